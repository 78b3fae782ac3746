"""Background loops that never die silently: restarted on an error, given up on when they keep failing.

A loop that died unnoticed would leave a half-daemon: watchdog pings going
on while heartbeats stop, and peers taking over a live host's jobs. Here
an exception is logged and counted, and the loop runs again; one that
keeps failing is given up on, and the daemon (which decides) stops for
systemd to restart it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .metrics import Metrics

log = logging.getLogger(__name__)

#: A loop that fails more than this often in FAILURE_WINDOW_SECONDS is given up on.
MAX_FAILURES = 5
FAILURE_WINDOW_SECONDS = 60.0
#: How long a failed loop waits before it runs again.
RESTART_SECONDS = 1.0


async def supervise(loop: Callable[[], Awaitable[None]], metrics: Metrics | None = None,
                    name: str | None = None) -> bool:
    """Run `loop` until it returns (True) or keeps failing (False); cancellation passes through.

    `name` (default: the function's) labels its failures in logs and metrics.
    """
    name = name or getattr(loop, "__name__", "loop")
    failures: list[float] = []
    while True:
        try:
            await loop()
            return True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            now = time.monotonic()
            failures = [t for t in failures if now - t < FAILURE_WINDOW_SECONDS] + [now]
            if metrics is not None:
                metrics.loop_failures.labels(name.strip("_")).inc()
            if len(failures) > MAX_FAILURES:
                log.critical("%s keeps failing (%s: %s); exiting so the service restarts",
                             name, type(e).__name__, e, exc_info=True)
                return False
            log.error("%s failed (%s: %s); restarting it", name, type(e).__name__, e, exc_info=True)
            await asyncio.sleep(RESTART_SECONDS)


def run_event_loop(main: Callable[[], Awaitable[int]]) -> int:
    """Run `main()` to its end on uvloop when it is installed, else asyncio's loop; its exit code.

    uvloop comes with vLLM, whose own server uses it: the serving layer's
    per-request work runs on this loop, and a cheaper loop leaves more CPU to
    the engine. A cold stop (the main task cancelled) is exit code 0.
    """
    try:
        import uvloop
    except ImportError:
        uvloop = None
    try:
        return uvloop.run(main()) if uvloop is not None else asyncio.run(main())
    except asyncio.CancelledError:
        log.warning("cold stop: in-flight work abandoned, it resumes on the next start")
        return 0
