"""Work paused on a full or failing disk: why, and the wait before trying again.

The daemon decides to pause (a job's end says its disk failed, a claim or a
scan of the spool failed with EIO or ENOSPC); this holds the reason, which
status and heartbeats show, and waits out the pause. Nothing unpersisted was
counted and nothing incomplete was published, so trying again resumes from
what is on disk.

Leaf module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

#: How long to wait before retrying a job whose results could not be written
#: (a full or failing disk): long enough not to spin, short enough to resume soon.
WRITE_RETRY_SECONDS = 5.0


class DiskPause:
    """Why work is paused, if it is; the first reason stands until the pause is waited out."""

    def __init__(self, retry_seconds: float = WRITE_RETRY_SECONDS) -> None:
        self.retry_seconds = retry_seconds
        #: why work is paused, shown in status and heartbeats; None while working
        self.reason: str | None = None

    def begin(self, reason: str, log_extra: dict | None = None) -> bool:
        """Pause for `reason` (logged once); False when already paused."""
        if self.reason is not None:
            return False
        log.error("%s; work paused, retrying in %.0fs", reason, self.retry_seconds, **(log_extra or {}))
        self.reason = reason
        return True

    async def wait_out(self, stop: asyncio.Event) -> None:
        """Start nothing for `retry_seconds` (a stop ends the wait sooner); then try again
        (a new failure pauses again)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=self.retry_seconds)
        self.reason = None
