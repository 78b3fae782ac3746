"""CPU seconds a process has spent, for the benchmarks' cost-per-request figures."""

from __future__ import annotations

import psutil


def cpu_seconds(pid: int) -> dict[str, float]:
    """User and system seconds of process `pid` so far, and user + system of its live descendants
    (`children`: vLLM's engine core and workers under a daemon); one that exits meanwhile is left out."""
    process = psutil.Process(pid)
    children = 0.0
    for child in process.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        children += times.user + times.system
    own = process.cpu_times()
    return {"user": own.user, "system": own.system, "children": children}
