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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config
from .events import EventPublisher
from .gpu import GpuReader
from .groups import Groups
from .heartbeat import heartbeat_document, status_line, write_heartbeat
from .lifecycle import FINAL, DaemonState, JobStatus, Outcome, shown_state
from .metrics import Metrics
from .names import display_name
from .notify import STOPPING_STATUS, Notifier
from .spool import JobDir, Spool

if TYPE_CHECKING:
    from .jobrunner import JobRunner
    from .progress import JobProgress

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
    #: the jobs running now, in the order they started
    runners: "tuple[JobRunner, ...]" = ()
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
        self._jobs: dict[str, _Told] = {}
        #: jobs that stopped running but stay claimed (waiting for a model): heartbeat and progress, for the next beat
        self._parked: dict[str, tuple[Path, dict[str, Any]]] = {}
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

    @property
    def stalled(self) -> bool:
        """Some running job has requests in flight and no result for `[watchdog] stall_seconds`."""
        return any(told.stalled for told in self._jobs.values())

    async def systemd_watchdog_loop(self, ready: Callable[[], bool]) -> None:
        """WATCHDOG=1 while healthy: `ready()` and no job stalled.

        systemd arms the watchdog at READY=1; a stuck engine stops the pings
        and systemd restarts the service, which resumes the job. (A fresh
        engine loading after a crash of the old one keeps the pings going.)
        """
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            if ready() and not self.stalled:
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def heartbeat_loop(self, shown: Callable[[], Shown]) -> None:
        """A heartbeat every `[heartbeat] seconds` (read each time: a reload may change it)."""
        while True:
            await self.heartbeat(shown())
            await asyncio.sleep(self.config.heartbeat.seconds)

    async def progress_loop(self, runners: Callable[[], Iterable["JobRunner"]],
                            act_on: Callable[[Stall], None]) -> None:
        """Every `[events] progress_seconds`: each running job's progress told, its stall verdict passed to `act_on`."""
        while True:
            await asyncio.sleep(self.config.events.progress_seconds)
            for runner in runners():
                act_on(self.progress(runner))

    def job_started(self, runner: "JobRunner") -> None:
        """A job (or the next run of one) starts: its counters start from what it has."""
        self._jobs[runner.job.id] = _Told()

    def job_ended(self, runner: "JobRunner", outcome: Outcome) -> None:
        """The last progress of a run, and the end of the job when the outcome is final."""
        told = self._jobs.setdefault(runner.job.id, _Told())
        told.stalled = False
        self.progress(runner, force=True)
        del self._jobs[runner.job.id]
        if outcome in (Outcome.WAITING, Outcome.PAUSED):
            self._park(runner, outcome)
        self._set_stalled_gauge()
        fields = {"job": runner.job.id, "input_file": runner.progress.input_file}
        if runner.progress.group:
            fields["group"] = runner.progress.group
        record = runner.record
        counts = record.request_counts.__dict__.copy()
        if outcome is Outcome.COMPLETED:
            self.publish("spoold.job.completed", {**fields, "request_counts": counts, "usage": record.usage,
                                                  "timings": record.timings or {}})
        elif outcome is Outcome.CANCELLED:
            self.publish("spoold.job.cancelled", {**fields, "request_counts": counts})
        elif outcome is Outcome.EXPIRED:
            self.publish("spoold.job.expired", {**fields, "request_counts": counts})
        elif outcome is Outcome.FAILED:
            self.publish("spoold.job.failed", {**fields, "errors": record.errors})
        elif outcome is Outcome.SPLIT:
            self.publish("spoold.job.split", {**fields, "parts": len(record.parts or [])})
        if runner.assembled is not None:  # this part was its batch's last: the batch is in outbox/
            self._group_assembled(runner.assembled)
        if outcome in FINAL and not runner.progress.group:  # a part is counted with its batch, once assembled
            self.job_finished(outcome)

    def _park(self, runner: "JobRunner", outcome: Outcome) -> None:
        """A job that waits claimed for its model: its heartbeat and its last progress event say so
        (`paused`/`waiting`, nothing in flight) rather than keep its last running beat, which `spoold
        status` would call stalled and `spoold watch` would show still running at its last rate."""
        summary = {**runner.progress.summary(), "state": outcome.value, "inflight": 0,
                   "requests_per_second": 0.0, "eta_seconds": None}
        self._parked[runner.job.id] = (runner.job.heartbeat, summary)
        for event in self._progress_events(summary):
            self.publish(*event)

    def _group_assembled(self, job: JobDir) -> None:
        """A split batch is whole again, in outbox/: its end on the feed and in the metrics, as a job's."""
        record, _ = job.read_record()
        if record is None:
            return
        counts = record.request_counts.__dict__.copy()
        self.publish(f"spoold.job.{record.status}", {"job": job.id, "input_file": record.input_file,
                                                     "request_counts": counts, "parts": len(record.parts or [])})
        self.job_finished(Outcome(record.status.value))

    def webhook_told(self, topic: str, fields: dict[str, Any]) -> None:
        """A webhook was delivered, or a try of one failed: on the feed and in the metrics."""
        self.publish(topic, fields)
        if self.metrics is not None:
            result = "delivered" if topic.endswith(".delivered") else "given_up" if fields["given_up"] else "failed"
            self.metrics.webhooks.labels(result).inc()

    def job_finished(self, outcome: Outcome) -> None:
        """Count a job that ended for good (also one refused at claim)."""
        if self.metrics is not None:
            self.metrics.jobs_finished.labels(outcome).inc()

    def progress(self, runner: "JobRunner", force: bool = False) -> Stall:
        """One job's progress event (only when its counts moved), its request counts, its stall measurement."""
        progress = runner.refresh()
        if progress.state == JobStatus.VALIDATING and not force:
            return Stall()  # no total yet: `spoold.job.validated` comes first
        told = self._jobs.setdefault(progress.job_id, _Told())
        stall = self._measure_stall(progress, told)
        self._count_requests(progress, told)
        if force or progress.done != told.announced:
            told.announced, told.summary = progress.done, progress.summary()
            for event in self._progress_events(told.summary):
                self.publish(*event)
        return stall

    def _progress_events(self, summary: dict[str, Any]) -> list[tuple[str, dict]]:
        """A job's progress event (from its JobProgress.summary); for a part of a split batch, also the
        whole batch's, as one job, so a watcher sees one bar per batch whichever daemons run its parts."""
        events = [("spoold.job.progress", {**summary, "gpus": self.readings})]
        group = summary.get("group")
        if not group:
            return events
        own_parts = {job_id: told.summary for job_id, told in self._jobs.items() if told.summary.get("group") == group}
        combined = Groups(self.spool).progress(group, own_parts)
        if combined is not None:
            events.append(("spoold.job.progress", _group_progress(combined, self.readings)))
        return events

    def _measure_stall(self, progress: "JobProgress", told: "_Told") -> Stall:
        idle_for = time.time() - progress.last_progress_at
        watchdog = self.config.watchdog
        stalled = progress.inflight > 0 and idle_for >= watchdog.stall_seconds
        if stalled and not told.stalled:  # once, when it starts
            log.error("job %s: %d requests in flight and no result for %.0fs: the engine looks stuck",
                      progress.job_id, progress.inflight, idle_for)
            self.publish("spoold.engine.stalled", {"job": progress.job_id, "inflight": progress.inflight,
                                                   "seconds_without_progress": round(idle_for, 1)})
        told.stalled = stalled
        self._set_stalled_gauge()
        return Stall(stalled, stalled and idle_for >= watchdog.restart_seconds)

    def _set_stalled_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.stalled.set(1 if self.stalled else 0)

    def _count_requests(self, progress: "JobProgress", told: "_Told") -> None:
        """Add what this job made durable since the last look to the request counters."""
        new = (progress.completed - progress.completed_at_start, progress.failed - progress.failed_at_start)
        if self.metrics is not None:
            self.metrics.requests.labels("completed").inc(max(0, new[0] - told.counted[0]))
            self.metrics.requests.labels("failed").inc(max(0, new[1] - told.counted[1]))
        told.counted = new

    def _set_job_gauges(self, progresses: "list[JobProgress]") -> None:
        """The gauges over every running job: in flight, rates, lines, the last progress."""
        m = self.metrics
        if m is None:
            return
        m.jobs.labels("running").set(len(progresses))
        m.inflight.set(sum(p.inflight for p in progresses))
        m.rate.set(sum(p.rate() for p in progresses))
        m.tokens_rate.set(sum(p.tokens_rate() for p in progresses))
        m.job_total.set(sum(p.total for p in progresses))
        m.job_done.set(sum(p.done for p in progresses))
        if progresses:
            m.last_progress.set(max(p.last_progress_at for p in progresses))

    def snapshot(self, shown: Shown) -> list[tuple[str, dict]]:
        """The current state, sent to a subscriber that has just connected."""
        events = [("spoold.daemon.heartbeat", self._heartbeat_payload(shown))]
        for runner in shown.runners:
            events += self._progress_events(runner.refresh().summary())
        return events

    # -- heartbeats and the status line ------------------------------------

    def shown_state(self, shown: Shown) -> DaemonState:
        """The state heartbeats and events report (lifecycle.shown_state says which wins)."""
        return shown_state(shown.state, bool(shown.paused), self.stalled)

    def _heartbeat_payload(self, shown: Shown) -> dict[str, Any]:
        jobs = [runner.progress.summary() for runner in shown.runners]
        return {"state": self.shown_state(shown), "model": shown.model, "queued": shown.queued,
                "job": jobs[0] if jobs else None, "jobs": jobs, "gpus": self.readings}

    def status_line(self, shown: Shown, progresses: "list[JobProgress]") -> str:
        """The line for `systemctl status`: loading, the jobs' progress, paused, or idle."""
        if shown.state in (DaemonState.STARTING, DaemonState.LOADING):
            return f"loading model {shown.model}"
        if shown.state == DaemonState.STOPPING:
            return STOPPING_STATUS
        if shown.paused:
            return f"PAUSED: {shown.paused}; retrying every {shown.retry_seconds:.0f}s"
        line = status_line(progresses, shown.queued, self.readings)
        return f"STALLED: {line}" if self.stalled else line

    async def heartbeat(self, shown: Shown) -> None:
        """Heartbeat files, the systemd status line, the heartbeat event, gauges, a periodic log line.

        The files are written in a thread: a spool on a slow or stuck NFS
        server must not hold the event loop (and with it every request in
        flight). One beat at a time, so an older one never lands last.
        """
        progresses = [runner.refresh() for runner in shown.runners]
        self.readings = self.gpus.read()
        state = self.shown_state(shown)
        doc = heartbeat_document(self.config.spool.host_id, state, progresses, self.readings)
        doc["model"] = shown.model
        beats = [(self.spool.host_dir / "heartbeat.json", doc)]
        state_dir = self.config.spool.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if state_dir:
            beats.append((Path(state_dir) / "heartbeat.json", doc))
        for job_id, (path, summary) in self._parked.items():
            if job_id not in self._jobs:  # a job run again since beats anew
                beats.append((path, {**heartbeat_document(self.config.spool.host_id, state, [], self.readings),
                                     "job": summary, "jobs": [summary], "model": shown.model}))
        self._parked.clear()
        for runner, progress in zip(shown.runners, progresses):
            if progress.state != JobStatus.COMPLETED:  # each job's own, naming only itself
                job_doc = heartbeat_document(self.config.spool.host_id, state, [progress], self.readings)
                beats.append((runner.job.heartbeat, {**job_doc, "model": shown.model}))
        self._set_job_gauges(progresses)
        if self.metrics is not None:
            self.metrics.jobs.labels("queued").set(shown.queued)
            self.metrics.set_gpus(self.readings)
        async with self._writing:
            failures = await asyncio.to_thread(self._write_files, beats)
        if failures != self._heartbeat_failures:  # once per change, not every beat
            self._heartbeat_failures = failures
            for failure in failures:
                log.warning("cannot write heartbeat %s", failure)
        line = self.status_line(shown, progresses)
        self.notifier.status(line)
        self.publish("spoold.daemon.heartbeat", self._heartbeat_payload(shown))
        now = time.monotonic()
        if progresses and now - self._last_log >= LOG_PROGRESS_SECONDS:
            self._last_log = now
            log.info("%s", line)

    def _write_files(self, beats: list[tuple[Path, dict[str, Any]]]) -> list[str]:
        """The beat's file work (heartbeats, the jobs gauge's directory count, the textfile): in a thread."""
        failures = write_heartbeat(beats, self.spool.file_mode, self.spool.gid)
        if self.metrics is not None:
            try:
                self.metrics.jobs.labels("processing").set(self.spool.count_host_jobs())
            except OSError as e:
                failures.append(f"{self.spool.host_dir}: {e.strerror or e}")
            self.metrics.write_textfile(self.config.metrics.textfile)
        return failures


@dataclass
class _Told:
    """What the reporter last said about one running job."""

    counted: tuple[int, int] = (0, 0)
    announced: int = -1
    #: its progress as last told (JobProgress.summary): a split batch's combined count sums its parts'
    summary: dict[str, Any] = field(default_factory=dict)
    stalled: bool = False


def _group_progress(combined: dict[str, Any], gpus: list[dict]) -> dict[str, Any]:
    """A split batch's combined progress (Groups.progress) in the shape of a job's progress event."""
    return {"job": combined["id"], "input_file": display_name(combined["input_file"]), "state": JobStatus.IN_PROGRESS,
            "total": combined["total"], "done": combined["completed"] + combined["failed"],
            "completed": combined["completed"], "failed": combined["failed"],
            "requests_per_second": combined["requests_per_second"], "eta_seconds": combined["eta_seconds"],
            "parts": combined["parts"], "parts_done": combined["parts_done"], "gpus": gpus}
