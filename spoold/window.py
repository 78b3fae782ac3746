"""The engine's in-flight window, shared fairly by the jobs that run at once.

`[engine] max_inflight` requests may be in the engine at a time, whichever
jobs they come from. Each running job holds a `Share` and asks it for a slot
before every request. While slots are free a request goes at once (one
job alone uses the whole window, as before); when jobs compete, each freed
slot goes to the tenant granted fewest (brought level with the others
whenever it asks for less than its share), and within it to the job with
the fewest in flight per unit of weight (among equals, the one served
least so far, so slots that do not divide evenly go round). So a 10-line
batch dropped behind a 170,000-line one gets half the window at once and
finishes in about its own work time, and one tenant's many jobs share what
one job of another tenant gets.

The window alone is not enough: vLLM queues what it cannot run yet, first
come first served, so a small job's requests would still wait behind every
request a big job already handed over. So each grant also says where the
request belongs in the engine's queue (start-time fair queueing): each job
carries a virtual clock that advances by its tenant's job count over its
weight per request, and a job that joins (or comes back from idle) starts
at the oldest tag still in the engine. vLLM's priority scheduling
(`scheduling_policy = "priority"`, lower first) then serves the small job's
lines next, and two big jobs alternate. That head start is for taking
turns: a slot no other tenant asked for, while another tenant's requests
wait in the engine's queue, is placed no earlier than that queue's front
(the window is told how many requests the engine runs at once).

Leaf module: asyncio only.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import AsyncIterator


#: Queue places per request of a job with weight 1 alone in its tenant: room
#: for weights up to MAX_PRIORITY (jobrecord) in whole numbers.
PLACE_STEP = 100


class FairWindow:
    """`capacity` request slots, granted by tenant first, then by job weight."""

    def __init__(self, capacity: int, running: int = 0) -> None:
        self.capacity = max(1, capacity)
        #: how many requests the engine runs at once (the rest wait in its queue); 0 if not known
        self.running = max(0, running)
        #: requests in the engine now, over all shares
        self.inflight = 0
        self._shares: list[Share] = []
        #: tenant -> its requests in the engine now
        self._tenants: dict[str, int] = {}
        #: tenant -> how many of its jobs hold a share
        self._tenant_jobs: dict[str, int] = {}
        #: tenant -> slots granted to it, brought level with the others' whenever it asks with none
        #: waiting (`_ask`): which tenant the next slot goes to (`_next_share`)
        self._tenant_served: dict[str, int] = {}
        #: tenant -> its requests waiting for a slot
        self._tenant_waiting: dict[str, int] = {}
        self._closed = False
        #: while set, only this share is granted slots (a job pinning down a poison line)
        self._only: Share | None = None
        self._exclusive = asyncio.Lock()
        self._others_drained = asyncio.Event()
        self._order = itertools.count()
        self._last_tag = 0.0

    def join(self, name: str, tenant: str = "", weight: float = 1.0) -> "Share":
        """A share for one job run; `leave()` it when the run ends."""
        share = Share(self, name, tenant, max(weight, 1e-3), next(self._order))
        share.tag = self._oldest_tag()
        self._shares.append(share)
        if tenant not in self._tenant_jobs:
            self._tenants[tenant] = self._tenant_served[tenant] = self._tenant_waiting[tenant] = 0
        self._tenant_jobs[tenant] = self._tenant_jobs.get(tenant, 0) + 1
        return share

    def close(self) -> None:
        """Grant nothing more: the engine died or hangs, and what is sent to it now is lost."""
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether the window was closed on a dead or hung engine."""
        return self._closed

    @property
    def jobs(self) -> int:
        """How many job runs hold a share."""
        return len(self._shares)

    def _may_take(self, share: "Share") -> bool:
        return (self.inflight < self.capacity and not self._closed
                and (self._only is None or self._only is share))

    def _take(self, share: "Share") -> int:
        """Count the slot as `share`'s; returns the request's place in the engine's queue."""
        if share.inflight == 0:  # back from idle: no credit for the time it sent nothing
            share.tag = max(share.tag, self._oldest_tag())
        if self._queue_in_engine() and self._uncontested(share.tenant):  # no head start spent on it
            share.tag = max(share.tag, self._front_of_queue())
        self.inflight += 1
        self._tenants[share.tenant] += 1
        self._tenant_served[share.tenant] += 1
        place = share.tag
        share.places.append(place)
        share.tag += PLACE_STEP * self._tenant_jobs[share.tenant] / share.weight
        return int(place)

    def _oldest_tag(self) -> float:
        """About the oldest place of a request in the engine now (each share's oldest in flight).

        Read from the places granted, not worked back from a share's clock:
        the clock's step grows with its tenant's job count, and worked back
        with today's count a burst granted to one job alone reads as far in
        the past, so every job that joined after it was owed slots it never
        waited for, and the latest to join most.
        """
        busy = [s.places[0] for s in self._shares if s.places]
        if busy:
            return min(busy)
        return max([s.tag for s in self._shares] + [self._last_tag])

    def _uncontested(self, tenant: str) -> bool:
        """Whether a slot for `tenant` is one no other tenant asked for while another tenant's requests
        wait in the engine's queue (it has handed over all its lines, or sends slowly).

        A job that joins is placed at the oldest place in the engine, about one running batch ahead
        of the engine's queue: the head start a small job dropped behind a big one needs. While
        tenants take turns for slots it shows nowhere; spent on slots no other tenant asked for, it
        put a big job's requests ahead of everything another tenant still had queued (0.2-0.3 of the
        answers for that tenant, with work left, in the test double; 0.31 in a second with vLLM).
        """
        return (any(n for t, n in self._tenants.items() if t != tenant)
                and not any(n for t, n in self._tenant_waiting.items() if t != tenant))

    def _queue_in_engine(self) -> bool:
        """Whether some requests in flight wait in the engine's queue (`running` known, and exceeded).
        Only then can a place jump anything: a busy share's next place already follows its own oldest."""
        return bool(self.running) and self.inflight > self.running

    def _front_of_queue(self) -> float:
        """About the place of the oldest request waiting in the engine's queue: the oldest place in
        flight after the `running` oldest (those the engine runs); call when `_queue_in_engine()`."""
        return next(itertools.islice(heapq.merge(*(s.places for s in self._shares)), self.running, None))

    def _ask(self, tenant: str) -> None:
        """A request of `tenant` asks for a slot: if none of the tenant's was waiting, it asked for
        less than its share until now, and its count of slots granted comes level with the least
        of the tenants that wait (or, with none waiting, the most of all).

        Without that, a tenant whose jobs sent nothing for a while (a retry's
        backoff) or sent slowly would be owed the difference, and take every
        slot until it had caught up with what the others were granted
        meanwhile; counting from when it came, a tenant that came now would.
        """
        if self._tenant_waiting[tenant] or len(self._tenant_served) == 1:
            return
        waiting = [n for t, n in self._tenant_served.items() if self._tenant_waiting[t]]
        level = min(waiting) if waiting else max(self._tenant_served.values())
        self._tenant_served[tenant] = max(self._tenant_served[tenant], level)

    @property
    def _waiting(self) -> int:
        """Requests waiting for a slot, over all tenants."""
        return sum(self._tenant_waiting.values())

    def _give_back(self, share: "Share") -> None:
        self.inflight -= 1
        share.places.popleft()  # requests are answered about in the order they were sent
        self._tenants[share.tenant] -= 1
        if self._only is not None and self.inflight == self._only.inflight:
            self._others_drained.set()
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to waiting shares, the least served first."""
        while self._waiting and self.inflight < self.capacity and not self._closed:
            share = self._next_share()
            if share is None:
                return
            waiter = share.waiters.popleft()
            self._tenant_waiting[share.tenant] -= 1
            if waiter.done():  # cancelled while it waited
                continue
            waiter.set_result(self._take(share))

    def _next_share(self) -> "Share | None":
        """The waiting share of the tenant granted fewest slots (`_ask`), and of its jobs the one with
        the fewest requests in flight per unit of weight; among equal jobs, the one served least so far.

        Tenants take turns by slots granted, not by requests in flight: a
        tenant whose requests the engine answers sooner (its new jobs' places
        are at the front of the queue, its old jobs' spaced for fewer jobs)
        keeps fewer in flight, and counted that way it was given more: 0.6 of
        the answers for as long as its jobs kept joining, 0.8 in a second with
        real vLLM. Counted by grants, each tenant's answers follow its grants.
        Within a tenant jobs share what is in flight, so a small job beside a
        big one holds half the window at once. Ties go to the job served
        least: slots that do not divide evenly (64 among 40 jobs) go round;
        broken by age instead, the oldest 24 jobs would hold a second slot and
        run at twice the others' rate.
        """
        eligible = [s for s in self._shares if s.waiters and (self._only is None or s is self._only)]
        if not eligible:
            return None
        return min(eligible, key=lambda s: (self._tenant_served[s.tenant], self._tenants[s.tenant],
                                            s.inflight / s.weight, s.tag, s.order))

    def _leave(self, share: "Share") -> None:
        self._tenant_waiting[share.tenant] -= len(share.waiters)
        for waiter in share.waiters:
            waiter.cancel()
        share.waiters.clear()
        self._shares.remove(share)
        self._last_tag = max(self._last_tag, share.tag)
        self._tenant_jobs[share.tenant] -= 1
        if not self._tenant_jobs[share.tenant]:
            del self._tenant_jobs[share.tenant]
            self._tenants.pop(share.tenant, None)
            self._tenant_served.pop(share.tenant, None)
            self._tenant_waiting.pop(share.tenant, None)
        self._grant()


class Share:
    """One job run's claim on the window."""

    def __init__(self, window: FairWindow, name: str, tenant: str, weight: float, order: int) -> None:
        self.window, self.name, self.tenant, self.weight, self.order = window, name, tenant, weight, order
        #: the queue places of this job's requests in the engine now, oldest first
        self.places: deque[float] = deque()
        #: the queue place its next request gets (its virtual clock)
        self.tag = 0.0
        self.waiters: deque[asyncio.Future] = deque()

    @property
    def inflight(self) -> int:
        """This job's requests in the engine now."""
        return len(self.places)

    @property
    def capacity(self) -> int:
        """The whole window's size: the most this job may use when it runs alone."""
        return self.window.capacity

    async def acquire(self) -> int:
        """Wait for a slot; returns the request's place in the engine's queue (lower goes first).

        A cancelled wait takes none.
        """
        w = self.window
        w._ask(self.tenant)
        if not w._waiting and w._may_take(self):
            return w._take(self)
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        w._tenant_waiting[self.tenant] += 1
        w._grant()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as it was cancelled: give it back
            raise

    def release(self) -> None:
        """The request this slot was for is answered (or abandoned)."""
        self.window._give_back(self)

    def leave(self) -> None:
        """The job run ended: its waiting requests are dropped and its weight no longer counts."""
        self.window._leave(self)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Run alone: wait until no other job has a request in the engine, and grant others
        nothing until the block ends.

        For the lines an engine died with: when they run again, a second death
        must be blamed on this job's lines only, never on another job's lines
        that happened to be in flight.
        """
        w = self.window
        async with w._exclusive:
            w._only = self
            w._others_drained.clear()
            try:
                if w.inflight > self.inflight:
                    await w._others_drained.wait()
                yield
            finally:
                w._only = None
                w._grant()
