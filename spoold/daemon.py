"""The daemon: wires spool, watcher, engine, job runner, heartbeat and notify together.

One main loop owns all decisions. Signal handlers only record the signal;
the loop acts on it (gunicorn's arbiter): the first SIGTERM stops claiming,
lets finished results reach disk and exits 0, leaving the job to resume on
the next start; a second one cancels at once (rq's cold shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

from .config import Config, ConfigError, engine_settings_for, reload_settings
from .engine import Engine
from .enginehost import MAX_RESTARTS, RESTART_WINDOW_SECONDS, EngineHost
from .events import EventPublisher
from .gpu import GpuReader
from .heartbeat import heartbeat_document, status_line, write_heartbeat
from .jobrunner import EngineFailed, IncompleteJob, JobProgress, JobRunner, job_fields, next_model
from .metrics import Metrics
from .names import display_name
from .notify import STOPPING_STATUS, Notifier
from .spool import DropRefused, JobDir, PeerClocks, Spool, created_at
from .scheduler import Candidate, in_order
from .validation import ModelResolver, first_model
from .watcher import InboxWatcher
from .writer import JobLost, WriterFailed

log = logging.getLogger(__name__)

#: How long to wait before retrying a job whose results could not be written
#: (a full or failing disk): long enough not to spin, short enough to resume soon.
WRITE_RETRY_SECONDS = 5.0

#: How many complete drops (first seen first) one scheduling pass weighs:
#: enough to find the loaded model's work, few enough that a pass over an
#: inbox of 10,000 drops costs no more than over one of 64.
SCHEDULE_WINDOW = 64

#: How often the status line goes to the log as well as to systemd.
LOG_PROGRESS_SECONDS = 30.0

#: A background loop (heartbeat, progress, watchdog) that fails more than
#: this often in LOOP_FAILURE_WINDOW_SECONDS stops the daemon for systemd.
MAX_LOOP_FAILURES = 5
LOOP_FAILURE_WINDOW_SECONDS = 60.0
#: How long a failed background loop waits before it runs again.
LOOP_RESTART_SECONDS = 1.0

#: While the model loads, systemd's start timeout is pushed this far ahead,
#: every third of it: a load that makes no progress still times out in vLLM.
LOAD_EXTEND_SECONDS = 60.0

#: How long shutting the engine down may take at stop: an engine that hangs
#: there must not hold the stop past systemd's TimeoutStopSec (90 s); its
#: processes are then left to KillMode=mixed.
ENGINE_CLOSE_SECONDS = 30.0


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
        self.watcher = InboxWatcher(self.spool, config.spool.settle_seconds, config.spool.poll_seconds)
        self.notifier = notifier or Notifier()
        self.gpus = gpus or GpuReader()
        self.engines = EngineHost(engine, make_engine, self._publish, self.gpus)
        self.state = "starting"
        self.exit_code = 0
        self._stop: asyncio.Event | None = None
        self._signals = 0
        self._main_task: asyncio.Task | None = None
        self._current: JobRunner | None = None
        self._stuck: set[str] = set()
        self._queued = 0
        self._last_log = 0.0
        self._gpus: list[dict] = []
        self._counted = (0, 0)
        self._last_announced = -1
        self._stalled = False
        self._hup: asyncio.Event | None = None
        #: why work is paused (a full or failing disk), shown in status and heartbeats
        self._paused: str | None = None
        self._heartbeat_failures: list[str] = []
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
            self.events.start(self._snapshot)
        loops = [asyncio.create_task(self._supervised(loop), name=loop.__name__)
                 for loop in (self._heartbeat_loop, self._progress_loop, self._watchdog_loop)]
        # Watch the inbox before saying "ready": a rename made the moment
        # READY (or the idle heartbeat) is seen must raise a hint, not wait
        # for the settle-and-poll path.
        self.watcher.start()
        try:
            await self._start_engine()
            if not self._stop.is_set():
                await self._serve()
        finally:
            self.state = "stopping"
            self.notifier.stopping()
            self.watcher.stop()
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            self._write_heartbeat()
            await self._close_engine()
            if self.events is not None:
                await self.events.close()
            log.info("stopped")
        return self.exit_code

    async def _close_engine(self) -> None:
        try:
            await asyncio.wait_for(self.engine.close(), ENGINE_CLOSE_SECONDS)
        except asyncio.TimeoutError:
            log.warning("the engine did not shut down within %gs; leaving its processes to systemd",
                        ENGINE_CLOSE_SECONDS)

    def _recover(self) -> None:
        """Before READY: clean half-made claims and name the jobs this host will resume first."""
        pending = self.spool.recover()
        if pending:
            log.info("%d unfinished job(s) of this host will be resumed first: %s",
                     len(pending), ", ".join(job.id for job in pending))

    async def _supervised(self, loop: Callable[[], Any]) -> None:
        """Run a background loop for good: an exception is logged and counted, and the loop restarts.

        A loop that died silently would leave a half-daemon: watchdog pings
        going on while heartbeats stop (and peers take over a live host's
        jobs). One that keeps failing stops the daemon instead, for systemd
        to restart it.
        """
        failures: list[float] = []
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                now = time.monotonic()
                failures = [t for t in failures if now - t < LOOP_FAILURE_WINDOW_SECONDS] + [now]
                if self.metrics is not None:
                    self.metrics.loop_failures.labels(loop.__name__.strip("_")).inc()
                if len(failures) > MAX_LOOP_FAILURES:
                    log.critical("%s keeps failing (%s: %s); exiting so the service restarts",
                                 loop.__name__, type(e).__name__, e, exc_info=True)
                    self.exit_code = 1
                    self._stop.set()
                    self.watcher.wake()
                    return
                log.error("%s failed (%s: %s); restarting it", loop.__name__, type(e).__name__, e,
                          exc_info=True)
                await asyncio.sleep(LOOP_RESTART_SECONDS)

    def _on_signal(self, sig: int) -> None:
        """Record the signal; the main loop acts on it."""
        self._signals += 1
        if self._signals == 1:
            log.info("%s: warm stop (finishing writes; send again to stop at once)", signal.Signals(sig).name)
            self._stop.set()
            if self._job_stop is not None:
                self._job_stop.set()
            self.watcher.wake()
        elif self._main_task is not None:
            self._main_task.cancel()

    @property
    def engine(self) -> Engine:
        """The engine loaded now (EngineHost swaps and replaces it)."""
        return self.engines.engine

    async def _start_engine(self) -> None:
        """Load the current engine, with the daemon's state, status line and READY=1 around it."""
        self.state = "loading"
        self._write_heartbeat()  # on disk (and in STATUS=) at once: a load can hold the loop for a while
        extender = asyncio.create_task(self._extend_start_timeout())
        try:
            await self.engines.load()
        finally:
            extender.cancel()
        self.state = "idle"
        self._write_heartbeat()  # a state change is on disk at once, not a period later
        self.notifier.ready(status_line(None, len(self.spool.inbox_entries()), self.gpus.read()))
        self._ready_sent = True

    async def _serve(self) -> None:
        """Run this host's jobs and claim drops as they complete, oldest first, few model swaps."""
        while not self._stop.is_set():
            try:
                job = await self._take_over_orphan() or await self._next_job()
            except OSError as e:  # EIO or ESTALE from the spool: pause and look again, never exit
                await self._pause(f"cannot read the spool: {_describe(e)}")
                continue
            if job is None:
                await self.watcher.wait()
                continue
            await self._run_job(job)

    async def _extend_start_timeout(self) -> None:
        if not self.notifier.active:
            return
        while True:
            self.notifier.extend_timeout(LOAD_EXTEND_SECONDS)
            await asyncio.sleep(LOAD_EXTEND_SECONDS / 3)

    async def _watchdog_loop(self) -> None:
        """WATCHDOG=1 from the main loop, only while healthy: ready and not stalled.

        systemd arms the watchdog at READY=1; a stuck engine stops the pings
        and systemd restarts the service, which resumes the job. (A fresh
        engine loading after a crash of the old one keeps the pings going.)
        """
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            if self._ready_sent and not self._stalled:
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
            self.watcher.settle_seconds = self.config.spool.settle_seconds
            self.watcher.poll_seconds = self.config.spool.poll_seconds
            log.info("reloaded settings (max_inflight applies from the next job)")
            if needs_restart:
                log.warning("reload: %s changed; restart spoold to apply", ", ".join(needs_restart))
        self.notifier.send("READY=1")

    async def _next_job(self) -> JobDir | None:
        """This host's jobs and the inbox's complete drops, in the scheduler's order; claims a drop."""
        own = [self._candidate(job) for job in self.spool.host_jobs() if job.id not in self._stuck]
        await self.watcher.refresh()
        drops = self.watcher.complete_drops()
        self._queued = len(drops)
        several = len(self.resolver.known) > 1  # only then is a peek at the drops worth it
        waiting = own + [Candidate(name, first_model(self.spool.inbox / name, self.resolver) if several else None,
                                   self.watcher.seen_at(name)) for name in drops[:SCHEDULE_WINDOW]]
        for choice in in_order(waiting, self.engine.model, self.config.models.max_wait_seconds, time.time()):
            if isinstance(choice.item, JobDir):
                return choice.item
            job = await self._claim(choice.item)
            if job is not None or self._paused:
                return job
        return None

    def _candidate(self, job: JobDir) -> Candidate:
        """A claimed job for the scheduler: the model it needs next (from batch.json, or a
        peek at a job not validated yet) and when it was claimed."""
        batch = job.read_batch()
        validating = batch.get("status", "validating") == "validating"
        model = first_model(job.input, self.resolver) if validating else self._known(next_model(batch))
        return Candidate(job, model, created_at(batch))

    def _known(self, model: object) -> str | None:
        """A model named in a batch.json, if it is a configured one; None (any will do) otherwise:
        the runner then fails a job whose record names another."""
        return model if isinstance(model, str) and model in self.resolver.known else None

    async def _take_over_orphan(self) -> JobDir | None:
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
                    return job
        except OSError as e:
            log.error("cannot take over orphaned jobs: %s", _describe(e))
        return None

    async def _claim(self, name: str) -> JobDir | None:
        """Claim one drop; None if another daemon was first or the disk refused."""
        shown = display_name(name)
        try:
            job = self.spool.claim_drop(name)
        except DropRefused as refused:
            self.watcher.forget(name)
            batch = refused.job.read_batch()
            self._publish("spoold.job.failed", {"job": refused.job.id, "input_file": shown,
                                                "errors": batch.get("errors", [])})
            if self.metrics is not None:
                self.metrics.jobs_finished.labels("failed").inc()
            return None
        except OSError as e:
            await self._pause(f"cannot claim {shown}: {_describe(e)}")
            return None
        self.watcher.forget(name)
        if job is not None:
            log.info("claimed '%s' as job %s", shown, job.id, **job_fields(job.id))
            self._publish("spoold.job.claimed", {"job": job.id, "input_file": shown})
        return job

    async def _run_job(self, job: JobDir) -> None:
        # A job not validated yet runs on the loaded model first: validation
        # needs none, and the lines it has for this model run before a swap.
        wanted = self._known(next_model(job.read_batch()))
        if wanted is not None and wanted != self.engine.model and not job.cancel_request.exists():
            await self._swap_engine(wanted)
            if self._stop.is_set():
                return
        self._job_stop = asyncio.Event()
        inflight = engine_settings_for(self.config, self.engine.model).inflight_limit  # [models.X] may set it
        runner = JobRunner(self.spool, job, self.engine, self.resolver, self.config.limits,
                           inflight, self._job_stop, on_validated=self._validated)
        self._current = runner
        self._paused = None  # trying again; a new failure pauses again
        self._counted, self._last_announced, self._stalled = (0, 0), -1, False
        self.state = "working"
        self._write_heartbeat()
        outcome = "interrupted"
        try:
            outcome = "interrupted" if job.cancel_request.exists() else await runner.run()
            if outcome == "interrupted" and job.cancel_request.exists():
                runner.finish_cancelled()
                outcome = "cancelled"
            elif outcome == "interrupted" and self._engine_hung:
                await self._restart_engine(f"job {job.id}: the engine made no progress for "
                                           f"{self.config.watchdog.restart_seconds:.0f}s")
            elif outcome == "waiting":
                log.info("job %s: the lines for %s are done; next model: %s", job.id, self.engine.model,
                         next_model(runner.batch), **job_fields(job.id))
            elif outcome == "interrupted":
                log.info("job %s interrupted at %d/%d; it resumes on the next start",
                         job.id, runner.progress.done, runner.progress.total, **job_fields(job.id))
        except JobLost as e:
            log.warning("job %s is no longer this host's: %s; leaving it alone", job.id, e, **job_fields(job.id))
        except (WriterFailed, OSError) as e:
            await self._pause(f"job {job.id}: {_describe(e)}", job.id)
        except IncompleteJob as e:
            log.error("%s", e)
            self._stuck.add(job.id)
        except EngineFailed as e:
            await self._restart_engine(str(e))
        except Exception as e:  # a bug or an I/O fault must not take the daemon down
            log.error("job %s stopped by an unexpected %s: %s; it stays in %s and is retried "
                      "on the next start", job.id, type(e).__name__, e, job.path.parent, exc_info=True,
                      **job_fields(job.id))
            self._stuck.add(job.id)
        finally:
            self._stalled = False
            self._announce_progress(force=True)
            self._announce_end(runner, outcome)
            self._current = None
            self._job_stop = None
            if self.state == "working":
                self.state = "idle"
            self._write_heartbeat()

    async def _pause(self, reason: str, job_id: str | None = None) -> None:
        """A full or failing disk: say so everywhere, wait, then let the loop try again.

        Nothing unpersisted was counted, nothing incomplete was published;
        the retry resumes from what is on disk. Spool directories someone
        removed are made again.
        """
        self._paused = reason
        fields = job_fields(job_id) if job_id else {}
        log.error("%s; work paused, retrying in %.0fs", reason, WRITE_RETRY_SECONDS, **fields)
        self._write_heartbeat()
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
        if not self.engines.may_restart():
            log.error("%s; more than %d engine restarts in %.0fs: exiting so the service restarts",
                      reason, MAX_RESTARTS, RESTART_WINDOW_SECONDS)
            self.exit_code = 1
            self._stop.set()
            return
        log.error("%s; starting a fresh engine (the requests in flight run again)", reason)
        try:
            await self.engines.replace()
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
        await self.engines.unload()
        if self.metrics is not None:
            self.metrics.swaps.inc()
        await self.engines.load_other(model, self._start_engine)
        if self.state == "loading":  # the load failed part way
            self.state = "idle"

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    # -- progress: events, metrics, stall detection ------------------------

    def _publish(self, topic: str, payload: dict) -> None:
        if self.events is not None:
            self.events.publish(topic, payload)

    def _validated(self, progress: JobProgress) -> None:
        self._publish("spoold.job.validated", {"job": progress.job_id, "input_file": progress.input_file,
                                               "total": progress.total, "bad": progress.failed})

    def _announce_end(self, runner: JobRunner, outcome: str) -> None:
        if outcome == "completed":
            batch = runner.batch
            self._publish("spoold.job.completed", {
                "job": runner.job.id, "input_file": runner.progress.input_file,
                "request_counts": batch["request_counts"], "usage": batch["usage"],
                "timings": batch.get("timings", {})})
        elif outcome == "cancelled":
            self._publish("spoold.job.cancelled", {
                "job": runner.job.id, "input_file": runner.progress.input_file,
                "request_counts": runner.batch["request_counts"]})
        elif outcome == "failed":
            self._publish("spoold.job.failed", {"job": runner.job.id, "input_file": runner.progress.input_file,
                                                "errors": runner.batch.get("errors", [])})
        if self.metrics is not None and outcome in ("completed", "failed", "cancelled"):
            self.metrics.jobs_finished.labels(outcome).inc()

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.events.progress_seconds)
            self._announce_progress()

    def _announce_progress(self, force: bool = False) -> None:
        """Progress event (only when counts moved), metrics, and the stall check."""
        if self._current is None:
            return
        progress = self._current.refresh()
        if self._job_stop is not None and self._current.job.cancel_request.exists():
            self._job_stop.set()  # `spoold cancel`: _run_job publishes what is done
        if progress.state == "validating" and not force:
            return  # no total yet: `spoold.job.validated` comes first
        self._check_stall(progress)
        self._update_metrics(progress)
        if force or progress.done != self._last_announced:
            self._last_announced = progress.done
            self._publish("spoold.job.progress", {**progress.summary(), "gpus": self._gpus})

    def _check_stall(self, progress: JobProgress) -> None:
        idle_for = time.time() - progress.last_progress_at
        stalled = progress.inflight > 0 and idle_for >= self.config.watchdog.stall_seconds
        if stalled and not self._stalled:
            log.error("job %s: %d requests in flight and no result for %.0fs: the engine looks stuck",
                      progress.job_id, progress.inflight, idle_for)
            self._publish("spoold.engine.stalled", {"job": progress.job_id, "inflight": progress.inflight,
                                                    "seconds_without_progress": round(idle_for, 1)})
        if stalled and idle_for >= self.config.watchdog.restart_seconds and not self._engine_hung:
            self._engine_hung = True  # the job stops; _run_job then replaces the engine
            if self._job_stop is not None:
                self._job_stop.set()
        self._stalled = stalled
        if self.metrics is not None:
            self.metrics.stalled.set(1 if stalled else 0)

    def _update_metrics(self, progress: JobProgress) -> None:
        m = self.metrics
        if m is None:
            return
        new = (progress.completed - progress.completed_at_start, progress.failed - progress.failed_at_start)
        m.requests.labels("completed").inc(max(0, new[0] - self._counted[0]))
        m.requests.labels("failed").inc(max(0, new[1] - self._counted[1]))
        self._counted = new
        m.inflight.set(progress.inflight)
        m.rate.set(progress.rate())
        m.tokens_rate.set(progress.tokens_rate())
        m.job_total.set(progress.total)
        m.job_done.set(progress.done)
        m.last_progress.set(progress.last_progress_at)

    def _snapshot(self) -> list[tuple[str, dict]]:
        """The current state, sent to a subscriber that has just connected."""
        events = [("spoold.daemon.heartbeat", self._heartbeat_payload())]
        if self._current is not None:
            events.append(("spoold.job.progress", {**self._current.refresh().summary(), "gpus": self._gpus}))
        return events

    def _heartbeat_payload(self) -> dict:
        job = self._current.progress.summary() if self._current else None
        return {"state": self._shown_state, "model": self.engine.model,
                "queued": self._queued, "job": job, "gpus": self._gpus}

    @property
    def _shown_state(self) -> str:
        """The state heartbeats and events report: `stalled` overrides the rest."""
        if self._paused:
            return "paused"
        return "stalled" if self._stalled else self.state

    def _status_line(self, progress: JobProgress | None, gpus: list[dict]) -> str:
        """The line for `systemctl status`: loading, a job's progress, or idle."""
        if self.state in ("starting", "loading"):
            return f"loading model {self.engine.model}"
        if self.state == "stopping":
            return STOPPING_STATUS
        if self._paused:
            return f"PAUSED: {self._paused}; retrying every {WRITE_RETRY_SECONDS:.0f}s"
        line = status_line(progress, self._queued, gpus)
        return f"STALLED: {line}" if self._stalled else line

    async def _heartbeat_loop(self) -> None:
        while True:
            self._write_heartbeat()
            try:
                await asyncio.wait_for(self._hup.wait(), timeout=self.config.heartbeat.seconds)
            except asyncio.TimeoutError:
                continue
            self._hup.clear()
            self._reload()

    def _write_heartbeat(self) -> None:
        """Heartbeat files, the systemd status line, and a periodic log line."""
        progress = self._current.refresh() if self._current else None
        gpus = self._gpus = self.gpus.read()
        doc = heartbeat_document(self.config.spool.host_id, self._shown_state, progress, gpus)
        doc["model"] = self.engine.model
        paths = [self.spool.host_dir / "heartbeat.json"]
        state_dir = self.config.spool.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if state_dir:
            paths.append(Path(state_dir) / "heartbeat.json")
        if progress is not None and progress.state != "completed":
            paths.append(self._current.job.heartbeat)
        failures = write_heartbeat(paths, doc, self.spool.file_mode, self.spool.gid)
        if failures != self._heartbeat_failures:  # once per change, not every beat
            self._heartbeat_failures = failures
            for failure in failures:
                log.warning("cannot write heartbeat %s", failure)
        line = self._status_line(progress, gpus)
        self.notifier.status(line)
        self._publish("spoold.daemon.heartbeat", self._heartbeat_payload())
        if self.metrics is not None:
            self.metrics.jobs.labels("queued").set(self._queued)
            self.metrics.jobs.labels("processing").set(self.spool.count_host_jobs())
            self.metrics.set_gpus(gpus)
            self.metrics.write_textfile(self.config.metrics.textfile)
        now = time.monotonic()
        if progress is not None and now - self._last_log >= LOG_PROGRESS_SECONDS:
            self._last_log = now
            log.info("%s", line)


def _describe(error: BaseException) -> str:
    """An I/O error as a person reads it: what failed, on which file."""
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)
