import asyncio
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

from spoold.config import EngineSettings
from spoold.records import EngineRequest
from spoold.vllm_adapter import VllmEngine, private_rpc_dir


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


@pytest.fixture
def short_dir():
    """A directory with a short path, as /tmp is: a unix socket's whole path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="rpc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def bind_as_vllm_does(base: str) -> None:
    """Leave a unix socket where vLLM makes its ZeroMQ ipc sockets (and leaves them)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{base}/{uuid.uuid4()}")
    listener.close()


@pytest.mark.parametrize("operator_set", [False, True])
def test_an_engine_keeps_its_sockets_in_a_directory_of_its_own_removed_after(short_dir, monkeypatch, operator_set):
    """vLLM leaves seven unix sockets in VLLM_RPC_BASE_PATH per engine start; a daemon swapping models
    for weeks must not fill /tmp (or the directory an operator named) with them."""
    from vllm import envs

    if operator_set:
        monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(short_dir))
    else:
        monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
        monkeypatch.setenv("TMPDIR", str(short_dir))
        monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    with private_rpc_dir() as path:
        assert envs.VLLM_RPC_BASE_PATH == path and os.path.dirname(path) == str(short_dir)
        bind_as_vllm_does(envs.VLLM_RPC_BASE_PATH)
    assert list(short_dir.iterdir()) == []
    assert os.environ.get("VLLM_RPC_BASE_PATH") == (str(short_dir) if operator_set else None)


def test_a_base_too_long_for_a_directory_of_our_own_is_used_as_it_is(short_dir, monkeypatch):
    from vllm import envs

    base = short_dir / ("b" * (106 - 37 - len(str(short_dir))))  # vLLM's own names just fit
    base.mkdir()
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(base))
    with private_rpc_dir() as path:
        assert path == envs.VLLM_RPC_BASE_PATH == str(base)
        bind_as_vllm_does(path)  # binds: the engine starts, as it would without spoold
    assert os.environ["VLLM_RPC_BASE_PATH"] == str(base)
