import asyncio
import os
import stat
import time

import pytest

from spoold.events import EventPublisher, resolve_endpoint

from .helpers import NOBODY, Subscriber, as_nobody, wait_for


def test_tcp_without_a_host_binds_to_loopback():
    assert resolve_endpoint("tcp://5557") == "tcp://127.0.0.1:5557"
    assert resolve_endpoint("tcp://:5557") == "tcp://127.0.0.1:5557"
    assert resolve_endpoint("tcp://0.0.0.0:5557") == "tcp://0.0.0.0:5557"
    assert resolve_endpoint("").startswith("ipc://")


def test_seq_snapshot_on_subscribe_and_sends_never_block(tmp_path):
    endpoint = f"ipc://{tmp_path}/e.sock"

    async def go():
        pub = EventPublisher(endpoint, "h")
        pub.start(lambda: [("spoold.daemon.heartbeat", {"state": "idle"})])
        mode = stat.S_IMODE(os.stat(tmp_path / "e.sock").st_mode)
        sub = Subscriber(endpoint)
        for _ in range(30):
            await asyncio.sleep(0.05)
            if sub.events:
                break
        stuck = Subscriber(endpoint, read=False)
        await asyncio.sleep(0.3)
        start = time.monotonic()
        for i in range(50_000):  # far past every high-water mark
            pub.publish("spoold.job.progress", {"done": i})
        elapsed = time.monotonic() - start
        wait_for(lambda: sub.of("spoold.job.progress", done=49_999) or len(sub.events) > 10, 5, "events")
        sub.close()
        stuck.close()
        await pub.close()
        return sub.events, elapsed, mode

    events, elapsed, mode = asyncio.run(go())
    assert events[0][0] == "spoold.daemon.heartbeat"
    assert events[0][1]["host"] == "h" and {"seq", "ts"} <= set(events[0][1])
    seqs = [p["seq"] for _, p in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # A send that blocked would wait for the stuck subscriber forever; the
    # bound only turns that hang into a failure (speed is not asserted here).
    assert elapsed < 60, f"50k sends took {elapsed:.1f}s"
    assert mode & 0o007 == 0, oct(mode)  # no access for others


def test_the_socket_never_goes_in_a_directory_someone_else_controls(tmp_path):
    from spoold.events import EventPublisher, EventsError

    shared = tmp_path / "spoold-1000"  # as a predictable /tmp/spoold-<uid> someone made first
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(EventsError, match="anyone may write"):
        EventPublisher(f"ipc://{shared}/events.sock", "h")
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(EventsError, match="owned by uid 65534"):
            EventPublisher(f"ipc://{theirs}/events.sock", "h")
    assert not (shared / "events.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a socket's group to one of another user's needs root")
def test_members_of_the_spools_group_may_connect_to_the_feed_and_others_may_not():
    import shutil
    import socket
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="spoold-events-"))  # not under pytest's tmp_path, which is root's alone
    base.chmod(0o755)
    path = base / "run" / "events.sock"

    def connect():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
            except PermissionError:
                return "refused"
            return "connected"

    async def go():
        pub = EventPublisher(f"ipc://{path}", "h", gid=NOBODY)  # as [spool] group: the submitters' group
        try:
            return as_nobody(connect), as_nobody(connect, gid=1), stat.S_IMODE(os.stat(path).st_mode)
        finally:
            await pub.close()
    try:
        member, outsider, mode = asyncio.run(go())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert member == {"ok": "connected"}  # `spoold watch` as a submitter, like `spoold status`
    assert outsider == {"ok": "refused"}
    assert mode & 0o007 == 0, oct(mode)
