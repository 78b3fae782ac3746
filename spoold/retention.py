"""How long the API keeps what it holds, and the sweep that deletes what has outlived it.

Without a limit the spool only grows: every upload and every batch's
results would stay forever. `[api] file_retention` (30 days, as OpenAI
keeps batch files) is how long an uploaded file lives after its upload,
and a finished batch (its outbox directory, its output and error files,
its record) after it ended; a client may ask for its own span with
`expires_after` on an upload or `output_expires_after` on a batch (1 hour
to 30 days, OpenAI's bounds). The sweep runs in `spoold api`; several API
servers on one spool may all run it, since each step is one rename or
unlink and a step another took first is skipped. It deletes only what
the API made: never a queued or running batch, and never a drop made
through the inbox or its results.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batches import BatchStore
from .filestore import FileStore

log = logging.getLogger(__name__)

#: OpenAI's bounds on `expires_after` and `output_expires_after` seconds.
MIN_EXPIRES_SECONDS, MAX_EXPIRES_SECONDS = 3600, 30 * 86400
#: How often `spoold api` sweeps: a file outlives its `expires_at` by at most this.
SWEEP_EVERY_SECONDS = 600
#: A hidden leftover of the API's own (an upload or a delete cut off by a crash) untouched this long is
#: debris: a live upload writes far more often than this.
STALE_SECONDS = 86400
#: The API's own hidden leftovers, by name: temp copies and records, uploads, deletes, withdrawals. Only
#: names made of its ids, so nothing a submitter keeps in the inbox is ever touched.
DEBRIS = re.compile(r"\.(file-|batch_)[A-Za-z0-9]{24}(\.jsonl?)?\.([0-9a-f]{8}\.tmp|tmp|deleted|withdrawn\.tmp)")


def expires_after_seconds(value: Any, param: str) -> int:
    """An `expires_after` policy, `{"anchor": "created_at", "seconds": N}`, as N; ValueError saying why not."""
    if not isinstance(value, dict) or set(value) != {"anchor", "seconds"}:
        raise ValueError(f"'{param}' must be an object with 'anchor' and 'seconds'")
    if value["anchor"] != "created_at":
        raise ValueError(f"'{param}.anchor' must be 'created_at'")
    seconds = value["seconds"]
    if not isinstance(seconds, int) or isinstance(seconds, bool) or \
            not MIN_EXPIRES_SECONDS <= seconds <= MAX_EXPIRES_SECONDS:
        raise ValueError(f"'{param}.seconds' must be a whole number from {MIN_EXPIRES_SECONDS} (1 hour) to "
                         f"{MAX_EXPIRES_SECONDS} (30 days)")
    return seconds


@dataclass
class Swept:
    """What one sweep deleted."""

    files: int = 0
    batches: int = 0
    debris: int = 0


class Sweeper:
    """Deletes the API's files and finished batches once they expire, and its own stale leftovers."""

    def __init__(self, files: FileStore, batches: BatchStore) -> None:
        self.files, self.batches = files, batches

    def sweep(self, now: float | None = None) -> Swept:
        """One pass over the spool (blocking: run it in a thread)."""
        now = time.time() if now is None else now
        swept = Swept()
        for stored in self.files.list(None, "batch"):
            if stored.expires_at is not None and stored.expires_at <= now and self.files.remove(stored.id):
                log.info("file %s of %s expired: deleted", stored.id, stored.owner)
                swept.files += 1
        keep = self.files.retention
        for batch in self.batches.list(None):
            span = batch.output_expires_after or keep
            ended = self.batches.ended_at(batch) if span is not None else None
            if ended is not None and ended + span <= now:
                self.batches.delete(batch)
                log.info("batch %s of %s expired: its results and record deleted", batch.id, batch.owner)
                swept.batches += 1
        spool = self.batches.spool
        for directory in (self.files.dir, spool.inbox, spool.outbox, spool.failed, self.batches.dir):
            swept.debris += _remove_debris(directory, now - STALE_SECONDS)
        return swept


def _remove_debris(directory: Path, untouched_since: float) -> int:
    """Remove the API's leftovers in `directory` that nothing has written to since `untouched_since`."""
    removed = 0
    try:
        entries = [e for e in os.scandir(directory) if DEBRIS.fullmatch(e.name)]
    except FileNotFoundError:
        return 0
    for entry in entries:
        if _last_written(Path(entry.path)) >= untouched_since:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        log.info("removed %s, a leftover of an upload or delete cut short", entry.path)
        removed += 1
    return removed


def _last_written(path: Path) -> float:
    """The newest mtime of `path` and (for a directory) what is in it; infinity if it is gone or changing."""
    try:
        times = [path.lstat().st_mtime]
        if path.is_dir():
            times += [child.lstat().st_mtime for child in path.iterdir()]
        return max(times)
    except OSError:
        return float("inf")  # not debris to remove now


async def sweep_forever(sweeper: Sweeper, every: float = SWEEP_EVERY_SECONDS) -> None:
    """Sweep now and then every `every` seconds until cancelled; a failed sweep is logged and retried."""
    while True:
        try:
            swept = await asyncio.to_thread(sweeper.sweep)
            if swept.files or swept.batches or swept.debris:
                log.info("retention: deleted %d file(s), %d batch(es), %d leftover(s)", swept.files,
                         swept.batches, swept.debris)
        except OSError as e:
            log.error("retention sweep failed: %s; trying again in %gs", e.strerror or e, every)
        await asyncio.sleep(every)
