"""Several daemons on one spool: claims race, a frozen host's jobs are taken over."""

from __future__ import annotations

import json
import os
import signal
import time

from ..helpers import wait_for
from .harness import Verdict, _reap, check_job, idle, make_drop, save_result, start, tail, verdict, write_config


def test_three_daemons_race_over_500_drops(tmp_path):
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    staging = tmp_path / "staging"
    staging.mkdir()
    procs = [start(write_config(tmp_path / f"h{i}.toml", root, host=f"h{i}"), tmp_path / f"h{i}.log")
             for i in range(3)]
    try:
        wait_for(lambda: all((root / "processing" / f"h{i}" / "heartbeat.json").exists() for i in range(3)),
                 30, "three daemons up")
        drops = []
        for n in range(500):  # renamed in one by one, as rsync or `spoold submit` would
            drops.append(make_drop(staging, f"race{n:03d}.jsonl", 2, bad=n % 10 == 0))
            os.rename(staging / drops[-1].name, root / "inbox" / drops[-1].name)
        wait_for(lambda: idle(root, drops), 240, "500 drops done", interval=0.2)
        alive = [p.poll() is None for p in procs]
    finally:
        for p in procs:
            _reap(p)
    assert all(alive), [tail(tmp_path / f"h{i}.log") for i in range(3)]
    v = verdict(root, drops)
    hosts = {json.loads((j / "batch.json").read_text())["host"] for j in (root / "outbox").iterdir()}
    save_result("3 daemons racing over 500 drops on one spool", 500, v)
    assert v.ok, v.problems[:5]
    assert len(hosts) >= 2, f"one daemon did all the work ({hosts}): no race was tested"


def test_a_frozen_hosts_job_is_taken_over_and_it_writes_nothing_more(tmp_path):
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    spool_keys = "claim_timeout = 2"
    slow = start(write_config(tmp_path / "a.toml", root, host="frozen", inflight=2, delay=0.01,
                              spool=spool_keys), tmp_path / "a.log")
    live = None
    try:
        drops = [make_drop(root / "inbox", "long.jsonl", 1500)]
        output = wait_for(lambda: list(root.glob("processing/frozen/*/output.jsonl")), 20, "the frozen host's job")
        wait_for(lambda: output[0].read_bytes().count(b"\n") > 50, 20, "some results")
        live = start(write_config(tmp_path / "b.toml", root, host="live", inflight=8, spool=spool_keys),
                     tmp_path / "b.log")
        os.killpg(slow.pid, signal.SIGSTOP)
        (job,) = wait_for(lambda: list((root / "outbox").iterdir()), 60, "the job finished by the live host")
        sizes = {f.name: f.stat().st_size for f in job.iterdir()}
        os.killpg(slow.pid, signal.SIGCONT)
        wait_for(lambda: "no longer this host's" in tail(tmp_path / "a.log", 20000), 20,
                 "the woken host to notice")
        time.sleep(1)
        assert {f.name: f.stat().st_size for f in job.iterdir()} == sizes, "the woken host wrote to the job"
        assert slow.poll() is None and live.poll() is None
    finally:
        for p in (slow, live):
            if p is not None:
                os.killpg(p.pid, signal.SIGCONT)
                _reap(p)
    assert "took over job" in tail(tmp_path / "b.log", 20000)
    v = verdict(root, drops)
    save_result("A host frozen past claim_timeout: job taken over, the woken host writes nothing", 1, v)
    assert v.ok, v.problems[:5]


def test_another_hosts_batch_json_is_data_not_orders(tmp_path):
    """Job records left in this host's directory (a takeover, an older spoold) that name an
    unconfigured model or hold wrong types fail as jobs, or start again; the daemon stays up."""
    root = tmp_path / "spool"
    host = root / "processing" / "testhost"
    records = {
        "evil": {"status": "in_progress", "models": {"/etc/evil-model": 1}, "created_at": 1,
                 "request_counts": {"total": 1, "completed": 0, "failed": 0}, "errors": []},
        "typed": {"status": "in_progress", "models": "fake-model", "created_at": "yesterday",
                  "models_done": 7, "request_counts": [], "errors": {}},
        "list": ["not", "an", "object"],
    }
    made = {}
    for name, record in records.items():
        job = host / f"{name}-20260101T000000-00"
        job.mkdir(parents=True)
        made[name] = make_drop(job, "input.jsonl", 3, bad=False)
        (job / "batch.json").write_text(json.dumps(record))
    proc = start(write_config(tmp_path / "c.toml", root), tmp_path / "log")
    try:
        wait_for(lambda: len(list((root / "failed").glob("*"))) + len(list((root / "outbox").glob("*"))) == 3,
                 30, "every job failed or finished")
        assert proc.poll() is None, tail(tmp_path / "log")
    finally:
        _reap(proc)
    log = tail(tmp_path / "log", 50_000)
    assert "loading model /etc/evil-model" not in log and "loading model fake-model" in log
    evil = json.loads((root / "failed" / "evil-20260101T000000-00" / "batch.json").read_text())
    assert evil["errors"][-1]["code"] == "bad_record" and "never loaded" in evil["errors"][-1]["message"]
    typed = json.loads((root / "failed" / "typed-20260101T000000-00" / "batch.json").read_text())
    assert typed["errors"][-1]["code"] == "bad_record"
    # Not an object at all: the job starts again from validation and completes, exactly once.
    v = Verdict()
    check_job(root / "outbox" / "list-20260101T000000-00", made["list"], v)
    save_result("Job records from elsewhere: unconfigured model, wrong types, not an object", len(records), v,
                "failed as bad_record, or run again; nothing loaded")
    assert v.ok, v.problems[:5]
