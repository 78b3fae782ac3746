"""The daemon's own decisions, in-process with the engine double."""

import asyncio
import os

from spoold.config import Config, EngineSettings, SpoolSettings
from spoold.daemon import Daemon

from .fake_engine import EchoEngine


def make_daemon(tmp_path) -> Daemon:
    config = Config(spool=SpoolSettings(root=tmp_path / "spool", host_id="h"),
                    engine=EngineSettings(adapter="tests.fake_engine:EchoEngine", model="fake-model"))
    return Daemon(config, EchoEngine(config.engine))


def test_a_background_loop_that_fails_is_restarted(tmp_path, monkeypatch):
    monkeypatch.setattr("spoold.supervise.RESTART_SECONDS", 0)
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
    monkeypatch.setattr("spoold.supervise.RESTART_SECONDS", 0)
    daemon = make_daemon(tmp_path)

    async def broken():
        raise OSError(5, "Input/output error")

    async def go():
        daemon._stop = asyncio.Event()
        await daemon._supervised(broken)
        return daemon._stop.is_set()
    assert asyncio.run(go()) is True
    assert daemon.exit_code == 1


def test_a_drop_refused_at_claim_is_announced_as_failed(tmp_path):
    class Events:
        def __init__(self):
            self.sent = []

        def publish(self, topic, payload):
            self.sent.append((topic, payload))

    daemon = make_daemon(tmp_path)
    daemon.report.events = Events()
    daemon.spool.ensure_dirs()
    (tmp_path / "elsewhere.jsonl").write_text("{}\n")
    os.symlink(tmp_path / "elsewhere.jsonl", daemon.spool.inbox / "l.jsonl")
    assert asyncio.run(daemon.work.claim("l.jsonl")) is None
    ((topic, payload),) = daemon.report.events.sent
    assert topic == "spoold.job.failed" and payload["input_file"] == "l.jsonl"
    assert [e["code"] for e in payload["errors"]] == ["not_regular"]
    assert (daemon.spool.failed / payload["job"] / "batch.json").exists()


def test_an_engine_that_hangs_at_shutdown_does_not_hold_the_stop(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("spoold.enginehost.CLOSE_SECONDS", 0.05)
    daemon = make_daemon(tmp_path)
    hung = asyncio.Event()

    async def close():
        await hung.wait()  # never set: an engine stuck in its shutdown
    daemon.engine.close = close
    asyncio.run(daemon.engine_host.close())
    assert "did not shut down cleanly" in caplog.text


def test_a_hung_engine_verdict_stops_every_job_and_sends_the_engine_nothing_more(tmp_path):
    from spoold.reporter import Stall

    daemon = make_daemon(tmp_path)
    runners = [_Running() for _ in range(3)]
    daemon.jobs._running = {str(i): r for i, r in enumerate(runners)}
    daemon._act_on(Stall(stalled=True))
    assert not any(r.runner.stop.is_set() for r in runners) and daemon._trouble is None  # the watchdog's business
    daemon._act_on(Stall(stalled=True, hung=True))
    assert all(r.runner.stop.is_set() for r in runners) and daemon._trouble  # the loop then replaces the engine
    assert not daemon.jobs.window._may_take(daemon.jobs.window.join("late"))  # nothing more goes to the hung engine


class _Running:
    """A running job as the daemon holds it, with only what a stop touches."""

    def __init__(self):
        self.runner = type("Runner", (), {"stop": asyncio.Event()})()


def test_a_reload_changes_what_the_reporter_counts_as_a_stall(tmp_path):
    import time
    from dataclasses import replace

    from spoold.config import WatchdogSettings
    from spoold.progress import JobProgress
    from spoold.lifecycle import JobStatus

    class Running:
        progress = JobProgress("j", "a.jsonl", JobStatus.IN_PROGRESS, total=9, done=1, inflight=2,
                               last_progress_at=time.time() - 30)

        def refresh(self):
            return self.progress

    daemon = make_daemon(tmp_path)
    daemon.spool.ensure_dirs()
    assert not daemon.report.progress(Running()).stalled  # 30 s idle, stall_seconds 300
    daemon.reload_config = lambda: replace(daemon.config, watchdog=WatchdogSettings(stall_seconds=10))
    daemon._reload()  # SIGHUP
    assert daemon.report.progress(Running()).stalled


def test_the_first_signal_is_a_warm_stop_the_second_a_cold_one(tmp_path):
    import signal

    daemon = make_daemon(tmp_path)

    async def go():
        daemon._stop, running = asyncio.Event(), _Running()
        daemon.jobs._running = {"j": running}
        daemon._main_task = asyncio.current_task()
        daemon._on_signal(signal.SIGTERM)
        warm = daemon._stop.is_set() and running.runner.stop.is_set()
        daemon._on_signal(signal.SIGTERM)
        try:
            await asyncio.sleep(10)  # the cancel lands here
        except asyncio.CancelledError:
            return warm, "cancelled"
        return warm, "not cancelled"
    assert asyncio.run(go()) == (True, "cancelled")


def test_a_peers_job_silent_for_claim_timeout_is_taken_over_and_run_here(tmp_path, monkeypatch):
    from spoold.spool import Spool

    clock = [1000.0]
    monkeypatch.setattr("spoold.spool.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("spoold.worklist.time.monotonic", lambda: clock[0])
    config = Config(spool=SpoolSettings(root=tmp_path / "spool", host_id="h", claim_timeout=60),
                    engine=EngineSettings(adapter="tests.fake_engine:EchoEngine", model="fake-model"))
    daemon = Daemon(config, EchoEngine(config.engine))
    peer = Spool(SpoolSettings(root=tmp_path / "spool", host_id="peer"))
    peer.ensure_dirs()
    (peer.inbox / "p.jsonl").write_text('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
                                         '"body": {"model": "fake-model", "messages": []}}\n')
    job = peer.claim_drop("p.jsonl")
    daemon.spool.ensure_dirs()
    assert daemon.work.take_over_orphans() == []  # the first look starts the peer's clock
    clock[0] += 30
    assert daemon.work.take_over_orphans() == []  # silent 30 s of 60: still the peer's
    clock[0] += 31
    (taken,) = daemon.work.take_over_orphans()
    assert taken.job.path == daemon.spool.host_dir / job.id and not job.path.exists()


def test_a_stop_asked_for_while_a_dead_engines_jobs_settle_is_not_held_up_by_a_fresh_engine(tmp_path, caplog):
    """Ctrl-C in a terminal reaches vLLM's processes too: the daemon may see its engine die just before the
    signal, and must then stop rather than first load a fresh engine (tens of seconds, minutes on a GPU)."""
    import logging
    import signal

    caplog.set_level(logging.INFO, logger="spoold")
    config = Config(spool=SpoolSettings(root=tmp_path / "spool", host_id="h"),
                    engine=EngineSettings(adapter="tests.fake_engine:EchoEngine", model="fake-model"))
    made = []
    daemon = Daemon(config, EchoEngine(config.engine),
                    make_engine=lambda model: made.append(model) or EchoEngine(config.engine))

    async def settle_while_the_signal_comes():
        daemon._on_signal(signal.SIGINT)

    async def go():
        daemon._stop = asyncio.Event()
        daemon._trouble = "the engine died: EngineCore exited"
        daemon.jobs.settle = settle_while_the_signal_comes
        await daemon._replace_engine()
    asyncio.run(go())
    assert made == [] and daemon.exit_code == 0
    assert "not replaced: stopping" in caplog.text
