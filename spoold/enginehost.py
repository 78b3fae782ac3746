"""The one engine a daemon holds: loading it, replacing it after a crash, swapping models.

The daemon decides when (a job needs another model, the engine died or
hung); this module does the how, and measures it: load time, and the
process and GPU memory before a model loads, while it is loaded and after
it is unloaded, so a swap that does not really free memory shows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .backoff import RetryPolicy
from .cpus import CpuPlacement
from .engine import Engine, UnavailableEngine
from .gpu import GpuReader, process_tree_mib

log = logging.getLogger(__name__)

#: Engine restarts allowed within RESTART_WINDOW_SECONDS before the daemon
#: gives up and exits for systemd to restart it (a model that keeps crashing).
MAX_RESTARTS = 3
RESTART_WINDOW_SECONDS = 600.0

#: How long an engine gets to shut down (a dead or hung one may never): under
#: systemd's TimeoutStopSec (90 s), so a stop is never held past it; what is
#: left of the engine's processes then goes with KillMode=mixed.
CLOSE_SECONDS = 60.0


class EngineHost:
    """Holds the current engine and makes new ones with `make_engine(model)`.

    `cpus` keeps the daemon's threads off the cores a loaded engine computes on;
    `retry` says how often a model that fails to load is tried.
    """

    def __init__(self, engine: Engine, make_engine: Callable[[str], Engine] | None,
                 publish: Callable[[str, dict], None], gpus: GpuReader,
                 cpus: CpuPlacement | None = None, retry: RetryPolicy = RetryPolicy()) -> None:
        self.engine = engine
        self.retry = retry
        self.make_engine = make_engine
        self.publish = publish
        self.gpus = gpus
        self.cpus = cpus or CpuPlacement()
        self._restarts: list[float] = []
        self._memory_before_load = 0.0
        #: when the model loaded now was loaded (epoch seconds; a restart of the same model keeps it):
        #: another model's jobs wait `[models] max_wait_seconds` from here at most (scheduler.overdue)
        self.loaded_at = 0.0
        self._loaded_model: str | None = None

    @property
    def model(self) -> str:
        """The model the current engine serves (loaded or about to be)."""
        return self.engine.model

    async def load(self) -> float:
        """Start the current engine; returns the seconds it took."""
        self._memory_before_load = process_tree_mib()
        log.info("loading model %s", self.model)
        self.publish("spoold.engine.loading", {"model": self.model})
        started = time.monotonic()
        self.cpus.release()  # the engine picks its cores from our mask: give it all of them
        await self.engine.start()
        seconds = time.monotonic() - started
        if self.model != self._loaded_model:
            self.loaded_at, self._loaded_model = time.time(), self.model
        self.cpus.keep_off_engine()
        log.info("model loaded in %.1fs", seconds)
        self.publish("spoold.engine.ready", {"model": self.model, "load_seconds": round(seconds, 2)})
        return seconds

    async def restart(self, reason: str, start: Callable[[], Awaitable[None]]) -> bool:
        """Replace a dead or hung engine with a fresh one for the same model, started by `start`
        (the daemon's loading step); False, logged, where the daemon had better exit for systemd.

        That is when the engine keeps failing (more than MAX_RESTARTS in
        RESTART_WINDOW_SECONDS) or the fresh one failed to start (the dead
        one's GPU memory may not be free yet): an engine that never started
        must not answer lines (with errors); a whole new process is the next
        best try.
        """
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_SECONDS] + [now]
        if self.make_engine is None or len(self._restarts) > MAX_RESTARTS:
            log.error("%s; more than %d engine restarts in %.0fs: exiting so the service restarts",
                      reason, MAX_RESTARTS, RESTART_WINDOW_SECONDS)
            return False
        log.error("%s; starting a fresh engine (the requests in flight run again)", reason)
        try:
            await close_quietly(self.engine)
            self.engine = self.make_engine(self.model)
            await start()
        except Exception as e:
            log.error("the fresh engine failed to start: %s; exiting so the service restarts", e, exc_info=True)
            return False
        return True

    def dead_reason(self) -> str | None:
        """Why the current engine can run nothing more, if it says (`Engine`'s optional `dead_reason`)."""
        probe = getattr(self.engine, "dead_reason", None)
        return probe() if probe is not None else None

    async def close(self) -> None:
        """Shut the current engine down at stop, within CLOSE_SECONDS."""
        await close_quietly(self.engine)

    async def swap(self, model: str, start: Callable[[], Awaitable[None]]) -> None:
        """Unload the current model, measuring what memory comes back, then load `model` (`load_other`)."""
        log.info("swapping models: %s -> %s", self.model, model)
        await self.unload()
        await self.load_other(model, start)

    async def unload(self) -> None:
        """Close the current engine for another model and publish what memory came back."""
        old, loaded_mib = self.engine, process_tree_mib()
        await close_quietly(old)
        unloaded = {"model": old.model, "memory_mib_before_load": self._memory_before_load,
                    "memory_mib_loaded": loaded_mib, "memory_mib_after_unload": process_tree_mib(),
                    "gpu_memory_used_bytes": [g["memory_used_bytes"] for g in self.gpus.read()]}
        log.info("unloaded %s: process memory %.0f MiB before loading it, %.0f MiB loaded, %.0f MiB after",
                 old.model, unloaded["memory_mib_before_load"], loaded_mib, unloaded["memory_mib_after_unload"])
        self.publish("spoold.engine.unloaded", unloaded)

    async def load_other(self, model: str, start: Callable[[], Awaitable[None]]) -> None:
        """Make and start the engine for `model`, up to `max_attempts` times with backoff; if every try
        fails, an UnavailableEngine stands in (its lines get a 503 result, batch.json says why).

        `start` is the daemon's own loading step (state, status, READY), run
        once the engine is made.
        """
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                self.engine = self.make_engine(model)
                await start()
                return
            except Exception as e:  # a bad path, out of memory, a broken checkpoint, a GPU not yet free
                error = f"{type(e).__name__}: {e}"
                await close_quietly(self.engine)
                if attempt == self.retry.max_attempts:
                    log.error("model %s failed to load %d times: %s; its lines get a 503 result, other "
                              "models go on", model, attempt, error, exc_info=True)
                    break
                wait = self.retry.wait(attempt)
                log.error("model %s failed to load (try %d of %d): %s; trying again in %.1fs",
                          model, attempt, self.retry.max_attempts, error, wait, exc_info=True)
                await asyncio.sleep(wait)
        self.engine = UnavailableEngine(model, f"{error} ({self.retry.max_attempts} tries)")


async def close_quietly(engine: Engine) -> None:
    """Close an engine, giving up after CLOSE_SECONDS; a failure is logged, not raised."""
    try:
        await asyncio.wait_for(engine.close(), CLOSE_SECONDS)
    except Exception as e:  # a dead engine may fail to shut down cleanly, or hang doing it
        log.warning("model %s did not shut down cleanly: %r", engine.model, e)
