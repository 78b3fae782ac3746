"""The daemon's own decisions, in-process with the engine double."""

import asyncio

from spoold import daemon as daemon_module
from spoold.config import Config, EngineSettings, SpoolSettings
from spoold.daemon import Daemon

from .fake_engine import EchoEngine


def make_daemon(tmp_path) -> Daemon:
    config = Config(spool=SpoolSettings(root=tmp_path / "spool", host_id="h"),
                    engine=EngineSettings(adapter="tests.fake_engine:EchoEngine", model="fake-model"))
    return Daemon(config, EchoEngine(config.engine))


def test_a_background_loop_that_fails_is_restarted(tmp_path, monkeypatch):
    monkeypatch.setattr(daemon_module, "LOOP_RESTART_SECONDS", 0)
    daemon, runs = make_daemon(tmp_path), []

    async def flaky():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("a bug in the heartbeat")

    async def go():
        daemon._stop = asyncio.Event()
        await daemon._supervised(flaky)
        return daemon._stop.is_set()
    assert asyncio.run(go()) is False
    assert len(runs) == 3 and daemon.exit_code == 0


def test_a_background_loop_that_keeps_failing_stops_the_daemon_for_systemd(tmp_path, monkeypatch):
    monkeypatch.setattr(daemon_module, "LOOP_RESTART_SECONDS", 0)
    daemon = make_daemon(tmp_path)

    async def broken():
        raise OSError(5, "Input/output error")

    async def go():
        daemon._stop = asyncio.Event()
        await daemon._supervised(broken)
        return daemon._stop.is_set()
    assert asyncio.run(go()) is True
    assert daemon.exit_code == 1
