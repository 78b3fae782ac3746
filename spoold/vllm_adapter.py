"""The vLLM engine adapter: every line goes through vLLM's own OpenAI serving layer.

This is built the way `vllm run-batch` builds its engine (AsyncLLM plus the
serving objects from `init_app_state`), so response bodies and request
parameters (temperature, stop, seed, logprobs, response_format, ...) behave
exactly as under `vllm serve`. We take run-batch's request handling, not its
loop: run-batch reads the whole file and writes only at the end, while the
daemon streams lines in and results out.

All vLLM-version-specific glue (written against vllm 0.32) lives in this
module, and in `vllmlog`, which keeps the requests' words out of vLLM's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
from argparse import Namespace
from typing import Any

from .config import EngineSettings
from .engine import EngineDead
from .records import EngineRequest, EngineResult, usage_tokens
from .rpcdir import private_rpc_dir
from .vllmlog import config_file_for_vllm

log = logging.getLogger(__name__)

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
RESPONSES_URL = "/v1/responses"
#: vLLM's scoring endpoints, by every path `vllm serve` answers on (run-batch matches their ends)
SCORE_URLS = ("/v1/score", "/score")
RERANK_URLS = ("/v1/rerank", "/rerank", "/v2/rerank")


def build_vllm_args(settings: EngineSettings) -> Namespace:
    """vLLM's own argument namespace (as `vllm run-batch` would parse it) from `[engine]`.

    Starting from vLLM's parser keeps every front-end default vLLM expects;
    our settings and the free-form `[engine.args]` table are then set on it.
    """
    from vllm.entrypoints.launchers.run_batch import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="spoold"))
    args = parser.parse_args(["--model", settings.model, "-i", "-", "-o", "-"])
    ours: dict[str, Any] = {
        "served_model_name": [settings.model],
        "dtype": settings.dtype,
        "max_num_seqs": settings.max_num_seqs,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "enforce_eager": settings.enforce_eager,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "data_parallel_size": settings.data_parallel_size,
        # A dropped file must never make the daemon run code from a repository.
        "trust_remote_code": False,
        # Jobs running at once share the engine: each request's place in its
        # queue comes from spoold's fair share (window.py), not arrival order.
        "scheduling_policy": "priority",
    }
    if settings.max_model_len:
        ours["max_model_len"] = settings.max_model_len
    log_config = config_file_for_vllm()
    if log_config is not None:  # every process vLLM starts logs through it: the lines of people's files stay out
        from vllm.config.logging import LoggingConfig

        ours["logging_config"] = LoggingConfig(pylogging_config_file=str(log_config))
    for key, value in settings.args.items():
        name = key.replace("-", "_")
        if not hasattr(args, name):
            raise ValueError(f"[engine.args] {key}: not a vLLM engine argument")
        ours[name] = value
    for name, value in ours.items():
        setattr(args, name, value)
    return args


class VllmEngine:
    """vLLM in-process: AsyncLLM plus the serving layer's handlers for every endpoint the model has
    (chat, completions and responses for a generating model; embeddings, score and rerank for a pooling one)."""

    def __init__(self, settings: EngineSettings) -> None:
        if not settings.model:
            raise ValueError("[engine] model is not set: name a Hugging Face id or local path")
        self.model = settings.model
        self._settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._handlers: dict[str, Any] = {}
        self._client: Any = None
        self._by_priority = False
        #: the loaded model's context in tokens (vLLM's, from `max_model_len` or the model's own config)
        self.max_model_len = 0

    async def start(self) -> None:
        """Load the model and build vLLM's serving objects, as run-batch does."""
        from starlette.datastructures import State
        from vllm import envs
        from vllm.entrypoints.launchers.api_server.entry import (
            build_async_engine_client,
            init_app_state,
        )
        from vllm.usage.usage_lib import UsageContext

        args = build_vllm_args(self._settings)
        self._by_priority = args.scheduling_policy == "priority"
        self._stack.enter_context(private_rpc_dir())  # left after the engine's own shutdown: removed last
        client = await self._stack.enter_async_context(
            build_async_engine_client(args, usage_context=UsageContext.OPENAI_BATCH_RUNNER)
        )
        self._client = client
        self.max_model_len = client.model_config.max_model_len
        state = State()
        tasks = await client.get_supported_tasks()
        await init_app_state(client, state, args, tasks)
        self._handlers = _handlers_from_state(state)
        # Everything loaded so far lives as long as the engine: keep it out of
        # the collector's way, as vLLM's engine core does for its own heap.
        # Measured: ~14% less front-end CPU per request (README, Performance).
        gc.collect()
        gc.freeze()
        # vLLM reads its VLLM_* settings from the environment on every access
        # (several per request in the serving layer) until told they are
        # final, as its engine core does for itself once started.
        envs.enable_envs_cache()
        log.info("engine ready: model %s, context %d tokens, endpoints %s", self.model, self.max_model_len,
                 sorted(self._handlers))

    async def handle(self, request: EngineRequest) -> EngineResult:
        """Run one request through the serving layer; errors become 4xx/5xx results."""
        from vllm.entrypoints.serve import create_error_response

        entry = self._handlers.get(request.url)
        if request.body.get("stream"):
            response: Any = create_error_response("stream=true is not supported in a batch")
        elif entry is None:
            response = create_error_response(
                f"Model {self.model} does not support endpoint {request.url}"
            )
        else:
            request_type, handler = entry
            try:
                parsed = request_type.model_validate(_without_request_id(request.body))
                _check_integers(parsed)
                if self._by_priority:
                    parsed.priority = request.priority  # a submitter's `priority` never jumps the queue
                response = await handler(parsed)
                _raise_if_cancelled()
            except Exception as e:  # vLLM's own mapping of exceptions to HTTP errors
                self._raise_if_dead(e)
                response = create_error_response(e)
        result = _to_result(response)
        if result.status_code >= 500:
            self._raise_if_dead(None)
        return result

    def _raise_if_dead(self, error: BaseException | None) -> None:
        """A dead engine core is not the request's fault: no result line, run it again.

        vLLM turns EngineDeadError into a 500 response like any other error;
        written down, it would fail every remaining line of the job.
        """
        reason = self.dead_reason()
        if reason is not None:
            raise EngineDead(reason) from error

    def dead_reason(self) -> str | None:
        """Why the engine can run nothing more (its core process died), or None while it can.

        vLLM's own monitor thread marks the client dead the moment the core
        process exits, request or not, so an idle daemon can see it too.
        """
        if self._client is not None and self._client.errored:
            return f"the vLLM engine core died: {self._client.dead_error!r}"
        return None

    async def close(self) -> None:
        """Shut down the engine process and free its memory."""
        from vllm import envs

        self._handlers = {}
        self._client = None
        envs.disable_envs_cache()  # the next engine reads the environment afresh
        gc.unfreeze()
        await self._stack.aclose()
        # The serving objects hold the AsyncLLM; collect it now, while vLLM's
        # modules are alive, not in __del__ during interpreter teardown.
        gc.collect()


def _handlers_from_state(state: Any) -> dict[str, tuple[Any, Any]]:
    """url → (pydantic request type, coroutine handler), for the endpoints this model has.

    run-batch wires chat, embeddings, score and rerank; `openai_serving_completion`
    and `openai_serving_responses` are in the same state and give us
    /v1/completions and /v1/responses as `vllm serve` has them. The
    Responses store stays off (vLLM's default): a batch of 100K lines must
    not keep 100K responses in memory, and `store` is then ignored, as
    under `vllm serve`.
    """
    from pydantic import TypeAdapter
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
    from vllm.entrypoints.pooling.scoring.protocol import RerankRequest, ScoreRequest

    handlers: dict[str, tuple[Any, Any]] = {}
    chat = getattr(state, "openai_serving_chat", None)
    if chat is not None:
        handlers[CHAT_URL] = (ChatCompletionRequest, chat.create_chat_completion)
    completion = getattr(state, "openai_serving_completion", None)
    if completion is not None:
        handlers[COMPLETIONS_URL] = (CompletionRequest, completion.create_completion)
    responses = getattr(state, "openai_serving_responses", None)
    if responses is not None:
        handlers[RESPONSES_URL] = (ResponsesRequest, responses.create_responses)
    embedding = getattr(state, "serving_embedding", None)
    if embedding is not None:
        handlers[EMBEDDINGS_URL] = (_AdapterType(TypeAdapter(EmbeddingRequest)), embedding)
    scores = getattr(state, "serving_scores", None)
    if scores is not None:
        handlers.update({url: (_AdapterType(TypeAdapter(ScoreRequest)), scores) for url in SCORE_URLS})
        handlers.update({url: (RerankRequest, scores) for url in RERANK_URLS})
    return handlers


class _AdapterType:
    """Gives a TypeAdapter the `model_validate` name the pydantic models have."""

    def __init__(self, adapter: Any) -> None:
        self._adapter = adapter

    def model_validate(self, value: Any) -> Any:
        return self._adapter.validate_python(value)


#: The integers a request can carry to vLLM's engine core: it is sent there as MessagePack, 64 bits at most.
ENGINE_INTEGERS = range(-2 ** 63, 2 ** 64)


def _check_integers(parsed: Any) -> None:
    """Refuse a request holding an integer the engine core cannot be sent, as vLLM refuses a bad parameter (400).

    vLLM checks this range for `vllm_xargs` only. Elsewhere (`top_k`, even
    written as a string) the request fails in the transport as a 500 with
    no message, which spoold would retry, and stays registered in vLLM's
    output processor for the engine's life: a file of such lines is a leak.
    """
    from vllm.exceptions import VLLMValidationError

    field = _field_beyond_the_engine(parsed)
    if field is not None:
        raise VLLMValidationError(f"`{field}` holds an integer outside {ENGINE_INTEGERS.start}.."
                                  f"{ENGINE_INTEGERS.stop - 1}, more than vLLM can send to its engine",
                                  parameter=field)


def _field_beyond_the_engine(parsed: Any) -> str | None:
    """The field of a parsed request that holds an integer outside ENGINE_INTEGERS, or None.

    It runs for every line, so it is written for speed: the fields that are
    None, text or a plain number are passed over at once (7 us a request).
    """
    from pydantic import BaseModel

    if not isinstance(parsed, BaseModel):
        return None
    for name, value in parsed.__dict__.items():
        kind = type(value)
        if kind is int:
            if value not in ENGINE_INTEGERS:
                return name
        elif value and kind not in _PLAIN and _holds_integer_beyond_the_engine(value):
            return name
    return None


#: Values that hold no integer to look for (bool is an int, but a small one).
_PLAIN = frozenset({str, float, bool, type(None)})


def _holds_integer_beyond_the_engine(value: Any) -> bool:
    """Whether a list, table or model holds, at any depth, an integer outside ENGINE_INTEGERS."""
    from pydantic import BaseModel

    items = [value]
    while items:
        item = items.pop()
        kind = type(item)
        if kind in _PLAIN:
            continue
        if kind is int:
            if item not in ENGINE_INTEGERS:
                return True
        elif kind is list or kind is tuple:
            items.extend(item)
        elif kind is dict:
            items.extend(item.values())
        elif isinstance(item, BaseModel):
            items.extend(item.__dict__.values())
    return False


def _without_request_id(body: dict[str, Any]) -> dict[str, Any]:
    """`body` without vLLM's `request_id` extension, so the request's id is vLLM's own random one.

    vLLM's log lines name a request by its id; one a submitter chose would
    put their words in the journal (and, with a newline, lines of their own).
    OpenAI's API takes no such field: a response's id is the server's.
    """
    if "request_id" not in body:
        return body
    return {key: value for key, value in body.items() if key != "request_id"}


def _raise_if_cancelled() -> None:
    """Go on with a cancel the serving layer swallowed: a cancelled request is never a result.

    vLLM's handlers answer a cancel with a 400 "Client disconnected" (an HTTP
    client that left gets no reply anyway); here the cancel is spoold's own
    (the engine died, or a cold stop), and that 400 written down would be a
    finished line that never ran. The line must run again instead.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _to_result(response: Any) -> EngineResult:
    """Turn whatever a serving handler returned into an EngineResult."""
    from starlette.responses import JSONResponse
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(response, ErrorResponse):
        return EngineResult(response.error.code, response.model_dump_json())
    if isinstance(response, JSONResponse):
        body = bytes(response.body).decode()
        return EngineResult(response.status_code, body, *usage_tokens(json.loads(body).get("usage")))
    if hasattr(response, "model_dump_json"):
        usage = getattr(response, "usage", None)
        usage = usage.model_dump() if usage is not None else None
        return EngineResult(200, response.model_dump_json(), *usage_tokens(usage))
    error = {"error": {"message": f"unexpected response type {type(response).__name__}",
                       "type": "InternalServerError", "param": None, "code": 500}}
    return EngineResult(500, json.dumps(error))
