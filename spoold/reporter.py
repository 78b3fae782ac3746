"""What the daemon tells the world: heartbeat files, systemd's STATUS=, events, metrics, the log line.

The reporter observes and measures; it decides nothing. The one judgement
it makes, whether the engine looks stuck, comes back as a `Stall` verdict
that the daemon's loop acts on (it stops the job and replaces the engine).
Never prompt or response text: only counts, names in display form, rates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config
from .events import EventPublisher
from .gpu import GpuReader
from .heartbeat import heartbeat_document, status_line, write_heartbeat
from .lifecycle import FINAL, DaemonState, JobStatus, Outcome, shown_state
from .metrics import Metrics
from .notify import STOPPING_STATUS, Notifier
from .spool import Spool

if TYPE_CHECKING:
    from .jobrunner import JobProgress, JobRunner

log = logging.getLogger(__name__)

#: How often the status line goes to the log as well as to systemd.
LOG_PROGRESS_SECONDS = 30.0


@dataclass(frozen=True)
class Stall:
    """The engine's health as measured at one look at a running job."""

    #: requests in flight and no result for `[watchdog] stall_seconds`
    stalled: bool = False
    #: ... and for `[watchdog] restart_seconds`: the daemon should replace the engine
    hung: bool = False


@dataclass(frozen=True)
class Shown:
    """What the daemon is doing, as the reporter needs it for one report."""

    state: DaemonState
    model: str
    #: why work is paused (a full or failing disk), or None
    paused: str | None = None
    runner: "JobRunner | None" = None
    #: how many complete drops wait in the inbox
    queued: int = 0
    #: how long a pause waits before the next try (for the status line)
    retry_seconds: float = 0.0


class Reporter:
    """Heartbeats, status line, events and metrics of one daemon, from what it is told it is doing."""

    def __init__(self, config: Config, spool: Spool, notifier: Notifier, gpus: GpuReader,
                 metrics: Metrics | None = None, events: EventPublisher | None = None) -> None:
        self.config, self.spool, self.notifier = config, spool, notifier
        self.gpus, self.metrics, self.events = gpus, metrics, events
        #: the last GPU readings (taken once per heartbeat, reused by progress events)
        self.readings: list[dict] = []
        #: requests in flight and no result for `[watchdog] stall_seconds`, at the last look
        self.stalled = False
        self._counted = (0, 0)
        self._last_announced = -1
        self._heartbeat_failures: list[str] = []
        self._last_log = 0.0
        self._writing = asyncio.Lock()

    # -- events -----------------------------------------------------------

    def publish(self, topic: str, payload: dict) -> None:
        """One event on the feed (a no-op without one)."""
        if self.events is not None:
            self.events.publish(topic, payload)

    def validated(self, progress: "JobProgress") -> None:
        """A job's validation pass is done: its total is known."""
        self.publish("spoold.job.validated", {"job": progress.job_id, "input_file": progress.input_file,
                                              "total": progress.total, "bad": progress.failed})

    def job_started(self) -> None:
        """A job (or the next run of one) starts: its counters start from what it has."""
        self._counted, self._last_announced = (0, 0), -1
        self.stalled = False

    def job_ended(self, runner: "JobRunner", outcome: Outcome) -> None:
        """The last progress of a run, and the end of the job when the outcome is final."""
        self.stalled = False
        self.progress(runner, force=True)
        fields = {"job": runner.job.id, "input_file": runner.progress.input_file}
        record = runner.record
        counts = record.request_counts.__dict__.copy()
        if outcome is Outcome.COMPLETED:
            self.publish("spoold.job.completed", {**fields, "request_counts": counts, "usage": record.usage,
                                                  "timings": record.timings or {}})
        elif outcome is Outcome.CANCELLED:
            self.publish("spoold.job.cancelled", {**fields, "request_counts": counts})
        elif outcome is Outcome.FAILED:
            self.publish("spoold.job.failed", {**fields, "errors": record.errors})
        if outcome in FINAL:
            self.job_finished(outcome)

    def job_finished(self, outcome: Outcome) -> None:
        """Count a job that ended for good (also one refused at claim)."""
        if self.metrics is not None:
            self.metrics.jobs_finished.labels(outcome).inc()

    def progress(self, runner: "JobRunner", force: bool = False) -> Stall:
        """Progress event (only when counts moved), metrics, and the stall measurement."""
        progress = runner.refresh()
        if progress.state == JobStatus.VALIDATING and not force:
            return Stall()  # no total yet: `spoold.job.validated` comes first
        stall = self._measure_stall(progress)
        self._update_metrics(progress)
        if force or progress.done != self._last_announced:
            self._last_announced = progress.done
            self.publish("spoold.job.progress", {**progress.summary(), "gpus": self.readings})
        return stall

    def _measure_stall(self, progress: "JobProgress") -> Stall:
        idle_for = time.time() - progress.last_progress_at
        watchdog = self.config.watchdog
        stalled = progress.inflight > 0 and idle_for >= watchdog.stall_seconds
        if stalled and not self.stalled:  # once, when it starts
            log.error("job %s: %d requests in flight and no result for %.0fs: the engine looks stuck",
                      progress.job_id, progress.inflight, idle_for)
            self.publish("spoold.engine.stalled", {"job": progress.job_id, "inflight": progress.inflight,
                                                   "seconds_without_progress": round(idle_for, 1)})
        self.stalled = stalled
        if self.metrics is not None:
            self.metrics.stalled.set(1 if stalled else 0)
        return Stall(stalled, stalled and idle_for >= watchdog.restart_seconds)

    def _update_metrics(self, progress: "JobProgress") -> None:
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

    def snapshot(self, shown: Shown) -> list[tuple[str, dict]]:
        """The current state, sent to a subscriber that has just connected."""
        events = [("spoold.daemon.heartbeat", self._heartbeat_payload(shown))]
        if shown.runner is not None:
            events.append(("spoold.job.progress", {**shown.runner.refresh().summary(), "gpus": self.readings}))
        return events

    # -- heartbeats and the status line ------------------------------------

    def shown_state(self, shown: Shown) -> DaemonState:
        """The state heartbeats and events report (lifecycle.shown_state says which wins)."""
        return shown_state(shown.state, bool(shown.paused), self.stalled)

    def _heartbeat_payload(self, shown: Shown) -> dict[str, Any]:
        job = shown.runner.progress.summary() if shown.runner else None
        return {"state": self.shown_state(shown), "model": shown.model, "queued": shown.queued,
                "job": job, "gpus": self.readings}

    def status_line(self, shown: Shown, progress: "JobProgress | None") -> str:
        """The line for `systemctl status`: loading, a job's progress, paused, or idle."""
        if shown.state in (DaemonState.STARTING, DaemonState.LOADING):
            return f"loading model {shown.model}"
        if shown.state == DaemonState.STOPPING:
            return STOPPING_STATUS
        if shown.paused:
            return f"PAUSED: {shown.paused}; retrying every {shown.retry_seconds:.0f}s"
        line = status_line(progress, shown.queued, self.readings)
        return f"STALLED: {line}" if self.stalled else line

    async def heartbeat(self, shown: Shown) -> None:
        """Heartbeat files, the systemd status line, the heartbeat event, gauges, a periodic log line.

        The files are written in a thread: a spool on a slow or stuck NFS
        server must not hold the event loop (and with it every request in
        flight). One beat at a time, so an older one never lands last.
        """
        runner = shown.runner
        progress = runner.refresh() if runner else None
        self.readings = self.gpus.read()
        doc = heartbeat_document(self.config.spool.host_id, self.shown_state(shown), progress, self.readings)
        doc["model"] = shown.model
        paths = [self.spool.host_dir / "heartbeat.json"]
        state_dir = self.config.spool.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if state_dir:
            paths.append(Path(state_dir) / "heartbeat.json")
        if progress is not None and progress.state != JobStatus.COMPLETED:
            paths.append(runner.job.heartbeat)
        if self.metrics is not None:
            self.metrics.jobs.labels("queued").set(shown.queued)
            self.metrics.set_gpus(self.readings)
        async with self._writing:
            failures = await asyncio.to_thread(self._write_files, paths, doc)
        if failures != self._heartbeat_failures:  # once per change, not every beat
            self._heartbeat_failures = failures
            for failure in failures:
                log.warning("cannot write heartbeat %s", failure)
        line = self.status_line(shown, progress)
        self.notifier.status(line)
        self.publish("spoold.daemon.heartbeat", self._heartbeat_payload(shown))
        now = time.monotonic()
        if progress is not None and now - self._last_log >= LOG_PROGRESS_SECONDS:
            self._last_log = now
            log.info("%s", line)

    def _write_files(self, paths: list[Path], doc: dict[str, Any]) -> list[str]:
        """The beat's file work (heartbeats, the jobs gauge's directory count, the textfile): in a thread."""
        failures = write_heartbeat(paths, doc, self.spool.file_mode, self.spool.gid)
        if self.metrics is not None:
            try:
                self.metrics.jobs.labels("processing").set(self.spool.count_host_jobs())
            except OSError as e:
                failures.append(f"{self.spool.host_dir}: {e.strerror or e}")
            self.metrics.write_textfile(self.config.metrics.textfile)
        return failures
