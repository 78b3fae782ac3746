"""The result line formats of output.jsonl and errors.jsonl (OpenAI Batch output).

Output: `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error": null}` with the body exactly as vLLM's serving layer
produced it. Error: `{"id", "custom_id", "response": null, "error": {"code",
"message", "line"}}`. Both are one JSON object per line.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from .engine import EngineResult
from .validation import LineError


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def output_line(custom_id: str, result: EngineResult) -> bytes:
    """One output.jsonl line; the engine's body JSON is embedded as-is."""
    return (
        '{"id":"%s","custom_id":%s,"response":{"status_code":%d,"request_id":"%s","body":%s},"error":null}\n'
        % (_new_id("batch_req"), json.dumps(custom_id), result.status_code, _new_id("req"), result.body_json)
    ).encode()


def error_line(error: LineError) -> bytes:
    """One errors.jsonl line for a line that could not be run."""
    record = {
        "id": _new_id("batch_req"),
        "custom_id": error.custom_id,
        "response": None,
        "error": {"code": error.code, "message": error.message, "line": error.line},
    }
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


@dataclass
class Tally:
    """Durable results so far: what batch.json's counts and usage say."""

    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def done(self) -> int:
        return self.completed + self.failed

    def add(self, status_code: int, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one durable output line: 2xx is completed, anything else failed."""
        if 200 <= status_code < 300:
            self.completed += 1
        else:
            self.failed += 1
        self.input_tokens += prompt_tokens
        self.output_tokens += completion_tokens

    def add_result(self, result: EngineResult) -> None:
        self.add(result.status_code, result.prompt_tokens, result.completion_tokens)

    def usage(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }
