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


def test_data_parallelism_reaches_vllm_as_vllm_serve_takes_it():
    """[engine] data_parallel_size (or a model's own) and the multi-node options of [engine.args] land on
    vLLM's own argument namespace; the window grows with the replicas so each stays full."""
    from spoold.config import engine_settings_for, parse_config
    from spoold.vllm_adapter import build_vllm_args

    config = parse_config({
        "engine": {"model": "small", "max_num_seqs": 16, "data_parallel_size": 2,
                   "args": {"data_parallel_address": "10.0.0.1", "data_parallel_size_local": 1,
                            "data_parallel_rpc_port": 13345, "data_parallel_backend": "ray"}},
        "models": {"small": "/models/small", "big": {"model": "/models/big", "data_parallel_size": 4}},
    })
    args = build_vllm_args(engine_settings_for(config, "/models/small"))
    assert (args.data_parallel_size, args.data_parallel_address, args.data_parallel_size_local,
            args.data_parallel_rpc_port, args.data_parallel_backend) == (2, "10.0.0.1", 1, 13345, "ray")
    big = engine_settings_for(config, "/models/big")
    assert build_vllm_args(big).data_parallel_size == 4
    assert config.engine.inflight_limit == 8 * 16 * 2 and big.inflight_limit == 8 * 16 * 4


def test_an_integer_vllm_cannot_send_to_its_engine_is_found_in_whichever_field_holds_it():
    """Its requests reach the engine core as MessagePack (64-bit integers): anything beyond fails there."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from spoold.vllm_adapter import _field_beyond_the_engine

    chat = {"model": "m", "messages": [{"role": "user", "content": "18446744073709551616"}], "max_tokens": 8}
    schema = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 2 ** 70}}}
    found = {name: _field_beyond_the_engine(ChatCompletionRequest.model_validate({**chat, **extra})) for name, extra in {
        "plain": {}, "edges": {"seed": -2 ** 63, "top_k": 2 ** 64 - 1},
        "top_k": {"top_k": 2 ** 64}, "as text": {"top_k": "18446744073709551616"},
        "deep": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
        "table": {"kv_transfer_params": {"a": [1, -2 ** 63 - 1]}}}.items()}
    assert found == {"plain": None, "edges": None, "top_k": "top_k", "as text": "top_k",
                     "deep": "response_format", "table": "kv_transfer_params"}
    assert _field_beyond_the_engine(CompletionRequest.model_validate({"model": "m", "prompt": [2 ** 64]})) == "prompt"
    assert _field_beyond_the_engine(CompletionRequest.model_validate({"model": "m", "prompt": str(2 ** 64)})) is None
