"""CpuPlacement: the daemon's threads leave the cores a child process bound itself to."""

from __future__ import annotations

import os
import threading

import pytest

from spoold.cpus import CpuPlacement, engine_bound_cpus

from .helpers import ALL_CPUS, needs_two_cpus, start_bound_worker


@pytest.fixture
def worker_on_first_cpu():
    child, done = start_bound_worker(min(ALL_CPUS))
    yield min(ALL_CPUS)
    done.set()
    child.join(30)


def _thread_masks() -> list[set[int]]:
    return [os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")]


@needs_two_cpus
def test_daemon_threads_leave_the_engines_cores_and_come_back(worker_on_first_cpu):
    helper_stop = threading.Event()
    helper = threading.Thread(target=helper_stop.wait)  # a thread that exists before the move
    helper.start()
    placement = CpuPlacement()
    try:
        assert engine_bound_cpus(placement.allowed) == {worker_on_first_cpu}
        free = placement.keep_off_engine()
        assert free == ALL_CPUS - {worker_on_first_cpu}
        assert all(mask == free for mask in _thread_masks())
        later: list[set[int]] = []
        t = threading.Thread(target=lambda: later.append(os.sched_getaffinity(0)))
        t.start()
        t.join()
        assert later == [free]  # threads started afterwards inherit the narrowed mask
        placement.release()
        assert all(mask == ALL_CPUS for mask in _thread_masks())
    finally:
        placement.release()
        os.sched_setaffinity(0, ALL_CPUS)
        helper_stop.set()
        helper.join()


def test_nothing_moves_when_no_child_bound_itself():
    placement = CpuPlacement()
    assert placement.keep_off_engine() == ALL_CPUS
    assert placement.narrowed_to is None
    assert all(mask == ALL_CPUS for mask in _thread_masks())


@needs_two_cpus
def test_workers_on_every_core_leave_the_daemon_where_it_is():
    cpus = sorted(ALL_CPUS)[:2]
    workers = [start_bound_worker(cpu) for cpu in cpus]
    try:
        placement = CpuPlacement(allowed=set(cpus))
        assert engine_bound_cpus(placement.allowed) == set(cpus)
        assert placement.keep_off_engine() == set(cpus)  # never a daemon with no core at all
        assert placement.narrowed_to is None
        assert all(mask == ALL_CPUS for mask in _thread_masks())
    finally:
        for child, done in workers:
            done.set()
            child.join(30)
