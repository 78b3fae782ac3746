"""The API's record of a batch it created: `batches/<batch-id>.json` in the spool.

Written (durably) by `spoold api` before the batch's input appears in the
inbox as `<batch-id>.jsonl`; read by the daemon when it claims that drop,
so the job's id is the batch id and its owner, metadata and API fields
come from here, never from anything a submitter wrote. A record is
believed only if it is a regular file made by the daemon's own user (or
root) under a name of the strict batch-id pattern. A leaf module beside
durable: nothing of the daemon is imported here.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .durable import atomic_write_json

#: `batch_` and 24 random letters or digits; nothing else is ever a batch id.
BATCH_ID = re.compile(r"batch_[A-Za-z0-9]{24}")
#: A record larger than this is not one the API wrote.
MAX_RECORD_BYTES = 64 * 1024
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def random_id(prefix: str) -> str:
    """`prefix` and 24 random letters or digits (143 bits: never guessed, never reused)."""
    return prefix + "".join(secrets.choice(ALPHABET) for _ in range(24))


@dataclass
class ApiBatch:
    """What the API was asked for: the Batch object's request fields, whose it is, where its results go."""

    id: str
    owner: str
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: int
    expires_at: int
    output_file_id: str
    error_file_id: str
    metadata: dict[str, str] | None = None
    #: set when the batch was withdrawn from the inbox before any daemon claimed it
    cancelled_at: int | None = None
    #: `output_expires_after` seconds: how long its results are kept after it ended (else file_retention)
    output_expires_after: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path, mode: int = 0o640) -> None:
        """Write the record durably (temp, fsync, rename, fsync the directory)."""
        doc = asdict(self)
        extra = doc.pop("extra")
        atomic_write_json(Path(directory) / f"{self.id}.json", {**extra, **doc}, mode)


def drop_name(batch_id: str) -> str:
    """The inbox name of a batch's input."""
    return f"{batch_id}.jsonl"


def read_api_batch(directory: Path, batch_id: str) -> ApiBatch | None:
    """The record of `batch_id` if there is one the API wrote; else None (a plain drop, or a forgery)."""
    if not BATCH_ID.fullmatch(batch_id):
        return None
    try:
        fd = os.open(Path(directory) / f"{batch_id}.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_size > MAX_RECORD_BYTES:
            return None
        doc = json.loads(os.read(fd, MAX_RECORD_BYTES + 1))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return _from_doc(doc, batch_id)


def _from_doc(doc: Any, batch_id: str) -> ApiBatch | None:
    if not isinstance(doc, dict) or doc.get("id") != batch_id:
        return None
    known = {name for name in ApiBatch.__dataclass_fields__ if name != "extra"}
    try:
        batch = ApiBatch(**{k: v for k, v in doc.items() if k in known},
                         extra={k: v for k, v in doc.items() if k not in known})
    except TypeError:
        return None
    texts = (batch.owner, batch.input_file_id, batch.endpoint, batch.completion_window, batch.output_file_id,
             batch.error_file_id)
    if not all(isinstance(t, str) for t in texts) or not isinstance(batch.metadata, (dict, type(None))):
        return None
    return batch
