"""The worklist's claims: a drop that meets a bug in spoold is set aside, the others still run."""

import asyncio

from spoold.config import Config, EngineSettings, SpoolSettings
from spoold.daemon import Daemon

from .fake_engine import EchoEngine


def test_a_drop_whose_claim_meets_a_bug_is_set_aside_and_the_next_is_claimed(tmp_path, monkeypatch, caplog):
    config = Config(spool=SpoolSettings(root=tmp_path / "spool", host_id="h"),
                    engine=EngineSettings(adapter="tests.fake_engine:EchoEngine", model="fake-model"))
    daemon = Daemon(config, EchoEngine(config.engine))
    daemon.spool.ensure_dirs()
    for name in ("bad.jsonl", "good.jsonl"):
        (daemon.spool.inbox / name).write_text("{}\n")
        (daemon.spool.inbox / (name + ".ready")).touch()
    claim_drop = daemon.spool.claim_drop

    def buggy(name):
        if name == "bad.jsonl":
            raise KeyError("a bug this file shows")  # before this change: the daemon exited, and again on restart
        return claim_drop(name)
    monkeypatch.setattr(daemon.spool, "claim_drop", buggy)

    async def rounds():
        chosen, _ = await daemon.work.next_round("fake-model", set(), 10)
        claims = [await daemon.work.claim(name) for name in chosen]
        again, _ = await daemon.work.next_round("fake-model", set(), 10)
        return chosen, claims, again
    chosen, claims, again = asyncio.run(rounds())
    assert chosen == ["bad.jsonl", "good.jsonl"]
    assert claims[0] is None and claims[1] is not None
    assert "cannot claim inbox/bad.jsonl" in caplog.text and "KeyError" in caplog.text
    assert (daemon.spool.inbox / "bad.jsonl").exists()  # untouched, for the next start
    assert "bad.jsonl" not in [getattr(item, "job", item) for item in again]
