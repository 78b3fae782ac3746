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
from pathlib import Path

from .config import Config
from .engine import Engine
from .gpu import GpuReader
from .heartbeat import heartbeat_document, status_line, write_heartbeat
from .jobrunner import EngineFailed, IncompleteJob, JobRunner
from .notify import Notifier
from .spool import JobDir, Spool
from .validation import ModelResolver
from .watcher import InboxWatcher
from .writer import WriterFailed

log = logging.getLogger(__name__)

#: How long to wait before retrying a job whose results could not be written
#: (a full or failing disk): long enough not to spin, short enough to resume soon.
WRITE_RETRY_SECONDS = 5.0

#: How often the status line goes to the log as well as to systemd.
LOG_PROGRESS_SECONDS = 30.0


class Daemon:
    """`spoold run`: serve the spool until told to stop."""

    def __init__(self, config: Config, engine: Engine, notifier: Notifier | None = None,
                 gpus: GpuReader | None = None) -> None:
        self.config = config
        self.engine = engine
        self.spool = Spool(config.spool)
        self.resolver = ModelResolver(config.models.aliases, config.engine.model)
        self.watcher = InboxWatcher(self.spool, config.spool.settle_seconds, config.spool.poll_seconds)
        self.notifier = notifier or Notifier()
        self.gpus = gpus or GpuReader()
        self.state = "starting"
        self.exit_code = 0
        self._stop: asyncio.Event | None = None
        self._signals = 0
        self._main_task: asyncio.Task | None = None
        self._current: JobRunner | None = None
        self._stuck: set[str] = set()
        self._queued = 0
        self._last_log = 0.0

    def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        try:
            return asyncio.run(self._main())
        except asyncio.CancelledError:
            log.warning("cold stop: in-flight work abandoned, it resumes on the next start")
            return 0

    async def _main(self) -> int:
        self._stop = asyncio.Event()
        self._main_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.spool.ensure_dirs()
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        try:
            await self._start_engine()
            if not self._stop.is_set():
                self.watcher.start()
                await self._serve()
        finally:
            self.state = "stopping"
            self.notifier.stopping()
            self.watcher.stop()
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            self._write_heartbeat()
            await self.engine.close()
            log.info("stopped")
        return self.exit_code

    def _on_signal(self, sig: int) -> None:
        """Record the signal; the main loop acts on it."""
        self._signals += 1
        if self._signals == 1:
            log.info("%s: warm stop (finishing writes; send again to stop at once)", signal.Signals(sig).name)
            self._stop.set()
            self.watcher.wake()
        elif self._main_task is not None:
            self._main_task.cancel()

    async def _start_engine(self) -> None:
        self.state = "loading"
        self.notifier.status(f"loading model {self.engine.model}")
        log.info("loading model %s", self.engine.model)
        started = time.monotonic()
        await self.engine.start()
        log.info("model loaded in %.1fs", time.monotonic() - started)
        self.state = "idle"
        self.notifier.ready(status_line(None, len(self.spool.inbox_entries()), self.gpus.read()))

    async def _serve(self) -> None:
        """Finish this host's claimed jobs first, then claim drops as they complete."""
        while not self._stop.is_set():
            job = self._next_own_job()
            if job is None:
                job = self._claim_next()
            if job is None:
                await self.watcher.wait()
                continue
            await self._run_job(job)

    def _next_own_job(self) -> JobDir | None:
        for job in self.spool.host_jobs():
            if job.id not in self._stuck:
                return job
        return None

    def _claim_next(self) -> JobDir | None:
        drops = self.watcher.complete_drops()
        self._queued = len(drops)
        for name in drops:
            job = self.spool.claim_drop(name)
            self.watcher.forget(name)
            if job is not None:
                log.info("claimed %s as job %s", name, job.id)
                return job
        return None

    async def _run_job(self, job: JobDir) -> None:
        runner = JobRunner(self.spool, job, self.engine, self.resolver, self.config.limits,
                           self.config.engine.inflight_limit, self._stop)
        self._current = runner
        self.state = "working"
        try:
            outcome = await runner.run()
            if outcome == "interrupted":
                log.info("job %s interrupted at %d/%d; it resumes on the next start",
                         job.id, runner.progress.done, runner.progress.total)
        except WriterFailed as e:
            log.error("job %s: %s; retrying in %.0fs", job.id, e, WRITE_RETRY_SECONDS)
            self.notifier.status(f"{job.id}: cannot write results ({e}); retrying")
            await self._sleep_unless_stopped(WRITE_RETRY_SECONDS)
        except IncompleteJob as e:
            log.error("%s", e)
            self._stuck.add(job.id)
        except EngineFailed as e:
            log.error("%s; exiting so the service restarts with a fresh engine", e)
            self.exit_code = 1
            self._stop.set()
        finally:
            self._current = None
            self.state = "idle"

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _heartbeat_loop(self) -> None:
        while True:
            self._write_heartbeat()
            await asyncio.sleep(self.config.heartbeat.seconds)

    def _write_heartbeat(self) -> None:
        """Heartbeat files, the systemd status line, and a periodic log line."""
        progress = self._current.refresh() if self._current else None
        gpus = self.gpus.read()
        doc = heartbeat_document(self.config.spool.host_id, self.state, progress, gpus)
        paths = [self.spool.host_dir / "heartbeat.json"]
        state_dir = self.config.spool.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if state_dir:
            paths.append(Path(state_dir) / "heartbeat.json")
        if progress is not None and progress.state != "completed":
            paths.append(self._current.job.heartbeat)
        write_heartbeat(paths, doc, self.spool.file_mode, self.spool.gid)
        line = status_line(progress, self._queued, gpus)
        self.notifier.status(line)
        now = time.monotonic()
        if progress is not None and now - self._last_log >= LOG_PROGRESS_SECONDS:
            self._last_log = now
            log.info("%s", line)
