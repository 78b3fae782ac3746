"""A finished job's failed lines, run again as a job of their own; and one result per custom_id over both.

`spoold retry JOB` reads JOB's results in outbox/ and makes a new drop of the
input lines that have no final answer: a 5xx answer, an `engine_crashed` or
`batch_expired` error, or no result at all (the job was cancelled). The
lines are copied from JOB's `input.jsonl` by line number, byte for byte; the
drop's marker names JOB (`retry_of`), and the claim records it in the new
job's batch.json once it has checked that whoever made the drop may speak
for JOB. `spoold results JOB` then writes one result per `custom_id` over JOB
and every retry of it (retries of retries too): the latest success wins,
else the latest answer.

Nothing here reads a whole results file into memory: the merge keeps one
small tuple per custom_id and copies the chosen lines straight through.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .formats import complete_lines
from .jobrecord import JobRecord

log = logging.getLogger(__name__)

#: Error codes of a line that may well succeed when run again.
RETRYABLE_ERRORS = frozenset({"engine_crashed", "batch_expired"})

#: The marker metadata key that names the job a drop retries.
RETRY_OF = "retry_of"

#: A job id as it appears in outbox/: a directory name spoold made (never `..`, a slash or a hidden name).
JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")


class NoSuchJob(Exception):
    """The job named is not a finished job in this spool's outbox; the message says where it looked."""


def finished_job(outbox: Path, job_id: str) -> Path:
    """The directory of finished job `job_id` in `outbox`; NoSuchJob when there is none."""
    path = outbox / job_id
    if not JOB_ID.fullmatch(job_id) or not (path / "input.jsonl").is_file():
        raise NoSuchJob(f"no finished job {job_id!r} in {outbox}/ (`spoold status` lists them)")
    return path


@dataclass
class RetryDrop:
    """What `spoold retry` put in the inbox: the drop, and why each of its lines runs again."""

    path: Path | None
    reasons: Counter

    @property
    def lines(self) -> int:
        """How many lines run again."""
        return sum(self.reasons.values())


def final_lines(job: Path) -> tuple[set[int], dict[int, str]]:
    """(lines with a final answer, line -> why it may run again) from a finished job's result files."""
    from .writer import parse_output_line

    final: set[int] = set()
    retryable: dict[int, str] = {}
    for raw in complete_lines(job / "output.jsonl"):
        line, _custom_id, status, *_ = parse_output_line(raw)
        if status >= 500:
            retryable[line] = "server_error"
        elif line:
            final.add(line)
    for raw in complete_lines(job / "errors.jsonl"):
        error = json.loads(raw)["error"]
        if error.get("code") in RETRYABLE_ERRORS:
            retryable[int(error["line"])] = error["code"]
        else:
            final.add(int(error["line"]))
    return final, retryable


def write_retry(job: Path, inbox: Path, max_line_bytes: int) -> RetryDrop:
    """Drop the lines of finished `job` that have no final answer into `inbox`, marked as its retry.

    No drop is made when every line has its final answer.
    """
    from .durable import hidden_temp
    from .submit import publish_drop
    from .validation import iter_lines, open_regular

    final, retryable = final_lines(job)
    reasons: Counter = Counter()
    name = f"{job.name}-retry.jsonl"
    with open_regular(job / "input.jsonl") as f, hidden_temp(inbox, name) as (fd, tmp):
        out = io.BufferedWriter(io.FileIO(fd, "w", closefd=False), 1 << 20)
        for number, raw in iter_lines(f, max_line_bytes):
            if raw is None or number in final:
                continue  # too long (it has its error), or answered for good
            reasons[retryable.get(number, "never_ran")] += 1
            out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        out.flush()
    if not reasons:
        os.unlink(tmp)
        return RetryDrop(None, reasons)
    return RetryDrop(publish_drop(tmp, inbox, name, {**_priority(job), RETRY_OF: job.name}), reasons)


def _priority(job: Path) -> dict[str, str]:
    """The original job's priority, which its retry keeps."""
    try:
        metadata = json.loads((job / "batch.json").read_text()).get("metadata") or {}
    except (OSError, ValueError):
        return {}
    priority = metadata.get("priority") if isinstance(metadata, dict) else None
    return {"priority": priority} if isinstance(priority, str) else {}


def accept_retry_of(metadata: dict[str, str] | None, drop_uid: int, outbox: Path, warn: bool = True) -> str | None:
    """The job a claimed drop retries, taken out of its marker's metadata; None when it names none
    or may not (`may_retry`, the daemon's user being this process's). Why one is not accepted is
    logged unless `warn` is False (the scheduler's look before the claim, which warns).
    """
    if not metadata or RETRY_OF not in metadata:
        return None
    job_id = metadata.pop(RETRY_OF)
    try:
        allowed = may_retry(finished_job(outbox, job_id), drop_uid, os.geteuid())
    except (NoSuchJob, OSError) as e:
        if warn:
            log.warning("a drop names %s %r that is not accepted (%s); it runs as a job of its own",
                        RETRY_OF, job_id[:80], e)
        return None
    if not allowed:
        if warn:
            log.warning("a drop of uid %d names %s %s, which is not theirs to retry; it runs as a job of its own",
                        drop_uid, RETRY_OF, job_id)
        return None
    return job_id


def may_retry(job: Path, uid: int, daemon_uid: int) -> bool:
    """Whether a drop of `uid` may name finished `job` as the job it retries: its submitter (its
    input's owner, or the user its record names, as for a retry root ran for them), root or the
    daemon's user. Anyone else could slip answers into another person's merged results.
    OSError when the job cannot be read.
    """
    return uid in (0, daemon_uid, os.lstat(job / "input.jsonl").st_uid) or uid == _recorded_submitter(job)


def job_submitter(job: Path) -> int:
    """Whose `job` (a job's directory, running or finished) is: the user its record names
    (`submitter_uid`), else its input's owner; a running part of a split batch is the daemon's, whose
    input it is (its batch's owner acts on the whole batch). OSError when neither can be read."""
    record, _ = JobRecord.load(job / "batch.json")
    if record is not None and record.submitter_uid is not None and record.group is None:
        return record.submitter_uid
    return os.lstat(job / "input.jsonl").st_uid


def submitter_of(outbox: Path, retry_of: str | None, dropper: int) -> int:
    """Whose share of the engine a drop of uid `dropper` runs in: the dropper's, but a retry (its
    accepted `retry_of`) runs in the share of the person whose job it retries (`job_submitter`), not
    root's or the daemon user's who ran `spoold retry` for them and would otherwise be one more
    tenant; the dropper's when that cannot be read.
    """
    if retry_of is None:
        return dropper
    try:
        return job_submitter(outbox / retry_of)
    except OSError:
        return dropper


def _recorded_submitter(job: Path) -> int | None:
    """The `submitter_uid` in a finished job's batch.json (written by the daemon), or None."""
    record, _ = JobRecord.load(job / "batch.json")
    return record.submitter_uid if record is not None else None


def retry_chain(outbox: Path, job_id: str) -> list[Path]:
    """`job_id`'s finished job and every retry of it (and of those), oldest first."""
    first = finished_job(outbox, job_id)
    created: dict[Path, int] = {}
    children: dict[str, list[Path]] = {}
    for entry in os.scandir(outbox):
        retry_of, created[Path(entry.path)] = _retry_of(Path(entry.path))
        if retry_of is not None:
            children.setdefault(retry_of, []).append(Path(entry.path))
    chain, todo = [], [first]
    while todo:
        job = todo.pop(0)
        chain.append(job)
        todo.extend(sorted(children.get(job.name, []), key=lambda p: (created[p], p)))
    return [first] + sorted(chain[1:], key=lambda p: created[p])


def _retry_of(job: Path) -> tuple[str | None, int]:
    try:
        doc = json.loads((job / "batch.json").read_text())
    except (OSError, ValueError):
        return None, 0
    if not isinstance(doc, dict):
        return None, 0
    retry_of, created = doc.get(RETRY_OF), doc.get("created_at")
    return (retry_of if isinstance(retry_of, str) else None,
            created if isinstance(created, int) and not isinstance(created, bool) else 0)


@dataclass
class Merged:
    """What `merge_results` wrote: results, how many came from a retry, how many are still not a success."""

    results: int = 0
    from_retries: int = 0
    failing: int = 0


def merge_results(chain: list[Path], out: IO[bytes]) -> Merged:
    """Write one result line per custom_id over `chain` (a job, then its retries) to `out`.

    The latest success wins; where none succeeded, the latest answer. An
    error line without a custom_id (a line that was not even JSON) is kept
    as it is. Lines come in the order of the jobs, then of their files.
    """
    chosen: dict[object, tuple[int, int, int, bool]] = {}
    for where, raw in _results(chain):
        key, success = _key_and_success(raw, where)
        if success or key not in chosen or not chosen[key][3]:
            chosen[key] = (*where, success)
    picked = {value[:3] for value in chosen.values()}
    merged = Merged(failing=sum(not value[3] for value in chosen.values()))
    for where, raw in _results(chain):
        if where in picked:
            out.write(raw if raw.endswith(b"\n") else raw + b"\n")
            merged.results += 1
            merged.from_retries += where[0] > 0
    return merged


def _results(chain: list[Path]) -> Iterator[tuple[tuple[int, int, int], bytes]]:
    """((job index, file index, offset), raw line) for every complete result line of every job."""
    for index, job in enumerate(chain):
        for file_index, name in enumerate(("output.jsonl", "errors.jsonl")):
            offset = 0
            for raw in complete_lines(job / name):
                yield (index, file_index, offset), raw
                offset += len(raw)


def _key_and_success(raw: bytes, where: tuple[int, int, int]) -> tuple[object, bool]:
    record = json.loads(raw)
    custom_id = record.get("custom_id")
    response = record.get("response") or {}
    status = response.get("status_code") if isinstance(response, dict) else None
    key = custom_id if isinstance(custom_id, str) else where  # no custom_id: a line of its own
    return key, isinstance(status, int) and 200 <= status < 300
