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

The queue is in the order the daemon first saw each drop (then ctime),
never by the mtime a submitter can set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from .names import display_name
from .readymarker import may_mark
from .spool import READY_SUFFIX, Spool, is_drop_name

log = logging.getLogger(__name__)

#: After an inotify hint, the inbox is rescanned if the last scan is at
#: least this old: the scheduler then weighs every drop of a burst.
HINT_RESCAN_SECONDS = 0.1

#: A creation event must stay without a write event this long before the
#: file counts as renamed in: a writer's first write may lag its open.
CREATE_GRACE_SECONDS = 0.5


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    #: when its size or mtime last changed (monotonic)
    since: float
    #: the queue order: when this daemon first saw it, then its ctime (which
    #: a submitter cannot set back, unlike the mtime `touch -d 1970` sets)
    order: tuple[float, int]
    #: wall-clock time it was first seen, for the scheduler's max_wait
    seen_at: float
    #: who owns it: only its owner's `.ready` marker counts
    uid: int = -1
    #: found complete, and unchanged since
    complete: bool = False


@dataclass
class _Hint:
    created_at: float
    renamed: bool = False
    written: bool = False


class InboxTracker:
    """Tracks the inbox and answers which drops are complete, first seen first.

    One full scan of the inbox every `poll_seconds` (off the event loop, in a
    thread: 10,000 drops take tens of milliseconds to stat), and a single
    stat for each name an inotify hint names, keep what is known up to
    date; asking which drops are complete reads no directory.
    """

    def __init__(self, spool: Spool, settle_seconds: float, poll_seconds: float) -> None:
        self.spool = spool
        self.settle_seconds = settle_seconds
        self.poll_seconds = poll_seconds
        self._seen: dict[str, _Seen] = {}
        #: the complete drops in queue order; the others are looked at again on every ask
        self._queue: list[str] = []
        #: drops found complete since the last `take_arrived`
        self._arrived: list[str] = []
        self._unsorted = False
        self._pending: set[str] = set()
        self._ready: set[str] = set()
        self._hints: dict[str, _Hint] = {}
        self._scanned_at: float | None = None
        self._hinted_since_scan = False
        self._wake = asyncio.Event()
        self._observer = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start inotify hints; without them (no inotify), polling still works."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

        # watchdog holds every IN_MOVED_FROM for `delay` (0.5 s) to pair it
        # with its IN_MOVED_TO, and every event behind it waits too. Each
        # claim moves a drop out of the inbox, so a drop renamed in just
        # after a claim was hinted 0.4 s late (watchdog issue #649). No
        # pairing is needed here: with full events an unpaired IN_MOVED_TO
        # is still a move with a destination, which is all `_on_event` reads.
        InotifyMoveEventGrouper.delay = 0

        self._loop = asyncio.get_running_loop()
        tracker = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):  # observer thread: hand over to the loop
                tracker._loop.call_soon_threadsafe(tracker._on_event, event)

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
                self._demote(name)  # written after all: it must settle
        if name.endswith(READY_SUFFIX) and kind in ("created", "moved"):
            self._ready.add(name.removesuffix(READY_SUFFIX))
            name = name.removesuffix(READY_SUFFIX)
        if kind in ("created", "moved") and is_drop_name(name):
            self._observe(name, now)
            self._hinted_since_scan = True
        self._wake.set()

    def _observe(self, name: str, now: float) -> None:
        """One stat for a name a hint named: no full rescan needed to claim it."""
        try:
            st = os.lstat(self.spool.inbox / name)
        except OSError:
            return
        self._update(name, st, now, time.time())

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

    async def refresh(self) -> None:
        """Rescan the inbox, off the event loop, if a rescan is due."""
        if self._rescan_due():
            self._apply(*await asyncio.to_thread(self._read_inbox))

    def complete_drops(self) -> list[str]:
        """Names of the drops that are complete now, first seen first (rescanning if due)."""
        if self._rescan_due():
            self._apply(*self._read_inbox())
        now = time.monotonic()
        for name in [n for n in self._pending if self._is_complete(n, self._seen[n], now)]:
            self._pending.discard(name)
            self._seen[name].complete = True
            self._queue.append(name)
            self._arrived.append(name)
            self._unsorted = True
        if self._unsorted:
            self._queue.sort(key=lambda name: self._seen[name].order)
            self._unsorted = False
        return list(self._queue)

    def take_arrived(self) -> list[str]:
        """The drops found complete since the last call (some may have left since): what is new to
        look at, without a pass over a backlog of 10,000."""
        arrived, self._arrived = self._arrived, []
        return arrived

    def seen_at(self, name: str) -> float:
        """When this daemon first saw a drop (epoch seconds): how long it has waited."""
        seen = self._seen.get(name)
        return seen.seen_at if seen is not None else time.time()

    def _rescan_due(self) -> bool:
        """Every poll_seconds; sooner after a hint (drops come in bursts: see the whole burst),
        but at most every HINT_RESCAN_SECONDS, so 10,000 renames cost a few scans, not 10,000."""
        if self._scanned_at is None:
            return True
        age = time.monotonic() - self._scanned_at
        return age >= self.poll_seconds or self._hinted_since_scan and age >= HINT_RESCAN_SECONDS

    def _read_inbox(self) -> tuple[float, list[tuple[str, os.stat_result]], set[str]]:
        """When the scan began, every drop-like entry with its stat, and the names marked ready.

        Touches no state: it runs in a thread.
        """
        started, drops, ready = time.monotonic(), [], set()
        for entry in self.spool.inbox_entries(with_markers=True):
            if entry.name.endswith(READY_SUFFIX):
                ready.add(entry.name.removesuffix(READY_SUFFIX))
                continue
            try:
                drops.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
        return started, drops, ready

    def _apply(self, started: float, drops: list[tuple[str, os.stat_result]], ready: set[str]) -> None:
        now, wall = time.monotonic(), time.time()
        self._scanned_at, self._hinted_since_scan = now, False
        for name, st in drops:
            self._update(name, st, now, wall)
        # What a hint brought in while the scan ran is not in its listing, and stays.
        fresh = {name for name, hint in self._hints.items() if hint.created_at >= started}
        present = {name for name, _ in drops} | fresh
        self._ready = ready | {name for name in self._ready if name + READY_SUFFIX in fresh}
        self._forget_missing(present)

    def _update(self, name: str, st: os.stat_result, now: float, wall: float) -> None:
        seen = self._seen.get(name)
        if seen is None:
            self._seen[name] = _Seen(st.st_size, st.st_mtime_ns, now, (now, st.st_ctime_ns), wall, uid=st.st_uid)
            self._pending.add(name)
        elif (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
            seen.size, seen.mtime_ns, seen.since = st.st_size, st.st_mtime_ns, now
            self._demote(name)

    def _demote(self, name: str) -> None:
        """A complete drop changed: back to the ones that must prove complete again."""
        seen = self._seen.get(name)
        if seen is not None and seen.complete:
            seen.complete = False
            self._queue.remove(name)
            self._pending.add(name)

    def _is_complete(self, name: str, seen: _Seen, now: float) -> bool:
        hint = self._hints.get(name)
        if hint is not None and seen.size > 0 and not hint.written:
            if hint.renamed or now - hint.created_at >= CREATE_GRACE_SECONDS:
                return True
        if name in self._ready and self._marked_by_owner(name, seen):
            return True
        return now - seen.since >= self.settle_seconds

    def _marked_by_owner(self, name: str, seen: _Seen) -> bool:
        """Whether `NAME.jsonl.ready` was made by whoever owns the drop (or by root or this daemon).

        Who counts is `readymarker.may_mark`'s rule. Someone
        else's marker is removed, so it cannot squat the name the owner needs
        (the sticky inbox would not let the owner replace it).
        """
        marker = self.spool.inbox / (name + READY_SUFFIX)
        try:
            uid = os.lstat(marker).st_uid
        except OSError:
            return False
        if may_mark(uid, seen.uid):
            return True
        log.warning("removing inbox/%s: made by uid %d, not by the drop's owner (uid %d)",
                    display_name(marker.name), uid, seen.uid)
        self._ready.discard(name)
        try:
            os.unlink(marker)
        except OSError:
            pass
        return False

    def _forget_missing(self, present: set[str]) -> None:
        gone = [n for n in self._seen if n not in present]
        if gone:
            for name in gone:
                self._pending.discard(name)
                del self._seen[name]
            self._queue = [name for name in self._queue if name in self._seen]
        for name in [n for n in self._hints if n not in present and is_drop_name(n)]:
            del self._hints[name]
        # Hints for names that never became drops (temp files) age out.
        cutoff = time.monotonic() - 60
        for name in [n for n, h in self._hints.items() if not is_drop_name(n) and h.created_at < cutoff]:
            del self._hints[name]

    def forget(self, name: str) -> None:
        """Drop what is known about a name once it has been claimed."""
        seen = self._seen.pop(name, None)
        if seen is not None and seen.complete:
            self._queue.remove(name)
        self._pending.discard(name)
        self._hints.pop(name, None)
        self._ready.discard(name)

