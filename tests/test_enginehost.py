"""The engine host's restart rule: a fresh engine while restarts are rare, exit for systemd when not."""

import asyncio

from spoold.backoff import RetryPolicy
from spoold.config import EngineSettings
from spoold.engine import UnavailableEngine
from spoold.enginehost import MAX_RESTARTS, EngineHost
from spoold.gpu import GpuReader

from .fake_engine import EchoEngine


def make_host(**args) -> EngineHost:
    settings = EngineSettings(adapter="tests.fake_engine:EchoEngine", model="m", args=args)
    return EngineHost(EchoEngine(settings), lambda model: EchoEngine(settings), lambda topic, payload: None,
                      GpuReader())


def restart(host: EngineHost) -> bool:
    return asyncio.run(host.restart("the engine died", lambda: host.engine.start()))


def test_a_dead_engine_is_closed_and_a_fresh_one_started():
    host = make_host()
    dead = host.engine
    assert restart(host) is True
    assert dead.closed and host.engine is not dead and host.engine.started


def test_an_engine_that_keeps_dying_gives_up_so_systemd_restarts_the_process(caplog):
    host = make_host()
    assert [restart(host) for _ in range(MAX_RESTARTS + 1)] == [True] * MAX_RESTARTS + [False]
    assert "exiting so the service restarts" in caplog.text


def test_a_fresh_engine_that_fails_to_load_is_not_used():
    host = make_host(fail_load="m")
    assert restart(host) is False
    assert not host.engine.started  # never answers a line with errors


def test_without_a_way_to_make_engines_there_is_no_restart():
    host = make_host()
    host.make_engine = None
    assert restart(host) is False


def load_other(host: EngineHost, model: str) -> None:
    asyncio.run(host.load_other(model, lambda: host.engine.start()))


def test_a_model_that_fails_to_load_is_tried_max_attempts_times_then_stands_in_with_503s():
    settings = EngineSettings(adapter="tests.fake_engine:EchoEngine", model="m", args={"fail_load": "broken"})
    made = []
    host = EngineHost(EchoEngine(settings), lambda model: made.append(model) or EchoEngine(
        EngineSettings(model=model, args=settings.args)), lambda topic, payload: None, GpuReader(),
        retry=RetryPolicy(max_attempts=3, first_backoff_seconds=0.01))
    load_other(host, "broken")
    assert made == ["broken"] * 3
    assert isinstance(host.engine, UnavailableEngine) and "3 tries" in host.engine.load_error


def test_a_model_whose_load_fails_once_is_loaded_on_the_next_try():
    engines = iter([EchoEngine(EngineSettings(model="flaky", args={"fail_load": "flaky"})),
                    EchoEngine(EngineSettings(model="flaky"))])
    host = EngineHost(EchoEngine(EngineSettings(model="m")), lambda model: next(engines),
                      lambda topic, payload: None, GpuReader(), retry=RetryPolicy(3, first_backoff_seconds=0.01))
    load_other(host, "flaky")
    assert isinstance(host.engine, EchoEngine) and host.engine.started


def test_a_models_turn_counts_from_its_load_and_a_restart_of_it_keeps_it(monkeypatch):
    """`loaded_at` is when the scheduler's bound starts for other models' jobs (scheduler.overdue): a
    swap starts it anew, a fresh engine for the same model does not lengthen the model's turn."""
    import dataclasses
    import time

    settings = EngineSettings(adapter="tests.fake_engine:EchoEngine", model="a")
    host = EngineHost(EchoEngine(settings), lambda model: EchoEngine(dataclasses.replace(settings, model=model)),
                      lambda topic, payload: None, GpuReader())
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    asyncio.run(host.load())
    clock[0] = 2000.0
    assert asyncio.run(host.restart("the engine died", host.load)) is True
    assert (host.model, host.loaded_at) == ("a", 1000.0)
    clock[0] = 3000.0
    asyncio.run(host.swap("b", host.load))
    assert (host.model, host.loaded_at) == ("b", 3000.0)
