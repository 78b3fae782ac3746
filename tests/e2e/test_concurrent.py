"""Many jobs at once in one `spoold run`, with the fast engine double: fair share, crashes, cancel."""

import json
import os
import subprocess
import sys

import pytest

from ..helpers import (REPO, DaemonProcess, Subscriber, api_drop, chat_line, check_exactly_once, complete_lines,
                       outbox_jobs, wait_for, write_config, write_jsonl)


def config_for(tmp_path, delay, inflight=16):
    return write_config(tmp_path / "c.toml", tmp_path / "spool",
                        engine=f"max_inflight = {inflight}\n[engine.args]\ndelay = {delay}")


def drop(root, tmp_path, name, n, uid=None):
    """Rename an n-line drop into the inbox (complete at once); its custom_ids name the drop. `uid`: the
    user who owns it, as `spoold submit` run by that user leaves it."""
    write_jsonl(tmp_path / name, [dict(chat_line(i), custom_id=f"{name}-{i}") for i in range(n)])
    if uid is not None:
        os.chown(tmp_path / name, uid, uid)
    os.rename(tmp_path / name, root / "inbox" / name)
    return {f"{name}-{i}" for i in range(n)}


def by_name(root):
    """Outbox job directories by the drop's name."""
    return {json.loads((job / "batch.json").read_text())["input_file"]: job for job in outbox_jobs(root)}


def running(root):
    """This host's job directories that have results on disk now."""
    return [p.parent for p in (root / "processing" / "testhost").glob("*/output.jsonl") if complete_lines(p) > 0]


def test_small_drops_behind_a_large_one_finish_before_it_each_exactly_once(tmp_path):
    root = tmp_path / "spool"
    d = DaemonProcess(config_for(tmp_path, delay=0.01), tmp_path / "daemon.log").start()
    d.wait_ready(root, timeout=60)
    sub = Subscriber(f"ipc://{tmp_path}/events.sock")
    try:
        want = {"large.jsonl": drop(root, tmp_path, "large.jsonl", 6000)}  # about 4 s alone at 16 in flight
        wait_for(lambda: running(root), 10, "the large job's first results")
        for i in range(200):
            want[f"small{i}.jsonl"] = drop(root, tmp_path, f"small{i}.jsonl", 1 + i % 3)
        wait_for(lambda: len(outbox_jobs(root)) == 201, 120, "every job in the outbox")
        completed = wait_for(lambda: len(sub.of("spoold.job.completed")) == 201 and sub.of("spoold.job.completed"),
                             10, "every completed event")
    finally:
        d.terminate()
        sub.close()
    jobs = by_name(root)
    for name, ids in want.items():
        check_exactly_once(jobs[name], ids, set())
    order = [event["input_file"] for event in completed]
    assert order[-1] == "large.jsonl", f"the large job finished before {200 - order.index('large.jsonl')} small ones"


def test_kill9_with_five_jobs_running_then_all_five_resume_together_and_finish_exactly_once(tmp_path):
    root = tmp_path / "spool"
    config = config_for(tmp_path, delay=0.02)
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    d.wait_ready(root, timeout=60)
    # Long enough (about 2 s alone) that none ends before the fifth is claimed.
    want = {f"j{i}.jsonl": drop(root, tmp_path, f"j{i}.jsonl", 1500) for i in range(5)}
    wait_for(lambda: len(running(root)) == 5, 20, "five jobs with results")
    d.kill9()
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        beat = root / "processing" / "testhost" / "heartbeat.json"
        wait_for(lambda: len(_read(beat).get("jobs") or []) == 5, 30, "all five resumed at once")
        wait_for(lambda: len(outbox_jobs(root)) == 5, 120, "the five jobs in the outbox")
    finally:
        d.terminate()
    jobs = by_name(root)
    for name, ids in want.items():
        check_exactly_once(jobs[name], ids, set())
        assert json.loads((jobs[name] / "batch.json").read_text())["timings"]["resumed"] is True


def test_cancelling_one_of_three_running_jobs_leaves_the_others_alone(tmp_path):
    root = tmp_path / "spool"
    config = config_for(tmp_path, delay=0.02)
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    d.wait_ready(root, timeout=60)
    try:
        want = {f"c{i}.jsonl": drop(root, tmp_path, f"c{i}.jsonl", 1500) for i in range(3)}
        wait_for(lambda: len(running(root)) == 3, 20, "three jobs with results")
        victim = next(job for job in running(root) if job.name.startswith("c1-"))
        done = subprocess.run([sys.executable, "-m", "spoold", "cancel", victim.name, "--config", str(config)],
                              capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: len(outbox_jobs(root)) == 3, 120, "the three jobs in the outbox")
    finally:
        d.terminate()
    jobs = by_name(root)
    cancelled = json.loads((jobs["c1.jsonl"] / "batch.json").read_text())
    assert cancelled["status"] == "cancelled" and 0 < cancelled["request_counts"]["completed"] < 1500
    for name in ("c0.jsonl", "c2.jsonl"):
        check_exactly_once(jobs[name], want[name], set())
        assert json.loads((jobs[name] / "batch.json").read_text())["status"] == "completed"


def test_a_batch_submitted_with_priority_overtakes_one_that_started_first(tmp_path):
    root = tmp_path / "spool"
    config = config_for(tmp_path, delay=0.02)
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    d.wait_ready(root, timeout=60)
    sub = Subscriber(f"ipc://{tmp_path}/events.sock")
    try:
        want = {"first.jsonl": drop(root, tmp_path, "first.jsonl", 1500)}
        wait_for(lambda: any(complete_lines(job / "output.jsonl") >= 100 for job in running(root)), 20,
                 "the first job well under way")
        write_jsonl(tmp_path / "urgent.jsonl", [dict(chat_line(i), custom_id=f"urgent-{i}") for i in range(1500)])
        want["urgent.jsonl"] = {f"urgent-{i}" for i in range(1500)}
        done = subprocess.run([sys.executable, "-m", "spoold", "submit", str(tmp_path / "urgent.jsonl"),
                               "--priority", "10", "--config", str(config)], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        completed = wait_for(lambda: len(sub.of("spoold.job.completed")) == 2 and sub.of("spoold.job.completed"),
                             120, "both jobs completed")
    finally:
        d.terminate()
        sub.close()
    # Equal shares would let the job with a head start finish first.
    assert [event["input_file"] for event in completed] == ["urgent.jsonl", "first.jsonl"]
    jobs = by_name(root)
    for name, ids in want.items():
        check_exactly_once(jobs[name], ids, set())
    assert json.loads((jobs["urgent.jsonl"] / "batch.json").read_text())["metadata"] == {"priority": "10"}


@pytest.mark.skipif(os.geteuid() != 0, reason="files of other owners need root")
def test_one_persons_one_drop_gets_half_the_engine_beside_another_persons_ten(tmp_path):
    root = tmp_path / "spool"
    d = DaemonProcess(config_for(tmp_path, delay=0.02), tmp_path / "daemon.log").start()
    d.wait_ready(root, timeout=60)
    sub = Subscriber(f"ipc://{tmp_path}/events.sock")
    try:
        want = {f"alice{i}.jsonl": drop(root, tmp_path, f"alice{i}.jsonl", 300, uid=1001) for i in range(10)}
        wait_for(lambda: len(running(root)) == 10, 20, "alice's ten jobs running")
        want["bob.jsonl"] = drop(root, tmp_path, "bob.jsonl", 300, uid=1002)
        completed = wait_for(lambda: len(sub.of("spoold.job.completed")) == 11 and sub.of("spoold.job.completed"),
                             120, "all eleven jobs completed")
    finally:
        d.terminate()
        sub.close()
    order = [event["input_file"] for event in completed]
    # Shared per job, bob's drop got one eleventh of the window and finished after alice's ten had.
    assert order[0] == "bob.jsonl", order
    jobs = by_name(root)
    for name, ids in want.items():
        check_exactly_once(jobs[name], ids, set())
    assert json.loads((jobs["bob.jsonl"] / "batch.json").read_text())["submitter_uid"] == 1002


def test_with_every_slot_taken_tenants_take_turns_and_a_priority_drop_goes_before_older_ones(tmp_path):
    root = tmp_path / "spool"
    config = config_for(tmp_path, delay=0.02)
    config.write_text(config.read_text().replace("poll_seconds = 0.2", "poll_seconds = 0.2\nmax_active_jobs = 1"))
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    d.wait_ready(root, timeout=60)
    sub = Subscriber(f"ipc://{tmp_path}/events.sock")
    try:
        drop(root, tmp_path, "first.jsonl", 4000)  # about 5 s alone: the one slot is taken while the rest queue
        wait_for(lambda: running(root), 20, "the first job's results")
        names = {api_drop(root, "alice", [chat_line(i) for i in range(100)]): f"alice{n}" for n in range(3)}
        names[api_drop(root, "bob", [chat_line(i) for i in range(100)])] = "bob"
        for n in range(2):
            drop(root, tmp_path, f"plain{n}.jsonl", 100)
        write_jsonl(tmp_path / "urgent.jsonl", [chat_line(i) for i in range(100)])
        done = subprocess.run([sys.executable, "-m", "spoold", "submit", str(tmp_path / "urgent.jsonl"),
                               "--priority", "10", "--config", str(config)], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert not outbox_jobs(root), "the first job ended before everything was queued behind it"
        completed = wait_for(lambda: len(sub.of("spoold.job.completed")) == 8 and sub.of("spoold.job.completed"),
                             120, "all eight jobs completed")
    finally:
        d.terminate()
        sub.close()
    order = [names.get(event["input_file"], event["input_file"].removesuffix(".jsonl")) for event in completed]
    assert order[:2] == ["first", "alice0"] and len(set(order)) == 8, order
    # Claimed by age, bob waited for all three of alice's batches and urgent for both older plain drops.
    assert order.index("bob") < order.index("alice1") and order.index("alice0") < order.index("alice1"), order
    assert order.index("urgent") < min(order.index("plain0"), order.index("plain1")), order


def _read(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
