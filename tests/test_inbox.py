import asyncio
import os
import time

import pytest

from spoold.config import SpoolSettings
from spoold.spool import Spool
from spoold.inbox import InboxTracker


def make(tmp_path, settle=0.6):
    spool = Spool(SpoolSettings(root=tmp_path, host_id="h"))
    spool.ensure_dirs()
    return spool, InboxTracker(spool, settle_seconds=settle, poll_seconds=0.05)


async def first_complete(tracker: InboxTracker, within: float) -> list[str]:
    """The first complete drops the tracker finds from now on, woken by its hints; [] if none come `within` seconds."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        await tracker.wait()
        if found := tracker.complete_drops():
            return found
    return []


class FakeClock:
    """Stands in for the inbox module's `time`: seconds pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_in_place_write_waits_for_settle(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("spoold.inbox.time", clock)
    spool, tracker = make(tmp_path)  # settles after 0.6 s unchanged
    (spool.inbox / "a.jsonl").write_text("{}\n")
    assert tracker.complete_drops() == []
    clock.advance(0.3)
    with open(spool.inbox / "a.jsonl", "a") as f:
        f.write("{}\n")  # still growing: the settle clock restarts
    assert tracker.complete_drops() == []
    clock.advance(0.4)
    assert tracker.complete_drops() == []  # 0.7 s since it was first seen, but only 0.4 s unchanged
    clock.advance(0.3)
    assert tracker.complete_drops() == ["a.jsonl"]


def test_ready_marker_and_ignored_names(tmp_path):
    spool, tracker = make(tmp_path, settle=60)
    for name in ("b.jsonl", ".c.jsonl", "d.jsonl.part", "e.jsonl.tmp"):
        (spool.inbox / name).write_text("{}\n")
    (spool.inbox / "b.jsonl.ready").touch()
    assert tracker.complete_drops() == ["b.jsonl"]


@pytest.mark.skipif(os.geteuid() != 0, reason="files of other owners need root")
def test_only_the_drops_owner_can_mark_it_ready(tmp_path):
    spool, tracker = make(tmp_path, settle=60)
    drop, marker = spool.inbox / "theirs.jsonl", spool.inbox / "theirs.jsonl.ready"
    drop.write_text("{}\n")
    os.chown(drop, 1000, 1000)
    marker.touch()
    os.chown(marker, 1001, 1001)  # another submitter's marker: ignored, and removed so it cannot squat the name
    assert tracker.complete_drops() == []
    assert not marker.exists()
    marker.touch()
    os.chown(marker, 1000, 1000)
    tracker._scanned_at = None  # the next ask rescans
    assert tracker.complete_drops() == ["theirs.jsonl"]


def test_inotify_rename_and_move_in_are_complete_at_once(tmp_path):
    async def go():
        spool, tracker = make(tmp_path / "s", settle=60)
        tracker.start()
        try:
            tmp = spool.inbox / ".x.jsonl.tmp"
            tmp.write_text("{}\n")
            os.rename(tmp, spool.inbox / "x.jsonl")             # rsync / spoold submit
            outside = tmp_path / "y.jsonl"
            outside.write_text("{}\n")
            os.rename(outside, spool.inbox / "y.jsonl")         # mv from elsewhere
            (spool.inbox / "z.jsonl").write_text("{}\n")        # scp-style in-place write
            start = time.monotonic()
            found = []
            while time.monotonic() - start < 2 and len(found) < 2:
                await tracker.wait()
                found = tracker.complete_drops()
            return found
        finally:
            tracker.stop()
    assert sorted(asyncio.run(go())) == ["x.jsonl", "y.jsonl"]


def test_a_move_in_from_another_directory_is_a_rename_not_a_creation(tmp_path, monkeypatch):
    # A bare creation would wait out this grace in case a writer follows; a
    # move in (right after a claim moved another drop out) must not.
    monkeypatch.setattr("spoold.inbox.CREATE_GRACE_SECONDS", 30)

    async def go():
        spool, tracker = make(tmp_path / "s", settle=60)
        tracker.start()
        try:
            (spool.inbox / "claimed.jsonl").write_text("{}\n")
            os.rename(spool.inbox / "claimed.jsonl", tmp_path / "claimed.jsonl")  # as a claim does
            outside = tmp_path / "y.jsonl"
            outside.write_text("{}\n")
            os.rename(outside, spool.inbox / "y.jsonl")
            return await first_complete(tracker, within=5)
        finally:
            tracker.stop()
    assert asyncio.run(go()) == ["y.jsonl"]


def test_a_drop_renamed_in_right_after_a_claim_is_not_held_back(tmp_path):
    # watchdog held the claim's unpaired move out for 0.5 s, and the rename
    # in behind it: the drop was complete 0.4-0.5 s after its rename (bench:
    # an idle daemon's 10-line drop took 0.35 s to be claimed). Now at once;
    # neither the poll (settle 60 s) nor a creation grace can make it complete.
    async def go():
        spool, tracker = make(tmp_path / "s", settle=60)
        tracker.start()
        try:
            (spool.inbox / "claimed.jsonl").write_text("{}\n")
            staged = spool.inbox / ".next.jsonl.tmp"
            staged.write_text("{}\n")
            os.rename(spool.inbox / "claimed.jsonl", tmp_path / "claimed.jsonl")  # as a claim does
            os.rename(staged, spool.inbox / "next.jsonl")
            return await first_complete(tracker, within=0.25)  # half of watchdog's hold
        finally:
            tracker.stop()
    assert asyncio.run(go()) == ["next.jsonl"]


def test_the_queue_is_in_the_order_drops_were_seen_not_their_mtime(tmp_path):
    spool, tracker = make(tmp_path, settle=0)
    (spool.inbox / "first.jsonl").write_text("{}\n")
    assert tracker.complete_drops() == ["first.jsonl"]
    (spool.inbox / "jumper.jsonl").write_text("{}\n")
    os.utime(spool.inbox / "jumper.jsonl", (0, 0))  # `touch -d 1970`: an mtime older than anything
    time.sleep(0.06)  # the next rescan is due (poll_seconds 0.05)
    assert tracker.complete_drops() == ["first.jsonl", "jumper.jsonl"]


def test_an_inbox_that_cannot_be_read_is_an_empty_one_until_it_can(tmp_path, monkeypatch):
    import errno

    spool, tracker = make(tmp_path, settle=0)
    (spool.inbox / "a.jsonl").write_text("{}\n")
    real_scandir = os.scandir

    def stale(path):
        raise OSError(errno.ESTALE, "Stale file handle", str(path))
    monkeypatch.setattr("spoold.spool.os.scandir", stale)  # an NFS server that restarted
    assert tracker.complete_drops() == []
    monkeypatch.setattr("spoold.spool.os.scandir", real_scandir)
    time.sleep(0.06)
    assert tracker.complete_drops() == ["a.jsonl"]
