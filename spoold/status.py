"""What the spool holds right now, read from the spool itself.

Works with the daemon down: queued drops are files in inbox/, running jobs
are directories under processing/<host>/ with batch.json and heartbeat.json,
finished ones are in outbox/ and failed/.
"""

from __future__ import annotations

import json
import os
import pwd
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .heartbeat import START_A_DAEMON, host_beats, short_duration
from .lifecycle import DaemonState
from .names import display_name
from .spool import JobDir, Spool, is_drop_name, subdirs
from .groups import Groups
from .webhooks import UNCLAIMED, Deliveries

#: How many finished and failed jobs `spoold status` lists.
RECENT = 10


def spool_status(spool: Spool, stall_seconds: float = 300.0, beat_seconds: float = 5.0) -> dict[str, Any]:
    """The daemons on this spool (from their heartbeats), queued, processing (every host) and recent
    finished/failed jobs.

    A job whose heartbeat shows requests in flight but no progress for
    `stall_seconds` is marked `stalled`. What this user may not read (a user
    outside the spool's group may not look into processing/, see the README's
    "Who may read what") is listed under `unreadable` instead of ending the
    command.
    """
    unreadable: list[str] = []

    def readable(section: str, read: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        try:
            return read()
        except PermissionError:
            if section not in unreadable:  # processing/ is read twice: daemons, then jobs
                unreadable.append(section)
            return []
    status = {
        "daemons": readable("processing", lambda: [asdict(b) for b in host_beats(spool.processing, beat_seconds)]),
        "queued": readable("inbox", lambda: _queued(spool.inbox)),
        "processing": readable("processing", lambda: _processing(spool.processing, stall_seconds)),
        "split": readable("groups", lambda: Groups(spool).all_progress()),
        "finished": readable("outbox", lambda: _recent(spool.outbox)),
        "failed": readable("failed", lambda: _recent(spool.failed)),
        "webhooks": readable("webhooks", lambda: _webhooks(spool.root / "webhooks")),
    }
    status["unreadable"] = unreadable
    return status


def _queued(inbox: Path) -> list[dict[str, Any]]:
    try:
        entries = [e for e in os.scandir(inbox) if is_drop_name(e.name)]
    except FileNotFoundError:
        return []
    out = []
    for e in sorted(entries, key=lambda e: e.name):
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        out.append({"name": display_name(e.name), "bytes": st.st_size, "mtime": int(st.st_mtime)})
    return out


def _processing(root: Path, stall_seconds: float) -> list[dict[str, Any]]:
    out = []
    for host_dir in subdirs(root):
        for job_dir in subdirs(host_dir):
            job = JobDir(job_dir)
            batch = job.read_batch()
            heartbeat = _read_json(job.heartbeat)
            # A job that moved on mid-read is left out: outbox/ and failed/ are read after this (one that
            # another host took over may be missed by this one look)
            if not job_dir.is_dir():
                continue
            beat, stamp = heartbeat.get("job") or {}, heartbeat.get("ts")
            last = beat.get("last_progress_at")
            stalled = bool(beat.get("inflight")) and last is not None and time.time() - last >= stall_seconds
            out.append({
                "id": job.id,
                "host": host_dir.name,
                "input_file": _shown(batch.get("input_file")),
                "status": DaemonState.STALLED if stalled else (beat.get("state") or batch.get("status")),
                "total": beat.get("total") or batch.get("request_counts", {}).get("total", 0),
                "done": beat.get("done", 0),
                "requests_per_second": beat.get("requests_per_second"),
                "eta_seconds": beat.get("eta_seconds"),
                "heartbeat_age_seconds": round(time.time() - stamp, 1) if stamp else None,
                "owner": _owner(batch),
            })
    return out


def _owner(batch: dict[str, Any]) -> str | None:
    """Whose a running job is, as the engine's shares count it (README, Many jobs at once): `key NAME`
    for a batch made through the API, else the user who dropped it (by uid where this host has no
    name for it); None for a record that does not say (a job claimed before owners were kept)."""
    tenant, uid = batch.get("tenant"), batch.get("submitter_uid")
    if isinstance(tenant, str) and tenant:
        return f"key {display_name(tenant)}"
    if type(uid) is not int:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return f"uid {uid}"


def _recent(root: Path) -> list[dict[str, Any]]:
    jobs = []
    for job_dir in subdirs(root):
        batch = JobDir(job_dir).read_batch()
        jobs.append({
            "id": job_dir.name,
            "input_file": _shown(batch.get("input_file")),
            "status": batch.get("status"),
            "request_counts": batch.get("request_counts"),
            "finished_at": batch.get("completed_at") or batch.get("failed_at"),
            "errors": batch.get("errors", []),
        })
    jobs.sort(key=lambda j: j["finished_at"] or 0, reverse=True)
    return jobs[:RECENT]


def _shown(name: Any) -> str | None:
    """A name from a record another host (or a submitter's file name) made, in display form."""
    return display_name(name) if isinstance(name, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _webhooks(root: Path) -> list[dict[str, Any]]:
    """Each host's webhook deliveries waiting to be sent (or retried), and given up; UNCLAIMED's (the API
    server's, for any daemon to take) first."""
    hosts = [UNCLAIMED] * (root / UNCLAIMED).is_dir() + [host.name for host in subdirs(root)]
    return [{"host": host, **Deliveries(root.parent, host).counts()} for host in hosts]


def render_status(status: dict[str, Any]) -> str:
    """The status as a few plain tables for a terminal."""
    lines = (["daemons: not readable by this user (below)"] if "processing" in status["unreadable"]
             else _render_daemons(status["daemons"], len(status["queued"])))
    lines.append(f"queued ({len(status['queued'])}):")
    lines += [f"  {q['name']}  {q['bytes']} bytes" for q in status["queued"]] or ["  -"]
    lines.append(f"processing ({len(status['processing'])}):")
    for p in status["processing"]:
        pct = f" ({100 * p['done'] // p['total']}%)" if p["total"] else ""
        rate = f"  {p['requests_per_second']:.1f} req/s" if p["requests_per_second"] else ""
        eta = f"  ETA {p['eta_seconds']:.0f}s" if p["eta_seconds"] is not None else ""
        age = (f"  heartbeat {p['heartbeat_age_seconds']:.0f}s ago"
               if p["heartbeat_age_seconds"] is not None else "  no heartbeat")
        owner = f"  by {p['owner']}" if p.get("owner") else ""
        lines.append(f"  {p['id']} [{p['host']}] {p['status']}: {p['done']}/{p['total']}{pct}{rate}{eta}{age}{owner}")
    if not status["processing"]:
        lines.append("  -")
    for g in status.get("split", []):
        done = g["completed"] + g["failed"]
        pct = f" ({100 * done // g['total']}%)" if g["total"] else ""
        lines.append(f"split batch {g['id']} ({g['input_file']}): {done}/{g['total']}{pct}, "
                     f"{g['parts_done']} of {g['parts']} parts done")
    for key in ("finished", "failed"):
        lines.append(f"{key} (latest {RECENT}):")
        for j in status[key]:
            if not j["status"]:  # a failed job's directory is the daemon's alone
                lines.append(f"  {j['id']}: details not readable by this user")
                continue
            counts = j["request_counts"] or {}
            why = f"  {j['errors'][0]['message']}" if key == "failed" and j["errors"] else ""
            lines.append(f"  {j['id']} {j['status']}: {counts.get('completed', 0)} ok, "
                         f"{counts.get('failed', 0)} failed of {counts.get('total', 0)}{why}")
        if not status[key]:
            lines.append("  -")
    for w in status.get("webhooks", []):
        if w["pending"] or w["given_up"]:
            lines.append(f"webhooks [{w['host']}]: {w['pending']} waiting to be delivered, {w['given_up']} given up "
                         f"(webhooks/{w['host']}/given_up/)")
    if status.get("unreadable"):
        lines.append(f"not readable by this user: {', '.join(status['unreadable'])} (run as root, or as a "
                     "member of the spool's group, [spool] group, to see them)")
    return "\n".join(lines)


def _render_daemons(daemons: list[dict[str, Any]], queued: int) -> list[str]:
    """One line per daemon that has run on the spool, and what it means when none is running now."""
    lines = [f"daemons ({sum(d['beating'] for d in daemons)} running):"] + [f"  {_daemon_line(d)}" for d in daemons]
    if not any(d["beating"] for d in daemons):
        waiting = ", so the queued drops wait" if queued else ""
        lines.append(f"  no daemon is running on this spool{waiting}: {START_A_DAEMON}")
    return lines


def _daemon_line(d: dict[str, Any]) -> str:
    """Another host's heartbeat is data: every value is shown in display form."""
    host, state, ago = display_name(d["host"]), display_name(d["state"]), short_duration(d["age_seconds"])
    if not d["beating"]:
        if d["state"] == DaemonState.STOPPING:
            return f"{host}: stopped {ago} ago"
        return f"{host}: not running, or stuck: its last heartbeat, {ago} ago, said {state}"
    pid = f" (pid {d['pid']})" if d["pid"] is not None else ""
    model = f", {display_name(d['model'])}" if d["model"] else ""
    gpus = "".join(display_name(f", GPU{g.get('index', '')} {g.get('utilization_pct')}%") for g in d["gpus"])
    return f"{host}{pid}: {state}{model}{gpus}, heartbeat {ago} ago"


def status_json(status: dict[str, Any]) -> str:
    """The status as JSON, for scripts."""
    return json.dumps(status, indent=2)
