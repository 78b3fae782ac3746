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
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from .backoff import RetryPolicy
from .config import LimitsSettings
from .dispatch import Dispatch, EngineLost
from .duplicates import DuplicateFinder
from .durable import finish_in_thread
from .engine import Engine, EngineDead
from .groups import Groups, group_of
from .jobinput import InputRejected, check_unchanged, no_request_lines, open_input
from .jobrecord import JobRecord
from .lifecycle import JobStatus, Outcome
from .names import display_name
from .progress import JobProgress
from .records import EngineRequest, LineError
from .spool import JobDir, Spool, cancel_asked_at
from .validation import TICK, LineValidator, ModelResolver, Repeat, check_file, iter_lines
from .window import Share
from .writer import GroupCommitWriter, Recovered, recover_results

log = logging.getLogger(__name__)

#: The fewest engine deaths a line may be in flight at before it gets an
#: `engine_crashed` error instead of another run, whatever `[engine]
#: max_attempts` says: one death takes every line in flight with it (up to
#: 2,048 innocent ones), so one more run is always owed to them.
MIN_CRASHES_PER_LINE = 2

#: After an engine death, the lines it had in flight run again this many at
#: a time, before the rest: a second death then names at most this many.
SUSPECT_WINDOW = 8

#: The longest a pass over the input runs without yielding to the event
#: loop, so heartbeats, signals and watchdog pings are served however the
#: file is made (huge lines, millions of blank ones).
YIELD_SECONDS = 0.05


#: How often a running job looks for its cancel marker (`spoold cancel`).
CANCEL_POLL_SECONDS = 0.2
#: `batch_expired` errors written between two flushes when a batch expires.
EXPIRED_FLUSH_LINES = 8192


class IncompleteJob(Exception):
    """Finalize found lines without a result; the job is left in processing/."""


def job_fields(job_id: str) -> dict[str, dict[str, str]]:
    """`extra=` for a log call about a job: a JOB_ID field in the journal."""
    return {"extra": {"JOB_ID": job_id}}


class JobRunner:
    """Runs one job to completion, or until asked to stop."""

    def __init__(self, spool: Spool, job: JobDir, engine: Engine, resolver: ModelResolver,
                 limits: LimitsSettings, share: Share, stop: asyncio.Event,
                 on_validated: Callable[[JobProgress], None] | None = None,
                 record: tuple[JobRecord | None, str | None] | None = None,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        """`share`: this run's part of the engine's in-flight window (other jobs may run beside
        it); `record`: the job's record as the daemon just read it (read here when not given);
        `retry`: how often a line the engine failed on is tried ([engine] max_attempts)."""
        self.spool, self.job, self.engine = spool, job, engine
        self.retry = retry
        #: engine deaths a line may be in flight at before it gets `engine_crashed`
        self.max_crashes = max(MIN_CRASHES_PER_LINE, retry.max_attempts)
        self.resolver, self.limits, self.share = resolver, limits, share
        self.stop = stop
        self.on_validated = on_validated
        loaded, self._bad_record = record if record is not None else job.read_record()
        self.record = loaded or JobRecord(job.id, _name_in(job.read_batch()), spool.settings.host_id)
        self.record.id = job.id  # the directory's name is the job's id, whatever a record says
        self.record.host = spool.settings.host_id  # the host finishing it, after a takeover too
        # Another host may have written this record: its name is shown only in display form.
        part = self.record.part_of()
        self.progress = JobProgress(job.id, display_name(self.record.input_file), self.record.status,
                                    group=part[0] if part else None)
        self._input: os.stat_result | None = None
        self.groups = Groups(spool)
        #: the group this run's part completed, assembled and published (None: not a part, or not the last)
        self.assembled: JobDir | None = None
        self._writer: GroupCommitWriter | None = None
        self._dispatch_started = 0.0
        #: the window passed: the run stops, and its unfinished lines get `batch_expired`
        self._expiring = False

    async def run(self) -> Outcome:
        """Process the job until it is done, fails, is cancelled or expires, waits for its next model or is stopped.

        A cancel (`spoold cancel` leaves a marker in the job) is noticed here,
        while the job runs or before it starts: the job stops and what is
        done is published as a cancelled job. So is the end of an API
        batch's window (`expires_at`), once its lines are validated: every
        line without a result then gets a `batch_expired` error.
        """
        if self.job.cancel_request.exists():
            return await self._finish_cancelled()
        watch = asyncio.create_task(self._watch_for_cancel(), name=f"cancel:{self.job.id}")
        try:
            outcome = await self._run()
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        if outcome is Outcome.INTERRUPTED and self.job.cancel_request.exists():
            return await self._finish_cancelled()
        if outcome is Outcome.INTERRUPTED and self._expiring:
            return await self._finish_expired()
        return outcome

    async def _watch_for_cancel(self) -> None:
        split_batch = group_of(self.job.id)
        while not self.job.cancel_request.exists() and not self._expiry_due():
            if self.spool.owner_cancel_asked(self.job.id):  # from the inbox: made the job's own if its owner's
                await finish_in_thread(self.spool.take_owner_cancel, self.job)
            if split_batch and self.spool.owner_cancel_asked(split_batch):  # the whole batch's, this part's too
                await finish_in_thread(self.groups.take_owner_cancel, split_batch)
            await asyncio.sleep(CANCEL_POLL_SECONDS)
        self.stop.set()  # this run's stop: what is in flight settles, then run() cancels or expires the job

    def _expiry_due(self) -> bool:
        """The batch's window has passed and its lines are validated (so each unfinished one is known)."""
        if self.record.status == JobStatus.IN_PROGRESS and self.record.expired():
            self._expiring = True
        return self._expiring

    async def _run(self) -> Outcome:
        status = self.record.status
        if self.groups.was_split(self.job):  # a crash came between its split's commit and its removal
            await finish_in_thread(self.groups.remove_original, self.job)
            return Outcome.SPLIT
        if status in (JobStatus.COMPLETED, JobStatus.EXPIRED):  # finished, but a crash cut its move short
            await self._move_out()
            self.progress.state = status
            return Outcome(status.value)
        if status == JobStatus.FAILED:  # a failure cut short before its move: finish it, unread
            await self._move_out()
            self.progress.state = JobStatus.FAILED
            return Outcome.FAILED
        problem = self._record_problem()
        if problem:
            return await self._fail(problem, "bad_record")
        try:
            f = self._open_input()
        except InputRejected as e:
            return await self._fail(str(e), e.code)
        # Any other OSError (EIO, ESTALE on NFS, a full disk) may pass: it
        # goes up to the daemon, which retries the job later.
        recovered = recover_results(self.job.output, self.job.errors)
        tally = recovered.tally
        self.progress.done = self.progress.done_at_start = tally.done
        self.progress.completed = self.progress.completed_at_start = tally.completed
        self.progress.failed = self.progress.failed_at_start = tally.failed
        writer, commit_task = self._start_writer(recovered)
        try:
            with f:
                return await self._run_phases(f, writer, recovered)
        finally:
            await self._settle_writer(writer, commit_task)

    def _start_writer(self, recovered: Recovered) -> tuple[GroupCommitWriter, asyncio.Task]:
        """The job's group-commit writer, going on from what is on disk, and the task that commits for it."""
        writer = GroupCommitWriter(self.job.output, self.job.errors, recovered.tally,
                                   self.spool.file_mode, self.spool.gid)
        self._writer = writer
        return writer, asyncio.create_task(writer.run(), name=f"commit:{self.job.id}")

    def _validator(self, duplicates: DuplicateFinder | None = None) -> LineValidator:
        # An API batch names its endpoint up front (as OpenAI's does); a drop's lines may mix them.
        endpoint = self.record.endpoint if self.record.input_file_id is not None else None
        return LineValidator(self.resolver, duplicates=duplicates, endpoint=endpoint,
                             max_output_tokens=self.limits.max_output_tokens_per_line,
                             allowed_media=self.limits.allowed_media_domains, context_tokens=self._context_tokens)

    def _context_tokens(self, model: str) -> int:
        """The tokens `model`'s context holds, where the loaded engine is that model's (0 otherwise).

        A line for another model of a mixed file is checked again, against
        its own engine's context, when that model is loaded and it runs.
        """
        return getattr(self.engine, "max_model_len", 0) if model == self.engine.model else 0

    def _open_input(self) -> IO[bytes]:
        """input.jsonl, opened as jobinput.open_input allows; its stat at opening is kept for the checks after."""
        f, self._input = open_input(self.job.input, self.limits.max_file_bytes, self.record.input)
        return f

    def _record_problem(self) -> str | None:
        """What is wrong with a batch.json another host (or an older spoold) wrote, if anything.

        A field of the wrong type (JobRecord.load says which) fails the job.
        So do its `models`, which decide what gets loaded, when they name one
        that is not configured here.
        """
        if self._bad_record:
            return self._bad_record
        if self.record.group is not None and self.record.part_of() is None:
            return "batch.json: `group` does not name a group and the part's first line"
        unknown = sorted(m for m in self.record.models if m not in self.resolver.known)
        if unknown:
            return (f"batch.json names model(s) {', '.join(map(repr, unknown))} that are not configured "
                    "here ([models]); they are never loaded")
        return None

    async def _run_phases(self, f: IO[bytes], writer: GroupCommitWriter, recovered: Recovered) -> Outcome:
        try:
            return await self._run_passes(f, writer, recovered)
        except InputRejected as e:
            await writer.flush()  # what is done is kept: it goes to failed/ with the job
            return await self._fail(str(e), e.code)

    async def _run_passes(self, f: IO[bytes], writer: GroupCommitWriter, recovered: Recovered) -> Outcome:
        if self.record.status == JobStatus.VALIDATING:
            if not await self._validate(f, writer, recovered):
                return Outcome.INTERRUPTED
            f.seek(0)
        if self._split_due(recovered):
            return await self._split(f, recovered)
        self.progress.state = JobStatus.IN_PROGRESS
        self.progress.total = self.record.request_counts.total
        if self._expiry_due():  # before a line is sent (after a restart past the window, say)
            return Outcome.INTERRUPTED
        if not await self._dispatch(f, writer, recovered):
            return Outcome.INTERRUPTED
        self._note_load_error()
        if self._models_left():
            # Lines for other models remain: the daemon loads the next one
            # and runs this job again; finished lines are skipped as on resume.
            self.record.model_done(self.engine.model)
            await self._save()
            return Outcome.WAITING
        check_unchanged(f, self._input)
        await self._finalize(writer)
        return Outcome.COMPLETED

    def _split_due(self, recovered: Recovered) -> bool:
        """Whether this job becomes a group: more valid lines than `[spool] split_lines`, none run yet,
        not a part already, not being cancelled."""
        limit = self.spool.settings.split_lines
        valid = self.record.request_counts.total - len(recovered.error_lines)
        return (bool(limit) and valid > limit and self.record.group is None and not recovered.done_lines
                and not self.job.cancel_request.exists() and not self.stop.is_set())

    async def _split(self, f: IO[bytes], recovered: Recovered) -> Outcome:
        """Split into parts any daemon on the spool may run (groups.py); this job is then gone."""
        await self._writer.flush()
        group = await finish_in_thread(self.groups.split, self.job, self.record, f, self._input.st_size,
                                       recovered.error_lines, self.spool.settings.split_lines,
                                       self.limits.max_line_bytes)
        self.progress.state = JobStatus.IN_PROGRESS
        log.info("job %s split into %d parts of at most %d lines (%s)", self.job.id, len(self.record.parts),
                 self.spool.settings.split_lines, group.path, **job_fields(self.job.id))
        return Outcome.SPLIT

    def _models_left(self) -> list[str]:
        done = set(self.record.models_done) | {self.engine.model}
        return [m for m in self.record.models if m not in done]

    def _note_load_error(self) -> None:
        """A model that failed to load answered its lines with 503s; batch.json says why."""
        reason = getattr(self.engine, "load_error", None)
        if reason:
            self.record.note_model_load_failed(self.engine.model, reason)

    async def _validate(self, f: IO[bytes], writer: GroupCommitWriter, recovered: Recovered) -> bool:
        """Stream the file once: count lines, write an error for each bad one. A file that changed
        meanwhile, or has no request lines, is InputRejected (the job fails, still validating).

        Repeated custom_ids are known only at the end of the file; their
        errors are written then, after a short second read of the suspects.
        """
        total, first_valid, models = 0, None, {}
        end = self._input.st_size  # bytes appended after the claim are never read
        breather = _Breather()
        checks = check_file(f, self._validator, self.limits.max_line_bytes, end, self.job.path, ticks=True)
        with contextlib.closing(checks):
            for item in checks:
                if breather.due(item is None):
                    await asyncio.sleep(0)
                    if self.stop.is_set():
                        return False
                if isinstance(item, Repeat):
                    models[item.request.body["model"]] -= 1
                    self._add_error(item.error, writer, recovered)
                elif isinstance(item, LineError):
                    total += 1
                    self._add_error(item, writer, recovered)
                elif item is not None:
                    total += 1
                    first_valid = first_valid or item
                    models[item.body["model"]] = models.get(item.body["model"], 0) + 1
        await writer.flush()
        check_unchanged(f, self._input)
        if total == 0:  # nothing to run: it fails while validating, never in progress (as OpenAI's does)
            raise no_request_lines()
        self.record.validated(total, first_valid.url if first_valid else self.record.endpoint,
                              first_valid.body["model"] if first_valid else self.resolver.served,
                              models, self._input)
        await self._save()
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

        After an engine death, the lines it had in flight (suspects: one of
        them may be what kills it) run first, SUSPECT_WINDOW at a time, so a
        second death pins the poison line down to a few; a line in flight at
        `max_crashes` deaths gets an `engine_crashed` error instead of
        killing every fresh engine (Mailman's cap on a message that keeps
        failing).
        """
        self._dispatch_started = time.monotonic()
        if self.progress.done_at_start:
            log.info("job %s resumed, %d lines already done (found in %.2fs)", self.job.id,
                     self.progress.done_at_start, time.monotonic() - self.progress.started,
                     **job_fields(self.job.id))
        crashes = self.record.crash_counts()
        suspects = {line for line, deaths in crashes.items() if deaths < self.max_crashes}
        if suspects:
            lines = self._unfinished(f, writer, recovered, crashes, lambda n: n in suspects)
            async with self.share.exclusive():  # a second death is then this job's lines' doing
                if not await self._run_lines(lines, min(SUSPECT_WINDOW, self.share.capacity), writer):
                    return False
            f.seek(0)
        lines = self._unfinished(f, writer, recovered, crashes, lambda n: n not in suspects)
        # No more workers than lines left: a one-line job must not start 2,048 of them.
        left = self.record.request_counts.total - writer.tally.done
        return await self._run_lines(lines, max(1, min(self.share.capacity, left)), writer)

    async def _run_lines(self, lines: Iterator[EngineRequest | None], workers: int,
                         writer: GroupCommitWriter) -> bool:
        """Run `lines` (dispatch.py); True when all ran. An engine death is counted against the lines
        it had in flight, then raised as EngineDead: nothing is written for them, and they run again
        once the engine has been replaced, rather than every remaining line turning into an error."""
        dispatch = Dispatch(self.engine, self.share, writer, self.stop, self.retry,
                            lambda: self.record.note_retries("server_error", 1), self.progress)
        try:
            return await dispatch.run(lines, workers)
        except EngineLost as e:
            await self._record_crash(e.lines)
            raise EngineDead(f"job {self.job.id}: {e}") from e.__cause__

    async def _record_crash(self, lines: set[int]) -> None:
        """Count an engine death against the lines it had in flight, durably, before the restart."""
        counts = self.record.crash_counts()
        for line in lines:
            counts[line] = counts.get(line, 0) + 1
        self.record.note_crashes(counts)
        self.record.note_retries("engine_died", sum(counts[line] < self.max_crashes for line in lines))
        await self._save()
        log.warning("job %s: the engine died with %d lines in flight (lines %s); they run again, %d at a "
                    "time, and a line in flight at %d deaths gets an engine_crashed error",
                    self.job.id, len(lines), _span(lines), SUSPECT_WINDOW,
                    self.max_crashes, **job_fields(self.job.id))

    def _unfinished(self, f: IO[bytes], writer: GroupCommitWriter, recovered: Recovered,
                    crashes: dict[int, int], wanted: Callable[[int], bool]) -> Iterator[EngineRequest | None]:
        """The `wanted` valid lines that have no result yet, in file order; None now and then (a tick).

        Lines with a result are skipped by number before any parse: a resume
        at 600K of 1M lines must not re-validate 600K lines. Every error of
        the validation pass is in `recovered.error_lines` by now, duplicates
        included, so this pass keeps no per-line state of its own. A line in
        flight at too many engine deaths gets its error here.
        """
        validator = self._validator()
        for number, raw in iter_lines(f, self.limits.max_line_bytes, self._input.st_size, ticks=True):
            if raw is TICK:
                yield None  # the worker yields to the loop: blank or over-long lines must not hold it
                continue
            if number in recovered.error_lines or number in recovered.done_lines or raw is None:
                continue
            if not wanted(number):
                continue
            item = validator.check(number, raw)
            if isinstance(item, EngineRequest) and item.body["model"] != self.engine.model:
                continue  # another model's line: its own pass runs it
            if isinstance(item, EngineRequest) and crashes.get(number, 0) >= self.max_crashes:
                item = LineError(number, item.custom_id, "engine_crashed",
                                 f"the engine died {crashes[number]} times with this line in flight; it was "
                                 "not run again (check its parameters: n, max_tokens, logprobs)")
            if isinstance(item, LineError):
                # Its error line was lost (only a failing disk can do that),
                # the line kills the engine, or it sets no output limit and
                # its model's context, known once that model is loaded, puts
                # it over [limits]: write an error rather than leave the line
                # without a result.
                writer.add_error(item)
                recovered.error_lines.add(number)
            else:
                yield item

    async def _finalize(self, writer: GroupCommitWriter) -> None:
        """Check every line has its result, write batch.json, publish to the outbox."""
        tally, total = writer.tally, self.record.request_counts.total
        if tally.done != total:
            raise IncompleteJob(f"job {self.job.id}: {total} lines but {tally.done} results; left in processing/")
        self.progress.state = JobStatus.FINALIZING
        elapsed = max(time.monotonic() - self.progress.started, 1e-9)
        self.record.complete(tally.completed, tally.failed, tally.usage(), {
            "seconds": round(elapsed, 3),
            "requests_per_second": round((tally.done - self.progress.done_at_start) / elapsed, 3),
            "output_tokens_per_second": round(tally.output_tokens / elapsed, 3),
            "resumed": self.progress.done_at_start > 0,
            **self._engine_timings(writer),
        })
        await self._save()
        await self._move_out()
        self.progress.state = JobStatus.COMPLETED
        log.info("job %s completed: %d ok, %d failed, %.1f req/s", self.job.id,
                 tally.completed, tally.failed, self.record.timings["requests_per_second"],
                 **job_fields(self.job.id))

    async def _finish_cancelled(self) -> Outcome:
        """`spoold cancel`: publish what is done so far as a cancelled job.

        Lines that had no result yet get none; batch.json counts what has
        one, and the job goes to the outbox like a finished one.
        """
        tally = self._writer.tally if self._writer else recover_results(self.job.output, self.job.errors).tally
        self.record.cancel(tally.completed, tally.failed, tally.usage(), cancel_asked_at(self.job.cancel_request))
        await self._publish()
        log.info("job %s cancelled: %d of %d lines have a result", self.job.id, tally.done,
                 self.record.request_counts.total, **job_fields(self.job.id))
        return Outcome.CANCELLED

    async def _finish_expired(self) -> Outcome:
        """The window passed first: each valid line without a result gets a `batch_expired` error.

        The lines are validated (every bad one has its error already), so
        the unfinished ones are exactly the lines with nothing in either
        file; then the job is published as expired, like a finished one.
        """
        recovered = recover_results(self.job.output, self.job.errors)
        writer, commit_task = self._start_writer(recovered)
        try:
            with self._open_input() as f:
                await self._write_expired(f, writer, recovered)
        except InputRejected as e:
            return await self._fail(str(e), e.code)
        finally:
            await self._settle_writer(writer, commit_task)
        tally = writer.tally
        self.record.expire(tally.completed, tally.failed, tally.usage())
        await self._publish()
        log.info("job %s expired: %d of %d lines had a result", self.job.id, tally.completed,
                 self.record.request_counts.total, **job_fields(self.job.id))
        return Outcome.EXPIRED

    async def _write_expired(self, f: IO[bytes], writer: GroupCommitWriter, recovered: Recovered) -> None:
        validator, written = self._validator(), 0
        for number, raw in iter_lines(f, self.limits.max_line_bytes, self._input.st_size):
            if raw is None or number in recovered.done_lines or number in recovered.error_lines:
                continue  # a result, or an error from validation (too long, bad, repeated)
            custom_id = validator.check(number, raw).custom_id  # a request, or an error naming it
            writer.add_error(LineError(number, custom_id, "batch_expired",
                                       "the batch's completion window ended before this line ran"))
            written += 1
            if written % EXPIRED_FLUSH_LINES == 0:
                await writer.flush()  # bounded memory, and the loop breathes
        await writer.flush()

    async def _publish(self) -> None:
        """The record's end (cancelled, expired), durably, then the job into outbox/ by one rename."""
        await self._save()
        await self._move_out()
        self.progress.state = self.record.status

    async def _move_out(self) -> None:
        """Publish the ended job by one rename: outbox/ (failed/ when it failed); a part into its group,
        which is then assembled if this was its last part (groups.py)."""
        part = self.record.part_of()
        if part is not None:
            await finish_in_thread(self.groups.publish_part, self.job, part[0])
            self.assembled = await finish_in_thread(self.groups.assemble, part[0])
        elif self.record.status == JobStatus.FAILED:
            await finish_in_thread(self.spool.move_to_failed, self.job)
        else:
            await finish_in_thread(self.spool.move_to_outbox, self.job)

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

    async def _save(self) -> None:
        """batch.json, durably, in a thread (durable.finish_in_thread).

        The document is made here, on the loop: a thread never reads the
        record while the loop changes it.
        """
        await finish_in_thread(self.spool.save_doc, self.job, self.record.to_doc())

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

    async def _fail(self, reason: str, code: str) -> Outcome:
        log.error("job %s failed: %s", self.job.id, reason, **job_fields(self.job.id))
        self.record.fail(reason, code)
        await self._save()
        await self._move_out()
        self.progress.state = JobStatus.FAILED
        return Outcome.FAILED


def _name_in(doc: dict[str, Any]) -> str:
    """The drop's name a record that could not be loaded still gives, for messages (else "")."""
    name = doc.get("input_file")
    return name if isinstance(name, str) else ""


class _Breather:
    """When a pass over the input should yield to the event loop: every YIELD_SECONDS, and at every tick."""

    def __init__(self) -> None:
        self._due = time.monotonic() + YIELD_SECONDS

    def due(self, tick: bool) -> bool:
        """True when the caller should yield now (and the next period starts)."""
        now = time.monotonic()
        if not tick and now < self._due:
            return False
        self._due = now + YIELD_SECONDS
        return True


def _span(lines: set[int]) -> str:
    """A few line numbers for a log line: `3, 7, 12` or `3 ... 2050`."""
    ordered = sorted(lines)
    return ", ".join(map(str, ordered)) if len(ordered) <= 8 else f"{ordered[0]} ... {ordered[-1]}"
