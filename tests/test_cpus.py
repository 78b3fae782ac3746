"""CpuPlacement: the daemon's threads leave the cores a child process bound itself to."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest

from spoold.cpus import CpuPlacement, engine_bound_cpus

ALL = os.sched_getaffinity(0)
needs_two = pytest.mark.skipif(len(ALL) < 2, reason="needs 2 CPUs to leave one to the daemon")


def _bind_and_wait(cpu: int, ready, done) -> None:
    os.sched_setaffinity(0, {cpu})
    ready.set()
    done.wait(30)


def _start_worker(cpu: int):
    """A child bound to one core, as vLLM's CPU worker binds its compute threads."""
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_bind_and_wait, args=(cpu, ready, done))
    child.start()
    assert ready.wait(30)
    return child, done


@pytest.fixture
def worker_on_first_cpu():
    child, done = _start_worker(min(ALL))
    yield min(ALL)
    done.set()
    child.join(30)


def _thread_masks() -> list[set[int]]:
    return [os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")]


@needs_two
def test_daemon_threads_leave_the_engines_cores_and_come_back(worker_on_first_cpu):
    helper_stop = threading.Event()
    helper = threading.Thread(target=helper_stop.wait)  # a thread that exists before the move
    helper.start()
    placement = CpuPlacement()
    try:
        assert engine_bound_cpus(placement.allowed) == {worker_on_first_cpu}
        free = placement.keep_off_engine()
        assert free == ALL - {worker_on_first_cpu}
        assert all(mask == free for mask in _thread_masks())
        later: list[set[int]] = []
        t = threading.Thread(target=lambda: later.append(os.sched_getaffinity(0)))
        t.start()
        t.join()
        assert later == [free]  # threads started afterwards inherit the narrowed mask
        placement.release()
        assert all(mask == ALL for mask in _thread_masks())
    finally:
        placement.release()
        os.sched_setaffinity(0, ALL)
        helper_stop.set()
        helper.join()


def test_nothing_moves_when_no_child_bound_itself():
    placement = CpuPlacement()
    assert placement.keep_off_engine() == ALL
    assert placement.narrowed_to is None
    assert all(mask == ALL for mask in _thread_masks())


@needs_two
def test_workers_on_every_core_leave_the_daemon_where_it_is():
    cpus = sorted(ALL)[:2]
    workers = [_start_worker(cpu) for cpu in cpus]
    try:
        placement = CpuPlacement(allowed=set(cpus))
        assert engine_bound_cpus(placement.allowed) == set(cpus)
        assert placement.keep_off_engine() == set(cpus)  # never a daemon with no core at all
        assert placement.narrowed_to is None
        assert all(mask == ALL for mask in _thread_masks())
    finally:
        for child, done in workers:
            done.set()
            child.join(30)
