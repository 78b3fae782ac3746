"""A job's input.jsonl, opened for a run: only a regular file with one name, never through a link.

A submitter chose what was renamed into the inbox, and may still hold a
descriptor to it: the runner reads it only through `open_input` (which
refuses a symlink, a device, a second hard link, a file over `[limits]
max_file_bytes`, a binary file, and one that changed since it was
validated) and checks with `check_unchanged` that nobody wrote to it while
the run read it. Each refusal is an `InputRejected` with the file-level code
batch.json records.

Imports only validation (open_regular, binary_kind).
"""

from __future__ import annotations

import errno
import os
from typing import IO, Any

from .validation import binary_kind, open_regular


class InputRejected(Exception):
    """The job's input can never be processed (too big, not a regular file): it fails.

    `code` is the file-level error code batch.json records (`too_big`,
    `binary`, `not_regular`, `input_changed`, and `empty_file`, known only
    once the whole file is read: `no_request_lines`).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def open_input(path: os.PathLike | str, max_file_bytes: int, validated: Any) -> tuple[IO[bytes], os.stat_result]:
    """input.jsonl opened for reading, and its stat at this moment; InputRejected if it may not be read.

    `validated` is batch.json's `input` (size and mtime when it was
    validated), or None before validation. Other OSErrors (EIO, ESTALE on
    NFS) pass: the daemon retries the job later.
    """
    try:
        f = open_regular(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputRejected("not_regular", "input.jsonl is a symlink; it is never followed") from None
        if e.errno == errno.EINVAL:
            raise InputRejected("not_regular", "input.jsonl is not a regular file") from None
        raise
    try:
        st = os.fstat(f.fileno())
        _check(st, validated)
        check_contents(f, st.st_size, max_file_bytes)
    except BaseException:
        f.close()
        raise
    return f, st


def check_unchanged(f: IO[bytes], opened: os.stat_result) -> None:
    """The input is still what this run opened: nobody wrote to it through a descriptor
    they held from before the claim. Checked after validation and before finalize."""
    st = os.fstat(f.fileno())
    if (st.st_size, st.st_mtime_ns) != (opened.st_size, opened.st_mtime_ns):
        raise InputRejected("input_changed", _changed(opened.st_size, st.st_size))


def no_request_lines() -> InputRejected:
    """The refusal of a file with no request lines (`empty_file`, OpenAI's code): known only once the
    whole file is read, by the runner's validation pass or `spoold validate`."""
    return InputRejected("empty_file", "no request lines: the file is empty or only blank lines")


def check_contents(f: IO[bytes], size: int, max_file_bytes: int) -> None:
    """InputRejected if a file of `size` bytes that starts as `f` does is one no job can run: over
    `[limits] max_file_bytes`, or a compressed or binary file. Reads nothing of `f` (it peeks), so
    `spoold validate` asks the same of a file, or a pipe, before checking its lines."""
    if max_file_bytes and size > max_file_bytes:
        raise InputRejected("too_big", f"file is {size} bytes, over [limits] max_file_bytes ({max_file_bytes})")
    kind = binary_kind(f.peek(16)[:16])
    if kind is not None:
        raise InputRejected("binary", f"this is {kind}, not JSONL")


def _check(st: os.stat_result, validated: Any) -> None:
    """Refuse an input with another name outside the spool, and one that changed since it was validated."""
    if st.st_nlink != 1:
        raise InputRejected("not_regular", f"input.jsonl has {st.st_nlink} hard links: another name "
                                           "for it is outside the spool; submit a file of its own")
    if isinstance(validated, dict) and (st.st_size, st.st_mtime_ns) != (validated.get("bytes"),
                                                                          validated.get("mtime_ns")):
        raise InputRejected("input_changed", _changed(validated.get("bytes"), st.st_size))


def _changed(validated: Any, now: int) -> str:
    return (f"input.jsonl changed after it was claimed ({validated} bytes when validated, {now} now): "
            "something still writes to it; submit it again once complete (rename it into the inbox, "
            "or mark it NAME.jsonl.ready). Results so far are kept with the failed job")
