"""vLLM's log lines, with the words of the requests taken out.

vLLM logs some oddities of a request while it serves it, and passes parts
of the request as the line's arguments: "Tool call %r has arguments that
are not valid JSON" names the tool call of a message, a grammar that fails
to compile is logged with the compiler's error, which quotes the grammar.
Under spoold those requests are lines of people's files, and nothing of
them may reach the journal. So the daemon gives vLLM a logging config of
its own (`vllm_logging.json`, beside this module: vLLM's own layout, at
INFO), whose one addition is `RequestWordsFilter` on vLLM's handler. vLLM
applies it in every process it starts (the engine core, its workers), as
it would `vllm serve --logging-config`.

The filter keeps a line and its place, and takes out what came from the
request: in a line logged by one of vLLM's request-path modules
(`REQUEST_LOGGERS`), every argument that is not a number becomes
`<redacted>`, and an exception keeps its type and traceback but not its
message. Lines about the engine itself (the model, memory, start and stop)
are vLLM's own words and stay as they are.

It also keeps a file from flooding the journal: a file whose every line
makes vLLM warn would write a journal line per line, and past journald's
rate limit the journal drops lines, the daemon's own among them. So each
kind of request-path line (its logger and format) is logged at most once
in `REPEAT_SECONDS`; the next one that is logged says how many were not.

An administrator who names a logging config of their own
(`VLLM_LOGGING_CONFIG_PATH`) or turns vLLM's off
(`VLLM_CONFIGURE_LOGGING=0`) keeps it, and the filter is theirs to add.
"""

from __future__ import annotations

import logging
import numbers
import os
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

#: What stands where a request's words were.
REDACTED = "<redacted>"

#: The logging config the daemon gives vLLM: vLLM's default layout, plus the filter.
CONFIG_FILE = Path(__file__).with_name("vllm_logging.json")

#: vLLM's loggers that log while serving a request, with parts of it among their arguments
#: (written against vLLM 0.32: its serving layer, chat rendering, parsers, media, grammars, detokenizer).
REQUEST_LOGGERS = ("vllm.entrypoints", "vllm.renderers", "vllm.tool_parsers", "vllm.reasoning", "vllm.parser",
                   "vllm.multimodal", "vllm.inputs", "vllm.tokenizers", "vllm.sampling_params",
                   "vllm.v1.structured_output", "vllm.v1.engine.input_processor", "vllm.v1.engine.detokenizer")

#: Each kind of request-path line is logged at most once in this many seconds.
REPEAT_SECONDS = 60.0

#: How many kinds are remembered: vLLM's format strings are far fewer, but a message vLLM formats
#: itself before logging is a kind of its own each time, and must not grow the table without end.
MAX_KINDS = 1000


class RequestWordsFilter(logging.Filter):
    """Takes the request's words out of every line a request-path logger of vLLM writes, and lets
    one line of each kind through in `repeat_seconds`; lines about the engine pass as they are."""

    def __init__(self, name: str = "", repeat_seconds: float = REPEAT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name)
        self._repeat_seconds, self._clock = repeat_seconds, clock
        self._kinds: dict[tuple[str, int, str], tuple[float, int]] = {}  # kind -> (last logged, not logged since)
        self._lock = threading.Lock()  # filters run before the handler's lock, in any thread

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_request_logger(record.name):
            return True
        redact(record)
        return self._due(record)

    def _due(self, record: logging.LogRecord) -> bool:
        """Whether this line's kind was last logged `repeat_seconds` ago or more; if so, with the count of
        those held back since."""
        kind, now = (record.name, record.levelno, record.msg), self._clock()
        with self._lock:
            last, held = self._kinds.get(kind, (None, 0))
            if last is not None and now - last < self._repeat_seconds:
                self._kinds[kind] = (last, held + 1)
                return False
            if len(self._kinds) >= MAX_KINDS:
                self._kinds.clear()
            self._kinds[kind] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {now - last:.0f} s, not logged)"
        return True


def is_request_logger(name: str) -> bool:
    """Whether logger `name` is one of vLLM's request-path loggers (or below one)."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in REQUEST_LOGGERS)


def redact(record: logging.LogRecord) -> None:
    """`record` with every argument that is not a number, and its exception's message, replaced by REDACTED.

    The message itself is vLLM's format string and stays, unless it is not a
    string (an exception or object logged as it is).
    """
    if not isinstance(record.msg, str):
        record.msg, record.args = REDACTED, ()
    elif isinstance(record.args, Mapping):  # `%(name)s` takes its values; a `%s` prints the keys too
        record.args = {key: _kept(value) for key, value in record.args.items()} if "%(" in record.msg else (REDACTED,)
    elif record.args:
        record.args = tuple(_kept(value) for value in record.args)
    if record.exc_info and record.exc_info[1] is not None:
        record.exc_text = _traceback_without_message(record.exc_info[1])
        record.exc_info = None


def _kept(value: Any) -> Any:
    """A number (a count, a length, a size) says nothing of what a request said; anything else might."""
    return value if value is None or isinstance(value, numbers.Number) else REDACTED


def _traceback_without_message(error: BaseException) -> str:
    """Where the exception was raised, and its type: enough to report a bug, with nothing of the request."""
    frames = "".join(traceback.format_tb(error.__traceback__))
    kind = type(error)
    return f"Traceback (most recent call last):\n{frames}{kind.__module__}.{kind.__qualname__}: {REDACTED}"


def config_file_for_vllm() -> Path | None:
    """The logging config file to give vLLM's engine; None where the administrator chose vLLM's logging."""
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") or os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        return None
    return CONFIG_FILE
