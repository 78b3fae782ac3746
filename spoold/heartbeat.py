"""heartbeat.json: how the daemon and its current job are doing, on disk.

Replaced atomically every `[heartbeat] seconds` in the job directory and in
the state directory, so `spoold status` (and other hosts sharing the spool)
can tell a working daemon from a dead or stuck one without talking to it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .durable import replace_json
from .lifecycle import ACTIVE, JobStatus


def heartbeat_document(host: str, state: str, progress: Any | None, gpus: list[dict]) -> dict[str, Any]:
    """The heartbeat content: pid, host, state, and the job's counts, rate and ETA."""
    doc: dict[str, Any] = {"pid": os.getpid(), "host": host, "state": state,
                           "ts": round(time.time(), 3), "job": None, "gpus": gpus}
    if progress is not None:
        doc["job"] = progress.summary()
    return doc


def write_heartbeat(paths: list[Path], doc: dict[str, Any], mode: int = 0o640, gid: int = -1) -> list[str]:
    """Replace each heartbeat file atomically; returns what failed, e.g. on a full disk.

    A heartbeat that cannot be written must never stop the work it reports
    on; a vanished directory (a job just published) is not a failure. Not
    fsynced: the next beat replaces it within seconds, and a power cut that
    loses one loses nothing (peers judge a host by beats it goes on writing).
    """
    failures = []
    for path in paths:
        try:
            replace_json(path, doc, mode, gid)
        except FileNotFoundError:
            pass
        except OSError as e:
            failures.append(f"{path}: {e.strerror or e}")
    return failures


def status_line(progress: Any | None, queued: int, gpus: list[dict]) -> str:
    """The one line for `systemctl status`, e.g. `batch_5k: 1762/5000 (35%) 3.9 req/s ETA 14m`."""
    gpu = ""
    if gpus:
        gpu = " GPU " + "/".join(f"{g['utilization_pct']}%" for g in gpus)
    if progress is None or progress.state not in ACTIVE:
        return f"idle, {queued} queued{gpu}"
    name = progress.input_file.removesuffix(".jsonl") or progress.job_id
    if progress.state == JobStatus.VALIDATING:
        return f"{name}: validating{gpu}"
    total = progress.total or 1
    eta = progress.eta_seconds()
    eta_text = f" ETA {_human(eta)}" if eta is not None else ""
    return (f"{name}: {progress.done}/{progress.total} ({100 * progress.done // total}%) "
            f"{progress.rate():.1f} req/s{eta_text}{gpu}")


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
