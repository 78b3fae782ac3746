"""Durable result files: group commit while running, recovery after a crash.

Results are appended as they finish. Everything that finished while the
previous fsync ran is written and fsynced together (one fsync per file per
group), and a line is counted only after its fsync returned: a count, an
event or a heartbeat never claims a line that a power cut could lose.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .durable import open_append, write_all
from .formats import OUTPUT_ID, Tally, error_line, output_line
from .lineset import LineSet
from .records import EngineResult, LineError, usage_tokens

log = logging.getLogger(__name__)


#: Bytes of finished result lines that may wait for their fsync before
#: dispatch pauses.
MAX_WAITING_BYTES = 64 * 1024 * 1024


class WriterFailed(Exception):
    """A write or fsync of a results file failed; nothing after it was counted."""


class JobLost(WriterFailed):
    """The job directory is no longer where this daemon opened it: another host took it over."""


class GroupCommitWriter:
    """Appends result lines to output.jsonl / errors.jsonl with group commit.

    Call `add_result` / `add_error` from the event loop, keep `run()` going
    as a task, and `await flush()` to wait until all added lines are durable.
    """

    def __init__(self, output: Path, errors: Path, tally: Tally, mode: int = 0o640, gid: int = -1) -> None:
        self.tally = tally
        self._paths = (output, errors)
        self._mode, self._gid = mode, gid
        self._fds: list[int | None] = [None, None]
        #: each file's size after its last successful fsync: what a failed commit is cut back to
        self._durable: list[int | None] = [None, None]
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._results: list[EngineResult] = []
        self._errors = 0
        self._added = self._committed = 0
        #: bytes of result lines added but not yet durable (backpressure counts them too)
        self._waiting_bytes = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self.failure: BaseException | None = None
        self.fsyncs = 0
        #: time.monotonic() after the first and the latest group with results became durable
        self.first_result_at: float | None = None
        self.last_result_at: float | None = None

    def add_result(self, line: int, custom_id: str, result: EngineResult) -> None:
        """Queue the engine's answer to input line `line` for output.jsonl."""
        record = output_line(line, custom_id, result)
        self._out.append(record)
        self._waiting_bytes += len(record)
        self._results.append(result)
        self._added += 1
        self._wake.set()

    def add_error(self, error: LineError) -> None:
        """Queue one line's error for errors.jsonl."""
        self._err.append(error_line(error))
        self._errors += 1
        self._added += 1
        self._wake.set()

    async def run(self) -> None:
        """Commit groups until cancelled; a failure (of any kind) is kept and wakes flushers."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            out, err, results, errors = self._out, self._err, self._results, self._errors
            self._out, self._err, self._results, self._errors = [], [], [], 0
            try:
                await asyncio.to_thread(self._commit, out, err)
            except JobLost as e:
                self.failure = e
                async with self._progress:
                    self._progress.notify_all()
                return
            except Exception as e:  # OSError, or a bug: either way flush() must not wait forever
                self.failure = WriterFailed(f"cannot write results: {e}")
                log.error("%s", self.failure, exc_info=not isinstance(e, OSError))
                async with self._progress:
                    self._progress.notify_all()
                return
            if results:
                self.last_result_at = time.monotonic()
                self.first_result_at = self.first_result_at or self.last_result_at
            for result in results:
                self.tally.add_result(result)
            self.tally.failed += errors
            self._committed += len(out) + len(err)
            self._waiting_bytes -= sum(map(len, out))
            async with self._progress:
                self._progress.notify_all()

    async def flush(self) -> None:
        """Return once every line added so far is fsynced; raise if that failed."""
        target = self._added
        async with self._progress:
            await self._progress.wait_for(lambda: self._committed >= target or self.failure)
        if self.failure:
            raise self.failure

    async def wait_pending_below(self, limit: int, limit_bytes: int | None = None) -> None:
        """Return once fewer than `limit` lines, and `limit_bytes` bytes, wait for their fsync
        (or the writer failed).

        Backpressure: a disk slower than the engine (an fsync stalled on
        NFS) must not let finished lines pile up in memory, however big
        each answer is (a large `n` with logprobs is megabytes).
        """
        def below() -> bool:
            return self._added - self._committed < limit and self._waiting_bytes < (limit_bytes or MAX_WAITING_BYTES)

        if below():
            return
        async with self._progress:
            await self._progress.wait_for(lambda: below() or self.failure)

    def _commit(self, out: list[bytes], err: list[bytes]) -> None:
        for index, lines in ((0, out), (1, err)):
            if not lines:
                continue
            fd = self._fd(index)
            self._check_owned(index, fd)
            try:
                write_all(fd, b"".join(lines))
                os.fsync(fd)
            except OSError:
                self._cut_back(index)
                raise
            self._durable[index] = os.fstat(fd).st_size
            self.fsyncs += 1

    def _check_owned(self, index: int, fd: int) -> None:
        """Refuse to write once the file's path no longer names the file we hold open.

        A daemon frozen past `[spool] claim_timeout` finds its job renamed
        into another host's directory; its open descriptors would still
        write there. Checked before every group, so after waking it adds
        nothing to a job that is no longer its own.
        """
        path = self._paths[index]
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise JobLost(f"{path} is gone from where this daemon opened it (taken over by another host?)")

    def _cut_back(self, index: int) -> None:
        """After a failed write or fsync, drop what may not be on disk.

        After a failed fsync the kernel may report the pages clean although
        they never reached the disk (PostgreSQL's "fsyncgate"): a later
        recovery must not read those lines back as finished. Best effort: if
        the disk refuses this too, recovery still cuts any torn tail.
        """
        fd, size = self._fds[index], self._durable[index]
        if fd is None or size is None:
            return
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as e:
            log.error("%s: cannot cut back to %d bytes after a failed write: %s", self._paths[index], size, e)

    def _fd(self, index: int) -> int:
        fd = self._fds[index]
        if fd is None:
            fd = self._fds[index] = open_append(self._paths[index], self._mode, self._gid)
            self._durable[index] = os.fstat(fd).st_size  # recovery fsynced what is there
        return fd

    def close(self) -> None:
        """Close the files; an error closing them is logged, not raised.

        What was committed was fsynced already, and an error that a network
        file system keeps for close() was reported by that fsync too.
        """
        for index, fd in enumerate(self._fds):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError as e:
                    log.warning("%s: error on close after its last fsync: %s", self._paths[index], e)
        self._fds = [None, None]


@dataclass
class Recovered:
    """What a job's result files already hold after a restart.

    Input lines with a result, one bit each, so a restart at 600K of 1M
    lines holds ~250 KB, not a set of 600K strings.
    """

    tally: Tally = field(default_factory=Tally)
    done_lines: LineSet = field(default_factory=LineSet)
    error_lines: LineSet = field(default_factory=LineSet)


def recover_results(output: Path, errors: Path) -> Recovered:
    """Cut torn tails off both files and read back what is already finished.

    A line is finished when it is complete and parses; the first line that
    does not (a write cut short by a crash) is cut off with everything after
    it, and those requests simply run again. An output line whose id names
    no input line (`batch_req_<hex>_<N>`) is not this job's result: it is
    left in place, and counted nowhere.
    """
    rec = Recovered()
    foreign = 0
    for line, _custom_id, status, prompt, completion in _read_complete(output, parse_output_line):
        if not line:
            foreign += 1
            continue
        rec.done_lines.add(line)
        rec.tally.add(status, prompt, completion)
    if foreign:
        log.warning("%s: %d output lines name no input line (not written by spoold); they are not counted",
                    output, foreign)
    for line in _read_complete(errors, _parse_error_line):
        rec.error_lines.add(line)
        rec.tally.failed += 1
    return rec


#: The start of every output line this module writes (formats.output_line),
#: for a custom_id without escapes.
_OUTPUT_PREFIX = re.compile(rb'\{"id":"' + OUTPUT_ID.encode() + rb'","custom_id":"([^"\\]*)","response":\{"status_code":(\d+),')
_LINE_IN_ID = re.compile(OUTPUT_ID)
#: chat's and completions' names, or the Responses API's
_USAGE = re.compile(rb'"(?:prompt|input)_tokens":\s*(\d+).*?"(?:completion|output)_tokens":\s*(\d+)', re.DOTALL)


def parse_output_line(raw: bytes) -> tuple[int, str, int, int, int]:
    """(input line or 0, custom_id, status, prompt tokens, completion tokens) of one output line.

    Matches our own fixed prefix and reads the token counts after the body's
    last `"usage"` key, instead of parsing the whole body: a restart after
    600K finished lines must find its place in well under 3 s. Anything
    unexpected gets a full parse, so only a line that really is broken
    raises (and is then cut off as torn).
    """
    m = _OUTPUT_PREFIX.match(raw)
    if m is None or not raw.endswith(b"}\n"):
        return _parse_output_record(json.loads(raw))
    usage_at = raw.rfind(b'"usage"')
    usage = _USAGE.search(raw, usage_at) if usage_at >= 0 else None
    tokens = (int(usage.group(1)), int(usage.group(2))) if usage else (0, 0)
    return int(m.group(1)), m.group(2).decode(), int(m.group(3)), *tokens


def _parse_output_record(record: dict) -> tuple[int, str, int, int, int]:
    response = record.get("response") or {}
    body = response.get("body")
    line = _LINE_IN_ID.fullmatch(str(record.get("id") or ""))
    return (int(line.group(1)) if line else 0, record["custom_id"], int(response.get("status_code") or 0),
            *usage_tokens(body.get("usage") if isinstance(body, dict) else None))


def _parse_error_line(raw: bytes) -> int:
    return int(json.loads(raw)["error"]["line"])


def _read_complete(path: Path, parse):
    """Yield parse(line) for each complete line of a results file, truncating it at the first torn one."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return
    with f:
        good = 0
        for raw in f:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("no newline")
                parsed = parse(raw)
            except (ValueError, KeyError, TypeError):
                break
            good += len(raw)
            yield parsed
        size = os.fstat(f.fileno()).st_size
        if size > good:
            log.warning("%s: cutting %d bytes of torn tail", path, size - good)
            f.truncate(good)
        # A crash may have left complete lines in the page cache only; they
        # are counted from now on, so they must be on disk first.
        os.fsync(f.fileno())
