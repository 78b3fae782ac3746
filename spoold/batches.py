"""The API's batches: each one a drop in the inbox, its Batch object read back from the spool.

Creating a batch writes its record (`batches/<id>.json`, apibatch.py),
names its result files, and then puts a copy of the input file into the
inbox as `<batch-id>.jsonl` by one rename: from there it is an ordinary
drop, claimed by whichever daemon gets it first, under the batch's id.
The API runs no job and keeps no state of its own beyond the record (and,
in memory, what listings sort by, which never changes): a batch's status,
counts and errors are read from wherever its job directory is
(processing/<host>/, outbox/, failed/), so the API can be restarted, or
run beside others on one spool, at any moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from calendar import timegm
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openai.types import Batch

from .apibatch import ApiBatch, drop_name, random_id, read_api_batch
from .durable import durable_mkdir, fsync_dir, hidden_temp, rename_noreplace, write_all
from .filestore import FileStore, StoredFile
from .groups import Groups
from .jobrecord import JobRecord
from .lifecycle import ACTIVE, JobStatus
from .names import is_plain_name
from .readonce import ReadOnce
from .spool import JobDir, Spool, cancel_asked_at, subdirs

#: `completion_window`: OpenAI's "24h", or any number of hours or days up to 30 days.
WINDOW = re.compile(r"([1-9][0-9]{0,3})([hd])")
MAX_WINDOW_SECONDS = 30 * 86400
#: A job made from a file dropped into the inbox (spool.new_job_id): its name's stem, UTC time, 64 random bits.
DROP_JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,79}-([0-9]{8}T[0-9]{6})-[0-9a-f]{16}")
#: `request_counts` before a daemon has counted the batch's lines: zeros, as OpenAI shows a new batch
#: (an app may read `batch.request_counts.total` straight after create).
UNCOUNTED = {"total": 0, "completed": 0, "failed": 0}
#: Statuses a batch never leaves.
FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})
#: how a job whose end is saved but which is still in processing/ shows until its move to outbox/: not
#: ended, as its result files are not there yet
PUBLISHING = {JobStatus.COMPLETED: JobStatus.FINALIZING, JobStatus.CANCELLED: JobStatus.CANCELLING,
              JobStatus.EXPIRED: JobStatus.FINALIZING}


@dataclass(frozen=True)
class DropJob:
    """A job made from a file dropped straight into the inbox (scp, NFS): admin keys see it as a batch."""

    id: str
    #: when it was claimed, from its id (listing reads no file)
    created_at: int


@dataclass(frozen=True)
class ListedBatch:
    """A batch made through the API, as a listing sorts and filters it: the fields its record never changes."""

    id: str
    created_at: int
    owner: str


class CannotCancel(Exception):
    """The batch has already finished; the message says how."""


def window_seconds(window: str) -> int:
    """`completion_window` in seconds; ValueError saying what is accepted."""
    match = WINDOW.fullmatch(window)
    seconds = int(match[1]) * (3600 if match[2] == "h" else 86400) if match else 0
    if not 0 < seconds <= MAX_WINDOW_SECONDS:
        raise ValueError(f"completion_window {window[:20]!r} must be hours or days, such as \"24h\" or \"7d\", "
                         "up to 30 days")
    return seconds


class BatchStore:
    """The batches made through the API on one spool."""

    def __init__(self, spool: Spool, files: FileStore,
                 on_withdrawn: Callable[[str, str], None] | None = None) -> None:
        """`on_withdrawn(batch id, tenant)`: told, durably, of a batch withdrawn before any claim
        (webhooks.record_withdrawn: no daemon ends that batch, so none would tell its receiver)."""
        self.spool, self.files = spool, files
        #: split batches: their parts run on any daemon (groups.py)
        self.groups = Groups(spool)
        self.dir = spool.batches
        self.on_withdrawn = on_withdrawn
        #: what listings sort and filter by, of every record listed so far
        self._listed: ReadOnce[ListedBatch] = ReadOnce(self._listed_batch)

    def create(self, owner: str, source: StoredFile, endpoint: str, window: str,
               metadata: dict[str, str] | None, output_expires_after: int | None = None) -> ApiBatch:
        """Record the batch, then drop a copy of its input into the inbox (blocking: run it in a thread)."""
        now = int(time.time())
        batch = ApiBatch(random_id("batch_"), owner, source.id, endpoint, window, now, now + window_seconds(window),
                         random_id("file-"), random_id("file-"), metadata,
                         output_expires_after=output_expires_after)
        durable_mkdir(self.dir)
        durable_mkdir(self.spool.inbox)  # made by tmpfiles or the daemon; missing only on a spool never run
        name = drop_name(batch.id)
        with open(self.files.content_path(source), "rb") as src, \
                hidden_temp(self.spool.inbox, name, self.spool.file_mode) as (fd, tmp):
            while chunk := src.read(1 << 20):
                write_all(fd, chunk)
        try:
            batch.save(self.dir, self.spool.file_mode)
            for file_id, result in ((batch.output_file_id, "output.jsonl"), (batch.error_file_id, "errors.jsonl")):
                self.files.add_result(file_id, owner, f"{batch.id}_{result}", f"outbox/{batch.id}/{result}",
                                      output_expires_after)
            rename_noreplace(tmp, self.spool.inbox / name)  # from here on, any daemon may claim it
            fsync_dir(self.spool.inbox)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return batch

    def get(self, batch_id: str, owner: str) -> ApiBatch | None:
        """`owner`'s batch `batch_id`, or None (no such batch, or another's: the same None)."""
        batch = read_api_batch(self.dir, batch_id)
        return batch if batch is not None and batch.owner == owner else None

    def list(self, owner: str | None) -> list[ApiBatch]:
        """`owner`'s batches (everyone's for None), newest first; ties by id, so pages never skip or repeat one."""
        return [batch for listed in self.index(owner) if (batch := self.full(listed)) is not None]

    def index(self, owner: str | None) -> list[ListedBatch]:
        """`list` without reading the records: a page of `GET /v1/batches` reads its own 20 only.

        A record is read once, the first time a listing sees it (its id,
        owner and creation time never change); after that a listing is one
        look at the directory. Reading every record for every page made an
        app's walk through 20,000 batches a read of 20 million files.
        """
        try:
            names = {n.removesuffix(".json") for n in os.listdir(self.dir) if n.endswith(".json")}
        except FileNotFoundError:
            names = set()
        mine = [b for b in self._listed.of(names) if owner is None or b.owner == owner]
        return sorted(mine, key=lambda b: (b.created_at, b.id), reverse=True)

    def gone(self, batch_id: str) -> ListedBatch | None:
        """A batch a listing saw whose record has since been removed (its retention passed); None if it
        is there or this process never listed it: where a walk through the pages goes on when the
        batch it names as its cursor is gone."""
        return self._listed.gone(batch_id)

    def _listed_batch(self, batch_id: str) -> ListedBatch | None:
        batch = read_api_batch(self.dir, batch_id)
        return ListedBatch(batch.id, batch.created_at, batch.owner) if batch is not None else None

    def full(self, listed: ListedBatch) -> ApiBatch | None:
        """The whole record of a listed batch as it is now; None if it was deleted since."""
        return read_api_batch(self.dir, listed.id)

    def drops(self) -> list[DropJob]:
        """Every job made from a drop in the inbox, wherever it is now (claimed ones: they have a record)."""
        found = {}
        for parent in (*subdirs(self.spool.processing), self.spool.outbox, self.spool.failed, self.groups.root):
            for name in _dir_names(parent):  # names only: an outbox of 20,000 jobs is listed for every page
                if (drop := _drop_job(name)) is not None:
                    found[drop.id] = drop
        return list(found.values())

    def get_drop(self, job_id: str) -> DropJob | None:
        """The drop's job `job_id` if there is one; None for anything else (checked before it touches a path)."""
        drop = _drop_job(job_id)
        return drop if drop is not None and self._locate(job_id)[0] is not None else None

    def batch_object(self, batch: ApiBatch | DropJob) -> Batch:
        """The Batch object as OpenAI shows it, from wherever its job is now."""
        if isinstance(batch, DropJob):
            return self._drop_object(batch)
        job, where = self._locate(batch.id)
        fields: dict[str, Any] = {
            "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window, "created_at": batch.created_at,
            "expires_at": batch.expires_at, "metadata": batch.metadata, "request_counts": dict(UNCOUNTED),
            "status": JobStatus.CANCELLED if batch.cancelled_at else JobStatus.VALIDATING,
            "cancelling_at": batch.cancelled_at, "cancelled_at": batch.cancelled_at}  # withdrawn at once
        if job is None and not batch.cancelled_at and not (self.spool.inbox / drop_name(batch.id)).exists():
            job, where = self._locate(batch.id)  # claimed since we looked; else withdrawn, or never queued
            if job is None and self._withdrawn(batch).exists():
                fields["status"] = JobStatus.CANCELLING
            elif job is None:
                fields.update(status=JobStatus.FAILED, failed_at=batch.created_at, errors={"object": "list", "data": [
                    {"code": "not_queued", "message": "the API stopped before the batch's input reached the inbox; "
                                                      "create the batch again", "line": None, "param": None}]})
        record, shown = self._read_job(batch.id, job, where)
        if record is not None:
            fields.update(shown)
        return Batch(**fields)

    def _drop_object(self, drop: DropJob) -> Batch:
        """A drop's job as a Batch: what its batch.json says; no file ids (its files are in the spool)."""
        fields: dict[str, Any] = {"id": drop.id, "object": "batch", "endpoint": "", "input_file_id": "",
                                  "completion_window": "", "created_at": drop.created_at,
                                  "request_counts": dict(UNCOUNTED), "status": JobStatus.VALIDATING}
        record, shown = self._read_job(drop.id, *self._locate(drop.id))
        if record is not None:
            fields.update(shown, endpoint=record.endpoint or "", created_at=record.created_at,
                          metadata=record.metadata)
        return Batch(**fields)

    def cancel(self, batch: ApiBatch | DropJob) -> None:
        """Withdraw a batch no daemon has claimed yet, or ask the daemon running it to stop it.

        CannotCancel for a batch that has already finished.
        """
        job, where = self._locate(batch.id)
        withdrawn = isinstance(batch, ApiBatch) and batch.cancelled_at  # a drop's job was claimed: none is
        if job is None and isinstance(batch, ApiBatch) and not withdrawn:
            if self._withdraw(batch):
                return
            job, where = self._locate(batch.id)  # claimed while we looked
        record = JobRecord.load(job.batch)[0] if job is not None else None
        status = JobStatus.CANCELLED if withdrawn else record.status if record else JobStatus.VALIDATING
        if where == "processing" and status not in FINISHED:
            self.spool.request_cancel(batch.id) or self.groups.request_cancel(batch.id)
            return
        raise CannotCancel(f"Cannot cancel a batch with status '{status}'.")

    def ended_at(self, batch: ApiBatch) -> int | None:
        """When the batch reached its final status; None while it is queued, running or being withdrawn."""
        job, where = self._locate(batch.id)
        if where in ("outbox", "failed"):
            record, _ = JobRecord.load(job.batch)
            return record.ended_at if record is not None else int(os.stat(job.path).st_mtime)
        if job is not None or (self.spool.inbox / drop_name(batch.id)).exists() or self._withdrawn(batch).exists():
            return None
        if self._locate(batch.id)[0] is not None:
            return None  # claimed while we looked
        return batch.cancelled_at or batch.created_at  # withdrawn, or never queued (the API stopped first)

    def delete(self, batch: ApiBatch) -> None:
        """Delete an ended batch: its job directory, its result files' records, then its own record last,
        so a delete cut short is finished by the next one. Never call it for a batch still running."""
        job, where = self._locate(batch.id)
        if where in ("outbox", "failed"):
            doomed = job.path.parent / f".{batch.id}.deleted"
            with contextlib.suppress(FileNotFoundError):  # another API server's sweep took it first
                os.rename(job.path, doomed)
                fsync_dir(job.path.parent)
            shutil.rmtree(doomed, ignore_errors=True)
        for file_id in (batch.output_file_id, batch.error_file_id):
            self.files.remove(file_id)
        (self.dir / f"{batch.id}.json").unlink(missing_ok=True)
        fsync_dir(self.dir)

    def _withdraw(self, batch: ApiBatch) -> bool:
        """Take the batch's drop back out of the inbox before a daemon claims it: one rename decides."""
        drop, withdrawn = self.spool.inbox / drop_name(batch.id), self._withdrawn(batch)
        try:
            os.rename(drop, withdrawn)
        except FileNotFoundError:
            return False
        if self.on_withdrawn is not None:
            self.on_withdrawn(batch.id, batch.owner)  # the rename decided it: the batch is cancelled
        batch.cancelled_at = int(time.time())
        batch.save(self.dir, self.spool.file_mode)
        withdrawn.unlink()
        fsync_dir(self.spool.inbox)
        return True

    def _withdrawn(self, batch: ApiBatch) -> Path:
        """Where a batch's drop is while it is being withdrawn (hidden: no daemon looks at it)."""
        return self.spool.inbox / f".{drop_name(batch.id)}.withdrawn.tmp"

    def _read_job(self, batch_id: str, job: JobDir | None,
                  where: str) -> tuple[JobRecord | None, dict[str, Any]]:
        """The record of the job `_locate` found and the Batch fields it and the job's files say.

        A running job is read in several steps (its record, then its
        heartbeat, its cancel marker, its result files); if it moved on
        meanwhile (processing/ to outbox/, one rename), all of it is read
        again where it is now, so that a batch being published never shows
        a state it was not in: unclaimed, its counts back at zero, or ended
        without its result files.
        """
        for _ in range(2):
            record = JobRecord.load(job.batch)[0] if job is not None else None
            shown = _from_record(record, job, where, self.groups) if record is not None else {}
            if job is None or where != "processing" or job.path.is_dir():
                break
            job, where = self._locate(batch_id)
        return record, shown

    def _locate(self, batch_id: str) -> tuple[JobDir | None, str]:
        """The batch's job directory and which part of the spool holds it; (None, "") before its claim."""
        for _ in range(2):  # a job moves from processing/ to outbox/ by one rename: look twice
            for where, parent in (("outbox", self.spool.outbox), ("failed", self.spool.failed)):
                if (parent / batch_id).is_dir():
                    return JobDir(parent / batch_id), where
            for host in subdirs(self.spool.processing):
                if (host / batch_id).is_dir():
                    return JobDir(host / batch_id), "processing"
            group = self.groups.group(batch_id)
            if is_plain_name(batch_id) and group.path.is_dir():  # split: its parts run on any daemon
                return JobDir(group.path), "processing"
        return None, ""


def _dir_names(parent: Path) -> list[str]:
    """The names of the directories in `parent` (as `subdirs`, unsorted and without a path for each)."""
    try:
        return [e.name for e in os.scandir(parent) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except FileNotFoundError:
        return []


def _drop_job(job_id: str) -> DropJob | None:
    """`job_id` as a drop's job, if it is one's name (its claim time is in it)."""
    match = DROP_JOB_ID.fullmatch(job_id)
    return DropJob(job_id, timegm(time.strptime(match[1], "%Y%m%dT%H%M%S"))) if match else None


def _from_record(record: JobRecord, job: JobDir, where: str, groups: Groups) -> dict[str, Any]:
    """The Batch fields a job's batch.json (and, while it runs, its heartbeat) says."""
    fields: dict[str, Any] = {
        "status": record.status, "model": record.model, "in_progress_at": record.in_progress_at,
        "finalizing_at": record.finalizing_at, "completed_at": record.completed_at,
        "failed_at": record.failed_at, "cancelling_at": record.cancelling_at, "cancelled_at": record.cancelled_at,
        "expired_at": record.expired_at,
        "request_counts": record.request_counts.__dict__.copy(),
        "errors": {"object": "list", "data": [{"code": e.get("code"), "message": e.get("message"),
                                               "line": None, "param": None} for e in record.errors]}
        if record.errors else None}
    if where == "processing":
        fields["request_counts"] = _live_counts(job, groups) or fields["request_counts"]
        if record.status in PUBLISHING:  # its move to outbox/ is the last step: results not there yet
            fields.update(status=PUBLISHING[record.status], completed_at=None, cancelled_at=None, expired_at=None)
        asked_at = cancel_asked_at(job.cancel_request)
        if asked_at is not None and record.status in ACTIVE:
            fields["status"], fields["cancelling_at"] = JobStatus.CANCELLING, int(asked_at)
    if where in ("outbox", "failed"):
        fields["usage"] = _batch_usage(record.usage)
    if where == "outbox":
        for key, path in (("output_file_id", job.output), ("error_file_id", job.errors)):
            if path.exists() and path.stat().st_size:
                fields[key] = getattr(record, key)
    return fields


def _batch_usage(usage: dict[str, int]) -> dict[str, Any]:
    """An ended batch's token totals (batch.json's `usage`) as the Batch object's `usage`. Cached and
    reasoning tokens are not counted (vLLM reports them per line only when asked to): they show as 0."""
    return {"input_tokens": usage["input_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["output_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


def _live_counts(job: JobDir, groups: Groups) -> dict[str, int] | None:
    """A running job's counts from its heartbeat (batch.json has them only at the end); a split batch's
    from its parts (groups.py)."""
    if job.path.parent == groups.root:
        progress = groups.progress(job.id)
        return {key: progress[key] for key in ("total", "completed", "failed")} if progress else None
    try:
        progress = json.loads(Path(job.heartbeat).read_text())["job"]
        return {key: int(progress[key]) for key in ("total", "completed", "failed")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
