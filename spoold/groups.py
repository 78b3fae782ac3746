"""Groups: one big batch split into parts that every daemon on the spool may run, then assembled.

A validated job with more valid lines than `[spool] split_lines` becomes a
group. Its parts are ordinary job directories, made whole (input.jsonl,
batch.json) in a hidden staging directory that one rename turns into
`groups/<group-id>/`: that rename is the split's one commit point, so a
crash leaves either the original job (and the staging is thrown away) or
the complete set of parts (and the original is removed), never both and
never a partial set. The group's id is the original job's id (an API
batch keeps its id).

    groups/<group-id>/batch.json      the original's record, validated, with `parts` (the API reads it)
    groups/<group-id>/input.jsonl     the original drop, moved in once the split is committed
    groups/<group-id>/errors.jsonl    its validation errors, numbered as in the original
    groups/<group-id>/parts/<part>/   parts no daemon has claimed yet
    groups/<group-id>/done/<part>/    finished parts
    groups/<group-id>/cancel.requested

A part holds a range of the original's lines with every bad one blanked,
so its line N is the original's line `first_line + N - 1`, and nothing is
validated twice into an error. Any daemon claims a part by renaming it into
its processing/ directory, runs it as any job and publishes it into done/.
Whoever publishes the last part assembles the group: one output.jsonl and
one errors.jsonl in the original's numbering, one batch.json over the whole
batch (with `parts`: which host ran which), staged inside the group and
published into outbox/ by one rename that never replaces; then the group
directory goes. Assembly is idempotent: a crash at any step is finished by
the next look (a daemon's start, its periodic look for orphans).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .durable import durable_mkdir, durable_rename, fsync_dir, hidden_temp, rename_noreplace, write_all
from .jobrecord import JobRecord
from .formats import Tally, complete_lines, error_line
from .lifecycle import JobStatus
from .lineset import LineSet
from .names import is_plain_name
from .records import LineError
from .spool import JobDir, Spool, cancel_asked_at, subdirs
from .validation import iter_lines
from .writer import parse_output_line

log = logging.getLogger(__name__)

#: A part's id: the group's id, then this and its number (1-based, 4 digits: 170,000 lines in parts of 1,000).
PART_INFIX = "-part"
#: Where a split is staged, inside the job being split.
SPLIT_STAGING = ".split"
#: Where a host stages a group's assembly: `assembly.<host>.<random>/<group-id>/` inside the group (named
#: as the group, so what it hands to `before_publish` has the group's id).
ASSEMBLY = "assembly."

#: The start of an output line (formats.output_line): its id ends in the number of the line it answers.
_OUTPUT_ID = re.compile(rb'^(\{"id":"batch_req_[0-9a-f]{16}_)([0-9]+)(?=")')


@dataclass(frozen=True)
class GroupDir(JobDir):
    """One group's directory: a job directory (batch.json, input.jsonl, errors.jsonl, cancel marker)
    that also holds its parts."""

    @property
    def parts(self) -> Path:
        """Parts no daemon has claimed yet."""
        return self.path / "parts"

    @property
    def done(self) -> Path:
        """Finished parts (completed, cancelled, expired or failed)."""
        return self.path / "done"


def group_of(job_id: str) -> str | None:
    """The group a job id names as a part's (`<group-id>-partNNNN`); None for any other job."""
    group_id, infix, number = job_id.rpartition(PART_INFIX)
    return group_id if infix and number.isdigit() else None


class Groups:
    """The spool's groups/ directory: splitting, claiming parts, publishing them, assembling."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.root = spool.root / "groups"

    def group(self, group_id: str) -> GroupDir:
        """The directory of one group's record (it may not exist)."""
        return GroupDir(self.root / group_id)

    def was_split(self, job: JobDir) -> bool:
        """Whether `job` is the original of a committed split (a crash cut its removal short)."""
        return self.group(job.id).path.is_dir()

    # -- the split ------------------------------------------------------------

    def split(self, job: JobDir, record: JobRecord, f: IO[bytes], end: int, bad_lines: LineSet,
              split_lines: int, max_line_bytes: int) -> GroupDir:
        """Make `job` (validated; no line run yet) a group of parts of at most `split_lines` valid lines.

        `bad_lines`: the lines validation gave an error (blanked in the parts).
        Everything is written and fsynced in a staging directory inside the
        job (the job's alone: a run that crashed here leaves it for the next
        run to throw away), which one rename publishes as the group; only
        then is the original job removed.
        """
        durable_mkdir(self.root)
        staging = job.path / SPLIT_STAGING
        shutil.rmtree(staging, ignore_errors=True)
        os.mkdir(staging, 0o750)
        group = GroupDir(staging)
        parts = self._write_parts(group, job.id, f, end, bad_lines, split_lines, max_line_bytes)
        self._write_part_records(group, record, parts)
        for name in ("errors.jsonl", "cancel.requested"):  # the input moves in after the commit (one name)
            if (job.path / name).exists():
                os.link(job.path / name, staging / name)
        record.parts = parts
        self.spool.save_doc(JobDir(staging), record.to_doc())
        with self.spool._moves:
            durable_rename(staging, self.root / job.id)  # the commit point
        self.remove_original(job)
        return self.group(job.id)

    def _write_parts(self, group: GroupDir, group_id: str, f: IO[bytes], end: int, bad_lines: LineSet,
                     split_lines: int, max_line_bytes: int) -> list[dict[str, Any]]:
        """Each part's input.jsonl (fsynced), valid lines only, bad ones blanked; the parts' plan."""
        durable_mkdir(group.parts)
        parts: list[dict[str, Any]] = []
        out: _PartFile | None = None
        try:
            for number, raw in iter_lines(f, max_line_bytes, end):
                if raw is None or number in bad_lines:
                    continue
                if out is None or out.lines == split_lines:
                    if out is not None:
                        out.close()
                    part_id = f"{group_id}{PART_INFIX}{len(parts) + 1:04d}"
                    out = _PartFile(group.parts / part_id, number)
                    parts.append({"id": part_id, "first_line": number, "lines": 0})
                out.add(number, raw)
                parts[-1]["lines"] = out.lines
        finally:
            if out is not None:
                out.close()
        fsync_dir(group.parts)
        return parts

    def _write_part_records(self, group: GroupDir, record: JobRecord, parts: list[dict[str, Any]]) -> None:
        for number, part in enumerate(parts, 1):
            part_record = JobRecord(part["id"], record.input_file, record.host, created_at=record.created_at,
                                    endpoint=record.endpoint, metadata=record.metadata, tenant=record.tenant,
                                    submitter_uid=record.submitter_uid,
                                    completion_window=record.completion_window, expires_at=record.expires_at,
                                    group={"id": record.id, "part": number, "parts": len(parts),
                                           "first_line": part["first_line"]})
            self.spool.save(JobDir(group.parts / part["id"]), part_record)

    def remove_original(self, job: JobDir) -> None:
        """The original of a committed split goes: its input into the group (a file of one name: a
        second one would make it look hard-linked), the rest away; its lines are the parts' now."""
        group = self.group(job.id)
        with self.spool._moves:
            if job.input.exists() and not group.input.exists():
                durable_rename(job.input, group.input)
            shutil.rmtree(job.path, ignore_errors=True)
            fsync_dir(job.path.parent)

    # -- parts ----------------------------------------------------------------

    def claimable(self, held: set[str]) -> Iterator[tuple[JobDir, JobRecord | None]]:
        """The first unclaimed part of each group of which this host holds no part (`held`: its job ids),
        with its group's record (its age in the queue, its tenant and weight; None if unreadable).

        One part per group per daemon at a time: a part fills an engine's
        window on its own, and the other parts are left for the other
        daemons on the spool, each claiming its next one as it finishes one.
        """
        busy = {group_of(job_id) for job_id in held}
        for group_path in subdirs(self.root):
            group = GroupDir(group_path)
            if group.id in busy:
                continue
            parts = subdirs(group.parts)
            if parts:
                yield JobDir(parts[0]), group.read_record()[0]

    def claim(self, part: JobDir) -> JobDir | None:
        """Make an unclaimed part this host's job; None when another daemon was first.

        A group cancelled before the claim passes its cancel on to the part:
        `request_cancel` marks the group first, then each part wherever it
        is, so either it saw this part or this sees its mark.
        """
        dest = self.spool.host_dir / part.id
        try:
            with self.spool._moves:
                durable_rename(part.path, dest)
        except FileNotFoundError:
            return None
        job = JobDir(dest)
        if GroupDir(part.path.parent.parent).cancel_request.exists():
            self.spool.mark_cancelled(job.cancel_request)
        return job

    def remove_stale_copies(self, jobs: list[JobDir]) -> None:
        """At start-up: a part a power cut left in two places (a claim or a publish whose rename was made
        durable in one directory only). Published wins over claimed; claimed wins over unclaimed."""
        for job in jobs:
            group_id = group_of(job.id)
            if group_id is None:
                continue
            group = self.group(group_id)
            if (group.done / job.id).is_dir() or (self.spool.outbox / group_id).is_dir():
                stale, parent = job.path, job.path.parent
            elif (group.parts / job.id).is_dir():
                stale, parent = group.parts / job.id, group.parts
            else:
                continue
            log.warning("part %s is in two places after a crash; removing the stale copy in %s", job.id, parent)
            shutil.rmtree(stale, ignore_errors=True)
            fsync_dir(parent)

    def publish_part(self, job: JobDir, group_id: str) -> JobDir:
        """A finished part goes into its group's done/ by one durable rename (never into outbox/)."""
        group = self.group(group_id)
        durable_mkdir(group.done)
        with self.spool._moves:
            durable_rename(job.path, group.done / job.id)
        return JobDir(group.done / job.id)

    def request_cancel(self, group_id: str) -> GroupDir | None:
        """`spoold cancel GROUP`: mark the group, then every part not finished, wherever it is."""
        group = self.group(group_id)
        if not is_plain_name(group_id) or not group.path.is_dir():
            return None
        self.spool.mark_cancelled(group.cancel_request)
        for part in [*self._parts_in(group.parts, group_id), *self.running_parts(group_id)]:
            try:
                self.spool.mark_cancelled(part.cancel_request)
            except FileNotFoundError:
                continue  # it moved on meanwhile: listed again on its host, or claimed after the group's
                # mark, which the claim passes on (`claim`), or finished
        return group

    def take_owner_cancel(self, group_id: str) -> bool:
        """Cancel split batch `group_id` (`request_cancel`) when its owner asked for it in the inbox, as
        `Spool.take_owner_cancel` does for one job; True when it did. Its owner is the group's submitter
        (the original's record, or its input, which the split moves into the group); a part's own input
        is the daemon's. For the runners of its parts: a submitter may not mark the group, and its parts
        run on many hosts."""
        return self.spool.take_owner_request(self.group(group_id), lambda: self.request_cancel(group_id))

    def running_parts(self, group_id: str) -> list[JobDir]:
        """The parts of split batch `group_id` that daemons have claimed, on every host. Members of the
        spool's group may look here (not into groups/): `spoold cancel` by a submitter does."""
        return [part for host in subdirs(self.spool.processing) for part in self._parts_in(host, group_id)]

    @staticmethod
    def _parts_in(directory: Path, group_id: str) -> list[JobDir]:
        prefix = f"{group_id}{PART_INFIX}"
        return [JobDir(path) for path in subdirs(directory) if path.name.startswith(prefix)]

    def progress(self, group_id: str, running: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """A split batch's combined progress, as one batch: its parts' durable counts (finished parts'
        records, running parts' heartbeats) and its validation errors; None when there is no such group.

        `running`: the progress summaries of the parts the caller runs itself, by part id. Their counts
        are used instead of their heartbeats, which are a heartbeat period old, so the combined figure
        moves with the parts' own instead of in steps."""
        group = self.group(group_id)
        record, _ = group.read_record()
        if record is None or not record.parts:
            return None
        failed = sum(1 for _ in complete_lines(group.errors))
        completed = parts_done = 0
        rate = 0.0
        for part in record.parts:
            counts = _part_counts(self.spool, group, str(part.get("id", "")), running or {})
            if counts is not None:
                completed, failed = completed + counts[0], failed + counts[1]
                parts_done, rate = parts_done + counts[2], rate + counts[3]
        total = record.request_counts.total
        return {"id": group_id, "input_file": record.input_file, "parts": len(record.parts),
                "parts_done": parts_done, "total": total, "completed": completed, "failed": failed,
                "requests_per_second": round(rate, 3),
                "eta_seconds": round((total - completed - failed) / rate, 1) if rate > 0 else None}

    def all_progress(self) -> list[dict[str, Any]]:
        """`progress` of every split batch not assembled yet."""
        return [p for p in map(self.progress, (path.name for path in subdirs(self.root))) if p is not None]

    # -- assembly -------------------------------------------------------------

    def finish_all(self) -> list[JobDir]:
        """Assemble every group whose parts are all done, and clear groups already in outbox/; at
        start-up and now and then, so a crash of whoever finished the last part leaves nothing behind."""
        published = []
        for path in subdirs(self.root):
            job = self.assemble(path.name)
            if job is not None:
                published.append(job)
        return published

    def assemble(self, group_id: str) -> JobDir | None:
        """Publish the group into outbox/ as one job if all its parts are done; returns it then, else None.

        Safe to call from any daemon at any time, from two at once too: each
        try stages in a directory of its own and the publishing rename never
        replaces, so one assembly wins and the other lets go. One daemon's
        threads take turns (`Spool.assembling`).
        """
        with self.spool.assembling:
            return self._assemble(group_id)

    def _assemble(self, group_id: str) -> JobDir | None:
        group = self.group(group_id)
        dest = self.spool.outbox / group_id
        if dest.is_dir():
            self._remove(group)  # published; a crash cut the clean-up short
            return None
        record, _ = group.read_record()
        if record is None or not record.parts:
            return None
        if not all(is_plain_name(part.get("id")) and type(part.get("first_line")) is int for part in record.parts):
            log.error("group %s: its batch.json names parts that are not plain names with a first line; "
                      "left for a person to look at", group_id)
            return None
        done = [JobDir(group.done / part["id"]) for part in record.parts]
        if subdirs(group.parts) or not all(part.batch.exists() for part in done):
            return None
        try:
            return self._publish(group, record, done, dest)
        except FileNotFoundError:
            if dest.is_dir():  # another daemon published it and removed the group under this one
                return None
            raise

    def _publish(self, group: GroupDir, record: JobRecord, done: list[JobDir], dest: Path) -> JobDir | None:
        started = time.monotonic()
        # Its own staging per try (another host may assemble at once); leftovers of a crashed try go
        # with the group.
        staging = JobDir(group.path / f"{ASSEMBLY}{self.spool.settings.host_id}.{secrets.token_hex(4)}" / group.id)
        durable_mkdir(staging.path)
        if self.spool.gid != -1:
            os.chown(staging.path, -1, self.spool.gid)
        parts, tally = self._assemble_files(group, record, done, staging)
        _finish_record(record, parts, tally, self.spool.settings.host_id, time.monotonic() - started,
                       cancel_asked_at(group.cancel_request))
        self.spool.save(staging, record)
        withdraw = None
        if self.spool.before_publish is not None:
            withdraw = self.spool.before_publish(staging)  # the group's webhook: its id names the delivery
        try:
            with self.spool._moves:
                rename_noreplace(staging.path, dest)
                fsync_dir(self.spool.outbox)
                fsync_dir(staging.path.parent)
                self.spool.remove_late_cancel(group.id)  # its owner's, asked for too late to be taken
        except OSError:
            if not dest.is_dir():
                raise
            log.info("group %s was assembled by another daemon meanwhile", group.id)
            if withdraw is not None:
                withdraw()  # that daemon recorded the batch's webhook too: one of them is sent
            self._remove(group)
            return None
        self._remove(group)
        log.info("group %s assembled from %d parts: %d ok, %d failed", group.id, len(parts),
                 record.request_counts.completed, record.request_counts.failed)
        return JobDir(dest)

    def _assemble_files(self, group: GroupDir, record: JobRecord, done: list[JobDir],
                        staging: JobDir) -> tuple[list[dict[str, Any]], Tally]:
        """output.jsonl and errors.jsonl in the original's numbering, and input.jsonl, staged; each
        part's summary, and the counts and usage the staged files hold."""
        errors: list[tuple[int, bytes]] = [(_error_number(raw), raw) for raw in complete_lines(group.errors)]
        parts, tally = [], Tally()
        mode, gid = self.spool.file_mode, self.spool.gid
        with hidden_temp(staging.path, "output.jsonl", mode, gid) as (fd, tmp):
            for part, plan in zip(done, record.parts):
                part_record, _ = part.read_record()
                status = part_record.status if part_record is not None else JobStatus.FAILED
                offset = plan["first_line"] - 1
                for raw in complete_lines(part.output):
                    raw = _OUTPUT_ID.sub(lambda m: m.group(1) + str(int(m.group(2)) + offset).encode(), raw, count=1)
                    _, _, code, prompt, completion = parse_output_line(raw)
                    tally.add(code, prompt, completion)
                    write_all(fd, raw)
                errors.extend(_renumbered_errors(part, offset))
                if status == JobStatus.FAILED:
                    errors.extend(_errors_for_failed_part(part, part_record, offset))
                parts.append({**plan, "host": part_record.host if part_record else "", "status": str(status)})
        os.rename(tmp, staging.output)
        errors.sort(key=lambda e: e[0])
        tally.failed += len(errors)
        with hidden_temp(staging.path, "errors.jsonl", mode, gid) as (fd, tmp):
            for _, raw in errors:
                write_all(fd, raw)
        os.rename(tmp, staging.errors)
        if group.input.exists():
            os.link(group.input, staging.input)
        fsync_dir(staging.path)
        return parts, tally

    def _remove(self, group: GroupDir) -> None:
        shutil.rmtree(group.path, ignore_errors=True)
        fsync_dir(self.root)


def _finish_record(record: JobRecord, parts: list[dict[str, Any]], tally: Tally, host: str,
                   assembly_seconds: float, asked_at: float | None) -> None:
    """The group's batch.json over the whole batch: the parts' ends; counts and usage from the files;
    `asked_at`, when the batch's cancel was asked for, if it was."""
    statuses = {p["status"] for p in parts}
    counted = (tally.completed, tally.failed, tally.usage())
    if JobStatus.CANCELLED in statuses:
        record.cancel(*counted, asked_at)
    elif JobStatus.EXPIRED in statuses:
        record.expire(*counted)
    else:
        seconds = max(time.time() - (record.in_progress_at or record.created_at), 1e-3)
        record.complete(*counted, {"seconds": round(seconds, 3), "requests_per_second": round(tally.done / seconds, 3),
                                   "assembly_seconds": round(assembly_seconds, 3), "parts": len(parts)})
    record.host, record.parts = host, parts
    for part in parts:
        if part["status"] == JobStatus.FAILED:
            record.errors.append({"code": "part_failed", "message": f"part {part['id']} failed; each of its "
                                  "lines without a result has an error line"})


def _part_counts(spool: Spool, group: GroupDir, part_id: str,
                 running: Mapping[str, dict[str, Any]]) -> tuple[int, int, int, float] | None:
    """(completed, failed, 1 if finished, lines per second) of one part: its record once done, while it
    runs the caller's own count of it (`running`) or else its heartbeat."""
    if not is_plain_name(part_id):
        return None
    record, _ = JobRecord.load(group.done / part_id / "batch.json")
    if record is not None:
        return record.request_counts.completed, record.request_counts.failed, 1, 0.0
    if part_id in running:
        return _summary_counts(running[part_id])
    for host in subdirs(spool.processing):
        try:
            return _summary_counts(json.loads((host / part_id / "heartbeat.json").read_text())["job"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _summary_counts(job: dict[str, Any]) -> tuple[int, int, int, float]:
    """A running part's counts from its progress summary (JobProgress.summary, as its heartbeat holds it)."""
    return int(job["completed"]), int(job["failed"]), 0, float(job.get("requests_per_second") or 0)


def _renumbered_errors(part: JobDir, offset: int) -> Iterator[tuple[int, bytes]]:
    for raw in complete_lines(part.errors):
        doc = json.loads(raw)
        doc["error"]["line"] = int(doc["error"]["line"]) + offset
        yield doc["error"]["line"], (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def _errors_for_failed_part(part: JobDir, record: JobRecord | None, offset: int) -> Iterator[tuple[int, bytes]]:
    """A part that failed as a whole (its record says why): an error line for each of its lines without one."""
    reason = (record.errors[-1] if record is not None and record.errors else {}).get("message", "the part failed")
    answered = {int(doc["error"]["line"]) for doc in map(json.loads, complete_lines(part.errors))}
    answered |= {parse_output_line(raw)[0] for raw in complete_lines(part.output)}
    try:
        f = open(part.input, "rb")
    except FileNotFoundError:
        return
    with f:
        for number, raw in iter_lines(f, 0):
            if number in answered or raw is None:
                continue
            custom_id = json.loads(raw).get("custom_id")
            yield number + offset, error_line(LineError(number + offset, custom_id, "part_failed", reason))


def _error_number(raw: bytes) -> int:
    return int(json.loads(raw)["error"]["line"])


class _PartFile:
    """One part's input.jsonl being written: its lines keep their distance from `first_line`."""

    def __init__(self, path: Path, first_line: int) -> None:
        os.mkdir(path, 0o750)
        self.path, self.first_line, self.lines, self._last = path, first_line, 0, first_line - 1
        self._out = open(path / "input.jsonl", "xb", buffering=1 << 20)

    def add(self, number: int, raw: bytes) -> None:
        self._out.write(b"\n" * (number - self._last - 1))
        self._out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        self._last, self.lines = number, self.lines + 1

    def close(self) -> None:
        if not self._out.closed:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            fsync_dir(self.path)
