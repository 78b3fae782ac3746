"""Putting a batch file into the inbox safely, and checking files before that.

`spoold submit` writes under a hidden temp name in the inbox, fsyncs, and
renames, so the daemon never sees half a file. `--model` rewrites every
line's `body.model`, replacing the hand-made scripts that fix model names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .durable import fsync_dir, hidden_temp, write_all
from .duplicates import DuplicateFinder
from .validation import LineError, LineValidator, ModelResolver, iter_lines, repeated_requests, validate_stream


@dataclass
class Report:
    """The outcome of validating one file."""

    path: str
    lines: int = 0
    errors: list[LineError] = field(default_factory=list)

    @property
    def valid(self) -> int:
        return self.lines - len(self.errors)


def validate_file(path: str, resolver: ModelResolver, max_line_bytes: int,
                  force_model: str | None = None) -> Report:
    """Check every line of a file as the daemon would (after a `--model` rewrite)."""
    report = Report(path)
    with open(path, "rb") as f, DuplicateFinder() as finder:
        for item in validate_stream(f, LineValidator(resolver, force_model, finder), max_line_bytes):
            report.lines += 1
            if isinstance(item, LineError):
                report.errors.append(item)
        suspects = finder.suspects()
        if len(suspects):
            f.seek(0)
            repeats = repeated_requests(f, suspects, LineValidator(resolver, force_model), max_line_bytes)
            report.errors.extend(error for _, error in repeats)
            report.errors.sort(key=lambda e: e.line)
    return report


def rewrite_models(lines: Iterator[tuple[int, bytes | None]], model: str) -> Iterator[bytes]:
    """The lines with `body.model` set to `model`; lines that are not requests pass unchanged."""
    for _, raw in lines:
        if raw is None:
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            yield raw if raw.endswith(b"\n") else raw + b"\n"
            continue
        if isinstance(obj, dict) and isinstance(obj.get("body"), dict):
            obj["body"]["model"] = model
            raw = json.dumps(obj, ensure_ascii=False).encode()
        yield raw if raw.endswith(b"\n") else raw + b"\n"


def submit_file(path: str, inbox: Path, model: str | None = None, max_line_bytes: int = 0) -> Path:
    """Copy a file into the inbox atomically; return its name there.

    An existing drop of the same name is never overwritten: a numbered
    name is chosen instead.
    """
    src = Path(path)
    with hidden_temp(inbox, src.name) as (fd, tmp):
        with open(src, "rb") as f:
            if model:
                for line in rewrite_models(iter_lines(f, max_line_bytes), model):
                    write_all(fd, line)
            else:
                while chunk := f.read(1 << 20):
                    write_all(fd, chunk)
    dest = _free_name(inbox, src.name if src.name.endswith(".jsonl") else src.name + ".jsonl")
    os.rename(tmp, dest)
    fsync_dir(inbox)
    return dest


def _free_name(inbox: Path, name: str) -> Path:
    dest = inbox / name
    stem = name.removesuffix(".jsonl")
    n = 1
    while dest.exists():
        n += 1
        dest = inbox / f"{stem}-{n}.jsonl"
    return dest
