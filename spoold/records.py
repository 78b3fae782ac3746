"""The records every stage passes on: a request for the engine, its result, a line's error.

A leaf module with no imports of spoold (nor numpy, nor vLLM): the write
path (formats, writer) needs these and nothing of validation or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One validated input line, ready for the engine."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]
    #: its place in the engine's queue, lower first (window.py); spoold's own, never the submitter's
    priority: int = 0


@dataclass(frozen=True, slots=True)
class EngineResult:
    """What the engine answered for one request.

    `body_json` is the response body already serialised by the serving
    layer, so it is written as-is without a second round of JSON encoding.
    A 4xx/5xx answer is a result too (status_code says so), not an exception.
    """

    status_code: int
    body_json: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class LineError:
    """Why one input line cannot be run; becomes one line of errors.jsonl."""

    line: int
    custom_id: str | None
    code: str
    message: str


def usage_tokens(usage: Any) -> tuple[int, int]:
    """(input, output) tokens of a response body's `usage`: chat's and completions' names
    (prompt_tokens, completion_tokens) or the Responses API's (input_tokens, output_tokens)."""
    if not isinstance(usage, dict):
        return 0, 0
    return (int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0),
            int(usage.get("completion_tokens") or usage.get("output_tokens") or 0))
