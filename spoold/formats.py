"""The result line formats of output.jsonl and errors.jsonl (OpenAI Batch output).

Output: `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error": null}` with the body exactly as vLLM's serving layer
produced it. Error: `{"id", "custom_id", "response": null, "error": {"code",
"message", "line"}}`. Both are one JSON object per line.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .records import EngineResult, LineError

#: Ids only need to be unique, not secret: a generator seeded once from the
#: OS is ~20x cheaper per line than a getrandom() call (secrets).
_random = random.Random()


def _new_id(prefix: str) -> str:
    return "%s_%024x" % (prefix, _random.getrandbits(96))


def output_line(line: int, custom_id: str, result: EngineResult) -> bytes:
    """One output.jsonl line for input line `line`; the engine's body JSON is embedded as-is.

    The id ends in the input line number (`batch_req_<16 hex>_<line>`): a
    restart reads it back to know which lines are done without keeping a
    set of custom_ids, and a person can find the request a result answers.
    """
    return (
        '{"id":"batch_req_%016x_%d","custom_id":%s,"response":{"status_code":%d,"request_id":"%s","body":%s},"error":null}\n'
        % (_random.getrandbits(64), line, json.dumps(custom_id), result.status_code, _new_id("req"), result.body_json)
    ).encode()


#: What `output_line` ids look like; group 1 is the input line number.
OUTPUT_ID = r"batch_req_[0-9a-f]{16}_([0-9]+)"


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
        """Lines with a durable answer, success or not."""
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
        """Count one engine result whose line is durable."""
        self.add(result.status_code, result.prompt_tokens, result.completion_tokens)

    def usage(self) -> dict[str, int]:
        """The tokens so far, shaped as the Batch object's `usage`."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }


def complete_lines(path: Path) -> Iterator[bytes]:
    """The complete lines of a finished job's results file (a missing file has none)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            if raw.endswith(b"\n"):
                yield raw
