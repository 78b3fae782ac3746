"""`spoold status` as whoever runs it: what they may read is shown, what they may not is named."""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from spoold.config import SpoolSettings
from spoold.heartbeat import host_beats
from spoold.spool import DropRefused, JobDir, Spool
from spoold.status import render_status, spool_status

from .helpers import as_nobody, chat_line, write_jsonl


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_a_user_who_may_not_look_into_processing_sees_the_rest_and_is_told():
    base = Path(tempfile.mkdtemp(prefix="spoold-status-"))
    try:
        base.chmod(0o755)
        spool = Spool(SpoolSettings(root=base, host_id="h"))
        spool.ensure_dirs()
        for d, mode in ((base / "inbox", 0o755), (spool.processing, 0o750), (spool.outbox, 0o755),
                        (spool.failed, 0o755)):
            d.chmod(mode)  # as packaged: processing/ is the daemon's; the others this user may list
        write_jsonl(spool.inbox / "waiting.jsonl", [chat_line(0)])
        write_jsonl(spool.inbox / "running.jsonl", [chat_line(0)])
        spool.claim_drop("running.jsonl")
        os.symlink("/etc/hostname", spool.inbox / "link.jsonl")
        with pytest.raises(DropRefused):
            spool.claim_drop("link.jsonl")  # a failed job: its directory is the daemon's alone

        beat(spool, "h", 0, state="idle")  # a daemon runs: it must never be said that none does

        def status():
            shown = spool_status(spool)
            return {"status": shown, "text": render_status(shown)}
        # processing/ closed; then open, but this host's directory closed (a spool whose [spool] group is
        # unset: processing/ has the submitters' group as packaged, its host directories the daemon's)
        for processing_mode in (0o750, 0o755):
            spool.processing.chmod(processing_mode)
            spool.host_dir.chmod(0o750)
            result = as_nobody(status)
            assert "error" not in result, result
            shown = result["ok"]["status"]
            assert [q["name"] for q in shown["queued"]] == ["waiting.jsonl"]
            assert shown["processing"] == [] and shown["unreadable"] == ["processing"]
            text = result["ok"]["text"]
            assert "not readable by this user: processing" in text
            assert "daemons: not readable by this user" in text and "no daemon is running" not in text, text
            (failed,) = shown["failed"]
            assert f"{failed['id']}: details not readable by this user" in text
            # every reader of the beats (submit's and watch's warning, models, doctor) is told it may not look,
            # rather than given no beats, which would say that no daemon runs
            said = as_nobody(lambda: host_beats(spool.processing, 1.0))
            assert said.get("error", "").startswith("PermissionError"), said
    finally:
        shutil.rmtree(base, ignore_errors=True)


def beat(spool: Spool, host: str, age: float, **doc) -> None:
    path = spool.processing / host / "heartbeat.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "ts": time.time() - age, **doc}))


def test_status_says_which_daemons_run_and_that_queued_drops_wait_when_none_does(tmp_path):
    spool = Spool(SpoolSettings(root=tmp_path, host_id="gpu1"))
    spool.ensure_dirs()
    write_jsonl(spool.inbox / "waiting.jsonl", [chat_line(0)])
    beat(spool, "gpu1", 1, pid=4242, state="working", model="org/m",
         gpus=[{"index": 0, "utilization_pct": 97}])
    beat(spool, "gpu2", 7200, pid=77, state="working", model="org/m")
    beat(spool, "gpu3", 3 * 86400, pid=78, state="stopping")
    beat(spool, "gpu5", 11, pid=79, state="stopping")  # two beats missed while stopping: it has exited
    (spool.processing / "gpu4").mkdir()
    (spool.processing / "gpu4" / "heartbeat.json").write_text('["not", "a", "beat"]')
    os.utime(spool.processing / "gpu4" / "heartbeat.json", (time.time() - 60, time.time() - 60))

    shown = spool_status(spool, beat_seconds=5)
    text = render_status(shown)
    assert [(d["host"], d["beating"]) for d in shown["daemons"]] == [
        ("gpu1", True), ("gpu2", False), ("gpu3", False), ("gpu4", False), ("gpu5", False)]
    assert "daemons (1 running):" in text
    assert "  gpu1 (pid 4242): working, org/m, GPU0 97%, heartbeat 1s ago" in text
    assert "  gpu2: not running, or stuck: its last heartbeat, 2.0h ago, said working" in text
    assert "  gpu3: stopped 3 days ago" in text and "  gpu5: stopped 11s ago" in text
    assert "  gpu4: not running, or stuck: its last heartbeat, 60s ago, said ?" in text
    assert "no daemon is running" not in text

    beat(spool, "gpu1", 600, pid=4242, state="working")  # silent for ten minutes
    text = render_status(spool_status(spool, beat_seconds=5))
    assert "daemons (0 running):" in text and "  gpu1: not running, or stuck: its last heartbeat, 10m ago" in text
    assert ("no daemon is running on this spool, so the queued drops wait: start one with `systemctl start "
            "spoold`") in text


def test_a_daemon_that_never_ran_and_a_hostile_beat_are_shown_plainly(tmp_path):
    spool = Spool(SpoolSettings(root=tmp_path, host_id="gpu1"))
    spool.ensure_dirs()
    text = render_status(spool_status(spool))
    assert "daemons (0 running):\n  no daemon is running on this spool: start one" in text

    beat(spool, "gpu1", float("nan"), pid="1; rm -rf /", state="working\x1b[2J", model=["x"], gpus="all")
    (daemon,) = spool_status(spool)["daemons"]
    assert daemon["pid"] is None and daemon["model"] is None and daemon["gpus"] == []
    assert "gpu1: working\\x1b[2J, heartbeat" in render_status(spool_status(spool))  # a fresh file, no escape


@pytest.mark.skipif(os.geteuid() != 0, reason="files of other owners need root")
def test_each_running_job_says_whose_it_is_as_the_engine_shares_count_it(tmp_path):
    spool = Spool(SpoolSettings(root=tmp_path, host_id="gpu1"))
    spool.ensure_dirs()
    nobody = 3_999_999  # a uid this host has no name for
    for name, uid in (("mine.jsonl", 0), ("theirs.jsonl", nobody)):
        write_jsonl(spool.inbox / name, [chat_line(0)])
        os.chown(spool.inbox / name, uid, uid)
        spool.claim_drop(name)
    api_job = spool.new_job_dir(spool.host_dir, "batch_abc.jsonl")
    (api_job.path / "batch.json").write_text(json.dumps({"id": api_job.id, "tenant": "alice\x1b[2J"}))
    old_job = spool.new_job_dir(spool.host_dir, "old.jsonl")  # claimed before owners were kept
    (old_job.path / "batch.json").write_text(json.dumps({"id": old_job.id}))
    shown = {p["input_file"] or p["id"]: p["owner"] for p in spool_status(spool)["processing"]}
    assert shown == {"mine.jsonl": "root", "theirs.jsonl": f"uid {nobody}", api_job.id: "key alice\\x1b[2J",
                     old_job.id: None}
    text = render_status(spool_status(spool))
    assert f"by uid {nobody}" in text and "by root" in text and text.count("  by ") == 3


def test_a_job_that_moves_to_the_outbox_while_status_reads_it_is_shown_there_not_running_at_zero(
        tmp_path, monkeypatch):
    spool = Spool(SpoolSettings(root=tmp_path, host_id="gpu1"))
    spool.ensure_dirs()
    write_jsonl(spool.inbox / "done.jsonl", [chat_line(i) for i in range(40)])
    job = spool.claim_drop("done.jsonl")
    record = json.loads(job.batch.read_text())
    job.batch.write_text(json.dumps({**record, "status": "completed", "completed_at": int(time.time())}))
    job.heartbeat.write_text(json.dumps({"ts": time.time(), "job": {"state": "in_progress", "done": 40,
                                                                     "total": 40}}))
    read_batch = JobDir.read_batch

    def then_published(self):  # the daemon's rename to outbox/ lands between the record's and the beat's read
        batch = read_batch(self)
        if self.path.parent.parent == spool.processing:
            self.path.rename(spool.outbox / self.id)
        return batch
    monkeypatch.setattr(JobDir, "read_batch", then_published)
    shown = spool_status(spool)
    assert [(j["id"], j["status"]) for j in shown["finished"]] == [(job.id, "completed")]
    assert shown["processing"] == []  # before: shown running as well, with 0 of its 40 lines done
