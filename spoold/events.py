"""The ZeroMQ progress feed: two frames per message, topic and JSON.

An XPUB socket, so a subscriber that connects late is sent the current
state (the daemon heartbeat and every job's progress) at once. Sends never
block: a slow or dead subscriber's queue is capped by the high-water mark
and ZeroMQ drops what does not fit, so the daemon never waits for a reader.
Every message carries `seq` (consecutive: a subscriber can see gaps), `ts`
and `host`. Never prompt or response text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOPIC_PREFIX = "spoold."

#: Messages queued per subscriber before ZeroMQ starts dropping for it.
SEND_HWM = 10_000

#: How often new subscriptions are looked for (and answered with a snapshot).
SUBSCRIPTION_POLL_SECONDS = 0.1


def runtime_dir() -> Path:
    """Where the default ipc socket lives: systemd's RuntimeDirectory, else a per-user one."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/spoold")
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "spoold"
    return Path(f"/tmp/spoold-{os.geteuid()}")


class EventsError(Exception):
    """The feed cannot be offered where it is configured; the message says why and what to do."""


def _check_socket_dir(directory: Path) -> None:
    """Refuse a socket directory someone else controls (a predictable /tmp/spoold-<uid> made first).

    Whoever owns it, or can write to it, could put their own socket in our
    place and read every event, or feed `spoold watch` lies.
    """
    st = os.lstat(directory)
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        problem = "it is not a directory (a symlink?)"
    elif st.st_uid != os.geteuid():
        problem = f"it is owned by uid {st.st_uid}, not this user ({os.geteuid()})"
    elif st.st_mode & stat.S_IWOTH:
        problem = "anyone may write to it"
    if problem:
        raise EventsError(f"not putting the event socket in {directory}: {problem}; remove it, or set "
                          "[events] endpoint (or XDG_RUNTIME_DIR) to a directory of this user's own")


#: Where a system service (systemd RuntimeDirectory=spoold) has its socket.
SYSTEM_SOCKET = Path("/run/spoold/events.sock")


def resolve_endpoint(endpoint: str, connect: bool = False) -> str:
    """The endpoint to bind or connect: the default ipc socket, tcp on loopback unless a host is named.

    A client (`connect`) of the default prefers the system service's socket
    when it exists, so `spoold watch` as any user finds the daemon.
    """
    if not endpoint:
        if connect and SYSTEM_SOCKET.exists():
            return f"ipc://{SYSTEM_SOCKET}"
        return f"ipc://{runtime_dir() / 'events.sock'}"
    match = re.fullmatch(r"tcp://:?(\d+)", endpoint)
    if match:
        return f"tcp://127.0.0.1:{match.group(1)}"
    return endpoint


class EventPublisher:
    """Publishes spoold.* events; answers each new subscription with a snapshot."""

    def __init__(self, endpoint: str, host: str, gid: int = -1) -> None:
        """`gid`: the group (`[spool] group`) whose members may connect to an ipc socket, as they may read
        the results; -1 leaves it the daemon's own."""
        import zmq

        self.endpoint = resolve_endpoint(endpoint)
        self.host = host
        self._gid = gid
        self._snapshot: Callable[[], list[tuple[str, dict]]] = list
        self._seq = 0
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._bind()
        self._task: asyncio.Task | None = None

    def _bind(self) -> None:
        if self.endpoint.startswith("ipc://"):
            path = Path(self.endpoint[len("ipc://"):])
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)  # the socket's own mode keeps others out
            _check_socket_dir(path.parent)
            if path.exists():
                path.unlink()  # a socket left by a crashed daemon
            old_umask = os.umask(0o117)  # the socket is created owner+group only
            try:
                self._sock.bind(self.endpoint)
            finally:
                os.umask(old_umask)
            if self._gid != -1:  # the spool's group may connect, as it may read the results
                os.chown(path, -1, self._gid)
        else:
            self._sock.bind(self.endpoint)
        log.info("progress events on %s", self.endpoint)

    def start(self, snapshot: Callable[[], list[tuple[str, dict]]]) -> None:
        """Start answering each new subscription with `snapshot()`: (topic, payload) pairs."""
        self._snapshot = snapshot
        self._task = asyncio.create_task(self._answer_subscriptions(), name="events")

    async def _answer_subscriptions(self) -> None:
        while True:
            await asyncio.sleep(SUBSCRIPTION_POLL_SECONDS)
            if self.new_subscriptions():
                for topic, payload in self._snapshot():
                    self.publish(topic, payload)

    def new_subscriptions(self) -> int:
        """How many subscribe messages arrived since the last look (never blocks)."""
        count = 0
        while True:
            try:
                frame = self._sock.recv(flags=self._zmq.NOBLOCK)
            except self._zmq.Again:
                return count
            count += frame[:1] == b"\x01"  # subscribe, not unsubscribe

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Send one event; never blocks, never raises for a missing reader."""
        self._seq += 1
        message = {"seq": self._seq, "ts": round(time.time(), 3), "host": self.host, **payload}
        try:
            self._sock.send_multipart([topic.encode(), json.dumps(message).encode()],
                                      flags=self._zmq.NOBLOCK)
        except self._zmq.Again:
            pass  # no room: ZeroMQ's own per-subscriber cap; the next event carries current counts

    async def close(self) -> None:
        """Stop the subscription task and close the socket."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close(linger=0)
        self._ctx.term()
