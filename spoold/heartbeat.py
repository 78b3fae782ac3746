"""heartbeat.json: how the daemon and its running jobs are doing, on disk.

Replaced atomically every `[heartbeat] seconds` in the job directory and in
the state directory, so `spoold status` (and other hosts sharing the spool)
can tell a working daemon from a dead or stuck one without talking to it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .durable import replace_json
from .lifecycle import ACTIVE, DaemonState, JobStatus


def heartbeat_document(host: str, state: str, progresses: list[Any], gpus: list[dict]) -> dict[str, Any]:
    """The heartbeat content: pid, host, state, and each running job's counts, rate and ETA.

    `job` is the first (longest running) of `jobs`, for readers written
    when a daemon ran one job at a time.
    """
    jobs = [progress.summary() for progress in progresses]
    return {"pid": os.getpid(), "host": host, "state": state, "ts": round(time.time(), 3),
            "job": jobs[0] if jobs else None, "jobs": jobs, "gpus": gpus}


def write_heartbeat(beats: list[tuple[Path, dict[str, Any]]], mode: int = 0o640, gid: int = -1) -> list[str]:
    """Replace each heartbeat file atomically with its document; returns what failed, e.g. on a full disk.

    A heartbeat that cannot be written must never stop the work it reports
    on; a vanished directory (a job just published) is not a failure. Not
    fsynced: the next beat replaces it within seconds, and a power cut that
    loses one loses nothing (peers judge a host by beats it goes on writing).
    """
    failures = []
    for path, doc in beats:
        try:
            replace_json(path, doc, mode, gid)
        except FileNotFoundError:
            pass
        except OSError as e:
            failures.append(f"{path}: {e.strerror or e}")
    return failures


#: A daemon whose host heartbeat is older than this many periods, and than STALE_FLOOR_SECONDS (a beat
#: can be late on a busy disk or a paused VM), is not beating: stopped, dead or stuck.
STALE_BEATS = 3
STALE_FLOOR_SECONDS = 30.0


#: What to do when no daemon beats on a spool, for every verb that finds none.
START_A_DAEMON = "start one with `systemctl start spoold` (or `spoold run`); `spoold doctor` says what is wrong"


@dataclass
class HostBeat:
    """What one host's heartbeat (processing/<host>/heartbeat.json) says, and whether it is still beating.

    Read from a file another host writes: every field is checked for its type, and one of the wrong
    type is left out (the state shows as `?`) rather than ending the command that looks."""

    host: str
    state: str
    age_seconds: float
    beating: bool
    model: str | None = None
    pid: int | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)


def host_beats(processing: Path, beat_seconds: float, now: float | None = None) -> list[HostBeat]:
    """Every host that has beaten on this spool, by name; `beat_seconds` is `[heartbeat] seconds`.
    PermissionError where this user may not read a host's beat (outside the spool's group)."""
    now = time.time() if now is None else now
    try:
        hosts = sorted(e.name for e in os.scandir(processing) if e.is_dir(follow_symlinks=False)
                       and not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []
    beats = (_host_beat(host, processing / host / "heartbeat.json", now, beat_seconds) for host in hosts)
    return [beat for beat in beats if beat is not None]


def _host_beat(host: str, path: Path, now: float, beat_seconds: float) -> HostBeat | None:
    """The age is from the beat's own `ts`, as the daemon's other readers take it; from the file's
    mtime where it has none."""
    try:
        mtime = path.stat().st_mtime
        doc = json.loads(path.read_bytes())
    except PermissionError:
        raise  # a beat this user may not read is no proof that no daemon runs: the caller says so
    except (OSError, ValueError):
        return None
    doc = doc if isinstance(doc, dict) else {}
    ts, state, model, pid, gpus = (doc.get(k) for k in ("ts", "state", "model", "pid", "gpus"))
    age = max(0.0, now - (ts if type(ts) in (int, float) and math.isfinite(ts) else mtime))
    # A stopping daemon beats on until its last write is done; once its beat is two periods old, it has exited.
    stale_after = 2 * beat_seconds if state == DaemonState.STOPPING else max(STALE_FLOOR_SECONDS,
                                                                               STALE_BEATS * beat_seconds)
    return HostBeat(host, state if isinstance(state, str) else "?", age, age <= stale_after,
                    model if isinstance(model, str) else None, pid if type(pid) is int else None,
                    [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else [])


def status_line(progresses: list[Any], queued: int, gpus: list[dict]) -> str:
    """The one line for `systemctl status`.

    One job: `batch_5k: 1762/5000 (35%) 3.9 req/s ETA 14m`; several:
    `3 jobs: 4210/170000 (2%), 37/50, 900/1000; 212 req/s` (the longest
    running first; a line that grows too long ends in `...`).
    """
    gpu = ""
    if gpus:
        gpu = " GPU " + "/".join(f"{g['utilization_pct']}%" for g in gpus)
    active = [p for p in progresses if p.state in ACTIVE]
    if not active:
        return f"idle, {queued} queued{gpu}"
    if len(active) == 1:
        return _one_job(active[0], gpu)
    parts = [_counts(p) for p in active[:SHOWN_JOBS]] + (["..."] if len(active) > SHOWN_JOBS else [])
    rate = sum(p.rate() for p in active)
    return f"{len(active)} jobs: {', '.join(parts)}; {rate:.1f} req/s{gpu}"


#: How many jobs the status line names one by one (systemd shows one line).
SHOWN_JOBS = 4


def _counts(progress: Any) -> str:
    if progress.state == JobStatus.VALIDATING:
        return JobStatus.VALIDATING.value
    if progress.total >= 100:
        return f"{progress.done}/{progress.total} ({100 * progress.done // progress.total}%)"
    return f"{progress.done}/{progress.total}"


def _one_job(progress: Any, gpu: str) -> str:
    name = progress.input_file.removesuffix(".jsonl") or progress.job_id
    if progress.state == JobStatus.VALIDATING:
        return f"{name}: validating{gpu}"
    total = progress.total or 1
    eta = progress.eta_seconds()
    eta_text = f" ETA {short_duration(eta)}" if eta is not None else ""
    return (f"{name}: {progress.done}/{progress.total} ({100 * progress.done // total}%) "
            f"{progress.rate():.1f} req/s{eta_text}{gpu}")


def short_duration(seconds: float) -> str:
    """`45s`, `14m`, `3.5h`, `3 days`: a time as a person reads it at a glance (an ETA, a heartbeat's age)."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.0f} days"
