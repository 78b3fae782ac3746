"""Putting a batch file into the inbox safely, and checking files before that.

`spoold submit` writes under a hidden temp name in the inbox, fsyncs, and
renames, so the daemon never sees half a file. `--model` rewrites every
line's `body.model`, replacing the hand-made scripts that fix model names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .config import LimitsSettings
from .durable import fsync_dir, hidden_temp, rename_noreplace, write_all
from .duplicates import DuplicateFinder
from .jobinput import InputRejected, check_contents, no_request_lines
from .readymarker import publish_with_metadata
from .records import LineError
from .spool import copy_name
from .validation import LineValidator, ModelResolver, Repeat, check_file


@dataclass
class Report:
    """The outcome of validating one file."""

    path: str
    lines: int = 0
    errors: list[LineError] = field(default_factory=list)
    #: why the daemon would fail the whole file without running a line (a gzip file, no request lines)
    refused: InputRejected | None = None

    @property
    def valid(self) -> int:
        """Lines that would run."""
        return self.lines - len(self.errors)


#: How many lines between two calls of a `progress` callback: often enough for a bar, rarely enough to cost nothing.
PROGRESS_EVERY_LINES = 4096

#: Told how many bytes of the file are done so far (a progress bar's update).
Progress = Callable[[int], None]


def validate_file(path: str, resolver: ModelResolver, limits: LimitsSettings,
                  force_model: str | None = None, progress: Progress | None = None,
                  context_tokens: Callable[[str], int] | None = None) -> Report:
    """Check a file as the daemon would (after a `--model` rewrite): the whole file first (`refused`:
    too big, compressed, no request lines), then every line. `progress` is told how far the check has
    read, now and then, so a large file is not minutes of silence. `context_tokens`: model → its
    context where configured (the daemon knows each once loaded), for lines that set no output limit."""
    report = Report(path)
    max_line_bytes, max_tokens = limits.max_line_bytes, limits.max_output_tokens_per_line
    def validator(finder: DuplicateFinder | None) -> LineValidator:
        return LineValidator(resolver, force_model, finder, max_tokens, allowed_media=limits.allowed_media_domains,
                             context_tokens=context_tokens)

    with open(path, "rb") as f:
        if not f.seekable():
            progress = None  # a pipe (`<(zcat x.gz)`, /dev/stdin) has no position to show
        try:
            check_contents(f, os.fstat(f.fileno()).st_size if f.seekable() else 0, limits.max_file_bytes)
        except InputRejected as e:
            report.refused = e
            return report
        for item in check_file(f, validator, max_line_bytes):
            if isinstance(item, Repeat):
                report.errors.append(item.error)
                continue
            report.lines += 1
            if isinstance(item, LineError):
                report.errors.append(item)
            if progress is not None and report.lines % PROGRESS_EVERY_LINES == 0:
                progress(f.tell())
    report.errors.sort(key=lambda e: e.line)
    if not report.lines:
        report.refused = no_request_lines()
    return report


def rewrite_models(f: IO[bytes], model: str, max_line_bytes: int) -> Iterator[bytes]:
    """`f` with every request line's `body.model` set to `model`, every other byte as it was.

    Blank lines, lines that are not requests and lines over `max_line_bytes`
    pass unchanged (an over-long one in pieces, never whole), so the line
    numbers the daemon reports are the numbers of the file you wrote.
    """
    limit = max_line_bytes + 1 if max_line_bytes else -1
    while raw := f.readline(limit):
        if limit > 0 and len(raw) == limit and not raw.endswith(b"\n"):
            yield raw  # too long to rewrite: the daemon reports it as line_too_long
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                yield rest
            yield rest
            continue
        yield _with_model(raw, model)


def _with_model(raw: bytes, model: str) -> bytes:
    try:
        obj = json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):  # a bad line goes in as it is, and gets its error from the daemon
        return raw
    if isinstance(obj, dict) and isinstance(obj.get("body"), dict):
        obj["body"]["model"] = model
        end = b"\r\n" if raw.endswith(b"\r\n") else b"\n" if raw.endswith(b"\n") else b""
        return json.dumps(obj, ensure_ascii=False).encode() + end
    return raw


def submit_file(path: str, inbox: Path, model: str | None = None, max_line_bytes: int = 0,
                metadata: dict[str, str] | None = None, progress: Progress | None = None) -> Path:
    """Copy a file into the inbox atomically; return its name there.

    An existing drop of the same name is never overwritten, not even one
    that appears while this copy is made: a numbered name is chosen instead.
    `metadata` (e.g. {"priority": "5"}) goes into the drop's `.ready`
    marker, made before the drop appears (readymarker). `progress` is told how much of the file is copied.
    """
    src = Path(path)
    with hidden_temp(inbox, src.name) as (fd, tmp):
        with open(src, "rb") as f:
            if not f.seekable():
                progress = None  # a pipe has no position to show
            if model:
                for n, piece in enumerate(rewrite_models(f, model, max_line_bytes), 1):
                    write_all(fd, piece)
                    if progress is not None and n % PROGRESS_EVERY_LINES == 0:
                        progress(f.tell())
            else:
                while chunk := f.read(1 << 20):
                    write_all(fd, chunk)
                    if progress is not None:
                        progress(f.tell())
    return publish_drop(tmp, inbox, src.name if src.name.endswith(".jsonl") else src.name + ".jsonl", metadata)


def publish_drop(tmp: Path, inbox: Path, name: str, metadata: dict[str, str] | None = None) -> Path:
    """Rename the finished hidden temp file `tmp` into `inbox` as `name` (a `.jsonl` name); return its path.

    An existing drop of the same name is never overwritten, not even one
    that appears meanwhile: `stem-2.jsonl`, `stem-3.jsonl`, ... is taken
    instead. `metadata` goes into the drop's `.ready` marker. On failure
    `tmp` is removed.
    """
    n = 1
    while True:
        dest = inbox / copy_name(name, n)
        try:
            if metadata:
                publish_with_metadata(tmp, dest, metadata)
            else:
                rename_noreplace(tmp, dest)
        except FileExistsError:
            n += 1
            continue
        except BaseException:
            os.unlink(tmp)
            raise
        fsync_dir(inbox)
        return dest
