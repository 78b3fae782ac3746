"""Sending one job's lines to the engine: a few workers, one share of the window, one writer.

The job runner decides which lines run and in what order (suspects of an
engine death first, then the rest); a `Dispatch` runs them. Each worker
takes the next line from one shared iterator, waits for a slot of the job's
share of the engine's in-flight window, sends it, tries a 5xx answer again
up to `[engine] max_attempts` times with backoff, and hands the final answer
to the job's group-commit writer. A request the engine never answers (it
died) gets no result at all: the line runs again on a fresh engine, and the
lines that were in flight with it are named (`EngineLost`) so the runner can
count the death against them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace

from .backoff import RetryPolicy
from .engine import Engine
from .progress import JobProgress
from .records import EngineRequest, EngineResult
from .window import Share
from .writer import GroupCommitWriter

#: How often the wait for the last requests in flight looks at the stop event.
DRAIN_POLL_SECONDS = 0.2

#: Finished results waiting for their fsync before dispatch pauses (at least
#: twice the requests in flight). A GPU finishes a few hundred lines between
#: two fsyncs; only a stalled disk reaches this.
MAX_PENDING_RESULTS = 4096


class EngineLost(Exception):
    """The engine failed a request (it died, or was replaced): nothing was written for the lines in flight.

    `lines` are the line numbers that were in flight at that moment; the
    cause is chained.
    """

    def __init__(self, lines: set[int], cause: BaseException) -> None:
        super().__init__(f"the engine failed: {cause!r}")
        self.lines = lines


class Dispatch:
    """Runs lines through an engine in one job's share of the window; one per job run."""

    def __init__(self, engine: Engine, share: Share, writer: GroupCommitWriter, stop: asyncio.Event,
                 retry: RetryPolicy, on_retry: Callable[[], None], progress: JobProgress) -> None:
        """`stop`: the run's stop (set, nothing new is sent and what is in flight is let go);
        `on_retry`: called for each retry of a 5xx answer, for batch.json's count; `progress`: the
        job's, whose `inflight` count this keeps (the reporter's stall measurement reads it)."""
        self.engine, self.share, self.writer, self.stop = engine, share, writer, stop
        self.retry, self.on_retry, self.progress = retry, on_retry, progress
        self._inflight_lines: set[int] = set()
        self._lost_lines: set[int] = set()
        self._failure: list[BaseException] = []

    async def run(self, lines: Iterator[EngineRequest | None], workers: int) -> bool:
        """Run `lines` through `workers` workers sharing one iterator; True when all ran, False when stopped.

        None items are ticks (lines were skipped): a worker yields on them.
        No task per line: with the instant engine double, making and
        scheduling one took a third of the time per line (55K -> 85K lines/s
        without). Raises EngineLost when the engine failed a request, and
        whatever reading the input raised (EIO, ESTALE: the daemon retries
        the job).
        """
        max_pending = max(MAX_PENDING_RESULTS, 2 * self.share.capacity)
        tasks = {asyncio.create_task(self._work(lines, max_pending)) for _ in range(workers)}
        await self._drain(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        await self.writer.flush()
        if self._failure:
            raise EngineLost(self._lost_lines, self._failure[0]) from self._failure[0]
        return not self.stop.is_set()

    async def _drain(self, tasks: set[asyncio.Task]) -> None:
        """Wait for the workers to run out of lines; a stop or an engine failure cancels the rest.

        Watching the stop while waiting matters: a stuck request must not
        hold up a warm stop (its line simply runs again on the next start).
        """
        running = set(tasks)
        while running and not (self.stop.is_set() or self._failure):
            _, running = await asyncio.wait(running, timeout=DRAIN_POLL_SECONDS)
        for task in running:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _work(self, lines: Iterator[EngineRequest | None], max_pending: int) -> None:
        """One worker: take a line, wait for its final answer, hand it to the writer; repeat.

        Sharing `lines` is safe: the generator never awaits, so one worker's
        next() ends before another's begins.
        """
        for count, item in enumerate(lines, 1):
            if item is None:  # a tick: lines were skipped without a request to send
                await asyncio.sleep(0)
                continue
            await self.writer.wait_pending_below(max_pending)
            result = await self._send(item)
            if result is not None and result.status_code >= 500:
                result = await self._retried(item, result)
            if result is None:
                return  # the line taken has no result yet: it runs on the next start
            self.writer.add_result(item.line, item.custom_id, result)
            if count % 256 == 0:
                await asyncio.sleep(0)  # an engine that answers at once must not starve the loop

    async def _retried(self, item: EngineRequest, result: EngineResult) -> EngineResult | None:
        """The final answer to a line the engine answered 5xx: tried again up to `max_attempts` times
        in all, with backoff.

        None when the run stops or the engine dies first: nothing is written,
        and the line runs again (on the next start, or on a fresh engine).
        A 4xx is the request's own fault and is final at once; so is the 503
        of a model that failed to load (its loading was retried already).
        """
        attempt = 1
        while (result is not None and result.status_code >= 500 and attempt < self.retry.max_attempts
               and not getattr(self.engine, "load_error", None)):
            self.on_retry()
            await asyncio.sleep(self.retry.wait(attempt))  # a stop cancels the wait (_drain)
            result = await self._send(item)
            attempt += 1
        return result

    async def _send(self, item: EngineRequest) -> EngineResult | None:
        """One request in this job's share of the window; None if it cannot be sent or the engine failed."""
        place = await self.share.acquire()  # other jobs' requests may hold the window
        if self.stop.is_set() or self._failure or self.writer.failure:
            self.share.release()
            return None
        self.progress.inflight += 1
        self._inflight_lines.add(item.line)
        try:
            return await self.engine.handle(replace(item, priority=place))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self._failure:
                self._lost_lines = set(self._inflight_lines)  # all of them were lost with the engine
            self._failure.append(e)
            return None
        finally:
            self.share.release()
            self.progress.inflight -= 1
            self._inflight_lines.discard(item.line)
