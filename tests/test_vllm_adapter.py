import asyncio

import pytest

from spoold.config import EngineSettings
from spoold.records import EngineRequest
from spoold.vllm_adapter import VllmEngine


class Body:
    @classmethod
    def model_validate(cls, body):
        return cls()


def test_a_request_cancelled_inside_the_serving_layer_is_never_a_result():
    """vLLM's handlers answer a cancel with 400 "Client disconnected"; spoold's own cancel must go on."""
    from vllm.entrypoints.serve import create_error_response

    started = asyncio.Event()

    async def handler(parsed):  # as vLLM's chat handler does with a cancel
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            return create_error_response("Client disconnected")

    async def go():
        engine = VllmEngine(EngineSettings(model="m"))
        engine._handlers = {"/v1/chat/completions": (Body, handler)}
        task = asyncio.create_task(engine.handle(EngineRequest(1, "c-1", "/v1/chat/completions", {})))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
