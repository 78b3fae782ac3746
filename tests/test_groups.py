"""Split batches: assembling when two assemblies meet (one publish, one webhook delivery); whose the parts are;
its owner's cancel."""

import asyncio
import base64
import dataclasses
import json
import os
import threading

import pytest

from spoold.config import EngineSettings, LimitsSettings, SpoolSettings
from spoold.groups import Groups
from spoold.jobrunner import JobRunner
from spoold.lifecycle import Outcome
from spoold.spool import Spool
from spoold.validation import ModelResolver
from spoold.webhooks import Deliveries, record_end
from spoold.window import FairWindow

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


@pytest.mark.skipif(os.geteuid() != 0, reason="files of other owners need root")
def test_a_split_batchs_owner_cancels_it_whole_by_asking_in_the_inbox_and_nobody_else_can(tmp_path):
    spool, job, engine = setup(tmp_path, [chat_line(i) for i in range(2000)], delay=0.01)
    spool.settings = dataclasses.replace(spool.settings, split_lines=500)
    os.chown(job.input, 1001, 1001)  # alice's drop...
    record = job.read_record()[0]
    record.submitter_uid = 1001  # ...as its claim records it
    spool.save(job, record)
    run_job(spool, job, engine)  # split into four parts, none run yet
    groups, request = Groups(spool), spool.owner_cancel_request(job.id)
    first = groups.claim(next(groups.claimable(set()))[0])

    def ask_as(uid):  # made whole, then renamed in, as `spoold cancel GROUP` by a submitter leaves it
        made = spool.inbox / ".request.tmp"
        made.write_text("")
        os.chown(made, uid, uid)
        os.rename(made, request)

    async def go():
        runner = JobRunner(spool, first, engine, ModelResolver({}, "fake-model"), LimitsSettings(),
                           FairWindow(4).join(first.id), asyncio.Event())
        task = asyncio.create_task(runner.run())
        while runner.refresh().done < 10:
            await asyncio.sleep(0.01)
        ask_as(1002)  # bob's request for alice's batch: removed, and her part runs on
        while request.exists() and not task.done():
            await asyncio.sleep(0.01)
        assert not request.exists() and not task.done() and not first.cancel_request.exists()
        ask_as(1001)  # alice's, taken by the runner of a part: the whole batch is cancelled
        return await task
    assert asyncio.run(go()) == Outcome.CANCELLED
    assert not request.exists() and groups.group(job.id).cancel_request.exists()
    while claimable := list(groups.claimable(set())):  # the parts left run cancelled, and it is assembled
        run_job(spool, groups.claim(claimable[0][0]), engine)
    assembled = json.loads((spool.outbox / job.id / "batch.json").read_text())
    assert assembled["status"] == "cancelled" and assembled["request_counts"]["completed"] < 500
