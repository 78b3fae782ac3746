"""The daemon: wires spool, inbox tracker, engine, job runner and reporter together.

One main loop owns all decisions: what runs next, when to stop, pause,
swap or replace the engine. Every claimed job of the loaded model runs at
once (up to `[spool] max_active_jobs`, runningjobs.py), sharing the
engine's in-flight window fairly; the worklist finds and claims work; each
runner notices its own cancel; the reporter tells the world (heartbeats,
STATUS=, events, metrics). What others notice comes back here as a verdict
to act on: a stall from the reporter, a job's end (a failing disk, a dead
engine) from the running jobs. Signal handlers only record the signal; the
loop acts on it (gunicorn's arbiter): the first SIGTERM stops claiming, lets
finished results reach disk and exits 0, leaving the jobs to resume on the
next start; a second one cancels at once (rq's cold shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from .backoff import RetryPolicy
from .config import Config, engine_settings_for
from .engine import Engine
from .enginehost import EngineHost
from .events import EventPublisher
from .gpu import GpuReader
from .heartbeat import status_line
from .inbox import InboxTracker
from .jobrunner import job_fields
from .lifecycle import DaemonState
from .metrics import Metrics
from .names import display_name
from .notify import Notifier
from .pause import DiskPause
from .reload import apply_reload
from .reporter import Reporter, Shown, Stall
from .runningjobs import JobEnd, RunningJobs, Trouble
from .spool import Spool
from .supervise import run_event_loop, supervise
from .validation import ModelResolver
from .webhooks import Deliveries, WebhookSender, job_published, record_end
from .worklist import Claimed, Swap, Unclaimed, WorkList, describe

log = logging.getLogger(__name__)


class Daemon:
    """`spoold run`: serve the spool until told to stop."""

    def __init__(self, config: Config, engine: Engine, notifier: Notifier | None = None,
                 gpus: GpuReader | None = None, metrics: Metrics | None = None,
                 events: EventPublisher | None = None,
                 reload_config: Callable[[], Config] | None = None,
                 make_engine: Callable[[str], Engine] | None = None,
                 webhook_secrets: dict[str, str] | None = None) -> None:
        self.config = config
        self.reload_config = reload_config
        self.metrics = metrics
        self.events = events
        deliveries = Deliveries(config.spool.root, config.spool.host_id, config.spool.file_mode)
        self.spool = Spool(config.spool, before_publish=record_end(deliveries, webhook_secrets)
                           if webhook_secrets else None)
        self.resolver = ModelResolver(config.models.aliases, config.engine.model)
        self.inbox = InboxTracker(self.spool, config.spool.settle_seconds, config.spool.poll_seconds)
        self.notifier = notifier or Notifier()
        self.gpus = gpus or GpuReader()
        self.report = Reporter(config, self.spool, self.notifier, self.gpus, metrics, events)
        self.webhooks = WebhookSender(deliveries, config.webhooks, webhook_secrets, job_published(config.spool.root),
                                      self.report.webhook_told, config.spool.claim_timeout) if webhook_secrets else None
        retry = RetryPolicy(config.engine.max_attempts, config.engine.retry_backoff_seconds)
        self.engine_host = EngineHost(engine, make_engine, self.report.publish, self.gpus, retry=retry)
        self.work = WorkList(config, self.spool, self.inbox, self.resolver, self.report)
        self.jobs = RunningJobs(self.spool, self.resolver, config.limits, self.report, self._job_ended,
                                self._inflight_limit(), retry)
        self.state = DaemonState.STARTING
        self.exit_code = 0
        self._stop: asyncio.Event | None = None
        self._signals = 0
        self._main_task: asyncio.Task | None = None
        self._hup: asyncio.Event | None = None
        self.pause = DiskPause()
        #: why the engine must be replaced (it died, or hung past restart_seconds); None while healthy
        self._trouble: str | None = None
        self._ready_sent = False

    def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        return run_event_loop(self._main)

    async def _main(self) -> int:
        self._stop = asyncio.Event()
        self._hup = asyncio.Event()
        self._main_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._hup.set)
        self.spool.ensure_dirs()
        self.work.recover()
        if self.events is not None:
            self.events.start(lambda: self.report.snapshot(self._shown()))
        background = {"heartbeat_loop": lambda: self.report.heartbeat_loop(self._shown),
                      "reload_loop": self._reload_loop,
                      "progress_loop": lambda: self.report.progress_loop(self.jobs.runners, self._act_on),
                      "systemd_watchdog_loop": lambda: self.report.systemd_watchdog_loop(lambda: self._ready_sent)}
        if self.webhooks is not None:
            background["webhook_loop"] = self.webhooks.run
        loops = [asyncio.create_task(self._supervised(run, name), name=name) for name, run in background.items()]
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
            self.jobs.stop_all(daemon_stops=True)
            await self.jobs.settle()
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

    async def _supervised(self, loop: Callable[[], Any], name: str | None = None) -> None:
        """A background loop for good (supervise.py); one that keeps failing stops the daemon for systemd."""
        if not await supervise(loop, self.metrics, name):
            self.exit_code = 1
            self._stop.set()
            self.inbox.wake()

    def _on_signal(self, sig: int) -> None:
        """Record the signal; the main loop acts on it."""
        self._signals += 1
        if self._signals == 1:
            log.info("%s: warm stop (finishing writes; send again to stop at once)", signal.Signals(sig).name)
            self._stop.set()
            self.jobs.stop_all(daemon_stops=True)
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
        extender = asyncio.create_task(self.notifier.keep_extending_timeout())
        try:
            await self.engine_host.load()
        finally:
            extender.cancel()
        self.jobs.new_window(self._inflight_limit(), self._engine_runs())
        self.state = DaemonState.IDLE
        await self._write_heartbeat()  # a state change is on disk at once, not a period later
        self.notifier.ready(status_line([], len(self.spool.inbox_entries()), self.gpus.read()))
        self._ready_sent = True

    async def _serve(self) -> None:
        """Run this host's jobs and claim drops as they complete, oldest first, few model swaps.

        Woken by the inbox (a drop, a poll) and by every job that ends.
        """
        while not self._stop.is_set():
            self._notice_dead_engine()
            if self._trouble is not None:
                await self._replace_engine()
                continue
            if self.pause.reason is not None:
                await self._wait_out_pause()
                continue
            try:
                swap = await self._fill()
            except OSError as e:  # EIO or ESTALE from the spool: pause and look again, never exit
                self._pause_for(f"cannot read the spool: {describe(e)}")
                continue
            if swap is not None and not self.jobs:
                await self._swap_engine(swap.model)
                continue
            if swap is not None and swap.overdue:
                self._pause_for_swap(swap.model)  # each pause ends its job's run, which wakes this loop
            await self.inbox.wait()

    def _inflight_limit(self) -> int:
        return engine_settings_for(self.config, self.engine.model).inflight_limit  # [models.X] may set it

    def _engine_runs(self) -> int:
        """Requests the engine runs at once (`max_num_seqs` per replica); the rest wait in its queue."""
        settings = engine_settings_for(self.config, self.engine.model)
        return settings.max_num_seqs * max(1, settings.data_parallel_size)

    async def _reload_loop(self) -> None:
        """SIGHUP, recorded by its handler, acted on here: reload, then a heartbeat that shows it."""
        while True:
            await self._hup.wait()
            self._hup.clear()
            self._reload()
            await self._write_heartbeat()

    def _reload(self) -> None:
        """SIGHUP: the settings that can change without reloading the model reach every part (reload.py)."""
        if self.reload_config is not None:
            apply_reload(self.config, self.reload_config, self._apply_settings, self.notifier)

    def _apply_settings(self, config: Config) -> None:
        self.config = self.report.config = self.work.config = config  # what they measure and look for
        self.inbox.settle_seconds, self.inbox.poll_seconds = config.spool.settle_seconds, config.spool.poll_seconds
        self.jobs.window.capacity = self._inflight_limit()

    # -- the jobs that run at once --------------------------------------------

    async def _fill(self) -> Swap | None:
        """Start what may run now beside the running jobs; returns the swap that is due, if one is."""
        await self.work.finish_groups_now_and_then()
        for claimed in self.work.take_over_orphans():
            self._start(claimed)
        chosen, swap = await self.work.next_round(self.engine.model, self.jobs.tenants(),
                                                 self.config.spool.max_active_jobs - len(self.jobs),
                                                 self.engine_host.loaded_at)
        if self.pause.reason:
            return None
        # Drops are claimed together: each claim's fsyncs wait on the disk, not on the others.
        for claimed in await asyncio.gather(*(self._claim(item) for item in chosen)):
            if claimed is not None:
                self._start(claimed)
        return swap

    async def _claim(self, item: Claimed | Unclaimed | str) -> Claimed | None:
        if isinstance(item, Claimed):
            return item
        try:
            if isinstance(item, Unclaimed):
                return await self.work.claim_part(item)
            return await self.work.claim(item)
        except OSError as e:
            name = f"part {item.part.id}" if isinstance(item, Unclaimed) else display_name(item)
            self._pause_for(f"cannot claim {name}: {describe(e)}")
            return None

    def _start(self, claimed: Claimed) -> None:
        self.jobs.start(claimed, self.engine)
        self.state = DaemonState.WORKING

    def _pause_for_swap(self, model: str) -> None:
        """A job has waited `[models] max_wait_seconds` for `model`: the running jobs pause now rather
        than keep it waiting until they end (hours, for a big batch). What they have done stays done and
        what is in flight settles, as in a warm stop; they stay claimed, and resume when their model
        is loaded again, under the same bound."""
        paused = self.jobs.pause_all()
        if paused:
            log.info("a job has waited over %.0fs for model %s: pausing %d running job(s) of %s for the swap",
                     self.config.models.max_wait_seconds, model, paused, self.engine.model)

    def _job_ended(self, end: JobEnd) -> None:
        """A job's run is over: act on what its end asks, then look for more work (a slot is free)."""
        self.work.job_ended(end.job_id, end.outcome, end.waits_from_now)
        if end.trouble is Trouble.DISK:
            self._pause_for(end.reason, end.job_id)
        elif end.trouble is Trouble.ENGINE:
            self._engine_trouble(end.reason)
        elif end.trouble is Trouble.STUCK:
            self.work.stuck.add(end.job_id)  # not picked again until the next start
        if not self.jobs and self.state == DaemonState.WORKING:
            self.state = DaemonState.IDLE
        if self.webhooks is not None:
            self.webhooks.wake.set()  # a finished job's delivery is recorded: send it now
        self.inbox.wake()

    def _engine_trouble(self, reason: str) -> None:
        """The engine died or hangs: stop sending it anything, stop every job; the loop replaces it."""
        if self._trouble is None:
            self._trouble = reason
            self.jobs.window.close()  # a request sent to it now would be lost, and blamed on its line
            self.jobs.stop_all()
            self.inbox.wake()

    def _notice_dead_engine(self) -> None:
        """An engine that died between requests (an idle daemon's, say) is replaced now.

        A request would find it dead too, but only when the next job comes:
        until then `spoold status` shows a healthy idle daemon, and that job
        waits out the load of a fresh engine.
        """
        reason = self.engine_host.dead_reason()
        if reason is not None:
            self._engine_trouble(f"{reason} (seen while {self.state.value})")  # acts once per death

    def _pause_for(self, reason: str, job_id: str | None = None) -> None:
        """A full or failing disk: say so everywhere (pause.py); the loop waits, then tries again."""
        if self.pause.begin(reason, job_fields(job_id) if job_id else None):
            self.inbox.wake()

    async def _wait_out_pause(self) -> None:
        """Start nothing for a while; then make again the spool directories someone removed."""
        await self._write_heartbeat()
        await self.pause.wait_out(self._stop)
        try:
            self.spool.ensure_dirs()
        except OSError as e:
            log.error("cannot create the spool directories: %s", describe(e))

    async def _replace_engine(self) -> None:
        """Replace a dead or hung engine in-process, once every job has stopped; they resume on the fresh one.

        What was durable stays done; the requests that were in flight have no
        result line and simply run again. An engine that keeps failing makes
        the daemon exit 1 instead, for systemd to restart the whole service.
        """
        await self.jobs.settle()
        reason, self._trouble = self._trouble, None
        if self._stop.is_set():  # asked for meanwhile: stop now, not after a load (Ctrl-C kills the engine too)
            log.info("%s; not replaced: stopping", reason)
            return
        if not await self.engine_host.restart(reason, self._start_engine):
            self.exit_code = 1
            self._stop.set()

    async def _swap_engine(self, model: str) -> None:
        """Unload the current model (its memory measured on the way out), then load `model`.

        A model that fails to load is replaced by an UnavailableEngine: its
        lines get 503 results naming why, and the daemon goes on with the
        other models' jobs.
        """
        if self.metrics is not None:
            self.metrics.swaps.inc()
        await self.engine_host.swap(model, self._start_engine)
        if self.state == DaemonState.LOADING:  # the load failed part way
            self.state = DaemonState.IDLE

    # -- what the reporter is told, and its one verdict ---------------------

    def _shown(self) -> Shown:
        """What the daemon is doing, for the reporter."""
        return Shown(self.state, self.engine.model, self.pause.reason, self.jobs.runners(), self.work.queued,
                     self.pause.retry_seconds)

    async def _write_heartbeat(self) -> None:
        await self.report.heartbeat(self._shown())

    def _act_on(self, stall: Stall) -> None:
        """An engine hung past `[watchdog] restart_seconds` stops every job; the loop then replaces it.

        (A stall short of that only stops the watchdog pings: `Reporter.systemd_watchdog_loop`.)
        """
        if stall.hung:
            self._engine_trouble(f"the engine made no progress for {self.config.watchdog.restart_seconds:.0f}s")

