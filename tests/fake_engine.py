"""A fast engine double for tests: answers like a chat completion, no model.

Selected the way production selects vLLM, by `[engine] adapter =
"tests.fake_engine:EchoEngine"`. Knobs come from `[engine.args]`:
`delay` (seconds per request), `load_delay` (seconds `start()` takes, like
loading a model), `fail_on` (a custom_id whose request raises EngineDead, as
a dead engine would; or a list: the Nth engine of the process dies on the
Nth custom_id, and engines past the list do not fail), `fail_all` (every request raises EngineDead: a broken
GPU rather than a poison line), `dies_when` (a path: once it exists, the
engine says it died, as vLLM's client does when its core process exits,
request or not), `hang_on` (a custom_id whose request never returns, as
a stuck engine would), `faulty_engines` (how many engines of a process
fail or hang that way; by default all, so a restart does not help),
`fail_load` (a model whose loading fails) and `fail_load_from` (engines of
a process from this one on fail to load), `server_error_on` (custom_ids
answered with a 503, as an overloaded server would) and `server_errors` (how
many times each of them is, before a 200; by default always).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from spoold.config import EngineSettings
from spoold.engine import EngineDead
from spoold.records import EngineRequest, EngineResult


_BODY = ('{"id": "chatcmpl-%d", "object": "chat.completion", "created": %d, "model": %s, "choices": '
         '[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "line %d"}}], '
         '"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}')


class EchoEngine:
    """Answers every request with a ChatCompletion-shaped body naming its line."""

    #: engines made in this process so far
    instances = 0

    def __init__(self, settings: EngineSettings) -> None:
        EchoEngine.instances += 1
        faulty = EchoEngine.instances <= int(settings.args.get("faulty_engines", 1 << 30))
        self.model = settings.model or "fake-model"
        self.max_model_len = settings.max_model_len  # `[engine] max_model_len`, as vLLM reports it
        self.delay = float(settings.args.get("delay", 0))
        fail_on = settings.args.get("fail_on")
        if isinstance(fail_on, list):
            fail_on = fail_on[EchoEngine.instances - 1] if EchoEngine.instances <= len(fail_on) else None
        self.fail_on = fail_on if faulty else None
        self.fail_all = bool(settings.args.get("fail_all")) and faulty
        self.dies_when = settings.args.get("dies_when") if faulty else None
        self.load_delay = float(settings.args.get("load_delay", 0))
        self.hang_on = settings.args.get("hang_on") if faulty else None
        self.fail_load = settings.args.get("fail_load")
        self.load_fails = EchoEngine.instances >= int(settings.args.get("fail_load_from", 1 << 30))
        self.server_error_on = set(settings.args.get("server_error_on", ()))
        self.server_errors = int(settings.args.get("server_errors", 1 << 30))
        #: custom_id -> requests for it so far (kept while server_error_on names some)
        self.tries: dict[str, int] = {}
        self.started = False
        self.closed = False
        self.handled = 0

    async def start(self) -> None:
        await asyncio.sleep(self.load_delay)
        if self.model == self.fail_load or self.load_fails:
            raise RuntimeError(f"cannot load {self.model}: no such checkpoint")
        self.started = True

    async def handle(self, request: EngineRequest) -> EngineResult:
        if self.delay:
            await asyncio.sleep(self.delay)
        if request.custom_id == self.fail_on or self.fail_all:
            raise EngineDead("engine died")
        if request.custom_id == self.hang_on:
            await asyncio.Event().wait()
        self.handled += 1
        if self.server_error_on:  # counted only then: a dict entry per line would grow the memory benchmarks
            self.tries[request.custom_id] = tries = self.tries.get(request.custom_id, 0) + 1
        if request.custom_id in self.server_error_on and tries <= self.server_errors:
            error = {"error": {"message": "the server is overloaded", "type": "ServiceUnavailableError",
                               "param": None, "code": 503}}
            return EngineResult(503, json.dumps(error))
        if request.body.get("max_tokens") == -1:
            error = {"error": {"message": "max_tokens must be at least 1", "type": "BadRequestError",
                               "param": "max_tokens", "code": 400}}
            return EngineResult(400, json.dumps(error))
        # Rendered from a template: the double must cost the benchmarks of
        # spoold's own write path as little as possible.
        body = _BODY % (request.line, int(time.time()), json.dumps(request.body["model"]), request.line)
        return EngineResult(200, body, 3, 2)

    def dead_reason(self) -> str | None:
        if self.dies_when and os.path.exists(self.dies_when):
            return "the engine double's process died"
        return None

    async def close(self) -> None:
        self.closed = True
