"""The spool directory: the queue's single source of truth.

States are places: a drop in `inbox/` is queued, a job directory under
`processing/<host>/` is owned by that host, `outbox/` holds finished jobs and
`failed/` the drops that could not be read at all. Every move between them is
one rename, so a crash leaves each job in exactly one place.
"""

from __future__ import annotations

import contextlib
import glob
import grp
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import SpoolSettings
from .durable import (atomic_write_bytes, atomic_write_json, durable_mkdir, durable_rename, fsync_dir,
                      hidden_temp, write_all)
from .apibatch import ApiBatch, read_api_batch
from .jobrecord import API_FIELDS, JobRecord, user_tenant, weight_of
from .names import display_name, is_plain_name
from .readymarker import READY_SUFFIX, may_mark, read_metadata
from .retries import accept_retry_of, job_submitter, submitter_of

log = logging.getLogger(__name__)

#: `inbox/<job-id>.cancel`: a job's owner asking for its cancel (`spoold cancel` by a submitter, who may
#: look into a running job's directory but not write there). Not a drop: `.jsonl` names only are claimed.
OWNER_CANCEL_SUFFIX = ".cancel"

#: Suffixes of files still being written by some tool; never claimed.
IGNORED_SUFFIXES = (".tmp", ".part", "~")


def is_drop_name(name: str) -> bool:
    """True for a name that may be a drop: `*.jsonl`, not hidden, not a temp file."""
    return (
        name.endswith(".jsonl")
        and not name.startswith(".")
        and not name.endswith(IGNORED_SUFFIXES)
    )


def new_job_id(drop_name: str, now: float | None = None) -> str:
    """`<stem>-<UTC timestamp>-<random>`: readable, sortable, unique across hosts.

    The stem keeps only `[A-Za-z0-9_.-]` of the drop's name, so a job id is
    always a safe single path component. 64 random bits: hosts sharing a
    spool never pick the same id for drops of one name in one second (and
    the job directory is made with O_EXCL semantics anyway, see new_job_dir).
    """
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{_job_stem(drop_name)}-{stamp}-{secrets.token_hex(8)}"


def job_ids_of(drop_name: str, with_copies: bool = False) -> re.Pattern[str]:
    """What every job id made from a drop of this name matches (`with_copies`: also from the names
    `copy_name` gives further drops of it); its group 1 is the claim's time."""
    copies = f"(?:{COPY_SUFFIX})?" if with_copies else ""
    return re.compile(re.escape(_job_stem(drop_name)) + copies + r"-(\d{8}T\d{6})-[0-9a-f]{16}")


#: How a copy's name ends, as `copy_name` makes it: two digits at most, so that a dated name
#: (`scores-2026.jsonl`) is not taken for a copy of `scores.jsonl`.
COPY_SUFFIX = r"-(?:[2-9]|[1-9][0-9])"


def copy_name(drop_name: str, n: int) -> str:
    """The name the `n`th drop of `drop_name` gets while the others still wait (`scores-2.jsonl`):
    a drop is never overwritten. The first keeps its name."""
    return drop_name if n == 1 else f"{drop_name.removesuffix('.jsonl')}-{n}.jsonl"


def _job_stem(drop_name: str) -> str:
    """The start of every job id made from a drop of this name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", drop_name.removesuffix(".jsonl"))[:80].lstrip(".") or "batch"


@dataclass(frozen=True)
class JobDir:
    """One job's directory and the files in it."""

    path: Path

    @property
    def id(self) -> str:
        """The job's id: its directory's name."""
        return self.path.name

    @property
    def input(self) -> Path:
        """The drop, moved here by the claim."""
        return self.path / "input.jsonl"

    @property
    def output(self) -> Path:
        """Results, one line per answered request, each fsynced before it counts."""
        return self.path / "output.jsonl"

    @property
    def errors(self) -> Path:
        """Error records, with line numbers, for lines no engine answered (bad, expired, the engine gone)."""
        return self.path / "errors.jsonl"

    @property
    def batch(self) -> Path:
        """The job's record: the OpenAI Batch object and spoold's own fields."""
        return self.path / "batch.json"

    @property
    def heartbeat(self) -> Path:
        """Progress, replaced while the job runs; other daemons take it as a sign the job is alive."""
        return self.path / "heartbeat.json"

    @property
    def cancel_request(self) -> Path:
        """Present when `spoold cancel` asked for this job to stop."""
        return self.path / "cancel.requested"

    def read_record(self) -> tuple[JobRecord | None, str | None]:
        """The job's record; (None, None) when there is none to read, (None, why) when it is wrong.

        See JobRecord.load: no record makes the job start again from
        validation (its result files make that safe), a wrong one fails it.
        """
        return JobRecord.load(self.batch)

    def read_batch(self) -> dict[str, Any]:
        """The job's batch.json as it is on disk, for showing it; {} when missing or not a JSON object."""
        try:
            batch = json.loads(self.batch.read_text())
        except (OSError, ValueError):
            return {}
        return batch if isinstance(batch, dict) else {}


class DropRefused(Exception):
    """A drop was not claimed but failed at once (not a regular file, hard-linked): `job` is its failed job."""

    def __init__(self, job: JobDir) -> None:
        super().__init__(job.id)
        self.job = job


#: `Spool.before_publish`: told of a finished job just before its publish; returns how to take back what it
#: did, for a publish that another daemon made first (a split batch's assembly), or None.
PublishHook = Callable[["JobDir"], "Callable[[], None] | None"]


class Spool:
    """The directories of one spool root, seen from one host."""

    def __init__(self, settings: SpoolSettings, before_publish: PublishHook | None = None) -> None:
        self.settings = settings
        #: called (in the mover's thread) with a finished job just before it goes to outbox/ or failed/: the
        #: daemon records the job's webhook delivery there, so no crash publishes a job without one
        self.before_publish = before_publish
        self.root = Path(settings.root)
        self.inbox = self.root / "inbox"
        self.processing = self.root / "processing"
        self.host_dir = self.processing / settings.host_id
        self.outbox = self.root / "outbox"
        self.failed = self.root / "failed"
        #: the API's records of the batches it created (apibatch.py)
        self.batches = self.root / "batches"
        self.file_mode = settings.file_mode
        self.gid = results_gid(settings.group)
        #: Held from a rename between the spool's shared directories (inbox,
        #: this host's, outbox/, failed/) until both are fsynced, and by every
        #: other change to them. Jobs run these steps in threads, at once: an
        #: fsync of the source directory by another in between would make the
        #: removal durable before the arrival, and a power cut there would
        #: lose the drop or the job. (A job's own directory needs no lock.)
        self._moves = threading.RLock()
        #: Held by an assembly of a split batch (groups.py) from its first look to its publish: two threads
        #: of this daemon (the last part's runner, the periodic look) then never assemble one batch at once,
        #: so an assembly that loses the publish always lost it to another host.
        self.assembling = threading.Lock()
        self._inbox_error: int | None = None

    def ensure_dirs(self) -> None:
        """Create the spool's directories if they are missing. This host's directory gets `[spool] group`,
        as its job directories and heartbeats do: the group may look in (not write) and see what runs."""
        for d in (self.inbox, self.host_dir, self.outbox, self.failed):
            durable_mkdir(d)
        if self.gid != -1 and os.stat(self.host_dir).st_gid != self.gid:  # made before the group was set
            os.chown(self.host_dir, -1, self.gid)

    def save(self, job: JobDir, record: JobRecord) -> None:
        """Replace a job's batch.json atomically and durably, with the spool's mode and group."""
        self.save_doc(job, record.to_doc())

    def save_doc(self, job: JobDir, doc: dict[str, Any]) -> None:
        """`save` for a record already made into its document (`JobRecord.to_doc`)."""
        atomic_write_json(job.batch, doc, self.file_mode, self.gid)

    # -- the inbox ---------------------------------------------------------

    def inbox_entries(self, with_markers: bool = False) -> list[os.DirEntry]:
        """Every drop-like entry in the inbox (and, `with_markers`, every `NAME.jsonl.ready`), unordered.

        An inbox that cannot be read (missing, EIO, ESTALE on NFS) reads as
        empty, and is said once in the log: the next rescan tries again.
        """
        def wanted(name: str) -> bool:
            return is_drop_name(name) or with_markers and is_drop_name(name.removesuffix(READY_SUFFIX))
        try:
            entries = [e for e in os.scandir(self.inbox) if wanted(e.name)]
        except OSError as e:
            if self._inbox_error != e.errno:
                log.warning("cannot read the inbox %s (%s); waiting for it to come back", self.inbox,
                            e.strerror or e)
            self._inbox_error = e.errno
            return []
        self._inbox_error = None
        return entries

    def claim_drop(self, name: str) -> JobDir | None:
        """Move `inbox/NAME` into a new job directory of this host.

        Returns None when another daemon (or the user) took the file first:
        only the daemon whose rename succeeded owns the job. A symlink or
        anything that is not a regular file is never followed; it goes to
        failed/ with the reason, and DropRefused says so.
        """
        src = self.inbox / name
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise DropRefused(self.fail_drop(name, "not a regular file (symlinks and devices are never read)",
                                             "not_regular"))
        if st.st_nlink != 1:
            if self._held_by_a_job(name, st):
                return None
            # Another name for the same file (a hard link to something only
            # the daemon may read, or a path the submitter keeps writing
            # through) must never be read or claimed.
            raise DropRefused(self.fail_drop(name, f"the file has {st.st_nlink} hard links; submit a file of "
                                                   "its own (copy it, do not `ln` it)", "not_regular"))
        api = self._api_batch(name, st)
        # Group `[spool] group`: its members may read the results in outbox/.
        job = self.new_job_dir(self.host_dir, name, self.gid, api.id if api else None)
        # How the drop looked when claimed: lets recover() tell a stale inbox
        # entry left by a power cut from a new drop of the same name; and
        # its name as it was, which `input_file` shows in display form.
        record = JobRecord(job.id, display_name(name), self.settings.host_id, drop=drop_record(name, st),
                           metadata=read_metadata(self.inbox / (name + READY_SUFFIX), st.st_uid))
        record.retry_of = accept_retry_of(record.metadata, st.st_uid, self.outbox)  # `spoold retry`'s drops
        record.metadata = record.metadata or None
        if api is not None:
            record.metadata, record.tenant, record.endpoint = api.metadata, api.owner, api.endpoint
            for key in API_FIELDS:
                setattr(record, key, getattr(api, key))
        else:
            record.submitter_uid = submitter_of(self.outbox, record.retry_of, st.st_uid)
        self.save(job, record)
        with self._moves:
            try:
                os.rename(src, job.input)
            except FileNotFoundError:
                shutil.rmtree(job.path, ignore_errors=True)
                return None
            fsync_dir(job.path)
            fsync_dir(self.inbox)
            _unlink_durably(self.inbox / (name + READY_SUFFIX))
        return job

    def drop_owner(self, name: str) -> tuple[str, int]:
        """Whose the drop `inbox/NAME` is and its weight, as its claim will record them: (the API key's
        name, or for a filesystem drop its submitter's `user_tenant`: its owner, or whose job it
        retries, `retries.submitter_of`; its `priority`, 1-100). For the
        scheduler, which lets tenants take turns before any claim; a drop it cannot read is ("", 1), and
        its claim says what is wrong."""
        try:
            st = os.lstat(self.inbox / name)
        except OSError:
            return "", 1
        api = self._api_batch(name, st)
        if api is not None:
            return api.owner, weight_of(api.metadata)
        metadata = read_metadata(self.inbox / (name + READY_SUFFIX), st.st_uid, warn=False)
        retry_of = accept_retry_of(dict(metadata or {}), st.st_uid, self.outbox, warn=False)
        return user_tenant(submitter_of(self.outbox, retry_of, st.st_uid)), weight_of(metadata)

    def _api_batch(self, name: str, st: os.stat_result) -> ApiBatch | None:
        """The API's record of the batch whose drop is `inbox/NAME` (stat `st`), or None for a plain drop.

        A batch made through the API keeps its id, owner and request: its
        record is the API's own (batches/), and so must the drop be (the API
        runs as the daemon's user), or a submitter could drop a file under
        a batch's name and run it as that batch's owner.
        """
        if st.st_uid not in (0, os.geteuid()):
            return None
        return read_api_batch(self.batches, name.removesuffix(".jsonl"))

    def fail_drop(self, name: str, reason: str, code: str) -> JobDir:
        """Move an unreadable drop to failed/<job-id>/ with a batch.json saying why.

        The failed job is made whole under this host's processing/ (record,
        then the drop) and published with one rename, as a finished job is:
        a power cut never leaves a failed/ entry without its record, and a
        job cut short there is finished by the runner (its status says
        failed), never run. The directory is the daemon's alone (its own
        group, not the results group): the drop may be another name for a
        file no submitter may read, and must not become readable here.
        """
        job = self.new_job_dir(self.host_dir, name, os.getegid())
        record = JobRecord(job.id, display_name(name), self.settings.host_id)
        try:
            record.drop = drop_record(name, os.lstat(self.inbox / name))
        except FileNotFoundError:
            pass
        record.fail(reason, code)
        self.save(job, record)
        with self._moves:
            try:
                durable_rename(self.inbox / name, job.input)
            except FileNotFoundError:
                pass
            _unlink_durably(self.inbox / (name + READY_SUFFIX))
        log.error("drop %s failed: %s", display_name(name), reason)
        return self.move_to_failed(job)

    def _held_by_a_job(self, name: str, st: os.stat_result) -> bool:
        """A drop that is the very file a job holds, here or on any host: a power cut cut its move short.

        The inbox entry goes (durably) instead of making a second job of the
        drop (its two names would look like a hard link). Only jobs made from
        a drop of this name are looked at.
        """
        pattern = f"{glob.escape(_job_stem(name))}-*"
        for job_dir in [*self.processing.glob(f"*/{pattern}"), *self.failed.glob(pattern)]:
            try:
                held = os.lstat(job_dir / "input.jsonl")
            except OSError:
                continue
            if self._remove_if_held(name, st, held, job_dir.name):
                return True
        return False

    def _remove_if_held(self, name: str, st: os.stat_result, held: os.stat_result, job_id: str) -> bool:
        """Remove inbox/NAME (and its .ready) durably if it is the very file (`st`) job `job_id`
        holds (`held`): the one place a move that a power cut cut short is undone."""
        if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):
            return False
        log.warning("inbox/%s is the drop job %s already holds (its move was cut short by a crash or "
                    "power cut); removing it from the inbox", display_name(name), job_id)
        with self._moves:
            _unlink_durably(self.inbox / name)
            _unlink_durably(self.inbox / (name + READY_SUFFIX))
        return True

    def new_job_dir(self, parent: Path, drop_name: str, gid: int = -1, wanted_id: str | None = None) -> JobDir:
        """A new, empty job directory under `parent` with group `gid`, made durably; never one that exists.

        A job id that is taken (another host, the same second, the same
        random bits) must not silently reuse a live job's directory: the
        mkdir fails and a fresh id is tried. `wanted_id` (an API batch's id)
        is tried first.
        """
        with self._moves:
            durable_mkdir(parent)
            for attempt in range(8):
                job = JobDir(parent / (wanted_id if wanted_id and not attempt else new_job_id(drop_name)))
                try:
                    os.mkdir(job.path, 0o750)
                except FileExistsError:
                    continue
                if gid != -1:
                    os.chown(job.path, -1, gid)
                fsync_dir(parent)
                return job
        raise FileExistsError(f"cannot make a new job directory under {parent}: every id tried exists")

    # -- jobs of this host -------------------------------------------------

    def host_jobs(self) -> list[JobDir]:
        """This host's claimed jobs, oldest first; half-made claims are cleaned up.

        A job directory without input.jsonl is a claim that crashed before
        its rename: the drop is still in the inbox, so the directory goes.
        """
        jobs = []
        for path in subdirs(self.host_dir):
            job = JobDir(path)
            if not job.input.exists():
                log.warning("removing half-claimed job directory %s", job.path)
                shutil.rmtree(job.path, ignore_errors=True)
                continue
            jobs.append(job)
        return jobs

    def recover(self) -> list[JobDir]:
        """At start-up: undo what a power cut can leave half-moved; return this host's jobs.

        A rename becomes durable in each directory only when that directory
        is fsynced, so a cut between the two fsyncs can leave an entry in
        both places: a published job still in processing/ (the outbox copy
        wins), a claimed drop still in the inbox (recognised by the size and
        mtime recorded at claim), or a job this host took over still under
        the old host too (this host's copy wins: job ids are unique, so only
        a takeover puts one job under two hosts). Temp files of interrupted
        atomic writes go too.
        """
        _remove_temp_files(self.host_dir)
        jobs = []
        for job in self.host_jobs():
            _remove_temp_files(job.path)
            published = next((d for d in (self.outbox, self.failed) if (d / job.id).is_dir()), None)
            if published is not None:
                log.warning("job %s is already in %s; removing the stale copy in %s",
                            job.id, published, job.path.parent)
                shutil.rmtree(job.path)
                fsync_dir(job.path.parent)
                continue
            record, _ = job.read_record()
            self._remove_stale_drop(job, record)
            self._remove_copies_under_other_hosts(job)
            self._record_submitter(job, record)
            jobs.append(job)
        return sorted(jobs, key=_claimed_at)

    def _remove_copies_under_other_hosts(self, job: JobDir) -> None:
        for host_dir in subdirs(self.processing):
            stale = host_dir / job.id
            if host_dir != self.host_dir and stale.is_dir():
                log.warning("job %s, taken over by this host, is also under %s; removing that stale copy",
                            job.id, host_dir.name)
                shutil.rmtree(stale)
                fsync_dir(host_dir)

    def _remove_stale_drop(self, job: JobDir, record: JobRecord | None) -> None:
        """Remove the inbox entry a power cut left of the drop this job claimed.

        It is that drop only if it is the very file the job holds (the same
        inode): a resubmission with `rsync -a` or `cp -p` has the same name,
        size and mtime, never the same inode, and stays.
        """
        seen = record.drop if record is not None else None
        name = seen.get("name", record.input_file) if isinstance(seen, dict) else None
        if not isinstance(name, str) or "/" in name or not is_drop_name(name):
            return  # not a name this daemon could have claimed: another host's record is data
        try:
            st, mine = os.lstat(self.inbox / name), os.lstat(job.input)
        except FileNotFoundError:
            _unlink_durably(self.inbox / (name + READY_SUFFIX))
            return
        self._remove_if_held(name, st, mine, job.id)

    def orphaned_jobs(self, claim_timeout: float, clocks: "PeerClocks") -> list[tuple[JobDir, float]]:
        """Jobs of other hosts whose files have not changed for `claim_timeout`, with how long.

        "Changed" is any of the host's heartbeat, the job's heartbeat, its
        batch.json or its directory, as seen from here: `clocks` times the
        silence on this host's monotonic clock, so no peer's clock (or a
        heartbeat stamped in the future) decides.
        """
        orphans, now = [], time.monotonic()
        for host_dir in subdirs(self.processing):
            if host_dir == self.host_dir:
                continue
            host_beat = file_signature(host_dir / "heartbeat.json")
            for path in subdirs(host_dir):
                job = JobDir(path)
                signature = (host_beat, file_signature(job.heartbeat), file_signature(job.batch),
                             file_signature(job.path))
                silent = clocks.silent_for(path, signature, now)
                if silent > claim_timeout:
                    orphans.append((job, silent))
        return orphans

    def take_over(self, job: JobDir) -> JobDir | None:
        """Make another host's job this host's; None if someone else was first.

        One rename moves the directory. Then its result files are copied
        into fresh files renamed over the old ones: a write the old owner
        had already begun (an NFS write stuck past its heartbeat, a process
        frozen between its ownership check and its write) lands in an inode
        nobody reads, so it can never double a line. The lines it had no
        time to write simply run again here.
        """
        dest = self.host_dir / job.id
        try:
            with self._moves:
                durable_rename(job.path, dest)
        except FileNotFoundError:
            return None
        taken = JobDir(dest)
        for path in (taken.output, taken.errors):
            self._replace_with_copy(path)
        self._record_submitter(taken, taken.read_record()[0])
        return taken

    def _record_submitter(self, job: JobDir, record: JobRecord | None) -> None:
        """Record whose a job claimed by a spoold from before `submitter_uid` was kept is, as a claim now
        does (its input's owner, or whose job it retries), when this host resumes or takes it over: else,
        across an upgrade, its owner's new drops would share the engine beside it as a second tenant (and
        `spoold status` would not say whose it is). A batch of an API key and a part of a split batch (its
        input is the daemon's) say whose they are otherwise. `record`: the job's, as read."""
        if record is None or record.tenant or record.submitter_uid is not None or record.group is not None:
            return
        try:
            record.submitter_uid = submitter_of(self.outbox, record.retry_of, os.lstat(job.input).st_uid)
            self.save(job, record)
        except OSError as e:  # no input (its run says so), or a full disk: it shares as before, and runs
            log.warning("job %s: cannot record its submitter (%s); it shares the engine as before", job.id, e)
            return
        log.info("job %s: recorded its submitter, uid %d (claimed before submitters were kept)",
                 job.id, record.submitter_uid)

    def _replace_with_copy(self, path: Path) -> None:
        try:
            src = open(path, "rb")
        except FileNotFoundError:
            return
        with src, hidden_temp(path.parent, path.name, self.file_mode, self.gid) as (fd, tmp):
            while chunk := src.read(1 << 20):
                write_all(fd, chunk)
        os.rename(tmp, path)
        fsync_dir(path.parent)

    def request_cancel(self, job_id: str) -> JobDir | None:
        """Ask whichever daemon owns a claimed job to cancel it; None if no such job is running."""
        job = self.running_job(job_id)
        if job is not None:
            self.mark_cancelled(job.cancel_request)
        return job

    def running_job(self, job_id: str) -> JobDir | None:
        """The claimed job `job_id` on whichever host runs it; None if there is none."""
        if not is_plain_name(job_id):
            return None
        for host in subdirs(self.processing):
            job = JobDir(host / job_id)
            if job.path.is_dir():
                return job
        return None

    def owner_cancel_request(self, job_id: str) -> Path:
        """Where the owner of running job `job_id` asks for its cancel (the daemon takes it: take_owner_cancel)."""
        return self.inbox / f"{job_id}{OWNER_CANCEL_SUFFIX}"

    def owner_cancel_asked(self, job_id: str) -> bool:
        """Whether a cancel of `job_id` was asked for in the inbox: a plain file (a link or a directory by
        that name is never followed, and stays there as any other stray entry does)."""
        try:
            return stat.S_ISREG(os.lstat(self.owner_cancel_request(job_id)).st_mode)
        except OSError:
            return False

    def ask_owner_cancel(self, job_id: str) -> Path:
        """Ask, as this user, for the cancel of running job `job_id`, which this user may not mark itself;
        the daemon running it honours the request if the job is this user's (take_owner_cancel)."""
        marker = self.owner_cancel_request(job_id)
        atomic_write_bytes(marker, f"{time.time():.3f}\n".encode(), 0o644)
        return marker

    def take_owner_cancel(self, job: JobDir) -> bool:
        """Make the cancel `job`'s owner asked for in the inbox the job's own; True when it did.

        Its owner is `job_owner`'s (the drop's owner, kept by the claim's
        rename), as for a `.ready` marker: anyone may write the inbox, but
        nobody may cancel another's job.
        """
        return self.take_owner_request(job, lambda: self.mark_cancelled(job.cancel_request))

    def take_owner_request(self, job: JobDir, cancel: Callable[[], object]) -> bool:
        """`cancel()` when the cancel of `job` asked for in the inbox is by its submitter (or root, or the
        daemon's user); True when it was. A request from anyone else is removed with a warning; an entry by
        that name that is not a plain file is never followed, and left where it is; with no input to judge
        by yet, the request waits."""
        request = self.owner_cancel_request(job.id)
        try:
            st, owner = os.lstat(request), job_owner(job)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        honoured = may_mark(st.st_uid, owner)
        if honoured:
            cancel()  # before the request goes: `spoold cancel` waits for that, then looks for the cancel
        else:
            log.warning("a cancel request for job %s by uid %d is not its owner's (uid %d); removed", job.id,
                        st.st_uid, owner)
        with self._moves:  # a change to the inbox, as every other one is made
            _unlink_quietly(request)
        return honoured

    def remove_late_cancel(self, job_id: str) -> None:
        """Remove a cancel of `job_id` asked for in the inbox too late, as its job is published. Only a plain
        file: anything else by that name stays, as any stray entry does, and no error here may fail the
        publish that has just been made."""
        if self.owner_cancel_asked(job_id):
            with contextlib.suppress(OSError):
                os.unlink(self.owner_cancel_request(job_id))

    def mark_cancelled(self, marker: Path) -> None:
        """Leave a cancel marker (a job's, a split batch's) for whichever daemon runs it to notice."""
        atomic_write_bytes(marker, f"{time.time():.3f}\n".encode(), self.file_mode, self.gid)

    def count_host_jobs(self) -> int:
        """How many job directories this host holds (a cheap look, no clean-up)."""
        return len(subdirs(self.host_dir))

    def move_to_outbox(self, job: JobDir) -> JobDir:
        """Publish a finished job: one directory rename into outbox/, made durable. A cancel its owner asked
        for in the inbox too late to be taken (`ask_owner_cancel`) goes with it."""
        dest = self.outbox / job.id
        if self.before_publish is not None:
            self.before_publish(job)
        with self._moves:
            durable_rename(job.path, dest)
            self.remove_late_cancel(job.id)
        return JobDir(dest)

    def move_to_failed(self, job: JobDir) -> JobDir:
        """Give up on a claimed job: its directory goes to failed/, the daemon's alone.

        A failed input is not a result: members of the results group may not
        read it (it may be what an attacker hoped to get read, or someone's
        data in a file the daemon could not make sense of). A cancel asked
        for in the inbox goes with it, as with `move_to_outbox`.
        """
        dest = self.failed / job.id
        os.chown(job.path, -1, os.getegid())
        if self.before_publish is not None:
            self.before_publish(job)
        with self._moves:
            durable_rename(job.path, dest)
            self.remove_late_cancel(job.id)
        return JobDir(dest)


class PeerClocks:
    """How long each other host's job has been silent, on this host's monotonic clock.

    A job's files are silent while their signature (inode, size, mtime of
    each) stays the same between looks. The first look starts the clock,
    so after a restart a peer is given a whole `claim_timeout` again.
    """

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[tuple, float]] = {}

    def silent_for(self, key: Path, signature: tuple, now: float) -> float:
        """Seconds `key` has shown `signature`; 0 when it just changed (or is new)."""
        seen = self._seen.get(key)
        if seen is None or seen[0] != signature:
            self._seen[key] = (signature, now)
            return 0.0
        return now - seen[1]

    def forget(self, key: Path) -> None:
        """Stop timing a job (taken over, or gone)."""
        self._seen.pop(key, None)


def results_gid(group: str) -> int:
    """The gid of `[spool] group` (-1: none set); ValueError naming the problem if it does not exist."""
    if not group:
        return -1
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no group {group!r} on this host (create it, e.g. with the packaged "
                         "spoold.sysusers, or unset it)") from None


def check_results_group(group: str) -> None:
    """Refuse to start as a daemon that could not give its job directories `group`.

    Only root and members may chown to a group: otherwise every claim would
    fail with EPERM.
    """
    gid = results_gid(group)
    if gid != -1 and os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ValueError(f"this daemon's user is not in group {group!r}, so it cannot make results "
                         f"readable by it; add it (usermod -aG {group} <user>) and restart")


def subdirs(root: Path) -> list[Path]:
    """The directories in `root`, by name, hidden ones and symlinks left out; [] if it is missing."""
    try:
        return sorted(Path(e.path) for e in os.scandir(root)
                      if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    except FileNotFoundError:
        return []


def job_owner(job: JobDir) -> int:
    """Who may cancel `job` besides root and the daemon's user: its submitter (`retries.job_submitter`: a
    `spoold retry` root ran for alice is hers, as she may retry it; a part of a split batch is the
    daemon's, its owner cancels the whole batch). FileNotFoundError without an input: nothing to judge by."""
    os.lstat(job.input)
    return job_submitter(job.path)


def _claimed_at(job: JobDir) -> float:
    record, _ = job.read_record()
    return record.created_at if record is not None else 0


def drop_record(name: str, st: os.stat_result) -> dict[str, Any]:
    """What batch.json keeps of a drop as claimed: its name as it was, its size and mtime.

    `name` is kept losslessly (bytes that are not UTF-8 as Python's
    surrogate escapes, `\\udcXX` in the JSON), for the daemon alone: what is
    shown is `input_file`, its display form.
    """
    return {"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cancel_asked_at(marker: Path) -> float | None:
    """When a cancel marker was left (its mtime): the Batch's `cancelling_at`; None if there is none."""
    try:
        return marker.stat().st_mtime
    except FileNotFoundError:
        return None


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or replaced: inode, size, mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _remove_temp_files(directory: Path) -> None:
    """Hidden temp files of atomic writes a crash interrupted (durable.hidden_temp)."""
    for path in directory.glob(".*.tmp"):
        _unlink_quietly(path)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_durably(path: Path) -> None:
    """Remove a file if it is there, and make its removal durable."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)
