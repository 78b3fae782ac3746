import asyncio
import threading

import pytest

from spoold.durable import finish_in_thread


def test_a_step_in_a_thread_is_finished_even_when_its_caller_is_cancelled():
    started, release, finished = threading.Event(), threading.Event(), []

    def step():
        started.set()
        release.wait(10)
        finished.append(True)

    async def go():
        caller = asyncio.create_task(finish_in_thread(step))
        await asyncio.to_thread(started.wait, 10)
        caller.cancel()
        await asyncio.sleep(0)
        assert not caller.done()  # still waiting for the step, not abandoning it halfway
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert finished == [True]

    asyncio.run(go())


def test_a_step_that_fails_raises_its_own_error_and_one_that_works_returns_its_value():
    def fails():
        raise OSError(5, "Input/output error", "batch.json")

    async def go():
        with pytest.raises(OSError, match="Input/output error"):
            await finish_in_thread(fails)
        assert await finish_in_thread(sum, [1, 2]) == 3

    asyncio.run(go())
