"""Uploaded files of the HTTP API, kept in the spool: `files/<file-id>/{content,file.json}`.

An upload streams to a hidden directory (never held in memory), is
fsynced with its record, and appears by one rename, so a file is either
all there or not there at all: an upload over the limit, a client that
goes away part way and a crash all leave nothing a reader can see. The
record is the OpenAI `FileObject` plus its owner. Ids are random and are
checked against a strict pattern before they touch a path, so no id a
client sends can name anything outside `files/`. A file's `expires_at`
is the client's own `expires_after` if it gave one, else `[api]
file_retention` after the upload (or, for a batch's results, after the
batch ended): retention.py deletes it then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from openai.types import FileObject

from .apibatch import random_id
from .jobrecord import JobRecord
from .durable import atomic_write_json, durable_mkdir, durable_rename, fsync_dir, write_all
from .readonce import ReadOnce

#: `file-` and 24 random characters, as OpenAI's ids look; nothing else is ever a file id.
FILE_ID = re.compile(r"file-[A-Za-z0-9]{24}")
#: What a file may be uploaded for; spoold serves batches only.
PURPOSES = ("batch",)
#: The longest file name kept in a record (OpenAI keeps the client's name; it is only ever data here).
MAX_FILENAME_CHARS = 255


class UploadTooLarge(Exception):
    """The upload passed `[api] max_upload_bytes` (or `[limits] max_file_bytes`)."""


@dataclass(frozen=True)
class StoredFile:
    """One uploaded file: the `FileObject` fields, and whose it is."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    owner: str
    #: set when the client asked (`expires_after`); else shown as `[api] file_retention` after the upload
    expires_at: int | None = None
    #: a batch's results (`outbox/<batch-id>/output.jsonl`), relative to the spool; None for an upload
    result_of: str | None = None
    #: a batch's results: seconds they are kept after the batch ended (`output_expires_after`), if asked
    expires_after: int | None = None

    def file_object(self) -> FileObject:
        """The file as the OpenAI API shows it."""
        return FileObject(id=self.id, object="file", bytes=self.bytes, created_at=self.created_at,
                          filename=self.filename, purpose=self.purpose, status="processed",
                          expires_at=self.expires_at)


class FileStore:
    """The API's files under one spool root."""

    def __init__(self, root: Path, file_mode: int = 0o640, gid: int = -1, retention: int | None = None) -> None:
        self.root = Path(root)
        self.dir = self.root / "files"
        self.file_mode, self.gid = file_mode, gid
        #: `[api] file_retention` in seconds; None keeps files until they are deleted
        self.retention = retention
        #: every record listed so far, as written (a record never changes once it is in sight)
        self._records: ReadOnce[StoredFile] = ReadOnce(self._record)
        #: the batch results among them whose bytes were there at a listing (they stay till deleted)
        self._there: set[str] = set()

    def ensure_dir(self) -> None:
        """Create `files/` if it is missing."""
        durable_mkdir(self.dir)

    @contextlib.contextmanager
    def new(self, owner: str, limit: int) -> Iterator["NewFile"]:
        """A file being uploaded, in a hidden directory; gone again unless `commit()`ed inside the block."""
        upload = NewFile(self, owner, limit)
        try:
            yield upload
        finally:
            upload.discard()

    def get(self, file_id: str, owner: str) -> StoredFile | None:
        """The file `file_id` if it exists and is `owner`'s; else None (the same None either way)."""
        stored = self.read(file_id)
        return stored if stored is not None and stored.owner == owner else None

    def read(self, file_id: str) -> StoredFile | None:
        """The file `file_id`, whoever's it is, with its size and expiry as of now; None if there is none."""
        return self.now(self._record(file_id))

    def _record(self, file_id: str) -> StoredFile | None:
        """The record of `file_id` as it was written; None if there is none."""
        if not FILE_ID.fullmatch(file_id):
            return None
        try:
            return StoredFile(**json.loads((self.dir / file_id / "file.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def now(self, stored: StoredFile | None) -> StoredFile | None:
        """A record with its size and expiry as of now; None for a batch's results not there (yet, or any
        more)."""
        if stored is None:
            return None
        if stored.result_of is not None:  # there once the batch is finished, with its size then
            try:
                stored = replace(stored, bytes=os.stat(self.content_path(stored)).st_size)
            except OSError:
                return None
        return self.with_expiry(stored)

    def with_expiry(self, stored: StoredFile) -> StoredFile:
        """`stored` with the `expires_at` it has now: its own, else `[api] file_retention` after it was made
        (an upload) or after its batch ended (a batch's results, from the batch.json beside them)."""
        if stored.result_of is None:
            if stored.expires_at is None and self.retention is not None:
                return replace(stored, expires_at=stored.created_at + self.retention)
            return stored
        keep = stored.expires_after or self.retention
        record, _ = JobRecord.load((self.root / stored.result_of).parent / "batch.json")
        ended = record.ended_at if record is not None else None
        return replace(stored, expires_at=ended + keep if keep is not None and ended is not None else None)

    def content_path(self, stored: StoredFile) -> Path:
        """Where a stored file's bytes are."""
        if stored.result_of is not None:
            return self.root / stored.result_of
        return self.dir / stored.id / "content"

    def add_result(self, file_id: str, owner: str, filename: str, result_of: str,
                   expires_after: int | None = None) -> None:
        """Name a batch's result file before it exists (`purpose` batch_output): it shows once it does."""
        stored = StoredFile(file_id, 0, int(time.time()), filename, "batch_output", owner, result_of=result_of,
                            expires_after=expires_after)
        tmp = self.dir / f".{file_id}.tmp"
        os.mkdir(tmp, 0o750)
        try:
            self.publish(tmp, stored)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def publish(self, tmp: Path, stored: StoredFile) -> None:
        """Write a file's record into its hidden directory `tmp`, then rename that into sight, durably."""
        atomic_write_json(tmp / "file.json", asdict(stored), self.file_mode, self.gid)
        durable_rename(tmp, self.dir / stored.id)

    def list(self, owner: str | None, purpose: str | None = None) -> list[StoredFile]:
        """`owner`'s files (everyone's for None) of `purpose`, newest first, with their size and expiry as
        of now; ties by id, so pages never skip or repeat one."""
        return [stored for listed in self.index(owner, purpose) if (stored := self.now(listed)) is not None]

    def index(self, owner: str | None, purpose: str | None = None) -> list[StoredFile]:
        """`list` as the records were written: `now` gives a page's own files their size and expiry.

        A record is read once, the first time a listing sees it, and a
        batch's results are looked for until they are there; after that a
        listing is one look at `files/`. Reading every record (and every
        batch.json, for the results' expiry) for every listing made
        `files.list()` over a month of a busy app's batches take seconds.
        """
        try:
            names = {n for n in os.listdir(self.dir) if FILE_ID.fullmatch(n)}
        except FileNotFoundError:
            names = set()
        self._there.intersection_update(names)
        mine = [f for f in self._records.of(names)
                if (owner is None or f.owner == owner) and (purpose is None or f.purpose == purpose)]
        found = [f for f in mine if f.result_of is None or self._is_there(f)]
        return sorted(found, key=lambda f: (f.created_at, f.id), reverse=True)

    def gone(self, file_id: str) -> StoredFile | None:
        """The record of a file a listing saw that has since been deleted (expired, or deleted by its
        owner); None if it is there or this process never listed it: where a walk through the pages
        goes on when the file it names as its cursor is gone."""
        return self._records.gone(file_id)

    def _is_there(self, stored: StoredFile) -> bool:
        """Whether a batch's result file exists (from its batch's end until it is deleted)."""
        if stored.id not in self._there and os.path.exists(self.content_path(stored)):
            self._there.add(stored.id)
        return stored.id in self._there

    def delete(self, stored: StoredFile) -> None:
        """Remove a stored file: first out of sight (one rename), then its bytes."""
        self.remove(stored.id)

    def remove(self, file_id: str) -> bool:
        """Remove the file `file_id` if it is there (also a result file whose batch is gone); whether it was."""
        if not FILE_ID.fullmatch(file_id):
            return False
        doomed = self.dir / f".{file_id}.deleted"
        try:
            os.rename(self.dir / file_id, doomed)
        except FileNotFoundError:
            return False  # never there, or another API server's sweep took it first
        fsync_dir(self.dir)
        shutil.rmtree(doomed, ignore_errors=True)
        return True


class NewFile:
    """An upload on its way in: `write` each chunk as it arrives, then `commit` it into sight."""

    def __init__(self, store: FileStore, owner: str, limit: int) -> None:
        self.store, self.owner, self.limit = store, owner, limit
        self.id = random_id("file-")
        self.size = 0
        self._tmp = store.dir / f".{self.id}.tmp"
        os.mkdir(self._tmp, 0o750)
        self._fd: int | None = os.open(self._tmp / "content", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                       store.file_mode)
        if store.gid >= 0:
            os.fchown(self._fd, -1, store.gid)

    def write(self, chunk: bytes) -> None:
        """Append one chunk; UploadTooLarge once the file passes the limit."""
        self.size += len(chunk)
        if self.size > self.limit:
            raise UploadTooLarge(f"the file is larger than the {self.limit}-byte limit")
        write_all(self._fd, chunk)

    async def commit(self, filename: str, purpose: str, expires_after: int | None = None) -> StoredFile:
        """Make the file durable with its record, then visible by one rename (off the event loop).

        `expires_after`: the seconds the client asked it be kept; else `[api] file_retention` applies.
        """
        now = int(time.time())
        stored = StoredFile(self.id, self.size, now, filename[:MAX_FILENAME_CHARS], purpose, self.owner,
                            expires_at=now + expires_after if expires_after is not None else None)
        await asyncio.to_thread(self._publish, stored)
        return self.store.with_expiry(stored)

    def _publish(self, stored: StoredFile) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        self.store.publish(self._tmp, stored)

    def discard(self) -> None:
        """Remove what is left of an upload that was not committed (nothing, once it was)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        shutil.rmtree(self._tmp, ignore_errors=True)
