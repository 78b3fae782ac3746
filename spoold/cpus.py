"""Keeping the daemon's own threads off the CPU cores the engine computes on.

vLLM's CPU backend binds each worker's compute threads to some cores and
leaves the others for its scheduler and the front end, which here is the
daemon (serving layer, writer, events). The kernel does not know that and
runs the daemon's threads on the worker's cores too, where every slice they
take stalls the model's forward pass: on 2 cores that cost about 6% of
throughput (README, Performance). So once an engine is loaded the daemon
moves its threads to the cores the engine left free, and moves them back to
every core before the next engine loads: vLLM chooses its cores from the
loading process's own mask, so a narrowed daemon would leave it nothing.

On a GPU box the workers bind nothing, and nothing here changes anything.
"""

from __future__ import annotations

import logging
import os

import psutil

log = logging.getLogger(__name__)


class CpuPlacement:
    """The daemon's CPU mask: all of `allowed`, or all but the engine's compute cores."""

    def __init__(self, allowed: set[int] | None = None) -> None:
        self.allowed = set(allowed if allowed is not None else os.sched_getaffinity(0))
        self.narrowed_to: set[int] | None = None

    def keep_off_engine(self) -> set[int]:
        """Move every thread of this process off the cores our child processes bound to.

        Returns the cores the daemon now uses (all of them when no child
        bound itself, when its cores would leave the daemon none, or when
        the kernel refused the move).
        """
        engine_cpus = engine_bound_cpus(self.allowed)
        free = self.allowed - engine_cpus
        if not engine_cpus or not free:
            return self.allowed
        self.narrowed_to = free  # even a move that failed part way is undone by release()
        if not _set_all_threads(free):
            return self.allowed
        log.info("engine computes on CPUs %s; spoold's own threads keep to CPUs %s",
                 _cpu_list(engine_cpus), _cpu_list(free))
        return free

    def release(self) -> None:
        """Give every thread all allowed cores again (before an engine loads)."""
        if self.narrowed_to is not None and _set_all_threads(self.allowed):
            self.narrowed_to = None


def engine_bound_cpus(allowed: set[int]) -> set[int]:
    """The cores that child processes (the engine's workers) have bound themselves to.

    A child whose mask is all of `allowed` bound nothing; one with a
    narrower mask chose its cores, as vLLM's CPU workers do.
    """
    bound: set[int] = set()
    for child in psutil.Process().children(recursive=True):
        try:
            cpus = set(child.cpu_affinity())
        except (psutil.Error, OSError):
            continue  # it exited, or is not ours to read
        if cpus and cpus < allowed:
            bound |= cpus
    return bound


def _set_all_threads(cpus: set[int]) -> bool:
    """Set the CPU mask of every thread of this process (Linux masks are per thread).

    Threads started later inherit their creator's mask. Returns False (and
    logs) if the kernel refused; the daemon works the same, only slower.
    """
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:
                continue  # the thread ended meanwhile
    except OSError as e:
        log.warning("could not set spoold's CPU mask to %s: %s", _cpu_list(cpus), e)
        return False
    return True


def _cpu_list(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))
