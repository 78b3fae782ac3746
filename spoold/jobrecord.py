"""A job's record, batch.json: the OpenAI Batch object plus spoold's own fields.

One typed object per job, loaded once, saved whole (temp file, fsync,
rename: `durable.atomic_write_json`), and changed only through its
transitions, so every writer of batch.json (the runner, the spool, an API)
says the same things the same way. A record another host (or another
version) wrote is input, not truth: `load` checks every field's type and
says what is wrong instead of raising, and keys it does not know are kept
as they were.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .durable import atomic_write_json
from .lifecycle import ACTIVE, JobStatus
from .names import is_plain_name

#: The largest weight `priority` may give a job: one job can have at most this
#: many times the share of a default one.
MAX_PRIORITY = 100

#: OpenAI's limits on a batch's `metadata`: pairs, characters per key, per value.
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


def parse_priority(text: str) -> int | None:
    """`text` as a priority a submitter may ask for: a whole number 1-MAX_PRIORITY in ASCII digits, else None."""
    if text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_PRIORITY:
        return int(text)
    return None


def user_tenant(uid: int) -> str:
    """The tenant a filesystem drop shares the engine as: its owner's, so on a box shared by several
    people one person's many drops get what another's one drop gets, as API keys do. `uid:N` is never
    an API key's name (those have no colon)."""
    return f"uid:{uid}"


def weight_of(metadata: object) -> int:
    """A job's weight from its batch metadata: its `priority` (1-100), else 1.

    Another host or a submitter wrote it: anything but a whole number in
    range counts as the default.
    """
    text = metadata.get("priority", "") if isinstance(metadata, dict) else ""
    if isinstance(text, str) and text.strip().isdigit():
        return min(max(int(text), 1), MAX_PRIORITY)
    return 1


def check_metadata(value: Any) -> dict[str, str]:
    """`value` as a batch's `metadata`, within OpenAI's limits; ValueError saying what is wrong.

    Every submitter's metadata passes here (a `.ready` marker, and the API's
    `metadata`), so a job's weight comes only from a `priority` it checked.
    """
    if not isinstance(value, dict):
        raise ValueError(f"metadata must be a JSON object, not {type(value).__name__}")
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(f"metadata has {len(value)} pairs; at most {MAX_METADATA_PAIRS} are allowed")
    for key, text in value.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise ValueError(f"metadata key {key[:MAX_METADATA_KEY_CHARS]!r}... is longer than "
                             f"{MAX_METADATA_KEY_CHARS} characters")
        if not isinstance(text, str) or len(text) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(f"metadata {key!r} must be a string of at most {MAX_METADATA_VALUE_CHARS} characters")
    priority = value.get("priority")
    if priority is not None and parse_priority(priority) is None:
        raise ValueError(f"metadata priority {priority[:20]!r} must be a whole number from 1 to {MAX_PRIORITY}")
    return dict(value)


#: The API's own fields of a batch made through it (absent for the filesystem's drops).
API_FIELDS = ("input_file_id", "output_file_id", "error_file_id", "completion_window", "expires_at")


@dataclass
class RequestCounts:
    """`request_counts`: lines in the file, lines answered 2xx, lines with an error or non-2xx answer."""

    total: int = 0
    completed: int = 0
    failed: int = 0


def _usage() -> dict[str, int]:
    return {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}


@dataclass
class JobRecord:
    """batch.json of one job."""

    id: str
    input_file: str  # the drop's name in display form
    host: str
    status: JobStatus = JobStatus.VALIDATING
    created_at: int = field(default_factory=lambda: int(time.time()))
    endpoint: str | None = None
    model: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    #: when the cancel was asked for (its marker's time), kept once cancelled, as OpenAI's Batch keeps it
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    expired_at: int | None = None
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    usage: dict[str, int] = field(default_factory=_usage)
    #: file-level problems: {"code", "message"} (and "model" for a model that failed to load)
    errors: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, Any] | None = None
    #: the drop as claimed: {name (as it was, losslessly), size, mtime_ns}
    drop: dict[str, Any] | None = None
    #: the input as validated: {bytes, mtime_ns}
    input: dict[str, int] | None = None
    #: model -> how many lines ask for it (after validation)
    models: dict[str, int] = field(default_factory=dict)
    #: models whose lines are done, in the order they ran
    models_done: list[str] = field(default_factory=list)
    #: input line (as a string) -> engine deaths it was in flight at
    engine_crashes: dict[str, int] = field(default_factory=dict)
    #: why lines were tried again -> how many tries that took: "server_error" (a 5xx answer), "engine_died"
    retries: dict[str, int] = field(default_factory=dict)
    #: the job this one retries the failed lines of (`spoold retry`)
    retry_of: str | None = None
    #: the OpenAI Batch object's `metadata` (string pairs); `priority` there weights the job's share
    metadata: dict[str, str] | None = None
    #: who the job belongs to (an API key's name); "" for the filesystem's drops
    tenant: str = ""
    #: a filesystem drop's owner (its uid when claimed; a `spoold retry` drop's, the retried job's): one
    #: person's drops share the engine as one tenant
    submitter_uid: int | None = None
    #: a batch made through the API: the Batch object's own fields (apibatch.py), None for drops
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completion_window: str | None = None
    expires_at: int | None = None
    #: a part of a split batch (groups.py): {"id": group id, "part": k, "parts": n, "first_line": N}
    group: dict[str, Any] | None = None
    #: a split batch's parts, in order: {"id", "first_line", "lines"} (and, once assembled, "host", "status")
    parts: list[dict[str, Any]] | None = None
    #: keys this version does not know, kept as they were
    extra: dict[str, Any] = field(default_factory=dict)

    # -- reading and writing ----------------------------------------------

    @classmethod
    def load(cls, path: Path) -> tuple["JobRecord | None", str | None]:
        """The record at `path`, or (None, None) when there is none to read, or (None, why) when it is wrong.

        No record (missing, torn, not an object) makes the job start again
        from validation, which its result files make safe. A record of the
        wrong shape is a job to fail with a reason, never a crash.
        """
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None, None
        if not isinstance(doc, dict):
            return None, None
        try:
            return cls.from_doc(doc), None
        except (TypeError, ValueError) as e:
            return None, f"batch.json: {e}"

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> "JobRecord":
        """A record from a parsed batch.json; TypeError or ValueError naming the first bad field."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {"extra": {k: v for k, v in doc.items() if k not in known and k != "object"}}
        for name in ("id", "input_file", "host"):
            kwargs[name] = _typed(doc, name, str, "")
        kwargs["status"] = _status(doc.get("status"))
        for name in ("endpoint", "model"):
            kwargs[name] = _typed(doc, name, (str, type(None)), None)
        for name in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at",
                     "cancelled_at", "expired_at"):
            kwargs[name] = _typed(doc, name, (int, float, type(None)), None)
        kwargs["created_at"] = kwargs["created_at"] or 0
        counts = _typed(doc, "request_counts", dict, {})
        kwargs["request_counts"] = RequestCounts(**{k: _count(counts, k) for k in ("total", "completed", "failed")})
        kwargs["usage"] = {**_usage(), **_ints(_typed(doc, "usage", dict, {}), "usage")}
        kwargs["errors"] = _typed(doc, "errors", list, [])
        if not all(isinstance(e, dict) for e in kwargs["errors"]):
            raise TypeError("`errors` must be a list of objects")
        for name in ("timings", "drop", "input"):
            kwargs[name] = _typed(doc, name, (dict, type(None)), None)
        kwargs["models"] = _ints(_typed(doc, "models", dict, {}), "models")
        kwargs["models_done"] = _typed(doc, "models_done", list, [])
        if not all(isinstance(m, str) for m in kwargs["models_done"]):
            raise TypeError("`models_done` must be a list of model names")
        kwargs["metadata"] = _typed(doc, "metadata", (dict, type(None)), None)
        if kwargs["metadata"] and not all(isinstance(v, str) for v in kwargs["metadata"].values()):
            raise TypeError("`metadata` must map names to strings")
        kwargs["tenant"] = _typed(doc, "tenant", str, "")
        kwargs["submitter_uid"] = _typed(doc, "submitter_uid", (int, type(None)), None)
        for name in API_FIELDS:
            kwargs[name] = _typed(doc, name, (int, type(None)) if name == "expires_at" else (str, type(None)), None)
        kwargs["engine_crashes"] = {k: v for k, v in _ints(_typed(doc, "engine_crashes", dict, {}),
                                                             "engine_crashes").items() if k.isdigit() and v > 0}
        kwargs["retries"] = _ints(_typed(doc, "retries", dict, {}), "retries")
        kwargs["retry_of"] = _typed(doc, "retry_of", (str, type(None)), None)
        kwargs["group"] = _typed(doc, "group", (dict, type(None)), None)
        kwargs["parts"] = _typed(doc, "parts", (list, type(None)), None)
        if kwargs["parts"] and not all(isinstance(p, dict) for p in kwargs["parts"]):
            raise TypeError("`parts` must be a list of objects")
        return cls(**kwargs)

    def to_doc(self) -> dict[str, Any]:
        """The batch.json document (the OpenAI Batch object's fields first)."""
        doc: dict[str, Any] = {"id": self.id, "object": "batch"}
        for f in fields(self):
            if f.name in ("id", "extra"):
                continue
            value = getattr(self, f.name)
            doc[f.name] = value.__dict__.copy() if isinstance(value, RequestCounts) else value
        for name in ("timings", "drop", "input"):
            if doc[name] is None:
                del doc[name]  # spoold's own, written once known
        for name in ("models", "models_done", "engine_crashes", "retries", "tenant", "retry_of"):
            if not doc[name]:
                del doc[name]
        for name in ("metadata", "cancelling_at", "expired_at", "group", "parts", "submitter_uid", *API_FIELDS):
            if doc[name] is None:
                del doc[name]
        return {**self.extra, **doc}

    def save(self, path: Path, mode: int = 0o640, gid: int = -1) -> None:
        """Replace batch.json atomically and durably."""
        atomic_write_json(path, self.to_doc(), mode, gid)

    def share_tenant(self) -> str:
        """Whom the job shares the engine as (the window's and the claims' tenant): its API key's name,
        or for a filesystem drop its submitter (`user_tenant`); "" for a drop claimed before that was kept."""
        if self.tenant or self.submitter_uid is None:
            return self.tenant
        return user_tenant(self.submitter_uid)

    def weight(self) -> int:
        """The job's weight in the engine's in-flight window: `priority` in its metadata (1-100), else 1."""
        return weight_of(self.metadata)

    def part_of(self) -> tuple[str, int] | None:
        """(group id, the original line number of the part's line 1) when this job is a part of a split
        batch (groups.py); None otherwise, or when `group` is not a part's (another host wrote it)."""
        group = self.group or {}
        group_id, first = group.get("id"), group.get("first_line")
        if is_plain_name(group_id) and type(first) is int and first >= 1:
            return group_id, first
        return None

    # -- transitions --------------------------------------------------------

    def validated(self, total: int, endpoint: str | None, model: str | None, models: dict[str, int],
                  input_stat: os.stat_result) -> None:
        """Validation is done: the job is in progress, with its line count and the models it needs."""
        self.status, self.in_progress_at = JobStatus.IN_PROGRESS, int(time.time())
        self.endpoint, self.model = endpoint, model
        self.models = {name: count for name, count in models.items() if count}
        self.request_counts.total = total
        self.input = {"bytes": input_stat.st_size, "mtime_ns": input_stat.st_mtime_ns}

    def model_done(self, model: str) -> None:
        """The lines for `model` are done; the job waits for its next model."""
        self.models_done.append(model)

    def next_model(self) -> str | None:
        """The model a validated job needs next; None when any will do (or it is not validated yet)."""
        return next((m for m in self.models if m not in self.models_done), None)

    def complete(self, completed: int, failed: int, usage: dict[str, int], timings: dict[str, Any]) -> None:
        """Every line has its result: the job is completed."""
        now = int(time.time())
        self.status, self.finalizing_at, self.completed_at = JobStatus.COMPLETED, now, now
        self._counted(completed, failed, usage)
        self.timings = timings

    def cancel(self, completed: int, failed: int, usage: dict[str, int], asked_at: float | None = None) -> None:
        """`spoold cancel` (asked at `asked_at`, when known): what is done so far is the job."""
        now = int(time.time())
        self.status, self.cancelled_at = JobStatus.CANCELLED, now
        self.cancelling_at = min(int(asked_at), now) if asked_at is not None else now
        self._counted(completed, failed, usage)

    @property
    def ended_at(self) -> int | None:
        """When the job reached its final status; None while it is worked on."""
        if self.status in ACTIVE:
            return None
        return self.completed_at or self.failed_at or self.cancelled_at or self.expired_at or self.created_at

    def expired(self) -> bool:
        """Whether a job still being worked on has passed its `expires_at` (an API batch's window)."""
        return self.expires_at is not None and self.status in ACTIVE and time.time() >= self.expires_at

    def expire(self, completed: int, failed: int, usage: dict[str, int]) -> None:
        """`expires_at` passed first: what is done stays, every other line has a `batch_expired` error."""
        self.status, self.expired_at = JobStatus.EXPIRED, int(time.time())
        self._counted(completed, failed, usage)

    def fail(self, reason: str, code: str) -> None:
        """The file cannot be read or run: the job is failed, with the reason and its code."""
        self.status, self.failed_at = JobStatus.FAILED, int(time.time())
        self.errors.append({"code": code, "message": reason})

    def note_model_load_failed(self, model: str, reason: str) -> None:
        """A model that could not be loaded answered its lines with 503s; say why, once."""
        if not any(e.get("model") == model for e in self.errors):
            self.errors.append({"code": "model_load_failed", "model": model,
                                "message": f"model {model} could not be loaded: {reason}"})

    def crash_counts(self) -> dict[int, int]:
        """Input line -> engine deaths it was in flight at."""
        return {int(line): deaths for line, deaths in self.engine_crashes.items()}

    def note_crashes(self, counts: dict[int, int]) -> None:
        """Record the engine deaths each line was in flight at (saved before the engine restarts)."""
        self.engine_crashes = {str(line): deaths for line, deaths in sorted(counts.items())}

    def note_retries(self, reason: str, tries: int) -> None:
        """Count `tries` more tries of lines for `reason` ("server_error", "engine_died")."""
        if tries:
            self.retries[reason] = self.retries.get(reason, 0) + tries

    def _counted(self, completed: int, failed: int, usage: dict[str, int]) -> None:
        self.request_counts.completed, self.request_counts.failed = completed, failed
        self.usage = usage


def _status(value: object) -> JobStatus:
    """A status read from batch.json; one this version does not know reads as not validated yet."""
    try:
        return JobStatus(value)
    except ValueError:
        return JobStatus.VALIDATING


def _typed(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"`{key}` is {type(value).__name__}, not {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _ints(table: dict[str, Any], key: str) -> dict[str, int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in table.values()):
        raise TypeError(f"`{key}` must map names to whole numbers")
    return dict(table)


def _count(counts: dict[str, Any], key: str) -> int:
    value = counts.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`request_counts.{key}` is {type(value).__name__}, not int")
    return value
