"""Failing disks and a shifting spool: the daemon pauses, says why, and finishes correctly.

Faults are injected by tests/torture/oswrap.py into the daemon's own `os`
calls (EIO, ENOSPC, ESTALE), the way an LD_PRELOAD shim would into libc.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
import shutil
import threading
import time
from pathlib import Path

from spoold.backoff import RetryPolicy
from spoold.jobrunner import SUSPECT_WINDOW

from ..helpers import Subscriber, read_jsonl, wait_for
from .harness import (_reap, announced, check_job, job_of, durable_lines, make_drop, read_record, rebuild, run_until_idle,
                      save_result, snapshot, start, tail, verdict, write_config)


def faulty_run(tmp_path: Path, faults: list[dict], lines: int = 300, **config) -> tuple:
    """Run one drop through a daemon whose os calls fail as planned; record its steps."""
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    drops = [make_drop(root / "inbox", "work.jsonl", lines)]
    initial = snapshot(root)
    cfg = write_config(tmp_path / "c.toml", root, **config)
    record = tmp_path / "record.jsonl"
    plan = {"root": str(root), "record": str(record), "faults": faults}
    run_until_idle(cfg, root, drops, tmp_path / "log", plan=plan, timeout=90)
    return root, drops, initial, read_record(record), (tmp_path / "log").read_text()


def never_counted_unpersisted(initial: dict, record: list[dict], work: Path) -> list[str]:
    """At each announcement, the lines announced were durable (rebuilt from fsyncs alone)."""
    problems = []
    for i, entry in enumerate(record):
        if entry["op"] != "announce" or entry.get("done") is None:
            continue
        root = work / f"at{i}"
        rebuild(initial, record, i + 1, root, random.Random(0))
        done, _ = announced(record, i + 1)
        have = durable_lines(root, entry["job"]) or 0
        if have < done[entry["job"]]:
            problems.append(f"announced {done[entry['job']]} lines of {entry['job']}, {have} durable")
        shutil.rmtree(root)
    return problems


def test_fsync_eio_on_results_pauses_and_never_counts_the_lost_lines(tmp_path):
    faults = [{"op": "fsync", "match": "output.jsonl", "errno": "EIO", "skip": 3, "count": 2}]
    root, drops, initial, record, log = faulty_run(tmp_path, faults, inflight=4, delay=0.002)
    v = verdict(root, drops)
    v.problems += never_counted_unpersisted(initial, record, tmp_path / "cuts")
    save_result("fsync fails with EIO on output.jsonl", 1, v)
    assert v.ok, v.problems[:5]
    assert "Input/output error" in log and "work paused, retrying" in log


def test_a_full_disk_pauses_work_and_it_resumes_when_space_returns(tmp_path):
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    drops = [make_drop(root / "inbox", "full.jsonl", 2000)]
    cfg = write_config(tmp_path / "c.toml", root, inflight=4, delay=0.002)
    sub = Subscriber(f"ipc://{tmp_path}/c.sock")
    # Every write under the spool fails for 7 s once 30 have gone through: mid-job.
    faults = [{"op": "write", "match": str(root), "errno": "ENOSPC", "skip": 30, "seconds": 7}]
    try:
        run_until_idle(cfg, root, drops, tmp_path / "log", plan={"root": str(root), "faults": faults}, timeout=90)
        paused = sub.of("spoold.daemon.heartbeat", state="paused")
    finally:
        sub.close()
    log = (tmp_path / "log").read_text()
    v = verdict(root, drops)
    save_result("Disk full (ENOSPC on every write for 7 s, mid-job)", 1, v)
    assert v.ok, v.problems[:5]
    assert "No space left on device" in log and "work paused" in log
    assert paused, "no heartbeat event said the daemon was paused"


def test_transient_errors_on_input_outbox_and_rename(tmp_path):
    """ESTALE opening a claimed input, EIO on the rename into outbox/ and on close: retried, done once."""
    faults = [{"op": "open", "match": "input.jsonl", "errno": "ESTALE", "count": 2},
              {"op": "rename", "match": "/outbox/", "errno": "EIO", "count": 1},
              {"op": "close", "match": "output.jsonl", "errno": "EIO", "count": 1}]
    root, drops, _, _, log = faulty_run(tmp_path, faults, lines=50)
    v = verdict(root, drops)
    save_result("ESTALE on a claimed input, EIO on the outbox rename and on close", 1, v)
    assert v.ok, v.problems[:5]
    assert "Stale file handle" in log and log.count("work paused") >= 2 and "error on close" in log


def test_a_removed_outbox_and_inbox_come_back(tmp_path):
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    drops = [make_drop(root / "inbox", "first.jsonl", 400)]
    cfg = write_config(tmp_path / "c.toml", root, inflight=2, delay=0.005)
    proc = start(cfg, tmp_path / "log")
    try:
        wait_for(lambda: list(root.glob("processing/testhost/*/output.jsonl")), 20, "the job running")
        shutil.rmtree(root / "outbox")  # an admin "cleaning up"
        wait_for(lambda: (root / "outbox").is_dir() and list((root / "outbox").iterdir()), 60,
                 "the job published into a re-made outbox")
        shutil.rmtree(root / "inbox")
        time.sleep(1)
        assert proc.poll() is None, tail(tmp_path / "log")
        (root / "inbox").mkdir()
        drops.append(make_drop(root / "inbox", "second.jsonl", 20))
        wait_for(lambda: len(list((root / "outbox").iterdir())) == 2, 30, "the drop in the re-made inbox done")
    finally:
        _reap(proc)
    v = verdict(root, drops)
    save_result("Outbox and inbox removed while running", 1, v)
    assert v.ok, v.problems[:5]


def test_drops_that_vanish_between_detection_and_claim(tmp_path):
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    cfg = write_config(tmp_path / "c.toml", root)
    proc = start(cfg, tmp_path / "log")
    stop = threading.Event()
    made: dict[str, object] = {}

    def ghosts():
        n = 0
        while not stop.is_set():
            ghost = made[f"ghost{n}.jsonl"] = make_drop(root / "inbox", f"ghost{n}.jsonl", 2)
            (root / "inbox" / f"{ghost.name}.ready").touch()
            time.sleep(0.003 * (n % 7))
            for p in (root / "inbox" / ghost.name, root / "inbox" / f"{ghost.name}.ready"):
                p.unlink(missing_ok=True)
            n += 1

    thread = threading.Thread(target=ghosts)
    thread.start()
    try:
        drops = [make_drop(root / "inbox", f"real{i}.jsonl", 30) for i in range(5)]
        wait_for(lambda: all(job_of(root, "outbox", d.name) for d in drops), 60, "the real drops done")
    finally:
        stop.set()
        thread.join()
        alive = proc.poll() is None
        _reap(proc)
    assert alive, tail(tmp_path / "log")
    v = verdict(root, drops)
    v.problems = [p for p in v.problems if "ghost" not in p]
    ghosts_claimed = [p for p in (root / "outbox").iterdir() if p.name.startswith("ghost")]
    for job in ghosts_claimed:  # a ghost claimed before it vanished is a whole job, run exactly once
        check_job(job, made[json.loads((job / "batch.json").read_text())["input_file"]], v)
    assert not list((root / "failed").glob("ghost*")), "a vanished drop became a failed job"
    save_result("Drops that vanish between detection and claim", 1, v)
    assert v.ok, v.problems[:5]


def test_a_dead_engine_is_replaced_in_process_and_the_job_completes(tmp_path):
    # Each engine dies on another line: no line is in flight at both deaths.
    root, drops, _, _, log = faulty_run(tmp_path, [], lines=300, inflight=8, delay=0.002,
                                        args='fail_on = ["work-120", "work-200"]')
    v = verdict(root, drops)
    save_result("Engine dies mid-job (twice in a row)", 2, v)
    assert v.ok, v.problems[:5]
    assert log.count("starting a fresh engine") == 2 and log.count("model loaded") == 3


def test_a_hung_engine_is_replaced_in_process_and_the_job_completes(tmp_path):
    root, drops, _, _, log = faulty_run(tmp_path, [], lines=300, inflight=8, delay=0.002,
                                        args='hang_on = "work-40"\nfaulty_engines = 1',
                                        extra="[watchdog]\nstall_seconds = 0.5\nrestart_seconds = 1")
    v = verdict(root, drops)
    save_result("Engine hangs mid-job (no result for restart_seconds)", 1, v)
    assert v.ok, v.problems[:5]
    assert "the engine looks stuck" in log and log.count("starting a fresh engine") == 1


def test_an_engine_that_dies_while_idle_is_replaced_before_the_next_drop(tmp_path):
    """vLLM's client knows its core process died with no request in flight: the idle daemon replaces the
    engine then, instead of showing itself idle on a dead engine until a drop meets it."""
    root, log, died = tmp_path / "spool", tmp_path / "log", tmp_path / "engine-died"
    proc = start(write_config(tmp_path / "c.toml", root, args=f'dies_when = "{died}"\nfaulty_engines = 1'), log)
    try:
        wait_for(lambda: "model loaded" in log.read_text(), 60, "the model loaded")
        died.touch()
        wait_for(lambda: log.read_text().count("model loaded") == 2, 30, "a fresh engine loaded")
        assert "the engine double's process died (seen while idle); starting a fresh engine" in log.read_text()
        drops = [make_drop(root / "inbox", "after.jsonl", 20)]
        wait_for(lambda: job_of(root, "outbox", "after.jsonl"), 30, "the next drop done")
        assert proc.poll() is None, tail(log)
    finally:
        _reap(proc)
    v = verdict(root, drops)
    assert v.ok, v.problems[:5]


def exits_for_systemd(tmp_path: Path, name: str, lines: int, args: str) -> tuple[Path, str]:
    """Run one drop through a daemon that must exit 1; its job (left in processing/) and its log."""
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    make_drop(root / "inbox", name, lines)
    proc = start(write_config(tmp_path / "c.toml", root, args=args), tmp_path / "log")
    try:
        assert proc.wait(timeout=60) == 1
    finally:
        _reap(proc)
    (job,) = [p for p in (root / "processing" / "testhost").iterdir() if p.is_dir()]
    return job, tail(tmp_path / "log", 20000)


def test_an_engine_that_keeps_dying_makes_the_daemon_exit_for_systemd(tmp_path):
    job, log = exits_for_systemd(tmp_path, "doomed.jsonl", 50, "fail_all = true")
    root = tmp_path / "spool"
    assert log.count("starting a fresh engine") == 3 and "exiting so the service restarts" in log
    # Nothing was written for a line the engine died on, nor doubled for any other.
    assert read_jsonl(job / "output.jsonl") == []
    lines = [e["error"]["line"] for e in read_jsonl(job / "errors.jsonl")]
    assert len(lines) == len(set(lines))
    assert not (root / "outbox").exists() or not list((root / "outbox").iterdir())


def test_a_line_that_kills_every_engine_gets_an_error_and_the_job_goes_on(tmp_path):
    """A poison line is in flight at every engine death: after max_attempts (3) it gets `engine_crashed`
    instead of taking the host down for good (restart, resume it first, die again)."""
    root, drops, _, _, log = faulty_run(tmp_path, [], lines=300, inflight=32, delay=0.002,
                                        args='fail_on = "work-120"')
    (job,) = [p for p in (root / "outbox").iterdir()]
    crashed = {e["custom_id"]: e["error"]["line"] for e in read_jsonl(job / "errors.jsonl")
               if e["error"]["code"] == "engine_crashed"}
    assert "work-120" in crashed and len(crashed) <= SUSPECT_WINDOW
    assert log.count("starting a fresh engine") == RetryPolicy().max_attempts
    assert "work-120" not in {o["custom_id"] for o in read_jsonl(job / "output.jsonl")}
    # Every other line has its one result; the crashed ones have their one error instead.
    (drop,) = drops
    v = verdict(root, [replace(drop, valid_ids=drop.valid_ids - set(crashed),
                               bad_lines=drop.bad_lines | set(crashed.values()))])
    save_result("A poison line that kills every engine (engine_crashed after 3 deaths)", 1, v)
    assert v.ok, v.problems[:5]


def test_a_fresh_engine_that_will_not_start_makes_the_daemon_exit_not_fail_lines(tmp_path):
    job, log = exits_for_systemd(tmp_path, "relapse.jsonl", 60,
                                 'fail_on = "relapse-30"\nfaulty_engines = 1\nfail_load_from = 2')
    assert "the fresh engine failed to start" in log
    statuses = {o["response"]["status_code"] for o in read_jsonl(job / "output.jsonl")}
    assert statuses <= {200}, statuses  # nothing answered by an engine that never started
