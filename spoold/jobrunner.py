"""Running one claimed job from wherever it stands to the outbox.

A job may be fresh or half done by a daemon that crashed: the runner first
reads back what the result files already hold (cutting torn tails), then
validates the input once (writing an error line for each bad line), then
streams the remaining valid lines through the engine with a bounded number
in flight, and finally publishes the job with one rename. Every valid line
ends with exactly one result, however many times this is interrupted.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from .config import LimitsSettings
from .duplicates import DuplicateFinder
from .engine import Engine, EngineRequest
from .spool import JobDir, Spool, mark_failed, new_batch
from .validation import (LineError, LineValidator, ModelResolver, binary_kind, iter_lines, repeated_requests,
                         validate_stream)
from .writer import GroupCommitWriter, Recovered, recover_results

log = logging.getLogger(__name__)

#: Lines validated between yields to the event loop, so heartbeats and
#: signals are served while a big file is checked.
VALIDATION_CHUNK = 2000


#: How often the wait for the last requests in flight looks at the stop event.
DRAIN_POLL_SECONDS = 0.2

#: Finished results waiting for their fsync before dispatch pauses (at least
#: twice the requests in flight). A GPU finishes a few hundred lines between
#: two fsyncs; only a stalled disk reaches this.
MAX_PENDING_RESULTS = 4096


class EngineFailed(Exception):
    """The engine could not run a request at all (it died or broke).

    Nothing is written for that request: it runs again once the engine has
    been restarted, rather than turning every remaining line into an error.
    """


class InputRejected(Exception):
    """The job's input can never be processed (too big, not a regular file): it fails."""


class IncompleteJob(Exception):
    """Finalize found lines without a result; the job is left in processing/."""


@dataclass
class JobProgress:
    """What a job has durably done so far; read by heartbeats and status."""

    job_id: str
    input_file: str
    state: str = "validating"
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    done_at_start: int = 0
    last_progress_at: float = field(default_factory=time.time)
    done: int = 0
    completed: int = 0
    failed: int = 0
    output_tokens: int = 0
    inflight: int = 0
    completed_at_start: int = 0
    failed_at_start: int = 0

    def rate(self) -> float:
        """Durable lines per second since this daemon took the job up."""
        elapsed = time.monotonic() - self.started
        return (self.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0

    def tokens_rate(self) -> float:
        """Output tokens per second since this daemon took the job up."""
        elapsed = time.monotonic() - self.started
        return self.output_tokens / elapsed if elapsed > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The progress as plain data, for heartbeats and events."""
        eta = self.eta_seconds()
        return {
            "job": self.job_id, "input_file": self.input_file, "state": self.state,
            "total": self.total, "done": self.done, "completed": self.completed, "failed": self.failed,
            "inflight": self.inflight, "requests_per_second": round(self.rate(), 3),
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "last_progress_at": round(self.last_progress_at, 3),
        }

    def eta_seconds(self) -> float | None:
        """Seconds to the end at the current rate, or None when unknown."""
        rate = self.rate()
        if not self.total or rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)


def job_fields(job_id: str) -> dict[str, dict[str, str]]:
    """`extra=` for a log call about a job: a JOB_ID field in the journal."""
    return {"extra": {"JOB_ID": job_id}}


_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*"((?:[^"\\]|\\.)*)"')


def finished_id(raw: bytes) -> str | None:
    """A line's custom_id read without parsing the line, or None when unsure.

    Only trusted when `"custom_id"` occurs once in the line: then it is the
    top-level key (a string value followed by a colon can only be a key).
    """
    if raw.count(b'"custom_id"') != 1:
        return None
    m = _CUSTOM_ID.search(raw)
    if m is None:
        return None
    value = m.group(1)
    try:
        return json.loads(b'"' + value + b'"') if b"\\" in value else value.decode()
    except ValueError:
        return None


def next_model(batch: dict[str, Any]) -> str | None:
    """The model a validated job needs next; None when any will do (or it is not validated yet)."""
    done = batch.get("models_done", [])
    return next((m for m in batch.get("models", {}) if m not in done), None)


class JobRunner:
    """Runs one job to completion, or until asked to stop."""

    def __init__(self, spool: Spool, job: JobDir, engine: Engine, resolver: ModelResolver,
                 limits: LimitsSettings, inflight: int, stop: asyncio.Event,
                 on_validated: Callable[[JobProgress], None] | None = None) -> None:
        self.spool, self.job, self.engine = spool, job, engine
        self.resolver, self.limits, self.inflight_limit = resolver, limits, inflight
        self.stop = stop
        self.on_validated = on_validated
        self.batch: dict[str, Any] = job.read_batch() or new_batch(job.id, job.input.name, spool.settings.host_id)
        self.batch["host"] = spool.settings.host_id  # the host finishing it, after a takeover too
        self.progress = JobProgress(job.id, self.batch.get("input_file", ""), self.batch.get("status", "validating"))
        self._writer: GroupCommitWriter | None = None
        self._dispatch_started = 0.0

    async def run(self) -> str:
        """Process the job; return completed, failed, interrupted, or waiting (for its next model)."""
        if self.batch.get("status") == "completed":
            self.spool.move_to_outbox(self.job)
            return "completed"
        try:
            f = self._open_input()
        except InputRejected as e:
            return self._fail(str(e))
        # Any other OSError (EIO, ESTALE on NFS, a full disk) may pass: it
        # goes up to the daemon, which retries the job later.
        recovered = recover_results(self.job.output, self.job.errors)
        writer = GroupCommitWriter(self.job.output, self.job.errors, recovered.tally,
                                   self.spool.file_mode, self.spool.gid)
        self._writer = writer
        tally = recovered.tally
        self.progress.done = self.progress.done_at_start = tally.done
        self.progress.completed = self.progress.completed_at_start = tally.completed
        self.progress.failed = self.progress.failed_at_start = tally.failed
        commit_task = asyncio.create_task(writer.run(), name=f"commit:{self.job.id}")
        try:
            with f:
                return await self._run_phases(f, writer, recovered)
        finally:
            await self._settle_writer(writer, commit_task)

    def _open_input(self) -> IO[bytes]:
        """Open input.jsonl without following links; only a regular file is read."""
        try:
            fd = os.open(self.job.input, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InputRejected("input.jsonl is a symlink; it is never followed") from None
            raise
        f = os.fdopen(fd, "rb", buffering=1 << 20)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise InputRejected("input.jsonl is not a regular file")
        if self.limits.max_file_bytes and st.st_size > self.limits.max_file_bytes:
            f.close()
            raise InputRejected(f"file is {st.st_size} bytes, over [limits] max_file_bytes "
                                f"({self.limits.max_file_bytes})")
        kind = binary_kind(f.peek(16)[:16])
        if kind is not None:
            f.close()
            raise InputRejected(f"this is {kind}, not JSONL")
        return f

    async def _run_phases(self, f: IO[bytes], writer: GroupCommitWriter, recovered: Recovered) -> str:
        if self.batch["status"] == "validating":
            if not await self._validate(f, writer, recovered):
                return "interrupted"
            if self.batch["request_counts"]["total"] == 0:
                return self._fail("no request lines: the file is empty or only blank lines")
            f.seek(0)
        self.progress.state = "in_progress"
        self.progress.total = self.batch["request_counts"]["total"]
        if not await self._dispatch(f, writer, recovered):
            return "interrupted"
        self._note_load_error()
        if self._models_left():
            # Lines for other models remain: the daemon loads the next one
            # and runs this job again; finished lines are skipped as on resume.
            self.batch.setdefault("models_done", []).append(self.engine.model)
            self.spool.write_batch(self.job, self.batch)
            return "waiting"
        await self._finalize(writer)
        return "completed"

    def _models_left(self) -> list[str]:
        done = set(self.batch.get("models_done", [])) | {self.engine.model}
        return [m for m in self.batch.get("models", {}) if m not in done]

    def _note_load_error(self) -> None:
        """A model that failed to load answered its lines with 503s; batch.json says why."""
        reason = getattr(self.engine, "load_error", None)
        if reason and not any(e.get("model") == self.engine.model for e in self.batch["errors"]):
            self.batch["errors"].append({"code": "model_load_failed", "model": self.engine.model,
                                         "message": f"model {self.engine.model} could not be loaded: {reason}"})

    async def _validate(self, f: IO[bytes], writer: GroupCommitWriter, recovered: Recovered) -> bool:
        """Stream the file once: count lines, write an error for each bad one.

        Repeated custom_ids are known only at the end of the file; their
        errors are written then, after a short second read of the suspects.
        """
        total, first_valid, models = 0, None, {}
        with DuplicateFinder(self.job.path) as finder:
            validator = LineValidator(self.resolver, duplicates=finder)
            for item in validate_stream(f, validator, self.limits.max_line_bytes):
                total += 1
                if isinstance(item, LineError):
                    self._add_error(item, writer, recovered)
                else:
                    first_valid = first_valid or item
                    models[item.body["model"]] = models.get(item.body["model"], 0) + 1
                if total % VALIDATION_CHUNK == 0:
                    await asyncio.sleep(0)
                    if self.stop.is_set():
                        return False
            suspects = finder.suspects()
        if len(suspects):
            f.seek(0)
            for request, error in repeated_requests(f, suspects, LineValidator(self.resolver),
                                                    self.limits.max_line_bytes):
                models[request.body["model"]] -= 1
                self._add_error(error, writer, recovered)
        await writer.flush()
        now = int(time.time())
        self.batch.update(status="in_progress", in_progress_at=now,
                          endpoint=first_valid.url if first_valid else None,
                          model=first_valid.body["model"] if first_valid else self.resolver.served,
                          models={model: count for model, count in models.items() if count})
        self.batch["request_counts"]["total"] = total
        self.spool.write_batch(self.job, self.batch)
        log.info("job %s validated: %d lines, %d bad", self.job.id, total, writer.tally.failed,
                 **job_fields(self.job.id))
        self.progress.total = total
        self._sync_progress()
        if self.on_validated is not None:
            self.on_validated(self.progress)
        return True

    @staticmethod
    def _add_error(error: LineError, writer: GroupCommitWriter, recovered: Recovered) -> None:
        """Write a validation error, unless an earlier run of this pass already did."""
        if error.line not in recovered.error_lines:
            writer.add_error(error)
            recovered.error_lines.add(error.line)  # the dispatch pass skips it by number

    async def _dispatch(self, f: IO[bytes], writer: GroupCommitWriter, recovered: Recovered) -> bool:
        """Send every valid line without a result to the engine, `inflight` at a time.

        `inflight` workers share one iterator over the file; each takes the
        next line once its last request is answered. No task per line: with
        the instant engine double, making and scheduling one took a third of
        the time per line (55K -> 85K lines/s without).
        """
        self._dispatch_started = time.monotonic()
        lines = self._unfinished(f, writer, recovered)
        first = next(lines, None)
        if first is not None and self.progress.done_at_start:
            log.info("job %s resumed at line %d, %d lines already done (found in %.2fs)", self.job.id,
                     first.line, self.progress.done_at_start, time.monotonic() - self.progress.started,
                     **job_fields(self.job.id))
        lines = itertools.chain([first] if first is not None else [], lines)
        failure: list[BaseException] = []
        max_pending = max(MAX_PENDING_RESULTS, 2 * self.inflight_limit)
        workers = {asyncio.create_task(self._work(lines, writer, failure, max_pending))
                   for _ in range(self.inflight_limit)}
        await self._drain(workers, failure)
        for worker in workers:
            if not worker.cancelled() and worker.exception() is not None:
                raise worker.exception()  # reading the input failed (EIO, ESTALE): the daemon retries the job
        await writer.flush()
        if failure:
            raise EngineFailed(f"job {self.job.id}: the engine failed: {failure[0]!r}") from failure[0]
        return not self.stop.is_set()

    async def _drain(self, tasks: set[asyncio.Task], failure: list[BaseException]) -> None:
        """Wait for the workers to run out of lines; a stop or an engine failure cancels the rest.

        Watching the stop while waiting matters: a stuck request must not
        hold up a warm stop (its line simply runs again on the next start).
        """
        running = set(tasks)
        while running and not (self.stop.is_set() or failure):
            _, running = await asyncio.wait(running, timeout=DRAIN_POLL_SECONDS)
        for task in running:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _unfinished(self, f: IO[bytes], writer: GroupCommitWriter, recovered: Recovered) -> Iterator[EngineRequest]:
        """The valid lines that have no result yet, in file order.

        Lines with a result are skipped by number before any parse: a resume
        at 600K of 1M lines must not re-validate 600K lines. Every error of
        the validation pass is in `recovered.error_lines` by now, duplicates
        included, so this pass keeps no per-line state of its own.
        `recovered.done_ids` holds only results whose line number is not
        known (written before output ids carried it): those are matched by
        custom_id.
        """
        validator = LineValidator(self.resolver)
        for number, raw in iter_lines(f, self.limits.max_line_bytes):
            if number in recovered.error_lines or number in recovered.done_lines or raw is None:
                continue
            if recovered.done_ids and finished_id(raw) in recovered.done_ids:
                continue
            item = validator.check(number, raw)
            if isinstance(item, EngineRequest) and item.body["model"] != self.engine.model:
                continue  # another model's line: its own pass runs it
            if isinstance(item, LineError):
                # Its error line was lost (only a failing disk can do that):
                # write it again rather than leave the line without a result.
                writer.add_error(item)
                recovered.error_lines.add(number)
            elif item.custom_id not in recovered.done_ids:
                yield item

    async def _work(self, lines: Iterator[EngineRequest], writer: GroupCommitWriter,
                    failure: list[BaseException], max_pending: int) -> None:
        """One dispatch worker: take a line, wait for its answer, hand it to the writer; repeat.

        Sharing `lines` is safe: the generator never awaits, so one worker's
        next() ends before another's begins.
        """
        for count, item in enumerate(lines, 1):
            await writer.wait_pending_below(max_pending)
            if self.stop.is_set() or failure or writer.failure:
                return  # the line taken has no result yet: it runs on the next start
            self.progress.inflight += 1
            try:
                result = await self.engine.handle(item)
                writer.add_result(item.line, item.custom_id, result)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failure.append(e)
                return
            finally:
                self.progress.inflight -= 1
            if count % 256 == 0:
                await asyncio.sleep(0)  # an engine that answers at once must not starve the loop

    async def _finalize(self, writer: GroupCommitWriter) -> None:
        """Check every line has its result, write batch.json, publish to the outbox."""
        tally, total = writer.tally, self.batch["request_counts"]["total"]
        if tally.done != total:
            raise IncompleteJob(f"job {self.job.id}: {total} lines but {tally.done} results; left in processing/")
        self.progress.state = "finalizing"
        elapsed = max(time.monotonic() - self.progress.started, 1e-9)
        now = int(time.time())
        self.batch.update(status="completed", finalizing_at=now, completed_at=now,
                          usage=tally.usage())
        self.batch["request_counts"].update(completed=tally.completed, failed=tally.failed)
        self.batch["timings"] = {
            "seconds": round(elapsed, 3),
            "requests_per_second": round((tally.done - self.progress.done_at_start) / elapsed, 3),
            "output_tokens_per_second": round(tally.output_tokens / elapsed, 3),
            "resumed": self.progress.done_at_start > 0,
            **self._engine_timings(writer),
        }
        self.spool.write_batch(self.job, self.batch)
        self.spool.move_to_outbox(self.job)
        self.progress.state = "completed"
        log.info("job %s completed: %d ok, %d failed, %.1f req/s", self.job.id,
                 tally.completed, tally.failed, self.batch["timings"]["requests_per_second"],
                 **job_fields(self.job.id))

    def finish_cancelled(self) -> None:
        """`spoold cancel`: publish what is done so far as a cancelled job.

        Lines that had no result yet get none; batch.json counts what has
        one, and the job goes to the outbox like a finished one.
        """
        tally = self._writer.tally if self._writer else recover_results(self.job.output, self.job.errors).tally
        self.batch.update(status="cancelled", cancelled_at=int(time.time()), usage=tally.usage())
        self.batch["request_counts"].update(completed=tally.completed, failed=tally.failed)
        self.spool.write_batch(self.job, self.batch)
        self.spool.move_to_outbox(self.job)
        self.progress.state = "cancelled"
        log.info("job %s cancelled: %d of %d lines have a result", self.job.id, tally.done,
                 self.batch["request_counts"]["total"], **job_fields(self.job.id))

    def _engine_timings(self, writer: GroupCommitWriter) -> dict[str, float]:
        """The engine phase of this run: first dispatch to last durable result."""
        if writer.last_result_at is None:
            return {}
        return {
            "engine_seconds": round(writer.last_result_at - self._dispatch_started, 3),
            "first_result_seconds": round(writer.first_result_at - self._dispatch_started, 3),
        }

    async def _settle_writer(self, writer: GroupCommitWriter, commit_task: asyncio.Task) -> None:
        """Let committed lines land, then stop the commit task and close the files."""
        try:
            if writer.failure is None:
                await writer.flush()
        finally:
            commit_task.cancel()
            await asyncio.gather(commit_task, return_exceptions=True)
            writer.close()
            self._sync_progress()

    def _sync_progress(self) -> None:
        if self._writer is not None:
            tally = self._writer.tally
            self.progress.done, self.progress.completed = tally.done, tally.completed
            self.progress.failed, self.progress.output_tokens = tally.failed, tally.output_tokens

    def refresh(self) -> JobProgress:
        """Progress with the durable counts of this moment."""
        if self._writer is not None:
            before = self.progress.done
            self._sync_progress()
            if self.progress.done != before:
                self.progress.last_progress_at = time.time()
        return self.progress

    def _fail(self, reason: str) -> str:
        log.error("job %s failed: %s", self.job.id, reason, **job_fields(self.job.id))
        mark_failed(self.batch, reason)
        self.spool.write_batch(self.job, self.batch)
        self.spool.move_to_failed(self.job)
        self.progress.state = "failed"
        return "failed"
