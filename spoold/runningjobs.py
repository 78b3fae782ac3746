"""The jobs that run at once, and what each one's end asks of the daemon.

Every claimed job of the loaded model runs in a task of its own, with its
own JobRunner and its share of the engine's in-flight window (window.py).
This module starts them, stops them, waits for them, and turns the way
each one ended into a JobEnd verdict. It decides nothing: the daemon's
loop acts on the verdict (pause for a failing disk, replace a dead engine,
leave a stuck job alone), as it acts on the reporter's stall verdicts.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .backoff import RetryPolicy
from .config import LimitsSettings
from .engine import Engine, EngineDead
from .jobrunner import IncompleteJob, JobRunner, job_fields
from .lifecycle import Outcome
from .reporter import Reporter
from .spool import Spool
from .validation import ModelResolver
from .window import FairWindow
from .worklist import Claimed, describe
from .writer import JobLost, WriterFailed

log = logging.getLogger(__name__)


class Trouble(enum.Enum):
    """What a job's end asks of the daemon, beyond looking for more work."""

    DISK = "disk"      # its results could not be written: pause, then resume it
    ENGINE = "engine"  # the engine died under it: replace the engine, then resume it
    STUCK = "stuck"    # it cannot run here until the next start (a bug, lines without results)


@dataclass(frozen=True)
class JobEnd:
    """How one job's run ended: its outcome and, when something is wrong, what and why."""

    job_id: str
    outcome: Outcome
    trouble: Trouble | None = None
    reason: str = ""
    #: it stays claimed and begins waiting for a model now (paused for a swap, or done with one
    #: model's lines), rather than from when it came: the scheduler's starvation bound counts from here
    waits_from_now: bool = False


class RunningJobs:
    """The jobs running now, in the order they started, sharing one engine's window."""

    def __init__(self, spool: Spool, resolver: ModelResolver, limits: LimitsSettings,
                 report: Reporter, on_end: Callable[[JobEnd], None], capacity: int,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        self.spool = spool
        self.retry = retry
        self.resolver = resolver
        self.limits = limits
        self.report = report
        self.on_end = on_end
        #: the engine's in-flight window (a fresh one per engine: `new_window`)
        self.window = FairWindow(capacity)
        self._running: dict[str, Running] = {}
        #: running jobs asked to stop for a model swap (`pause_all`): they end PAUSED, not INTERRUPTED
        self._paused: set[str] = set()

    def __len__(self) -> int:
        return len(self._running)

    def tenants(self) -> dict[str, str]:
        """The jobs running now, each id with its tenant (whose turn the next claim is: scheduler.py)."""
        return {job_id: r.runner.share.tenant for job_id, r in self._running.items()}

    def runners(self) -> tuple[JobRunner, ...]:
        """The running jobs' runners, oldest first (their progress is what is shown)."""
        return tuple(r.runner for r in self._running.values())

    def new_window(self, capacity: int, running: int = 0) -> None:
        """A fresh window for a fresh engine (the old one may have been closed on a dead engine);
        `running`: how many requests the engine runs at once."""
        self.window = FairWindow(capacity, running)

    def start(self, claimed: Claimed, engine: Engine) -> None:
        """Run one job beside the others, with its own stop and its share of the window."""
        read = claimed.record or claimed.job.read_record()
        record = read[0]
        share = self.window.join(claimed.job.id, record.share_tenant() if record else "",
                                 record.weight() if record else 1)
        runner = JobRunner(self.spool, claimed.job, engine, self.resolver, self.limits, share,
                           asyncio.Event(), on_validated=self.report.validated, record=read, retry=self.retry)
        self.report.job_started(runner)
        task = asyncio.create_task(self._run(runner), name=f"job:{claimed.job.id}")
        self._running[claimed.job.id] = Running(runner, task)

    def stop_all(self, daemon_stops: bool = False) -> None:
        """Tell every running job to stop: what is in flight settles, what is durable stays. When the
        daemon stops, a job paused for a swap is stopped too: it resumes on the next start."""
        if daemon_stops:
            self._paused.clear()
        for running in self._running.values():
            running.runner.stop.set()

    def pause_all(self) -> int:
        """Stop every running job as `stop_all` does, for a model swap: each ends PAUSED, still claimed,
        to resume when its model is loaded again. Returns how many were running and not yet stopping."""
        asked = [running.runner for running in self._running.values() if not running.runner.stop.is_set()]
        for runner in asked:
            self._paused.add(runner.job.id)
            runner.stop.set()
        return len(asked)

    async def settle(self) -> None:
        """Wait until every running job has stopped."""
        await asyncio.gather(*(r.task for r in list(self._running.values())), return_exceptions=True)

    async def _run(self, runner: JobRunner) -> None:
        end = JobEnd(runner.job.id, Outcome.INTERRUPTED)
        try:
            end = await self._ending(runner)
        finally:
            runner.share.leave()
            self.report.job_ended(runner, end.outcome)
            del self._running[runner.job.id]
            self._paused.discard(runner.job.id)
            self.on_end(end)

    async def _ending(self, runner: JobRunner) -> JobEnd:
        """One job's run, and its end as a verdict; a bug or an I/O fault never leaves this task."""
        job = runner.job
        fields = job_fields(job.id)
        try:
            outcome = await runner.run()
        except JobLost as e:
            log.warning("job %s is no longer this host's: %s; leaving it alone", job.id, e, **fields)
            return JobEnd(job.id, Outcome.INTERRUPTED)
        except (WriterFailed, OSError) as e:
            return JobEnd(job.id, Outcome.INTERRUPTED, Trouble.DISK, f"job {job.id}: {describe(e)}")
        except IncompleteJob as e:
            log.error("%s", e)
            return JobEnd(job.id, Outcome.INTERRUPTED, Trouble.STUCK, str(e))
        except EngineDead as e:
            return JobEnd(job.id, Outcome.INTERRUPTED, Trouble.ENGINE, str(e))
        except Exception as e:
            log.error("job %s stopped by an unexpected %s: %s; it stays in %s and is retried "
                      "on the next start", job.id, type(e).__name__, e, job.path.parent, exc_info=True, **fields)
            return JobEnd(job.id, Outcome.INTERRUPTED, Trouble.STUCK, f"{type(e).__name__}: {e}")
        if outcome is Outcome.WAITING:
            log.info("job %s: the lines for %s are done; next model: %s", job.id, runner.engine.model,
                     runner.record.next_model(), **fields)
            # A job claimed on this model only to be validated has not been served yet: it waits from its drop.
            return JobEnd(job.id, outcome, waits_from_now=runner.engine.model in runner.record.models)
        if outcome is Outcome.INTERRUPTED and job.id in self._paused:
            log.info("job %s paused at %d/%d for a model swap; it resumes when %s is loaded again",
                     job.id, runner.progress.done, runner.progress.total, runner.engine.model, **fields)
            return JobEnd(job.id, Outcome.PAUSED, waits_from_now=True)
        if outcome is Outcome.INTERRUPTED and not self.window.closed:  # a closed window: the engine's news
            log.info("job %s interrupted at %d/%d; it resumes on the next start",
                     job.id, runner.progress.done, runner.progress.total, **fields)
        return JobEnd(job.id, outcome)


@dataclass(frozen=True)
class Running:
    """A job running now: its runner (progress, stop) and the task that runs it."""

    runner: JobRunner
    task: asyncio.Task
