"""What the daemon needs from an inference engine, and how one is chosen.

The engine is picked by an import path (`[engine] adapter`), the way gunicorn
picks a worker class: the product ships the vLLM adapter, and tests pass a
fast double from `tests/` the same way. Nothing here imports vLLM.
"""

from __future__ import annotations

import importlib
import json
from typing import Protocol

from .config import EngineSettings
from .records import EngineRequest, EngineResult


class Engine(Protocol):
    """An engine the daemon can start, send requests to and close."""

    #: The model id this engine serves (what `body.model` must resolve to).
    model: str

    async def start(self) -> None:
        """Load the model; return when requests can be served."""

    async def handle(self, request: EngineRequest) -> EngineResult:
        """Answer one request. Raising means the request could not be run at all."""

    async def close(self) -> None:
        """Release the engine and whatever memory it holds."""

    # Optional: `dead_reason() -> str | None`, why the engine can run nothing
    # more (its process died) or None while it can. An engine that has it is
    # replaced as soon as it dies, even with no request in flight.
    #
    # Optional: `max_model_len: int`, the tokens the loaded model's context
    # holds (prompt and output together; 0 while not known). A line that sets
    # no output limit may ask for that many per choice, and is held to
    # `[limits] max_output_tokens_per_line` by it.


class EngineDead(Exception):
    """The engine can run no request at all: its process died, or `handle` broke.

    Raised by `handle` (the adapter saw the engine die), and by the job
    runner for any exception out of `handle`. Nothing is written for such a
    request; the daemon starts a fresh engine and the request runs again.
    """


class UnavailableEngine:
    """Stands in for a model that failed to load: each of its lines gets a 503 result.

    The daemon keeps serving the other models; the job's batch.json names
    the model and why it failed. The next job for that model tries to load
    it again.
    """

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.load_error = reason

    async def start(self) -> None:
        """Nothing to start: the model failed to load."""
        return None

    async def handle(self, request: EngineRequest) -> EngineResult:
        """A 503 result naming the load error: each line is answered, none lost, and a retry can run it."""
        error = {"error": {"message": f"model {self.model} could not be loaded: {self.load_error}",
                           "type": "ModelLoadError", "param": "model", "code": 503}}
        return EngineResult(503, json.dumps(error))

    async def close(self) -> None:
        """Nothing to close."""
        return None


class EngineLoadError(Exception):
    """The adapter named in the config cannot be imported or built."""


def load_engine(settings: EngineSettings) -> Engine:
    """Build the engine named by `[engine] adapter` ("module:Class")."""
    module_name, _, attr = settings.adapter.partition(":")
    if not module_name or not attr:
        raise EngineLoadError(
            f"[engine] adapter {settings.adapter!r}: expected 'module:Class'"
        )
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise EngineLoadError(f"[engine] adapter {settings.adapter!r}: {e}") from e
    return cls(settings)
