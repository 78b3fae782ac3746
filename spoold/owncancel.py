"""`spoold cancel` by the owner of a running job who may not write its directory (a submitter, as packaged).

A running job's directory is the daemon's to change: a member of the spool's
group may look into it, not leave a cancel marker there. So its owner asks in
the inbox, which they may write (`inbox/<job-id>.cancel`), and the daemon
running the job takes the request if whoever made it owns the job's input
(`Spool.take_owner_cancel`); a request from anyone else is removed unheeded.
This side checks the owner first, so that nobody asks in vain, then waits for
the daemon to take the request, to say what became of it.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

from .access import user_name
from .spool import JobDir, Spool

#: How long to wait for the daemon to take the request: each running job looks for one every 0.2 s.
TAKE_WAIT_SECONDS = 10.0

#: How often to look whether it was taken.
LOOK_SECONDS = 0.05


@dataclass
class OwnCancel:
    """What became of the request: `asked` is False when none was made or it came to nothing."""

    asked: bool
    said: str


def cancel_own_job(spool: Spool, job_id: str) -> OwnCancel | None:
    """Ask for the cancel of running job `job_id` as its owner; None when no such job runs (a split batch's
    id included: its parts run on many hosts, and its cancel is root's). PermissionError when this user
    may not look into processing/ at all."""
    job = spool.running_job(job_id)
    try:
        owner = os.lstat(job.input).st_uid if job else None
    except FileNotFoundError:  # no input: not a job a drop became (a failed drop on its way to failed/)
        owner = None
    if job is None or owner is None:
        return None
    if owner != os.geteuid() and job.read_batch().get("input_file_id"):
        return OwnCancel(False, f"cannot cancel {job_id!r} here: it is a batch made through `spoold api`, which its "
                                f"owner cancels through the API (client.batches.cancel)")
    if owner != os.geteuid():
        return OwnCancel(False, f"cannot cancel {job_id!r}: it is {user_name(owner)}'s job; only its owner, the "
                                f"daemon's user and root may cancel it")
    request = spool.ask_owner_cancel(job_id)
    deadline = time.monotonic() + TAKE_WAIT_SECONDS
    while request.exists() and job.path.is_dir() and time.monotonic() < deadline:
        time.sleep(LOOK_SECONDS)
    if _cancelled(spool, job):
        return OwnCancel(True, f"cancelling {job_id} on {job.path.parent.name}: its results so far go to "
                               f"{spool.outbox / job_id}")
    if not job.path.is_dir():  # it ended first: the request would only linger in the inbox
        with contextlib.suppress(FileNotFoundError):
            os.unlink(request)
        return OwnCancel(False, f"{job_id} ended before its daemon took the cancel (`spoold status` says how)")
    if request.exists():
        return OwnCancel(True, f"asked for the cancel of {job_id} in {spool.inbox}/; its daemon has not taken "
                               f"the request yet, and will once it runs the job again (`spoold status`)")
    return OwnCancel(False, f"the daemon running {job_id} did not take the cancel as this user's")


def _cancelled(spool: Spool, job: JobDir) -> bool:
    """Whether the job is being cancelled, or was, if it has already gone to the outbox."""
    if job.cancel_request.exists():
        return True
    return JobDir(spool.outbox / job.id).read_batch().get("status") in ("cancelling", "cancelled")

