"""`spoold cancel` by the owner of a running job who may not write its directory (a submitter, as packaged).

A running job's directory is the daemon's to change: a member of the spool's
group may look into it, not leave a cancel marker there. So its owner asks in
the inbox, which they may write (`inbox/<job-id>.cancel`), and the daemon
running the job takes the request if whoever made it is the job's owner
(`spool.job_owner`, `Spool.take_owner_cancel`); a request from anyone else is
removed unheeded.
This side checks the owner first, so that nobody asks in vain, then waits for
the daemon to take the request, to say what became of it. A split batch
(groups.py) is asked for the same way, by its id: the runner of any of its
parts takes the request and cancels every part, wherever it runs.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

from .access import user_name
from .groups import Groups, group_of
from .spool import JobDir, Spool, job_owner

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
    """Ask for the cancel of running job `job_id` (or split batch: `cancel_own_split_batch`) as its owner;
    None when no such job runs. PermissionError when this user may not look into processing/ at all."""
    job = spool.running_job(job_id)
    if job is None:
        return cancel_own_split_batch(spool, job_id)
    try:
        owner = job_owner(job)
    except FileNotFoundError:  # no input: not a job a drop became (a failed drop on its way to failed/)
        return None
    split_batch = group_of(job_id)
    if owner != os.geteuid() and split_batch:
        return OwnCancel(False, f"cannot cancel {job_id!r} alone: it is a part of split batch {split_batch}, "
                                f"which its owner cancels whole (spoold cancel {split_batch})")
    refusal = _refusal(job_id, owner, "job", bool(job.read_batch().get("input_file_id")))
    if refusal is not None:
        return refusal
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


def cancel_own_split_batch(spool: Spool, group_id: str) -> OwnCancel | None:
    """Ask for the cancel of split batch `group_id` as its owner; None when none of its parts runs now
    (groups/, where the others wait, is the daemon's alone: nothing there says whose the batch is)."""
    parts = Groups(spool).running_parts(group_id)
    record = parts[0].read_record()[0] if parts else None  # a part carries its batch's submitter and tenant
    if record is None or (record.submitter_uid is None and not record.tenant):
        return None
    refusal = _refusal(group_id, record.submitter_uid, "batch", bool(record.tenant))
    if refusal is not None:
        return refusal
    request = spool.ask_owner_cancel(group_id)
    deadline = time.monotonic() + TAKE_WAIT_SECONDS
    while request.exists() and time.monotonic() < deadline:
        time.sleep(LOOK_SECONDS)
    if not request.exists():
        said = f"cancelling {group_id} (a split batch) on every daemon running its parts: its results so far go to "
        return OwnCancel(True, said + f"{spool.outbox / group_id} once every part has stopped")
    return OwnCancel(True, f"asked for the cancel of {group_id} in {spool.inbox}/; no daemon has taken the request "
                           f"yet, and the next one to run one of its parts will (`spoold status`)")


def _refusal(job_id: str, owner: int | None, noun: str, made_through_api: bool) -> OwnCancel | None:
    """Why this user may not ask for the cancel of `job_id` (a "job" or a "batch"), whose owner is `owner`
    (None: nobody's here); None when they may. A batch made through `spoold api` is its key's, not a user's."""
    if owner == os.geteuid():
        return None
    if made_through_api:
        return OwnCancel(False, f"cannot cancel {job_id!r} here: it is a batch made through `spoold api`, which its "
                                f"owner cancels through the API (client.batches.cancel)")
    return OwnCancel(False, f"cannot cancel {job_id!r}: it is {user_name(owner)}'s {noun}; only its owner, the "
                            f"daemon's user and root may cancel it")


def _cancelled(spool: Spool, job: JobDir) -> bool:
    """Whether the job is being cancelled, or was, if it has already gone to the outbox."""
    if job.cancel_request.exists():
        return True
    return JobDir(spool.outbox / job.id).read_batch().get("status") in ("cancelling", "cancelled")

