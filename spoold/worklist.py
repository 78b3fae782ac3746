"""What this daemon could run next: its own claimed jobs, orphans of dead peers, the inbox's drops.

The worklist looks at the spool and puts what it finds in the scheduler's
order; it claims a drop or takes over an orphan when the daemon's loop
asks it to. It decides nothing about when to run, swap or stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .durable import finish_in_thread
from .groups import Groups
from .jobrecord import JobRecord
from .jobrunner import job_fields
from .lifecycle import FINAL, JobStatus, Outcome
from .names import display_name
from .inbox import InboxTracker
from .reporter import Reporter
from .scheduler import Candidate, fair_order, in_order, overdue
from .spool import DropRefused, JobDir, PeerClocks, Spool
from .validation import ModelResolver, first_model

log = logging.getLogger(__name__)

#: How many complete drops (first seen first) one scheduling pass weighs:
#: enough to find the loaded model's work, few enough that a pass over an
#: inbox of 10,000 drops costs no more than over one of 64.
SCHEDULE_WINDOW = 64


@dataclass(frozen=True)
class Unclaimed:
    """A part of a split batch (groups.py) that no daemon has claimed yet."""

    part: JobDir


@dataclass(frozen=True)
class Claimed:
    """A job of this host chosen to run, with its record as read for this pass (None: read it then)."""

    job: JobDir
    record: tuple[JobRecord | None, str | None] | None


@dataclass(frozen=True)
class Swap:
    """The model the job whose turn it is needs: loaded once the running jobs are done."""

    model: str
    #: that job has waited past `[models] max_wait_seconds`: the running jobs pause for it now
    overdue: bool = False


class WorkList:
    """This host's jobs and the complete drops, as scheduler candidates; claims and takeovers."""

    def __init__(self, config: Config, spool: Spool, inbox: InboxTracker, resolver: ModelResolver,
                 report: Reporter) -> None:
        self.config, self.spool, self.inbox, self.resolver, self.report = config, spool, inbox, resolver, report
        #: jobs that failed in a way a retry in this process cannot mend (left for the next start)
        self.stuck: set[str] = set()
        #: drops whose claim failed on an error of spoold's own: left in the inbox until the next start
        self.unclaimable: set[str] = set()
        #: complete drops in the inbox at the last look
        self.queued = 0
        self._orphans_checked = 0.0
        self._peer_clocks = PeerClocks()
        self.groups = Groups(spool)
        self._groups_checked = time.monotonic()
        self.owners = DropOwners(spool)
        #: each tenant's last turn (scheduler.fair_order): a count that grows with every job chosen
        self.turns: dict[str, int] = {}
        #: when a claimed job began waiting for the model it needs next, where that is not when it was
        #: claimed: a drop waits from its arrival, a job paused for a swap (or done with one model's
        #: lines) from then. The scheduler's `max_wait_seconds` counts from here (kept in memory only:
        #: after a restart a job waits from its claim)
        self.waiting_since: dict[str, float] = {}

    def recover(self) -> None:
        """Before READY: clean half-made claims, finish the assemblies a crash cut short (of any host:
        they are idempotent) and name the jobs this host will resume first."""
        self.groups.remove_stale_copies(self.spool.host_jobs())
        self.finish_groups()
        pending = self.spool.recover()
        if pending:
            log.info("%d unfinished job(s) of this host will be resumed first: %s",
                     len(pending), ", ".join(job.id for job in pending))

    async def next_round(self, loaded: str, running: Mapping[str, str], free: int,
                         loaded_at: float = 0.0) -> tuple[list[Claimed | Unclaimed | str], Swap | None]:
        """What may start now beside the running jobs (`running`: their ids, each with its tenant), at
        most `free`, in the scheduler's order, and the swap that is due (None: none is).

        Only jobs of the loaded model run together. When the job whose turn
        it is needs another model, nothing after it starts: its model is
        returned instead, overdue if that job has waited past `[models]
        max_wait_seconds` (scheduler.overdue; `loaded_at`: when the loaded
        model was). One not validated yet runs on the loaded model first
        (validation needs none, and its lines for this model run before a swap).
        """
        chosen: list[Claimed | Unclaimed | str] = []
        now = time.time()
        for rank, choice in enumerate(await self.in_order(loaded, running, loaded_at, now)):
            if len(chosen) >= free:
                break
            if choice.model not in (None, loaded):
                if rank > 0:
                    continue  # not its turn yet: the scheduler's starvation bound says when
                if self.validated(choice):
                    late = overdue(choice, loaded, loaded_at, self.config.models.max_wait_seconds, now)
                    return chosen, Swap(choice.model, late)
            chosen.append(choice.item)
            self.turns[choice.tenant] = max(self.turns.values(), default=0) + 1
        return chosen, None

    async def in_order(self, loaded: str, running: Mapping[str, str], loaded_at: float = 0.0,
                       now: float | None = None) -> list[Candidate]:
        """Every job of this host not running now, the first unclaimed parts of split batches and the first
        complete drops of each tenant, in the order to try them (scheduler.py; `running`: the running
        jobs' ids, each with its tenant).

        A candidate's `item` is a `Claimed` job, an `Unclaimed` part or a
        drop's name; its `model` is what it needs next (None: any will do).
        A part is as old as its batch: parts go before later drops, as far
        as the scheduler's starvation bound lets them.
        """
        held = self.spool.host_jobs()
        own = [self._candidate(job) for job in held if job.id not in running and job.id not in self.stuck]
        await self.inbox.refresh()
        drops = [name for name in self.inbox.complete_drops() if name not in self.unclaimable]
        self.queued = len(drops)
        await self.owners.learn(self.inbox.take_arrived(), drops)
        load = Counter(running.values())
        parts = [_waiting(Unclaimed(part), None, record) for part, record in
                 itertools.islice(self.groups.claimable({job.id for job in held}), SCHEDULE_WINDOW)]
        drops_first = [Candidate(name, None, self.inbox.seen_at(name), tenant, weight)
                       for name, tenant, weight in self.owners.first(drops, SCHEDULE_WINDOW)]
        fresh = fair_order(parts + drops_first, load, self.turns)[:SCHEDULE_WINDOW]
        if len(self.resolver.known) > 1:  # only then is a peek at what they need worth it
            fresh = [dataclasses.replace(c, model=first_model(self._input(c.item), self.resolver)) for c in fresh]
        return in_order(own + fresh, loaded, self.config.models.max_wait_seconds, now or time.time(), load,
                        self.turns, loaded_at)

    def _input(self, item: Unclaimed | str) -> Path:
        return item.part.input if isinstance(item, Unclaimed) else self.spool.inbox / item

    def _candidate(self, job: JobDir) -> Candidate:
        """A claimed job for the scheduler: the model it needs next (from its record, or a
        peek at a job not validated yet), when it was claimed, whose it is. Its record is
        read here once for the pass, and the runner reuses it."""
        record, problem = read = job.read_record()
        if problem or job.cancel_request.exists():
            model = None  # the runner fails or cancels it, on whatever model is loaded
        elif record is None or record.status == JobStatus.VALIDATING:
            model = first_model(job.input, self.resolver)
        else:
            model = self.known(record.next_model())
        candidate = _waiting(Claimed(job, read), model, record)
        since = self.waiting_since.get(job.id)
        return candidate if since is None else dataclasses.replace(candidate, since=since)

    def job_ended(self, job_id: str, outcome: Outcome, waits_from_now: bool) -> None:
        """A run of a job ended: one that stays claimed for another model waits from now (or, not yet
        served, from when it came); one that has left the host is forgotten."""
        if waits_from_now:
            self.waiting_since[job_id] = time.time()
        elif outcome in FINAL or outcome is Outcome.SPLIT:
            self.waiting_since.pop(job_id, None)

    @staticmethod
    def validated(candidate: Candidate) -> bool:
        """Whether the candidate is a claimed job past validation, whose record names the model it needs."""
        item = candidate.item
        if not isinstance(item, Claimed) or item.record is None or item.record[0] is None:
            return False
        return item.record[0].status != JobStatus.VALIDATING

    def known(self, model: object) -> str | None:
        """A model named in a batch.json, if it is a configured one; None (any will do) otherwise:
        the runner then fails a job whose record names another."""
        return model if isinstance(model, str) and model in self.resolver.known else None

    def take_over_orphans(self) -> list[Claimed]:
        """Adopt the jobs whose host stopped heartbeating for `[spool] claim_timeout`.

        Looked for every quarter of the timeout (at most every 30 s), before
        new drops: an orphan is older than anything in the inbox.
        """
        timeout = self.config.spool.claim_timeout
        now = time.monotonic()
        if now - self._orphans_checked < self._look_interval():
            return []
        self._orphans_checked = now
        adopted = []
        try:
            for orphan, age in self.spool.orphaned_jobs(timeout, self._peer_clocks):
                job = self.spool.take_over(orphan)
                self._peer_clocks.forget(orphan.path)
                if job is not None:
                    log.warning("took over job %s from %s: nothing of it changed for %.0fs", job.id,
                                orphan.path.parent.name, age, **job_fields(job.id))
                    adopted.append(Claimed(job, None))
        except OSError as e:
            log.error("cannot take over orphaned jobs: %s", describe(e))
        return adopted

    async def claim_part(self, item: Unclaimed) -> Claimed | None:
        """Claim a part of a split batch; None if another daemon was first."""
        job = await finish_in_thread(self.groups.claim, item.part)
        if job is None:
            return None
        log.info("claimed part %s of a split batch", job.id, **job_fields(job.id))
        self.report.publish("spoold.job.claimed", {"job": job.id, "input_file": ""})
        return Claimed(job, None)

    def finish_groups(self) -> None:
        """Assemble the split batches whose parts are all done (a crash of whoever finished the last
        one cut its assembly short) and clear those already published."""
        try:
            for job in self.groups.finish_all():
                log.info("assembled split batch %s, left unassembled by a crash", job.id, **job_fields(job.id))
        except OSError as e:
            log.error("cannot assemble split batches: %s", describe(e))
        except Exception:  # a bug of ours that some group shows: never a reason to stop serving
            log.exception("cannot assemble split batches; tried again later")

    async def finish_groups_now_and_then(self) -> None:
        """`finish_groups` as often as orphans are looked for, in a thread (an assembly copies files)."""
        now = time.monotonic()
        if now - self._groups_checked >= self._look_interval():
            self._groups_checked = now
            await finish_in_thread(self.finish_groups)

    def _look_interval(self) -> float:
        """How often other hosts' leftovers (orphaned jobs, unassembled groups) are looked for: every
        quarter of `[spool] claim_timeout`, at most every 30 s."""
        return min(max(self.config.spool.claim_timeout / 4, 0.5), 30.0)

    async def claim(self, name: str) -> Claimed | None:
        """Claim one drop; None if another daemon was first or it was refused (and failed).

        The claim's fsyncs run in a thread, beside the running jobs' work.
        An OSError (a full or failing disk) goes up: the daemon pauses. Any
        other error is a bug in spoold that this drop meets: logged with its
        traceback, and the drop is left alone until the next start, so one
        file can neither stop the daemon nor make it retry in a loop.
        """
        shown = display_name(name)
        arrived = self.inbox.seen_at(name)
        try:
            job = await finish_in_thread(self.spool.claim_drop, name)
        except DropRefused as refused:
            self.inbox.forget(name)
            self.owners.forget(name)
            record, _ = refused.job.read_record()
            self.report.publish("spoold.job.failed", {"job": refused.job.id, "input_file": shown,
                                                      "errors": record.errors if record else []})
            self.report.job_finished(Outcome.FAILED)
            return None
        except OSError:
            raise  # the disk, not the drop: the daemon pauses and tries again
        except Exception:  # a bug of ours that some drop shows: never a reason to stop serving the others
            log.exception("cannot claim inbox/%s; it stays there, not tried again until spoold restarts", shown)
            self.unclaimable.add(name)
            return None
        self.inbox.forget(name)
        self.owners.forget(name)
        if job is None:
            return None
        self.waiting_since[job.id] = arrived  # validated on whatever model is loaded, it waits on for its own
        log.info("claimed '%s' as job %s", shown, job.id, **job_fields(job.id))
        self.report.publish("spoold.job.claimed", {"job": job.id, "input_file": shown})
        return Claimed(job, None)


class DropOwners:
    """Whose each complete drop in the inbox is, and its weight: read once per drop (its API record
    or `.ready` marker, `Spool.drop_owner`), so tenants take turns over a backlog of any length."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._known: dict[str, tuple[str, int]] = {}
        #: how many known drops each (tenant, weight) has: while there is one, at weight 1, the queue's
        #: own order is the fair one
        self._owners: Counter[tuple[str, int]] = Counter()

    async def learn(self, arrived: list[str], drops: list[str]) -> None:
        """Read whose the drops that `arrived` (complete since the last pass) are; forget the ones
        that left the inbox (`drops`: the complete drops now).

        A few (a stream of drops) are read here, a backlog in a thread: a
        hop to a thread for every drop of a stream costs more than the reads.
        """
        if arrived:
            def read() -> list[tuple[str, int]]:
                return [self.spool.drop_owner(name) for name in arrived]
            found = await asyncio.to_thread(read) if len(arrived) > SCHEDULE_WINDOW else read()
            for name, owner in zip(arrived, found):
                self.forget(name)  # a drop that changed and settled again: its marker may be new
                self._known[name] = owner
                self._owners[owner] += 1
        if len(self._known) > len(drops) + SCHEDULE_WINDOW:  # taken by other daemons, withdrawn, removed
            present = set(drops)
            for name in [name for name in self._known if name not in present]:
                self.forget(name)

    def forget(self, name: str) -> None:
        """Forget a drop: it left the inbox, or is to be read again."""
        owner = self._known.pop(name, None)
        if owner is not None:
            self._owners[owner] -= 1
            if not self._owners[owner]:
                del self._owners[owner]

    def first(self, drops: list[str], each: int) -> list[tuple[str, str, int]]:
        """(name, tenant, weight) of the first `each` of `drops` (in queue order) of every tenant:
        its heaviest, then the others in queue order. One pass, no sort of the whole backlog."""
        if len(self._owners) <= 1 and all(weight == 1 for _, weight in self._owners):
            return [(name, *self._known.get(name, ("", 1))) for name in drops[:each]]
        light: dict[str, list[str]] = {}
        heavy: dict[str, list[str]] = {}
        for name in drops:
            tenant, weight = self._known.get(name, ("", 1))
            (heavy if weight > 1 else light).setdefault(tenant, []).append(name)
        chosen = []
        for tenant in heavy.keys() | light.keys():
            mine = sorted(heavy.get(tenant, []), key=lambda name: -self._known[name][1])
            mine += light.get(tenant, [])[:each]
            chosen += [(name, tenant, self._known.get(name, ("", 1))[1]) for name in mine[:each]]
        return chosen


def _waiting(item: Claimed | Unclaimed, model: str | None, record: JobRecord | None) -> Candidate:
    """A job or part for the scheduler, as old, whose and as heavy as `record` says (a part's: its
    batch's); an unreadable record waits from 0, the default tenant's, at weight 1."""
    if record is None:
        return Candidate(item, model, 0.0)
    return Candidate(item, model, float(record.created_at), record.share_tenant(), record.weight())


def describe(error: BaseException) -> str:
    """An I/O error as a person reads it: what failed, on which file."""
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)
