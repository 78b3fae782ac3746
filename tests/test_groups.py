"""Split batches: assembling when two assemblies meet (one publish, one webhook delivery); whose the parts are."""

import base64
import dataclasses
import json
import os
import threading

import pytest

from spoold.config import EngineSettings, SpoolSettings
from spoold.groups import Groups
from spoold.spool import Spool
from spoold.webhooks import Deliveries, record_end

from .fake_engine import EchoEngine
from .helpers import chat_line, check_exactly_once, write_jsonl
from .test_jobrunner import run_job, setup

SECRETS = {"": "whsec_" + base64.b64encode(b"k" * 32).decode()}
LINES = 6


@pytest.fixture
def ready_group(tmp_path, monkeypatch):
    """A 6-line batch split into parts of 2, every part done, not assembled yet (as a crash after the
    last part's publish leaves it): (the spool's settings, the group's id)."""
    spool, job, engine = setup(tmp_path, [chat_line(i) for i in range(LINES)])
    spool.settings = dataclasses.replace(spool.settings, split_lines=2)
    run_job(spool, job, engine)
    groups = Groups(spool)
    with monkeypatch.context() as m:
        m.setattr(Groups, "assemble", lambda self, group_id: None)
        while claimable := list(groups.claimable(set())):
            run_job(spool, groups.claim(claimable[0][0]), engine)
    assert (groups.group(job.id).done).is_dir() and not (spool.outbox / job.id).exists()
    return spool.settings, job.id


def daemon(settings, host):
    """`host`'s view of the spool, recording webhook deliveries as a daemon with a receiver does."""
    return Spool(dataclasses.replace(settings, host_id=host),
                 before_publish=record_end(Deliveries(settings.root, host), SECRETS))


def deliveries(settings, host):
    return [d.type for d in Deliveries(settings.root, host).pending()]


def test_a_daemon_that_loses_the_assembly_to_another_withdraws_its_webhook(ready_group):
    settings, group_id = ready_group
    first, second = daemon(settings, "first"), daemon(settings, "second")
    records_for_second = second.before_publish

    def second_records_then_first_publishes(job):
        recorded = records_for_second(job)
        assert Groups(first).assemble(group_id) is not None  # the other daemon wins meanwhile
        return recorded
    second.before_publish = second_records_then_first_publishes

    assert Groups(second).assemble(group_id) is None
    published = settings.root / "outbox" / group_id
    assert json.loads((published / "batch.json").read_text())["host"] == "first"
    check_exactly_once(published, {f"req-{i}" for i in range(LINES)}, set())
    assert deliveries(settings, "first") == ["batch.completed"]
    assert deliveries(settings, "second") == [], "the batch's end would be sent twice"


def test_two_assemblies_by_one_daemon_keep_its_one_webhook(ready_group):
    """The last part's runner and the periodic look run in threads of one daemon: their deliveries are the
    same file, so the one that loses must not take it back. (Passes without withdrawing too: it guards the
    withdrawal: without `Spool.assembling` it failed one run in six here.)"""
    settings, group_id = ready_group
    spool = daemon(settings, "h")
    records = spool.before_publish
    outcome = []
    second = threading.Thread(target=lambda: outcome.append(Groups(spool).assemble(group_id)))

    def records_while_another_thread_assembles(job):
        recorded = records(job)
        if not second.is_alive() and not outcome:
            second.start()
        return recorded
    spool.before_publish = records_while_another_thread_assembles

    outcome.append(Groups(spool).assemble(group_id))
    second.join()
    assert [job is None for job in outcome].count(False) == 1, "one of the two publishes"
    assert (settings.root / "outbox" / group_id / "batch.json").exists()
    assert deliveries(settings, "h") == ["batch.completed"]


@pytest.mark.skipif(os.geteuid() != 0, reason="files of other owners need root")
def test_the_parts_of_a_persons_split_batch_share_the_engine_as_that_person(tmp_path):
    spool = Spool(SpoolSettings(root=tmp_path / "spool", host_id="h", split_lines=2))
    spool.ensure_dirs()
    write_jsonl(spool.inbox / "big.jsonl", [chat_line(i) for i in range(LINES)])
    os.chown(spool.inbox / "big.jsonl", 1001, 1001)
    job = spool.claim_drop("big.jsonl")
    run_job(spool, job, EchoEngine(EngineSettings(model="fake-model")))  # split into parts, none run yet
    parts = list(Groups(spool).claimable(set()))
    assert parts and parts[0][1].share_tenant() == "uid:1001"  # whose turn among the waiting work
    claimed = Groups(spool).claim(parts[0][0])
    assert claimed.read_record()[0].share_tenant() == "uid:1001"  # whose share of the window it runs on
