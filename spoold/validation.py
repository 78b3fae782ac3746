"""Streaming validation of OpenAI-Batch JSONL, one line at a time.

A bad line never fails a job: it becomes one LineError naming its line
number and what is wrong, and the rest of the file goes on. Memory does not
grow with line count: repeated custom_ids are found by a DuplicateFinder,
which spills to disk, and confirmed by reading the few suspect lines again
(`repeated_requests`). Messages never quote prompt text.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from .duplicates import DuplicateFinder
from .media import may_name_media, refused_media
from .records import EngineRequest, LineError

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                  "/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank")


class ModelResolver:
    """Turns the `model` a line names into one of the configured models.

    `[models]` aliases map Ollama-style names (`qwen3:4b`) to Hugging Face
    ids or local paths; a line without `model` gets `[engine] model`. Only
    configured models are accepted, so a dropped file can never make the
    daemon fetch an arbitrary repository.
    """

    def __init__(self, aliases: dict[str, str], default_model: str) -> None:
        self.aliases = dict(aliases)
        self.known = set(aliases.values())
        self.served = self.aliases.get(default_model, default_model)
        if self.served:
            self.known.add(self.served)

    def resolve(self, name: Any) -> tuple[str | None, str]:
        """(resolved model, "") or (None, reason it cannot be served)."""
        if name is None:
            if not self.served:
                return None, "no `model` in the body and [engine] model is not set"
            return self.served, ""
        if not isinstance(name, str):
            return None, "`model` must be a string"
        resolved = self.aliases.get(name, name)
        if resolved not in self.known:
            names = ", ".join(sorted(self.aliases) + sorted(self.known - set(self.aliases)))
            return None, f"unknown model {name!r}; configured: {names or 'none'} (see [models])"
        return resolved, ""


#: Longer custom_ids are refused: they are keys, echoed in every result line.
MAX_CUSTOM_ID_CHARS = 1024

#: The first bytes of files that are often renamed `.jsonl` by mistake.
BINARY_MAGIC = {
    b"\x1f\x8b": "a gzip file (decompress it first: gunzip)",
    b"PK\x03\x04": "a zip file (unzip it first)",
    b"(\xb5/\xfd": "a zstd file (decompress it first: unzstd)",
    b"BZh": "a bzip2 file (decompress it first: bunzip2)",
    b"\xfd7zXZ\x00": "an xz file (decompress it first: unxz)",
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"%PDF-": "a PDF document",
    b"SQLite format 3\x00": "an SQLite database",
    b"PAR1": "a Parquet file (convert it to JSONL first)",
}


def binary_kind(head: bytes) -> str | None:
    """What kind of non-JSONL file starts with `head`, or None if it may be JSONL."""
    for magic, kind in BINARY_MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


class LineValidator:
    """Checks lines one by one; hands each custom_id to `duplicates` when given.

    Repeats are not known until the whole file has been read: see
    `repeated_requests`.
    """

    def __init__(self, resolver: ModelResolver, force_model: str | None = None,
                 duplicates: DuplicateFinder | None = None, max_output_tokens: int = 0,
                 endpoint: str | None = None, allowed_media: Iterable[str] = (),
                 context_tokens: Callable[[str], int] | None = None) -> None:
        self.resolver = resolver
        #: model → the tokens its context holds (0: not known), what a line that sets no output limit may ask
        self.context_tokens = context_tokens or (lambda model: 0)
        #: hosts media may be fetched from ([limits] allowed_media_domains); none: only data: URLs (media.py)
        self.allowed_media = frozenset(allowed_media)
        self.force_model = force_model  # what `spoold submit --model` will write
        self.duplicates = duplicates
        self.max_output_tokens = max_output_tokens  # [limits] max_output_tokens_per_line; 0 = none
        self.endpoint = endpoint  # an API batch's `endpoint`: every line's `url` must be it

    def check(self, line: int, raw: bytes) -> EngineRequest | LineError:
        """Validate one line on its own; the request has its `model` resolved."""
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError:
            return LineError(line, None, "invalid_json", "line is not valid UTF-8")
        except json.JSONDecodeError as e:
            return LineError(line, None, "invalid_json", f"not valid JSON: {e.msg} at column {e.colno}")
        except ValueError:  # e.g. an integer of more than 4300 digits
            return LineError(line, None, "invalid_json", "JSON value out of range")
        except RecursionError:
            return LineError(line, None, "invalid_json", "JSON nested too deeply")
        if not isinstance(obj, dict):
            return LineError(line, None, "not_an_object", f"line is a JSON {type(obj).__name__}, not an object")
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return LineError(line, None, "missing_custom_id", "`custom_id` is missing or not a non-empty string")
        if len(custom_id) > MAX_CUSTOM_ID_CHARS:
            return LineError(line, None, "custom_id_too_long",
                             f"`custom_id` is {len(custom_id)} characters, over {MAX_CUSTOM_ID_CHARS}")
        if self.duplicates is not None:
            # Every good custom_id counts, even on a line that fails a later
            # check: the id is taken, and a later line repeating it is a duplicate.
            self.duplicates.add(line, custom_id)
        checked = self._check_request(line, custom_id, obj)
        if isinstance(checked, EngineRequest) and may_name_media(raw):
            refused = refused_media(checked.body, self.allowed_media)
            if refused:
                return LineError(line, custom_id, "media_url_refused", refused)
        return checked

    def _check_request(self, line: int, custom_id: str, obj: dict[str, Any]) -> EngineRequest | LineError:
        if obj.get("method") != "POST":
            return LineError(line, custom_id, "invalid_method", f"`method` must be \"POST\", got {obj.get('method')!r}")
        url = obj.get("url")
        if url not in SUPPORTED_URLS:
            return LineError(line, custom_id, "unsupported_url", f"`url` {url!r} is not one of {', '.join(SUPPORTED_URLS)}")
        if self.endpoint is not None and url != self.endpoint:
            return LineError(line, custom_id, "url_mismatch", f"`url` {url!r} is not this batch's endpoint "
                                                             f"{self.endpoint!r}")
        body = obj.get("body")
        if not isinstance(body, dict):
            return LineError(line, custom_id, "invalid_body", "`body` must be a JSON object")
        if body.get("stream"):
            return LineError(line, custom_id, "stream_not_supported", "`stream` must be false in a batch")
        model, why = self.resolver.resolve(self.force_model or body.get("model"))
        if model is None:
            return LineError(line, custom_id, "unknown_model", why)
        body["model"] = model
        context = self.context_tokens(model)
        asked = output_tokens_asked(body, url, context)
        if self.max_output_tokens and asked > self.max_output_tokens:
            return LineError(line, custom_id, "too_many_output_tokens", _too_many(body, url, context, asked,
                                                                                  self.max_output_tokens))
        return EngineRequest(line, custom_id, url, body)


#: What bounds each generating endpoint's output per choice, as vLLM's serving layer reads it: the first
#: of these fields that is not null; none: the endpoint's default where it has one (completions: 16, as
#: OpenAI's), else the model's whole context (prompt and output share it).
OUTPUT_LIMITS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "/v1/chat/completions": (("max_completion_tokens", "max_tokens"), None),
    "/v1/completions": (("max_tokens",), 16),
    "/v1/responses": (("max_output_tokens",), None),
}


def output_limit(body: dict[str, Any], url: str) -> int | None:
    """The most tokens one choice of this request may have, as the line sets it; None: it sets none."""
    fields, default = OUTPUT_LIMITS.get(url, ((), None))
    for key in fields:
        if body.get(key) is not None:
            return max(1, whole_number(body[key], 1))  # one vLLM refuses: its 400 follows
    if default is not None and not any(key in body for key in fields):
        return default
    return None


def output_tokens_asked(body: dict[str, Any], url: str, context_tokens: int = 0) -> int:
    """How many tokens (and logprob entries) a request may make the engine produce and hold.

    `n` choices of `output_limit` tokens each (with no limit set, each may
    fill the model's context: `context_tokens`, where known), each token
    with its `top_logprobs` (chat) or `logprobs` (completions) alternatives.
    An embedding or a score makes none. Numbers count as vLLM reads them
    ("8" and 8.0 are 8 there); one it refuses counts as 1, and the line
    gets vLLM's own 400.
    """
    if url not in OUTPUT_LIMITS:
        return 0
    per_token = 1
    for key in ("top_logprobs", "logprobs"):
        if not isinstance(body.get(key), bool):  # chat's `logprobs` is a switch; its count is `top_logprobs`
            per_token += max(0, whole_number(body.get(key), 0))
    per_choice = output_limit(body, url) or context_tokens or 1
    return max(1, whole_number(body.get("n"), 1)) * per_choice * per_token


def _too_many(body: dict[str, Any], url: str, context_tokens: int, asked: int, limit: int) -> str:
    """The `too_many_output_tokens` message: the product, and what to set when the line set no limit."""
    field = OUTPUT_LIMITS[url][0][0]
    message = f"`n` x `{field}` x (1 + logprobs per token) is {asked} tokens, over [limits] " \
              f"max_output_tokens_per_line ({limit})"
    if output_limit(body, url) is None and context_tokens:
        message += f"; with no `{field}` set, each choice may fill the model's context of {context_tokens} " \
                   f"tokens: set `{field}`"
    return message


def whole_number(value: Any, missing: int = 0) -> int:
    """`value` as vLLM's request models read an integer; `missing` where it is none or not one."""
    if type(value) is int:
        return value
    if value is None:
        return missing
    return _lax_integer(value, missing)


def _lax_integer(value: Any, missing: int) -> int:
    """pydantic's lax reading of an integer ("8", 8.0, " 8_000 "), the one vLLM's request models use."""
    from pydantic import ValidationError

    try:
        return _integer_reader().validate_python(value)
    except ValidationError:
        return missing


@functools.cache
def _integer_reader() -> Any:
    """pydantic's integer reader, made on first need: `spoold submit` starts 0.2 s sooner without pydantic."""
    from pydantic import TypeAdapter

    return TypeAdapter(int)


UTF8_BOM = b"\xef\xbb\xbf"

#: What `iter_lines(ticks=True)` yields in place of a line after TICK_BYTES
#: were read without one (blank lines, or the rest of an over-long line).
TICK = b""

#: Bytes read without a line to yield before a tick: a few milliseconds of
#: blank lines, one chunk of an over-long line.
TICK_BYTES = 1 << 16

#: How much of an over-long line is read at a time while skipping it.
SKIP_CHUNK = 1 << 20


def iter_lines(f: IO[bytes], max_line_bytes: int, end: int | None = None,
               ticks: bool = False) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw line) for every non-blank line; raw is None when too long.

    A line over the limit is skipped in chunks, never held in memory whole.
    `end` bounds the read to that many bytes from where `f` stands (the
    length validated, so bytes appended later are never read). With
    `ticks`, (line number, TICK) comes after every TICK_BYTES read without a
    line to yield, so a caller on an event loop can yield to it however
    the file is made: a sparse terabyte, millions of blank lines, one
    endless line.
    """
    limit = max_line_bytes + 1 if max_line_bytes else -1
    number = pos = quiet = 0
    while True:
        raw = f.readline(_budget(limit, end, pos))
        if not raw:
            return
        pos += len(raw)
        number += 1
        if number == 1 and raw.startswith(UTF8_BOM):  # Windows tools write one
            raw = raw[len(UTF8_BOM):]
        if limit > 0 and len(raw) == limit and not raw.endswith(b"\n"):
            while rest := f.readline(_budget(SKIP_CHUNK, end, pos)):
                pos += len(rest)
                if rest.endswith(b"\n"):
                    break
                if ticks:
                    yield number, TICK
            quiet = 0
            yield number, None
        elif raw.strip():
            quiet = 0
            yield number, raw
        elif ticks:
            quiet += len(raw)
            if quiet >= TICK_BYTES:
                quiet = 0
                yield number, TICK


def _budget(limit: int, end: int | None, pos: int) -> int:
    """The most one readline may take: the line limit, and what is left before `end`."""
    if end is None:
        return limit
    left = end - pos
    if left <= 0:
        return 0
    return left if limit < 0 else min(limit, left)


def validate_stream(f: IO[bytes], validator: LineValidator, max_line_bytes: int, end: int | None = None,
                    ticks: bool = False) -> Iterator[EngineRequest | LineError | None]:
    """Every non-blank line of `f` as a request or a LineError, in order; None for a tick (see iter_lines)."""
    for number, raw in iter_lines(f, max_line_bytes, end, ticks):
        if raw is None:
            yield LineError(number, None, "line_too_long", f"line is longer than [limits] max_line_bytes ({max_line_bytes})")
        elif raw is TICK:
            yield None
        else:
            yield validator.check(number, raw)


def repeated_requests(f: IO[bytes], suspects, validator: LineValidator, max_line_bytes: int,
                      ticks: bool = False) -> Iterator[tuple[EngineRequest, LineError] | None]:
    """The lines that passed every check but repeat an earlier line's custom_id, each with its error.

    Reads `f` from the start up to the last of `suspects` (sorted line
    numbers from DuplicateFinder.suspects) and compares the custom_ids
    themselves, so a hash collision is never reported. `validator` must not
    have a DuplicateFinder. A repeat that failed another check already has
    that error and is not yielded. With `ticks`, None comes now and then
    while lines are skipped (see iter_lines).
    """
    wanted = iter(int(n) for n in suspects)
    next_line = next(wanted, None)
    first_seen: dict[str, int] = {}
    for number, raw in iter_lines(f, max_line_bytes, ticks=ticks):
        if next_line is None:
            return
        if raw is TICK:
            yield None
            continue
        if number < next_line:
            continue
        next_line = next(wanted, None)
        if raw is None:
            continue
        item = validator.check(number, raw)
        first = first_seen.setdefault(item.custom_id, number)
        if first != number and isinstance(item, EngineRequest):
            yield item, LineError(number, item.custom_id, "duplicate_custom_id",
                                  f"custom_id {item.custom_id!r} appears earlier in the file, on line {first}")


@dataclass(frozen=True, slots=True)
class Repeat:
    """A line that passed every check but repeats an earlier line's custom_id, with its error."""

    request: EngineRequest
    error: LineError


def check_file(f: IO[bytes], validator: Callable[[DuplicateFinder | None], LineValidator], max_line_bytes: int,
               end: int | None = None, spill_dir: str | os.PathLike | None = None,
               ticks: bool = False) -> Iterator[EngineRequest | LineError | Repeat | None]:
    """Every check the daemon makes on a file, in one pass plus a short second read of the repeats.

    Yields one EngineRequest or LineError per request line in file order,
    then a Repeat for each confirmed repeated custom_id (known only once the
    whole file is read). `validator(finder)` makes the LineValidator: with a
    DuplicateFinder for the first pass, with None for the second. With
    `ticks`, None comes now and then while lines are skipped (see iter_lines).
    Used by `spoold submit`/`validate`, the job runner and `bench-models`,
    so all three judge a file the same way. Close it (contextlib.closing)
    when it may be left part way.
    """
    with DuplicateFinder(spill_dir) as finder:
        yield from validate_stream(f, validator(finder), max_line_bytes, end, ticks=ticks)
        suspects = finder.suspects()
    if len(suspects):
        f.seek(0)
        for pair in repeated_requests(f, suspects, validator(None), max_line_bytes, ticks=ticks):
            yield None if pair is None else Repeat(*pair)


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """Open a file for reading only if it is a regular file, never through a symlink.

    OSError otherwise: ELOOP for a symlink, EINVAL (naming the path) for a
    FIFO, device or directory. O_NONBLOCK: opening a FIFO must not wait for
    a writer.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    f = os.fdopen(fd, "rb", buffering=1 << 20)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    return f


#: How much of a drop the scheduler's model peek reads, at most.
PEEK_BYTES = 64 * 1024


def first_model(path: str | os.PathLike, resolver: ModelResolver, lines: int = 20) -> str | None:
    """The model the first good line of a file asks for: a cheap peek to schedule it.

    Reads at most PEEK_BYTES, so an over-long first line or a sparse file
    costs no more than a small one. None when the file cannot be read (it
    is never opened if it is not a regular file) or its first lines name
    no configured model.
    """
    try:
        with open_regular(path) as f:
            head = f.read(PEEK_BYTES)
    except OSError:
        return None
    for raw in head.removeprefix(UTF8_BOM).split(b"\n")[:lines]:
        try:
            body = json.loads(raw).get("body")
            model, _ = resolver.resolve(body.get("model"))
        except (ValueError, AttributeError, RecursionError):
            continue
        if model is not None:
            return model
    return None
