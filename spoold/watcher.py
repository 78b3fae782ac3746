"""Deciding when a drop in the inbox is complete and may be claimed.

inotify (through watchdog) is only a hint that makes claims fast; a periodic
rescan of the inbox is the truth, so drops written from another NFS client,
which raise no inotify events here, are still seen. A drop is complete when:

- it was renamed into the inbox (rsync, `spoold submit`, `mv` from another
  directory): watchdog reports a move, or a creation never followed by a
  write;
- `NAME.jsonl.ready` stands beside it;
- otherwise (scp and NFS writers write in place) its size and mtime have
  not changed for `[spool] settle_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from .spool import READY_SUFFIX, Spool, is_drop_name

log = logging.getLogger(__name__)

#: A creation event must stay without a write event this long before the
#: file counts as renamed in: a writer's first write may lag its open.
CREATE_GRACE_SECONDS = 0.5


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float


@dataclass
class _Hint:
    created_at: float
    renamed: bool = False
    written: bool = False


class InboxWatcher:
    """Tracks the inbox and answers which drops are complete, oldest first."""

    def __init__(self, spool: Spool, settle_seconds: float, poll_seconds: float) -> None:
        self.spool = spool
        self.settle_seconds = settle_seconds
        self.poll_seconds = poll_seconds
        self._seen: dict[str, _Seen] = {}
        self._hints: dict[str, _Hint] = {}
        self._wake = asyncio.Event()
        self._observer = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start inotify hints; without them (no inotify), polling still works."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver

        self._loop = asyncio.get_running_loop()
        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):  # observer thread: hand over to the loop
                watcher._loop.call_soon_threadsafe(watcher._on_event, event)

        try:
            # Full events: a move in from another directory (`mv`) is then
            # reported as a move, not as a bare creation that must wait out
            # CREATE_GRACE_SECONDS in case a writer follows.
            observer = InotifyObserver(generate_full_events=True)
            observer.schedule(_Handler(), str(self.spool.inbox), recursive=False)
            observer.daemon = True
            observer.start()
            self._observer = observer
        except OSError as e:
            log.warning("no inotify on %s (%s); polling every %ss", self.spool.inbox, e, self.poll_seconds)

    def stop(self) -> None:
        """Stop the inotify thread."""
        if self._observer is not None:
            self._observer.stop()
            self._observer = None

    def _on_event(self, event) -> None:
        kind = event.event_type
        now = time.monotonic()
        if kind == "moved":
            if not event.dest_path:
                return  # moved out of the inbox: our own claims
            name = os.path.basename(os.fsdecode(event.dest_path))
            self._hints[name] = _Hint(now, renamed=True)
        else:
            name = os.path.basename(os.fsdecode(event.src_path))
            if kind == "created":
                self._hints[name] = _Hint(now)
            elif kind == "modified" and name in self._hints:
                self._hints[name].written = True
        self._wake.set()

    def wake(self) -> None:
        """End a pending `wait()` early (a signal arrived)."""
        self._wake.set()

    async def wait(self) -> None:
        """Sleep until an inotify hint arrives or the next rescan is due."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    def complete_drops(self) -> list[str]:
        """Names of the drops that are complete now, oldest first (a full rescan)."""
        now = time.monotonic()
        ready, present = [], set()
        for entry in self.spool.inbox_entries():
            present.add(entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if self._is_complete(entry.name, st, now):
                ready.append(entry.name)
        self._forget_missing(present)
        return ready

    def _is_complete(self, name: str, st: os.stat_result, now: float) -> bool:
        hint = self._hints.get(name)
        if hint is not None and st.st_size > 0 and not hint.written:
            if hint.renamed or now - hint.created_at >= CREATE_GRACE_SECONDS:
                return True
        if os.path.lexists(self.spool.inbox / (name + READY_SUFFIX)):
            return True
        seen = self._seen.get(name)
        if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self._seen[name] = _Seen(st.st_size, st.st_mtime_ns, now)
            return self.settle_seconds == 0
        return now - seen.since >= self.settle_seconds

    def _forget_missing(self, present: set[str]) -> None:
        for table in (self._seen, self._hints):
            for name in [n for n in table if n not in present and is_drop_name(n)]:
                del table[name]
        # Hints for names that never became drops (temp files) age out.
        cutoff = time.monotonic() - 60
        for name in [n for n, h in self._hints.items() if not is_drop_name(n) and h.created_at < cutoff]:
            del self._hints[name]

    def forget(self, name: str) -> None:
        """Drop what is known about a name once it has been claimed."""
        self._seen.pop(name, None)
        self._hints.pop(name, None)

