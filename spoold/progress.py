"""What a job has durably done so far, as heartbeats, events, status and metrics read it.

Leaf module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .lifecycle import JobStatus


@dataclass
class JobProgress:
    """What a job has durably done so far; read by heartbeats and status."""

    job_id: str
    input_file: str
    state: JobStatus = JobStatus.VALIDATING
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    done_at_start: int = 0
    last_progress_at: float = field(default_factory=time.time)
    done: int = 0
    completed: int = 0
    failed: int = 0
    output_tokens: int = 0
    inflight: int = 0
    completed_at_start: int = 0
    failed_at_start: int = 0
    #: the split batch this job is a part of (groups.py), None for a whole batch
    group: str | None = None

    def rate(self) -> float:
        """Durable lines per second since this daemon took the job up."""
        elapsed = time.monotonic() - self.started
        return (self.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0

    def tokens_rate(self) -> float:
        """Output tokens per second since this daemon took the job up."""
        elapsed = time.monotonic() - self.started
        return self.output_tokens / elapsed if elapsed > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The progress as plain data, for heartbeats and events."""
        eta = self.eta_seconds()
        return {
            "job": self.job_id, "input_file": self.input_file, "state": self.state,
            "total": self.total, "done": self.done, "completed": self.completed, "failed": self.failed,
            "inflight": self.inflight, "requests_per_second": round(self.rate(), 3),
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "last_progress_at": round(self.last_progress_at, 3),
            **({"group": self.group} if self.group else {}),
        }

    def eta_seconds(self) -> float | None:
        """Seconds to the end at the current rate, or None when unknown."""
        rate = self.rate()
        if not self.total or rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)
