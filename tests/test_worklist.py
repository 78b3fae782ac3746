"""The worklist: what is claimed next (tenants take turns, each person's drops one tenant, priority first),
and a drop that meets a bug in spoold is set aside while the others still run."""

import asyncio
import json
import os

import pytest

from spoold.config import Config, EngineSettings, SpoolSettings
from spoold.daemon import Daemon
from spoold.worklist import SCHEDULE_WINDOW, Swap

from .fake_engine import EchoEngine
from .helpers import api_drop, chat_line


def make_daemon(tmp_path):
    config = Config(spool=SpoolSettings(root=tmp_path / "spool", host_id="h"),
                    engine=EngineSettings(adapter="tests.fake_engine:EchoEngine", model="fake-model"))
    daemon = Daemon(config, EchoEngine(config.engine))
    daemon.spool.ensure_dirs()
    return daemon


def mark_ready(daemon, name, metadata=""):
    """Complete at once (no inotify in these tests), with the metadata `spoold submit --priority` writes."""
    (daemon.spool.inbox / (name + ".ready")).write_text(metadata)
    return name


def choose(daemon, running, free):
    return asyncio.run(daemon.work.next_round("fake-model", running, free))[0]


def test_another_tenants_batch_is_claimed_next_however_many_batches_the_first_has_queued(tmp_path):
    daemon = make_daemon(tmp_path)
    root = daemon.spool.settings.root
    alices = [mark_ready(daemon, api_drop(root, "alice", [chat_line(0)])) for _ in range(SCHEDULE_WINDOW + 36)]
    bobs = mark_ready(daemon, api_drop(root, "bob", [chat_line(0)]))
    # By age alone, bob's one batch waited for all 100 of alice's to be claimed.
    chosen = choose(daemon, {"job1": "alice", "job2": "alice"}, 2)
    assert chosen[0] == bobs and chosen[1] in alices


def test_tenants_with_nothing_running_take_turns_claim_by_claim(tmp_path):
    daemon = make_daemon(tmp_path)
    root = daemon.spool.settings.root
    alices = [mark_ready(daemon, api_drop(root, "alice", [chat_line(0)])) for _ in range(3)]
    bobs = [mark_ready(daemon, api_drop(root, "bob", [chat_line(0)])) for _ in range(2)]

    async def one_at_a_time():  # as with max_active_jobs = 1: nothing else is running at each claim
        claimed = []
        for _ in range(5):
            (name,), _ = await daemon.work.next_round("fake-model", {}, 1)
            daemon.spool.move_to_outbox((await daemon.work.claim(name)).job)  # done before the next claim
            claimed.append("alice" if name in alices else "bob" if name in bobs else name)
        return claimed
    assert asyncio.run(one_at_a_time()) == ["alice", "bob", "alice", "bob", "alice"]


def test_a_priority_drop_is_claimed_before_older_drops_beyond_the_first_window(tmp_path):
    daemon = make_daemon(tmp_path)
    for i in range(SCHEDULE_WINDOW + 6):
        (daemon.spool.inbox / f"plain{i}.jsonl").write_text(json.dumps(chat_line(i)) + "\n")
        mark_ready(daemon, f"plain{i}.jsonl")
    (daemon.spool.inbox / "urgent.jsonl").write_text(json.dumps(chat_line(0)) + "\n")
    mark_ready(daemon, "urgent.jsonl", json.dumps({"priority": "5"}))
    assert choose(daemon, {}, 1) == ["urgent.jsonl"]


def test_a_drop_whose_claim_meets_a_bug_is_set_aside_and_the_next_is_claimed(tmp_path, monkeypatch, caplog):
    daemon = make_daemon(tmp_path)
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
        chosen, _ = await daemon.work.next_round("fake-model", {}, 10)
        claims = [await daemon.work.claim(name) for name in chosen]
        again, _ = await daemon.work.next_round("fake-model", {}, 10)
        return chosen, claims, again
    chosen, claims, again = asyncio.run(rounds())
    assert chosen == ["bad.jsonl", "good.jsonl"]
    assert claims[0] is None and claims[1] is not None
    assert "cannot claim inbox/bad.jsonl" in caplog.text and "KeyError" in caplog.text
    assert (daemon.spool.inbox / "bad.jsonl").exists()  # untouched, for the next start
    assert "bad.jsonl" not in [getattr(item, "job", item) for item in again]


@pytest.mark.skipif(os.geteuid() != 0, reason="files of other owners need root")
def test_one_persons_hundred_drops_do_not_hold_back_another_persons_one(tmp_path):
    daemon = make_daemon(tmp_path)

    def drop_as(uid, name):
        (daemon.spool.inbox / name).write_text(json.dumps(chat_line(0)) + "\n")
        os.chown(daemon.spool.inbox / name, uid, uid)  # as `spoold submit` run by that user leaves it
        return mark_ready(daemon, name)
    alices = [drop_as(1001, f"alice{i}.jsonl") for i in range(SCHEDULE_WINDOW + 36)]
    bobs = drop_as(1002, "bob.jsonl")
    # Filesystem drops were one tenant: bob's one drop waited for all 100 of alice's, by age.
    chosen = choose(daemon, {"job1": "uid:1001", "job2": "uid:1001"}, 2)
    assert chosen[0] == bobs and chosen[1] in alices

    record, _ = asyncio.run(daemon.work.claim(bobs)).job.read_record()
    assert (record.submitter_uid, record.share_tenant(), record.tenant) == (1002, "uid:1002", "")


def test_a_drop_for_another_model_waits_from_its_arrival_not_from_its_claim(tmp_path, monkeypatch):
    """A drop for another model is claimed on the loaded one to be validated; the wait `max_wait_seconds`
    bounds began when it came, so its swap is due then, not another `max_wait_seconds` after the claim."""
    import time

    from spoold.config import parse_config

    config = parse_config({"spool": {"root": str(tmp_path / "spool"), "host_id": "h"},
                           "engine": {"adapter": "tests.fake_engine:EchoEngine", "model": "a"},
                           "models": {"a": "org/a", "b": "org/b", "max_wait_seconds": 600}})
    daemon = Daemon(config, EchoEngine(config.engine))
    daemon.spool.ensure_dirs()
    daemon.inbox.poll_seconds = 0  # each look rescans the inbox
    (daemon.spool.inbox / "for_b.jsonl").write_text(json.dumps(chat_line(0, model="b")) + "\n")
    for_b = mark_ready(daemon, "for_b.jsonl")

    async def claimed_when_its_turn_came():
        (name,), swap_to = await daemon.work.next_round("org/a", {}, 1)  # first seen now; nothing else waits
        assert (name, swap_to) == (for_b, None)  # claimed, to be validated on the loaded model
        now = time.time() + 700
        monkeypatch.setattr(time, "time", lambda: now)  # its claim came 700 s after it did
        claimed = await daemon.work.claim(name)
        record = claimed.job.read_record()[0]
        record.validated(1, "/v1/chat/completions", "org/b", {"org/b": 1}, os.stat(claimed.job.input))
        daemon.spool.save(claimed.job, record)  # validated on org/a, which none of its lines needs
        (daemon.spool.inbox / "for_a.jsonl").write_text(json.dumps(chat_line(0, model="a")) + "\n")
        mark_ready(daemon, "for_a.jsonl")  # later work for the loaded model
        return await daemon.work.next_round("org/a", {}, 1)
    chosen, swap_to = asyncio.run(claimed_when_its_turn_came())
    assert (chosen, swap_to) == ([], Swap("org/b", overdue=True))  # before: the later drop for org/a
