"""systemd notifications (sd_notify), a no-op when not run under systemd.

systemd-python's `systemd.daemon.notify` does the work; without
`$NOTIFY_SOCKET` (a terminal, a test, a container) every call does nothing,
the way gunicorn's systemd module behaves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from .names import display_name

log = logging.getLogger(__name__)

#: The status line from the first SIGTERM until exit.
STOPPING_STATUS = "stopping: finishing writes"

#: While a model loads, systemd's start timeout is pushed this far ahead,
#: every third of it: a load that makes no progress still times out in vLLM.
LOAD_EXTEND_SECONDS = 60.0


class Notifier:
    """Sends READY/STATUS/STOPPING to systemd when systemd is listening."""

    def __init__(self) -> None:
        self._notify = None
        self._last_status = ""
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        try:
            from systemd.daemon import notify
        except ImportError:
            log.warning("NOTIFY_SOCKET is set but systemd-python is not installed")
            return
        self._notify = notify

    @property
    def active(self) -> bool:
        """True when notifications reach systemd."""
        return self._notify is not None

    def send(self, *fields: str) -> None:
        """Send `KEY=value` fields in one datagram; a field that is not one line of UTF-8 is refused.

        Fields are separated by newlines, so a newline inside a value would
        reach systemd as a field of its own: a status naming a file
        `a<newline>WATCHDOG=trigger` would have the service killed. Such a
        field is never sent. Only a bug can make one (names are shown in
        their display form), so it is logged, in that form.
        """
        if self._notify is None:
            return
        safe = [field for field in fields if _one_line_of_utf8(field)]
        for field in fields:
            if field not in safe:
                log.error("not sending notify field %s to systemd: it is not one line of UTF-8",
                          display_name(field))
        if safe:
            self._notify("\n".join(safe))

    def ready(self, status: str) -> None:
        """The daemon has recovered its jobs and loaded its model."""
        self.send("READY=1", f"STATUS={status}")

    def status(self, line: str) -> None:
        """The one line `systemctl status spoold` shows (sent only when it changes)."""
        if self._notify is not None and line != self._last_status:
            self._last_status = line
            self.send(f"STATUS={line}")

    def watchdog(self) -> None:
        """Tell systemd's watchdog the daemon is healthy."""
        self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec), or None when no watchdog is set for us."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not self.active or not usec or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2e6

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more start (or stop) time: a big model is still loading."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    async def keep_extending_timeout(self, seconds: float = LOAD_EXTEND_SECONDS) -> None:
        """Push the start timeout `seconds` ahead every third of it, until cancelled (a model loading).

        A load that makes no progress still times out, in vLLM itself.
        """
        if not self.active:
            return
        while True:
            self.extend_timeout(seconds)
            await asyncio.sleep(seconds / 3)

    def reloading(self) -> None:
        """A SIGHUP reload has begun (READY=1 follows when it is done)."""
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        """The daemon has begun a warm stop."""
        self.send("STOPPING=1", f"STATUS={STOPPING_STATUS}")


def _one_line_of_utf8(field: str) -> bool:
    if "\n" in field:
        return False
    try:
        field.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a file name (surrogate escapes)
        return False
    return True
