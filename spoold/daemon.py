"""The daemon: wires spool, inbox tracker, engine, job runner and reporter together.

One main loop owns all decisions: what runs next, when to stop, pause,
swap or replace the engine. The runner runs one job (and notices a cancel
itself); the reporter tells the world (heartbeats, STATUS=, events,
metrics) and measures stalls, which come back here as a verdict. Signal handlers only record the signal;
the loop acts on it (gunicorn's arbiter): the first SIGTERM stops claiming,
lets finished results reach disk and exits 0, leaving the job to resume on
the next start; a second one cancels at once (rq's cold shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Config, ConfigError, engine_settings_for, reload_settings
from .engine import Engine, EngineDead
from .enginehost import MAX_RESTARTS, RESTART_WINDOW_SECONDS, EngineHost
from .events import EventPublisher
from .gpu import GpuReader
from .heartbeat import status_line
from .jobrecord import JobRecord
from .jobrunner import IncompleteJob, JobRunner, job_fields
from .lifecycle import DaemonState, JobStatus, Outcome
from .metrics import Metrics
from .names import display_name
from .notify import Notifier
from .reporter import Reporter, Shown, Stall
from .spool import DropRefused, JobDir, PeerClocks, Spool
from .supervise import supervise
from .scheduler import Candidate, in_order
from .validation import ModelResolver, first_model
from .inbox import InboxTracker
from .writer import JobLost, WriterFailed

log = logging.getLogger(__name__)

#: How long to wait before retrying a job whose results could not be written
#: (a full or failing disk): long enough not to spin, short enough to resume soon.
WRITE_RETRY_SECONDS = 5.0

#: How many complete drops (first seen first) one scheduling pass weighs:
#: enough to find the loaded model's work, few enough that a pass over an
#: inbox of 10,000 drops costs no more than over one of 64.
SCHEDULE_WINDOW = 64

#: While the model loads, systemd's start timeout is pushed this far ahead,
#: every third of it: a load that makes no progress still times out in vLLM.
LOAD_EXTEND_SECONDS = 60.0


class Daemon:
    """`spoold run`: serve the spool until told to stop."""

    def __init__(self, config: Config, engine: Engine, notifier: Notifier | None = None,
                 gpus: GpuReader | None = None, metrics: Metrics | None = None,
                 events: EventPublisher | None = None,
                 reload_config: Callable[[], Config] | None = None,
                 make_engine: Callable[[str], Engine] | None = None) -> None:
        self.config = config
        self.reload_config = reload_config
        self.metrics = metrics
        self.events = events
        self.spool = Spool(config.spool)
        self.resolver = ModelResolver(config.models.aliases, config.engine.model)
        self.inbox = InboxTracker(self.spool, config.spool.settle_seconds, config.spool.poll_seconds)
        self.notifier = notifier or Notifier()
        self.gpus = gpus or GpuReader()
        self.report = Reporter(config, self.spool, self.notifier, self.gpus, metrics, events)
        self.engine_host = EngineHost(engine, make_engine, self.report.publish, self.gpus)
        self.state = DaemonState.STARTING
        self.exit_code = 0
        self._stop: asyncio.Event | None = None
        self._signals = 0
        self._main_task: asyncio.Task | None = None
        self._current: JobRunner | None = None
        self._stuck: set[str] = set()
        self._queued = 0
        self._hup: asyncio.Event | None = None
        #: why work is paused (a full or failing disk), shown in status and heartbeats
        self._paused: str | None = None
        #: set to end the current job early: a stop, or a hung engine
        self._job_stop: asyncio.Event | None = None
        self._engine_hung = False
        self._ready_sent = False
        self._orphans_checked = 0.0
        self._peer_clocks = PeerClocks()

    def run(self) -> int:
        """Run until stopped; returns the process exit code.

        On uvloop when it is installed (it comes with vLLM, whose own server
        uses it): the serving layer's per-request work runs on this loop, and
        a cheaper loop leaves more CPU to the engine.
        """
        try:
            import uvloop
        except ImportError:
            uvloop = None
        try:
            if uvloop is not None:
                return uvloop.run(self._main())
            return asyncio.run(self._main())
        except asyncio.CancelledError:
            log.warning("cold stop: in-flight work abandoned, it resumes on the next start")
            return 0

    async def _main(self) -> int:
        self._stop = asyncio.Event()
        self._hup = asyncio.Event()
        self._main_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._hup.set)
        self.spool.ensure_dirs()
        self._recover()
        if self.events is not None:
            self.events.start(lambda: self.report.snapshot(self._shown()))
        loops = [asyncio.create_task(self._supervised(loop), name=loop.__name__)
                 for loop in (self._heartbeat_loop, self._progress_loop, self._systemd_watchdog_loop)]
        # Watch the inbox before saying "ready": a rename made the moment
        # READY (or the idle heartbeat) is seen must raise a hint, not wait
        # for the settle-and-poll path.
        self.inbox.start()
        try:
            await self._start_engine()
            if not self._stop.is_set():
                await self._serve()
        finally:
            self.state = DaemonState.STOPPING
            self.notifier.stopping()
            self.inbox.stop()
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._write_heartbeat()
            await self.engine_host.close()
            if self.events is not None:
                await self.events.close()
            log.info("stopped")
        return self.exit_code

    def _recover(self) -> None:
        """Before READY: clean half-made claims and name the jobs this host will resume first."""
        pending = self.spool.recover()
        if pending:
            log.info("%d unfinished job(s) of this host will be resumed first: %s",
                     len(pending), ", ".join(job.id for job in pending))

    async def _supervised(self, loop: Callable[[], Any]) -> None:
        """A background loop for good (supervise.py); one that keeps failing stops the daemon for systemd."""
        if not await supervise(loop, self.metrics):
            self.exit_code = 1
            self._stop.set()
            self.inbox.wake()

    def _on_signal(self, sig: int) -> None:
        """Record the signal; the main loop acts on it."""
        self._signals += 1
        if self._signals == 1:
            log.info("%s: warm stop (finishing writes; send again to stop at once)", signal.Signals(sig).name)
            self._stop.set()
            if self._job_stop is not None:
                self._job_stop.set()
            self.inbox.wake()
        elif self._main_task is not None:
            self._main_task.cancel()

    @property
    def engine(self) -> Engine:
        """The engine loaded now (EngineHost swaps and replaces it)."""
        return self.engine_host.engine

    async def _start_engine(self) -> None:
        """Load the current engine, with the daemon's state, status line and READY=1 around it."""
        self.state = DaemonState.LOADING
        await self._write_heartbeat()  # on disk (and in STATUS=) at once: a load can hold the loop for a while
        extender = asyncio.create_task(self._extend_start_timeout())
        try:
            await self.engine_host.load()
        finally:
            extender.cancel()
        self.state = DaemonState.IDLE
        await self._write_heartbeat()  # a state change is on disk at once, not a period later
        self.notifier.ready(status_line(None, len(self.spool.inbox_entries()), self.gpus.read()))
        self._ready_sent = True

    async def _serve(self) -> None:
        """Run this host's jobs and claim drops as they complete, oldest first, few model swaps."""
        while not self._stop.is_set():
            try:
                chosen = await self._take_over_orphan() or await self._next_job()
            except OSError as e:  # EIO or ESTALE from the spool: pause and look again, never exit
                await self._pause(f"cannot read the spool: {_describe(e)}")
                continue
            if chosen is None:
                await self.inbox.wait()
                continue
            await self._run_job(chosen)

    async def _extend_start_timeout(self) -> None:
        if not self.notifier.active:
            return
        while True:
            self.notifier.extend_timeout(LOAD_EXTEND_SECONDS)
            await asyncio.sleep(LOAD_EXTEND_SECONDS / 3)

    async def _systemd_watchdog_loop(self) -> None:
        """WATCHDOG=1 from the main loop, only while healthy: ready and not stalled.

        systemd arms the watchdog at READY=1; a stuck engine stops the pings
        and systemd restarts the service, which resumes the job. (A fresh
        engine loading after a crash of the old one keeps the pings going.)
        """
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            if self._ready_sent and not self.report.stalled:
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _reload(self) -> None:
        """SIGHUP: apply the settings that can change without reloading the model."""
        if self.reload_config is None:
            return
        self.notifier.reloading()
        try:
            new = self.reload_config()
        except ConfigError as e:
            log.error("reload: %s; keeping the current settings", e)
        else:
            self.config, needs_restart = reload_settings(self.config, new)
            self.report.config = self.config  # [watchdog] and [heartbeat] apply to what it measures
            self.inbox.settle_seconds = self.config.spool.settle_seconds
            self.inbox.poll_seconds = self.config.spool.poll_seconds
            log.info("reloaded settings (max_inflight applies from the next job)")
            if needs_restart:
                log.warning("reload: %s changed; restart spoold to apply", ", ".join(needs_restart))
        self.notifier.send("READY=1")

    async def _next_job(self) -> "Claimed | None":
        """This host's jobs and the inbox's complete drops, in the scheduler's order; claims a drop."""
        own = [self._candidate(job) for job in self.spool.host_jobs() if job.id not in self._stuck]
        await self.inbox.refresh()
        drops = self.inbox.complete_drops()
        self._queued = len(drops)
        several = len(self.resolver.known) > 1  # only then is a peek at the drops worth it
        waiting = own + [Candidate(name, first_model(self.spool.inbox / name, self.resolver) if several else None,
                                   self.inbox.seen_at(name)) for name in drops[:SCHEDULE_WINDOW]]
        for choice in in_order(waiting, self.engine.model, self.config.models.max_wait_seconds, time.time()):
            if isinstance(choice.item, Claimed):
                return choice.item
            job = await self._claim(choice.item)
            if job is not None or self._paused:
                return Claimed(job, None) if job is not None else None
        return None

    def _candidate(self, job: JobDir) -> Candidate:
        """A claimed job for the scheduler: the model it needs next (from its record, or a
        peek at a job not validated yet) and when it was claimed. Its record is read here
        once for the pass, and the runner reuses it."""
        record, problem = read = job.read_record()
        if problem:
            model = None  # the runner fails it, on whatever model is loaded
        elif record is None or record.status == JobStatus.VALIDATING:
            model = first_model(job.input, self.resolver)
        else:
            model = self._known(record.next_model())
        return Candidate(Claimed(job, read), model, record.created_at if record is not None else 0)

    def _known(self, model: object) -> str | None:
        """A model named in a batch.json, if it is a configured one; None (any will do) otherwise:
        the runner then fails a job whose record names another."""
        return model if isinstance(model, str) and model in self.resolver.known else None

    async def _take_over_orphan(self) -> "Claimed | None":
        """Adopt a job whose host stopped heartbeating for `[spool] claim_timeout`.

        Looked for every quarter of the timeout (at most every 30 s), before
        new drops: an orphan is older than anything in the inbox.
        """
        timeout = self.config.spool.claim_timeout
        now = time.monotonic()
        if now - self._orphans_checked < min(max(timeout / 4, 0.5), 30.0):
            return None
        self._orphans_checked = now
        try:
            orphans = self.spool.orphaned_jobs(timeout, self._peer_clocks)
            for orphan, age in orphans:
                job = self.spool.take_over(orphan)
                self._peer_clocks.forget(orphan.path)
                if job is not None:
                    log.warning("took over job %s from %s: nothing of it changed for %.0fs", job.id,
                                orphan.path.parent.name, age, **job_fields(job.id))
                    return Claimed(job, None)
        except OSError as e:
            log.error("cannot take over orphaned jobs: %s", _describe(e))
        return None

    async def _claim(self, name: str) -> JobDir | None:
        """Claim one drop; None if another daemon was first or the disk refused."""
        shown = display_name(name)
        try:
            job = self.spool.claim_drop(name)
        except DropRefused as refused:
            self.inbox.forget(name)
            record, _ = refused.job.read_record()
            self.report.publish("spoold.job.failed", {"job": refused.job.id, "input_file": shown,
                                                      "errors": record.errors if record else []})
            self.report.job_finished(Outcome.FAILED)
            return None
        except OSError as e:
            await self._pause(f"cannot claim {shown}: {_describe(e)}")
            return None
        self.inbox.forget(name)
        if job is not None:
            log.info("claimed '%s' as job %s", shown, job.id, **job_fields(job.id))
            self.report.publish("spoold.job.claimed", {"job": job.id, "input_file": shown})
        return job

    async def _run_job(self, claimed: "Claimed") -> None:
        job = claimed.job
        read = claimed.record or job.read_record()
        # A job not validated yet runs on the loaded model first: validation
        # needs none, and the lines it has for this model run before a swap.
        wanted = self._known(read[0].next_model()) if read[0] is not None else None
        if wanted is not None and wanted != self.engine.model and not job.cancel_request.exists():
            await self._swap_engine(wanted)
            if self._stop.is_set():
                return
        self._job_stop = asyncio.Event()
        inflight = engine_settings_for(self.config, self.engine.model).inflight_limit  # [models.X] may set it
        runner = JobRunner(self.spool, job, self.engine, self.resolver, self.config.limits,
                           inflight, self._job_stop, on_validated=self.report.validated, record=read)
        self._current = runner
        self._paused = None  # trying again; a new failure pauses again
        self.report.job_started()
        self.state = DaemonState.WORKING
        await self._write_heartbeat()
        outcome = Outcome.INTERRUPTED
        try:
            outcome = await runner.run()
            if outcome is Outcome.INTERRUPTED and self._engine_hung:
                await self._restart_engine(f"job {job.id}: the engine made no progress for "
                                           f"{self.config.watchdog.restart_seconds:.0f}s")
            elif outcome is Outcome.WAITING:
                log.info("job %s: the lines for %s are done; next model: %s", job.id, self.engine.model,
                         runner.record.next_model(), **job_fields(job.id))
            elif outcome is Outcome.INTERRUPTED:
                log.info("job %s interrupted at %d/%d; it resumes on the next start",
                         job.id, runner.progress.done, runner.progress.total, **job_fields(job.id))
        except JobLost as e:
            log.warning("job %s is no longer this host's: %s; leaving it alone", job.id, e, **job_fields(job.id))
        except (WriterFailed, OSError) as e:
            await self._pause(f"job {job.id}: {_describe(e)}", job.id)
        except IncompleteJob as e:
            log.error("%s", e)
            self._stuck.add(job.id)
        except EngineDead as e:
            await self._restart_engine(str(e))
        except Exception as e:  # a bug or an I/O fault must not take the daemon down
            log.error("job %s stopped by an unexpected %s: %s; it stays in %s and is retried "
                      "on the next start", job.id, type(e).__name__, e, job.path.parent, exc_info=True,
                      **job_fields(job.id))
            self._stuck.add(job.id)
        finally:
            self.report.job_ended(runner, outcome)
            self._current = None
            self._job_stop = None
            if self.state == DaemonState.WORKING:
                self.state = DaemonState.IDLE
            await self._write_heartbeat()

    async def _pause(self, reason: str, job_id: str | None = None) -> None:
        """A full or failing disk: say so everywhere, wait, then let the loop try again.

        Nothing unpersisted was counted, nothing incomplete was published;
        the retry resumes from what is on disk. Spool directories someone
        removed are made again.
        """
        self._paused = reason
        fields = job_fields(job_id) if job_id else {}
        log.error("%s; work paused, retrying in %.0fs", reason, WRITE_RETRY_SECONDS, **fields)
        await self._write_heartbeat()
        await self._sleep_unless_stopped(WRITE_RETRY_SECONDS)
        try:
            self.spool.ensure_dirs()
        except OSError as e:
            log.error("cannot create the spool directories: %s", _describe(e))

    async def _restart_engine(self, reason: str) -> None:
        """Replace a dead or hung engine in-process; the job resumes on the fresh one.

        What was durable stays done; the requests that were in flight have no
        result line and simply run again. An engine that keeps failing makes
        the daemon exit 1 instead, for systemd to restart the whole service.
        """
        self._engine_hung = False
        if not self.engine_host.may_restart():
            log.error("%s; more than %d engine restarts in %.0fs: exiting so the service restarts",
                      reason, MAX_RESTARTS, RESTART_WINDOW_SECONDS)
            self.exit_code = 1
            self._stop.set()
            return
        log.error("%s; starting a fresh engine (the requests in flight run again)", reason)
        try:
            await self.engine_host.replace()
            await self._start_engine()
        except Exception as e:  # e.g. the dead engine's GPU memory is not free yet
            # An engine that never started must not answer lines (with errors):
            # a whole new process, started by systemd, is the next best try.
            log.error("the fresh engine failed to start: %s; exiting so the service restarts", e, exc_info=True)
            self.exit_code = 1
            self._stop.set()

    async def _swap_engine(self, model: str) -> None:
        """Unload the current model (its memory measured on the way out), then load `model`.

        A model that fails to load is replaced by an UnavailableEngine: its
        lines get 503 results naming why, and the daemon goes on with the
        other models' jobs.
        """
        log.info("swapping models: %s -> %s", self.engine.model, model)
        await self.engine_host.unload()
        if self.metrics is not None:
            self.metrics.swaps.inc()
        await self.engine_host.load_other(model, self._start_engine)
        if self.state == DaemonState.LOADING:  # the load failed part way
            self.state = DaemonState.IDLE

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    # -- what the reporter is told, and its one verdict ---------------------

    def _shown(self) -> Shown:
        """What the daemon is doing, for the reporter."""
        return Shown(self.state, self.engine.model, self._paused, self._current, self._queued,
                     WRITE_RETRY_SECONDS)

    async def _write_heartbeat(self) -> None:
        await self.report.heartbeat(self._shown())

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._write_heartbeat()
            try:
                await asyncio.wait_for(self._hup.wait(), timeout=self.config.heartbeat.seconds)
            except asyncio.TimeoutError:
                continue
            self._hup.clear()
            self._reload()

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.events.progress_seconds)
            if self._current is not None:
                self._act_on(self.report.progress(self._current))

    def _act_on(self, stall: Stall) -> None:
        """An engine hung past `[watchdog] restart_seconds` stops the job; `_run_job` then replaces it.

        (A stall short of that only stops the watchdog pings: `_systemd_watchdog_loop`.)
        """
        if stall.hung and not self._engine_hung:
            self._engine_hung = True
            if self._job_stop is not None:
                self._job_stop.set()


@dataclass(frozen=True)
class Claimed:
    """A job of this host chosen to run, with its record as read for this pass (None: read it then)."""

    job: JobDir
    record: tuple[JobRecord | None, str | None] | None


def _describe(error: BaseException) -> str:
    """An I/O error as a person reads it: what failed, on which file."""
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)
