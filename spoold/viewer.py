"""`spoold watch`: live progress from the ZeroMQ feed, one bar per job.

Works from another terminal or another host (with a tcp endpoint). `--json`
prints the raw events, one JSON object per line, for scripts.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from .events import TOPIC_PREFIX, resolve_endpoint
from .names import display_name


def subscribe(endpoint: str):
    """A SUB socket connected to the daemon's feed, subscribed to every spoold topic."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(resolve_endpoint(endpoint, connect=True))
    sock.setsockopt(zmq.SUBSCRIBE, TOPIC_PREFIX.encode())
    return sock


def receive(sock, timeout_ms: int = 500) -> tuple[str, dict[str, Any]] | None:
    """The next (topic, payload), or None when nothing came within the timeout."""
    if not sock.poll(timeout_ms):
        return None
    topic, body = sock.recv_multipart()
    return topic.decode(), json.loads(body)


def watch_json(endpoint: str, out: TextIO = sys.stdout) -> int:
    """Print every event as one JSON line until interrupted."""
    sock = subscribe(endpoint)
    try:
        while True:
            event = receive(sock)
            if event:
                topic, payload = event
                out.write(json.dumps({"topic": topic, **payload}) + "\n")
                out.flush()
    except KeyboardInterrupt:
        return 0


def watch_bars(endpoint: str) -> int:
    """Show one progress bar per job, and notable events above the bars, until interrupted."""
    from rich.progress import Progress

    sock = subscribe(endpoint)
    bars = JobBars()
    try:
        with Progress(*bar_columns(), refresh_per_second=4) as progress:
            progress.console.print(f"waiting for spoold events on {resolve_endpoint(endpoint, connect=True)} "
                                   "(Ctrl-C to quit)", markup=False)
            while True:
                event = receive(sock)
                if event:
                    bars.show(progress, *event)
    except KeyboardInterrupt:
        return 0


def bar_columns() -> list:
    """The columns of one job's bar: name and state, bar, done/total, percent, rate, ETA, GPU.

    The name comes from a submitter: it is never read as rich markup
    (`[/x].jsonl` would raise and end `spoold watch`).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    return [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[gpu]}")]


#: Terminal rows kept free of bars: the latest notes above them stay in sight.
NOTE_ROWS = 3


class JobBars:
    """Turns events into progress bars and one-line notes.

    More running jobs than the terminal has rows (64 run at once by default)
    would push the bars past its bottom edge; the jobs that do not fit share
    one last row instead: how many, their lines done of their total, their
    rate together.
    """

    def __init__(self) -> None:
        self.tasks: dict[str, Any] = {}
        #: each job's latest requests/s, for the row of the jobs not shown
        self.rates: dict[str, float] = {}
        self.last_seq: int | None = None
        self.daemon_state = ""
        self._more: Any = None

    def show(self, progress, topic: str, payload: dict[str, Any]) -> None:
        """Apply one event and print its note, as plain text, above the bars."""
        note = self.apply(progress, topic, payload)
        if note:
            progress.console.print(note, markup=False, highlight=False)

    def apply(self, progress, topic: str, payload: dict[str, Any]) -> str | None:
        """Update the bars for one event; return a note to print above them, if any."""
        note = self._gap(payload.get("seq"))
        name = _shown(payload.get("input_file") or payload.get("job", ""))
        if payload.get("group"):  # a part of a split batch: the batch's own progress makes its one bar
            name = f"{name} ({_shown(payload.get('job', '')).rsplit('-', 1)[-1]})"
        if topic == "spoold.job.progress":
            self._update(progress, payload)
        elif topic == "spoold.job.claimed":
            note = f"claimed {name} as {payload['job']}"
        elif topic == "spoold.job.completed":
            counts = payload["request_counts"]
            note = (f"completed {name}: {counts['completed']} ok, {counts['failed']} failed "
                    f"of {counts['total']}")
            self._remove(progress, payload.get("job"))
        elif topic == "spoold.job.cancelled":
            counts = payload["request_counts"]
            done = counts["completed"] + counts["failed"]
            note = f"cancelled {name}: {done} of {counts['total']} lines have a result"
            self._remove(progress, payload.get("job"))
        elif topic == "spoold.job.failed":
            errors = payload.get("errors") or [{"message": "unknown"}]
            note = f"FAILED {name}: {errors[0]['message']}"
            self._remove(progress, payload.get("job"))
        elif topic == "spoold.engine.stalled":
            note = f"STALLED: job {payload['job']} has {payload['inflight']} requests and no result for " \
                   f"{payload['seconds_without_progress']:.0f}s"
        elif topic == "spoold.engine.loading":
            note = f"loading model {payload['model']} ..."
        elif topic == "spoold.engine.ready":
            note = f"model {payload['model']} ready ({payload['load_seconds']:.0f}s)"
        elif topic == "spoold.daemon.heartbeat" and payload.get("state") != self.daemon_state:
            self.daemon_state = payload.get("state", "")
            note = f"{payload['host']}: {self.daemon_state}, {payload.get('queued', 0)} queued"
        if topic == "spoold.daemon.heartbeat":
            for job in payload.get("jobs") or ([payload["job"]] if payload.get("job") else []):
                self._update(progress, {**job, "gpus": payload.get("gpus", [])})
        self._fit(progress)
        return note

    def _remove(self, progress, job: Any) -> None:
        """A job that ended leaves the bars (its note stays above them): many small jobs must not pile up."""
        task = self.tasks.pop(job, None)
        self.rates.pop(job, None)
        if task is not None:
            progress.remove_task(task)

    def _fit(self, progress) -> None:
        """Show the bars of the jobs that have run longest, as many as the terminal has rows for, and
        one last row for the rest."""
        rows = max(2, progress.console.size.height - NOTE_ROWS)
        jobs = list(self.tasks)
        shown = set(jobs if len(jobs) <= rows else jobs[:rows - 1])
        for job, task in self.tasks.items():
            progress.update(task, visible=job in shown)
        if self._more is not None:  # made again below, so that it stays the last row
            progress.remove_task(self._more)
            self._more = None
        rest = [job for job in jobs if job not in shown]
        if rest:
            tasks = {task.id: task for task in progress.tasks}
            total = sum(tasks[self.tasks[job]].total or 0 for job in rest)
            self._more = progress.add_task(
                f"... and {len(rest)} more jobs", total=total or None,
                completed=sum(tasks[self.tasks[job]].completed for job in rest),
                rate=f"{sum(self.rates.get(job, 0) for job in rest):.1f} req/s", eta="", gpu="")

    def _gap(self, seq: int | None) -> str | None:
        note = None
        if seq is not None and self.last_seq is not None and seq > self.last_seq + 1:
            note = f"(missed {seq - self.last_seq - 1} events)"
        if seq is not None:
            self.last_seq = seq
        return note

    def _update(self, progress, p: dict[str, Any]) -> None:
        job = p["job"]
        if p.get("group"):
            return
        fields = {
            "rate": f"{p.get('requests_per_second') or 0:.1f} req/s",
            "eta": f"ETA {_human(p['eta_seconds'])}" if p.get("eta_seconds") is not None else "ETA -",
            "gpu": " ".join(f"GPU{g['index']} {g['utilization_pct']}%" for g in p.get("gpus") or []),
        }
        description = f"{_shown(p.get('input_file') or job)} [{p.get('state', '')}]"
        if p.get("parts"):  # a split batch: its parts run on any daemon of the spool
            description += f" {p.get('parts_done', 0)}/{p['parts']} parts"
        self.rates[job] = float(p.get("requests_per_second") or 0)
        if job not in self.tasks:
            self.tasks[job] = progress.add_task(description, total=p.get("total") or None, **fields)
        progress.update(self.tasks[job], description=description, total=p.get("total") or None,
                        completed=p.get("done", 0), **fields)


def _human(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _shown(name: Any) -> str:
    """A name from the feed (another host's, or a submitter's) in display form."""
    return display_name(name if isinstance(name, str) else str(name))
