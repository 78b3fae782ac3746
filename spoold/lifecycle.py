"""The states things are in: a job (batch.json's status), a runner's outcome, the daemon.

String enums: each member is its own name as it appears in batch.json,
heartbeats and events, so files and feeds read the same as before and
compare equal to plain strings from another host or an older spoold. A
leaf module: nothing of the daemon is imported here.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A job's `status` in batch.json and the API: the OpenAI Batch statuses."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


#: The statuses of a job still being worked on (heartbeats show its progress).
ACTIVE = frozenset({JobStatus.VALIDATING, JobStatus.IN_PROGRESS, JobStatus.FINALIZING})


class Outcome(StrEnum):
    """How one run of a job ended, as the runner returns it to the daemon."""

    COMPLETED = "completed"  # in outbox/
    FAILED = "failed"  # in failed/
    CANCELLED = "cancelled"  # `spoold cancel`: in outbox/ with what was done
    EXPIRED = "expired"  # `expires_at` passed first: in outbox/, every unfinished line a `batch_expired` error
    INTERRUPTED = "interrupted"  # stopped (a stop, a hung engine): it resumes later
    WAITING = "waiting"  # this model's lines are done; it waits for its next model
    PAUSED = "paused"  # stopped for a swap another model's job waited for: it resumes when its model is back
    SPLIT = "split"  # it became a group (groups.py): its parts are jobs of their own, for any daemon


#: Outcomes that end a job for good (counted in spoold_jobs_finished_total).
FINAL = frozenset({Outcome.COMPLETED, Outcome.FAILED, Outcome.CANCELLED, Outcome.EXPIRED})


class DaemonState(StrEnum):
    """The daemon's `state` in heartbeats, events and `spoold status`."""

    STARTING = "starting"
    LOADING = "loading"
    IDLE = "idle"
    WORKING = "working"
    STALLED = "stalled"
    PAUSED = "paused"
    STOPPING = "stopping"


#: States in which no model is serving yet (or any more).
NOT_SERVING = frozenset({DaemonState.STARTING, DaemonState.LOADING, DaemonState.STOPPING})


def shown_state(state: DaemonState, paused: bool, stalled: bool) -> DaemonState:
    """The one state to report when several apply.

    Paused (a full or failing disk) wins over everything: nothing can
    progress until the disk is back, whatever the engine does. Then stalled
    (requests in flight, no result for `[watchdog] stall_seconds`): it is
    the thing to look at. Otherwise the daemon's own state.
    """
    if paused:
        return DaemonState.PAUSED
    return DaemonState.STALLED if stalled else state
