"""The shared in-flight window: one job alone uses all of it; jobs that compete get fair shares."""

import asyncio
import heapq
import itertools
import random

import pytest

from spoold.window import FairWindow


async def hold(share, n):
    """Take n slots of `share` (each acquire must be granted at once)."""
    for _ in range(n):
        await asyncio.wait_for(share.acquire(), 1)


async def contend(window, shares, rounds, together=False, arriving=(), count_after=0):
    """Every share keeps `capacity` workers asking for slots; the oldest request is answered
    each round, and its slot goes to whoever the window picks.

    Returns how many slots each share was granted (the first share's workers
    start first, so it alone fills the window before the others ask; with
    `together`, the shares' workers ask in turn from the start, as jobs
    claimed at once do). `arriving`: names of jobs that join one per round,
    as drops claimed one by one while others run; `count_after`: grants of
    the first rounds are not counted.
    """
    got = {s.name: 0 for s in shares}
    held = []
    counting = [count_after == 0]

    async def worker(share):
        while True:
            await share.acquire()
            got[share.name] += counting[0]
            answered = asyncio.Event()
            held.append((share, answered))
            await answered.wait()

    if together:
        workers = [asyncio.create_task(worker(s)) for _ in range(window.capacity) for s in shares]
    else:
        workers = [asyncio.create_task(worker(s)) for s in shares for _ in range(window.capacity)]
    for _ in range(3):
        await asyncio.sleep(0)
    for n in range(rounds):
        counting[0] = n >= count_after
        if n < len(arriving):
            share = window.join(arriving[n])
            got[share.name] = 0
            workers += [asyncio.create_task(worker(share)) for _ in range(window.capacity)]
        share, answered = held.pop(0)
        share.release()
        answered.set()
        for _ in range(3):
            await asyncio.sleep(0)
        assert window.inflight <= window.capacity
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    return got


class QueueingEngine:
    """A test double of vLLM's priority scheduling, stepped by the test: `batch` requests run at
    once, each for 4 to 12 steps (seeded); the rest wait in its queue, lowest place first; a
    running request is never stopped for one placed before it."""

    def __init__(self, batch, seed=7):
        self.batch, self.random = batch, random.Random(seed)
        self.waiting, self.running = [], []
        #: (step, tenant) of every answer, in order
        self.answered = []
        self._sent = itertools.count()
        self.now = 0

    async def request(self, share):
        """Send one request of `share`'s job through the window and wait for its answer."""
        place = await share.acquire()
        answer = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (place, next(self._sent), share.tenant, answer))
        try:
            await answer
        finally:
            share.release()

    async def step(self):
        """One decode step: start what fits, advance what runs, answer what is done."""
        while len(self.running) < self.batch and self.waiting:
            _, _, tenant, answer = heapq.heappop(self.waiting)
            self.running.append([self.random.randint(4, 12), tenant, answer])
        for running in self.running:
            running[0] -= 1
        for running in [r for r in self.running if r[0] <= 0]:
            self.running.remove(running)
            self.answered.append((self.now, running[1]))
            running[2].set_result(None)
        self.now += 1
        for _ in range(5):
            await asyncio.sleep(0)

    def share_of(self, tenant, start, end, every):
        """`tenant`'s share of the answers in each `every` steps from `start` to `end`."""
        shares = []
        for first in range(start, end - every + 1, every):
            got = [who for when, who in self.answered if first <= when < first + every]
            shares.append(round(got.count(tenant) / len(got), 2))
        return shares


async def run_job(engine, share, lines, at_once=None):
    """A job's runner: as many requests at once as its share allows (or `at_once`), until its lines
    are done."""
    left = [lines]

    async def worker():
        while left[0] > 0:
            left[0] -= 1
            await engine.request(share)
    await asyncio.gather(*(worker() for _ in range(min(lines, at_once or share.capacity))))
    share.leave()


async def stop(*jobs):
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)


def test_one_job_alone_gets_the_whole_window_and_no_more():
    async def go():
        window = FairWindow(4)
        share = window.join("big")
        await hold(share, 4)
        late = asyncio.create_task(share.acquire())
        await asyncio.sleep(0.01)
        assert not late.done() and window.inflight == 4
        share.release()
        await asyncio.wait_for(late, 1)
        assert window.inflight == 4
    asyncio.run(go())


def test_a_small_job_beside_a_big_one_gets_half_the_window_at_once():
    async def go():
        window = FairWindow(8)
        big, small = window.join("big"), window.join("small")
        got = await contend(window, [big, small], rounds=4)
        # the big job filled the window first; the first 4 slots it freed went to the small one
        assert got == {"big": 8, "small": 4} and (big.inflight, small.inflight) == (4, 4), got
    asyncio.run(go())


def test_two_equal_jobs_share_the_window_evenly_over_time():
    async def go():
        window = FairWindow(8)
        a, b = window.join("a"), window.join("b")
        got = await contend(window, [a, b], rounds=400)
        assert abs(got["a"] - got["b"]) <= 8, got
    asyncio.run(go())


def test_jobs_that_cannot_split_the_window_evenly_take_turns_with_the_slots_left_over():
    # 40 jobs in 64 slots get 1.6 each: the 24 slots left over once each has one must go round,
    # or the same 24 jobs run at twice the others' rate for as long as all 40 run
    async def go():
        for capacity, jobs in ((4, 3), (64, 40)):
            window = FairWindow(capacity)
            shares = [window.join(f"job{i:02d}") for i in range(jobs)]
            got = await contend(window, shares, rounds=30 * capacity, together=True)
            fair = sum(got.values()) / jobs
            assert max(got.values()) < 1.15 * fair and min(got.values()) > 0.85 * fair, (capacity, got)
    asyncio.run(go())


def test_jobs_that_join_one_by_one_share_evenly_whatever_their_turn_to_join():
    # drops claimed one after another while the first job's requests fill the engine: a job
    # that joins later must not be owed the time before it came, nor any job stay ahead
    async def go():
        window = FairWindow(64)
        late = [f"late{i:02d}" for i in range(40)]
        got = await contend(window, [window.join("first")], rounds=3200, arriving=late, count_after=64)
        fair = sum(got[name] for name in late) / len(late)
        assert all(0.85 * fair < got[name] < 1.15 * fair for name in late), got
    asyncio.run(go())


def test_weights_that_do_not_divide_the_window_evenly_still_hold_over_time():
    async def go():
        window = FairWindow(5)
        light = [window.join(f"light{i}") for i in range(2)]
        heavy = window.join("heavy", weight=2)
        got = await contend(window, [*light, heavy], rounds=500)  # due: 1.25, 1.25 and 2.5 of every 5
        assert all(0.85 < got[s.name] / (got["heavy"] / 2) < 1.15 for s in light), got
    asyncio.run(go())


def test_weight_divides_the_window_in_proportion():
    async def go():
        window = FairWindow(12)
        heavy, light = window.join("heavy", weight=3), window.join("light", weight=1)
        got = await contend(window, [heavy, light], rounds=400)
        assert 2.5 < got["heavy"] / got["light"] < 3.5, got
    asyncio.run(go())


def test_tenants_share_first_then_their_jobs():
    async def go():
        window = FairWindow(8)
        one = window.join("alice-only", tenant="alice")
        many = [window.join(f"bob-{i}", tenant="bob") for i in range(4)]
        got = await contend(window, [one, *many], rounds=400)
        bob = sum(got[s.name] for s in many)
        assert 0.8 < got["alice-only"] / bob < 1.25, got  # bob's four jobs together get what alice's one gets
    asyncio.run(go())


def test_a_tenant_with_many_jobs_gets_no_more_of_a_window_that_does_not_divide_evenly():
    # three tenants in 4 or 8 slots: the slot left over goes round the tenants, not to the one
    # whose many jobs each have few requests in flight
    async def go():
        for capacity in (4, 8):
            window = FairWindow(capacity)
            alice, carol = window.join("alice-only", tenant="alice"), window.join("carol-only", tenant="carol")
            bob = [window.join(f"bob-{i}", tenant="bob") for i in range(20)]
            got = await contend(window, [alice, carol, *bob], rounds=300 * capacity, together=True)
            shares = [got["alice-only"], got["carol-only"], sum(got[s.name] for s in bob)]
            assert all(0.85 < share / (sum(shares) / 3) < 1.15 for share in shares), (capacity, shares)
    asyncio.run(go())


def test_a_tenant_whose_jobs_join_one_by_one_gets_half_the_answers_and_no_more():
    # alice's one big job fills a 512-request window of an engine that runs 64 at once; bob then
    # creates twenty 100-line batches, one about every request's time. Each of bob's new jobs
    # starts at the front of the engine's queue, so bob's requests were answered sooner than
    # alice's: counted by requests in flight, bob was given more slots for it, and got 0.6 of
    # the answers for as long as his jobs kept coming
    for seed in (7, 8):
        async def go():
            window, engine = FairWindow(512), QueueingEngine(batch=64, seed=seed)
            alice = asyncio.create_task(run_job(engine, window.join("alice-big", "alice"), 10**6))
            while engine.now < 60:
                await engine.step()
            bob = []
            while len(bob) < 20 or not all(job.done() for job in bob):
                if len(bob) < 20 and engine.now % 8 == 4:
                    share = window.join(f"bob-{len(bob)}", "bob")
                    bob.append(asyncio.create_task(run_job(engine, share, 100)))
                await engine.step()
            await stop(alice)
            last = max(when for when, who in engine.answered if who == "bob")
            shares = engine.share_of("bob", 100, last, every=40)  # after the first 40 steps, bob's start
            assert len(shares) >= 5 and all(0.45 <= share <= 0.55 for share in shares), (seed, shares)
        asyncio.run(go())


def test_a_tenant_back_from_idle_takes_turns_at_once_and_is_owed_nothing():
    # bob's job holds its share but sends nothing for a while (its lines wait out a retry's
    # backoff) while alice's uses the whole window: counted from when bob came, bob would be
    # owed every slot until he had caught up with all that alice was granted meanwhile
    async def go():
        window, engine = FairWindow(16), QueueingEngine(batch=4)
        alice = asyncio.create_task(run_job(engine, window.join("alice-big", "alice"), 10**6))
        bob_share = window.join("bob-big", "bob")
        while engine.now < 200:
            await engine.step()
        bob = asyncio.create_task(run_job(engine, bob_share, 10**6))
        while engine.now < 400:
            await engine.step()
        await stop(alice, bob)
        shares = engine.share_of("bob", 220, 400, every=40)
        assert all(0.35 <= share <= 0.65 for share in shares), shares
    asyncio.run(go())


def test_a_tenant_that_asked_for_less_than_its_share_is_owed_nothing_for_it():
    # bob's first job sends two requests at a time (its lines come slowly) while alice's uses the
    # rest of the window (and the engine runs all 16 at once); then bob's second job wants all it
    # can get. Counted from when bob came, bob would be owed every slot until he had caught up
    # with what alice was granted meanwhile
    async def go():
        window, engine = FairWindow(16), QueueingEngine(batch=16)
        alice = asyncio.create_task(run_job(engine, window.join("alice-big", "alice"), 10**6))
        trickle = asyncio.create_task(run_job(engine, window.join("bob-trickle", "bob"), 10**6, at_once=2))
        while engine.now < 200:
            await engine.step()
        bob = asyncio.create_task(run_job(engine, window.join("bob-big", "bob"), 10**6))
        while engine.now < 400:
            await engine.step()
        await stop(alice, trickle, bob)
        shares = engine.share_of("bob", 220, 400, every=40)
        assert all(0.35 <= share <= 0.65 for share in shares), shares
    asyncio.run(go())


def test_a_tenant_that_has_handed_over_all_its_lines_keeps_its_half_of_the_answers():
    # bob's twenty 100-line jobs run first (alice's big file is still being validated); then alice's
    # job joins at the oldest place in the engine, about one running batch ahead of bob's queued
    # requests: a head start that shows nowhere while the two take turns for slots. Once bob had
    # handed over all his lines, alice took every free slot and her new requests went ahead of all
    # of bob's still queued: bob got 0.2-0.3 of the answers for a while, with work left
    for seed in (7, 8):
        async def go():
            window, engine = FairWindow(512, running=64), QueueingEngine(batch=64, seed=seed)
            bob = [asyncio.create_task(run_job(engine, window.join(f"bob-{i}", "bob"), 100)) for i in range(20)]
            while engine.now < 30:
                await engine.step()
            alice = asyncio.create_task(run_job(engine, window.join("alice-big", "alice"), 10**6))
            while not all(job.done() for job in bob):
                await engine.step()
            await stop(alice)
            last = max(when for when, who in engine.answered if who == "bob")
            shares = engine.share_of("bob", 50, last, every=20)  # from 20 steps after alice came
            assert len(shares) >= 10 and all(0.4 <= share <= 0.6 for share in shares), (seed, shares)
        asyncio.run(go())


def test_an_exclusive_run_waits_for_the_others_and_holds_them_off():
    async def go():
        window = FairWindow(8)
        other, suspect = window.join("other"), window.join("suspect")
        await hold(other, 3)
        entered = asyncio.Event()

        async def alone():
            async with suspect.exclusive():
                entered.set()
                await hold(suspect, 2)
                assert window.inflight == 2  # nobody else's line is in the engine now
                later = asyncio.create_task(other.acquire())
                await asyncio.sleep(0.01)
                assert not later.done()  # held off while the suspects run
                suspect.release()
                suspect.release()
            await asyncio.wait_for(later, 1)

        task = asyncio.create_task(alone())
        await asyncio.sleep(0.01)
        assert not entered.is_set()  # the other job still has requests in the engine
        for _ in range(3):
            other.release()
        await asyncio.wait_for(task, 1)
    asyncio.run(go())


def test_a_cancelled_wait_takes_no_slot_and_a_closed_window_grants_nothing():
    async def go():
        window = FairWindow(1)
        a, b = window.join("a"), window.join("b")
        await hold(a, 1)
        waiting = asyncio.create_task(b.acquire())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        a.release()
        assert window.inflight == 0
        await hold(a, 1)
        a.release()
        window.close()  # the engine died: nothing more may be sent to it
        late = asyncio.create_task(a.acquire())
        await asyncio.sleep(0.01)
        assert not late.done() and window.inflight == 0
        late.cancel()
    asyncio.run(go())


def test_a_job_that_leaves_frees_its_weight_for_the_others():
    async def go():
        window = FairWindow(4)
        a, b = window.join("a"), window.join("b")
        await hold(a, 4)
        waiting = asyncio.create_task(b.acquire())
        await asyncio.sleep(0)
        b.leave()  # its run ended (stopped) while it waited
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for _ in range(4):
            a.release()
        await hold(a, 4)
        assert window.jobs == 1
    asyncio.run(go())


def test_a_job_that_joins_late_gets_places_ahead_of_what_the_engine_already_queues():
    async def go():
        window = FairWindow(500)
        big = window.join("big")
        queued = [await big.acquire() for _ in range(500)]  # handed over; the engine runs a few at a time
        small = window.join("small")
        for _ in range(10):
            big.release()  # answered
        places = [await asyncio.wait_for(small.acquire(), 1) for _ in range(10)]
        still_queued = queued[10:]
        assert max(places) < still_queued[len(still_queued) // 10]  # ahead of nearly all the big job's
        assert queued == sorted(queued) and places == sorted(places)
    asyncio.run(go())


def test_two_busy_jobs_get_interleaved_places_and_weight_spaces_them():
    async def go():
        window = FairWindow(1000)
        a, b, heavy = window.join("a"), window.join("b"), window.join("heavy", weight=4)
        pa = [await a.acquire() for _ in range(40)]
        pb = [await b.acquire() for _ in range(40)]
        ph = [await heavy.acquire() for _ in range(40)]
        merged = sorted([(p, "a") for p in pa] + [(p, "b") for p in pb] + [(p, "h") for p in ph])
        first = [who for _, who in merged[:60]]
        assert abs(first.count("a") - first.count("b")) <= 1  # a and b alternate
        assert first.count("h") >= 3 * first.count("a") - 4  # weight 4: four places for each of a's
    asyncio.run(go())
