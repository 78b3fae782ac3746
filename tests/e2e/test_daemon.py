"""`spoold run` as a process, with the fast engine double: claims, settle, stop, crash."""

import json
import os
import random
import signal
import time

import pytest

from ..helpers import (complete_lines, DaemonProcess, chat_line, check_exactly_once, outbox_jobs, wait_for, write_config, write_jsonl)


@pytest.fixture
def daemon(tmp_path):
    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root, engine='[engine.args]\ndelay = 0.002')
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    d.wait_ready(root, timeout=60)
    d.root = root
    yield d
    if d.proc.poll() is None:
        d.terminate()


def test_a_renamed_drop_is_claimed_within_a_second(daemon, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [chat_line(i) for i in range(5)])
    os.rename(src, daemon.root / "inbox" / "r.jsonl")
    start = time.monotonic()
    wait_for(lambda: not (daemon.root / "inbox" / "r.jsonl").exists(), 5, "the claim")
    assert time.monotonic() - start < 1.0
    (job,) = wait_for(lambda: outbox_jobs(daemon.root), 10, "the job in the outbox")
    check_exactly_once(job, {f"req-{i}" for i in range(5)}, set())


def test_a_slowly_written_file_is_not_claimed_before_it_settles(daemon):
    target = daemon.root / "inbox" / "slow.jsonl"
    with open(target, "w") as f:
        for i in range(6):  # like scp: written in place over ~1.5 s, settle is 1 s
            f.write(json.dumps(chat_line(i)) + "\n")
            f.flush()
            written = time.monotonic()
            time.sleep(0.3)
            assert target.exists(), "claimed while still being written"
    (job,) = wait_for(lambda: outbox_jobs(daemon.root), 10, "the job in the outbox")
    assert time.monotonic() - written >= 0.9
    check_exactly_once(job, {f"req-{i}" for i in range(6)}, set())


def test_sigterm_is_a_warm_stop_and_the_job_resumes(tmp_path):
    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root, engine='max_inflight = 4\n[engine.args]\ndelay = 0.01')
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    d.wait_ready(root, timeout=60)
    rows = [chat_line(i) for i in range(2000)]
    write_jsonl(root / "inbox" / "big.jsonl", rows)
    (root / "inbox" / "big.jsonl.ready").touch()
    out = wait_for(lambda: list((root / "processing" / "testhost").glob("*/output.jsonl")), 10, "output")
    wait_for(lambda: complete_lines(out[0]) > 50, 10, "some results")
    assert d.terminate(timeout=30) == 0
    assert "warm stop" in d.log_tail()
    assert 50 < complete_lines(out[0]) < 2000
    d2 = DaemonProcess(config, tmp_path / "daemon.log").start()
    (job,) = wait_for(lambda: outbox_jobs(root), 120, "the resumed job")
    d2.terminate()
    check_exactly_once(job, {f"req-{i}" for i in range(2000)}, set())


def _beat_pid(root) -> int | None:
    try:
        return json.loads((root / "processing" / "testhost" / "heartbeat.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_repeated_kill9_loses_and_doubles_nothing(tmp_path):
    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root, engine='max_inflight = 16\n[engine.args]\ndelay = 0.02')
    rows = [chat_line(i) for i in range(1500)] + ["{bad", chat_line(7)]
    (root / "inbox").mkdir(parents=True)
    write_jsonl(root / "inbox" / "k.jsonl", rows)
    (root / "inbox" / "k.jsonl.ready").touch()
    rng = random.Random(1)
    kills = 0
    for attempt in range(8):
        d = DaemonProcess(config, tmp_path / "daemon.log").start()
        if attempt % 2 == 0:  # early: as soon as it is up (recovery, claim, validation, the first lines)
            wait_for(lambda: _beat_pid(root) == d.proc.pid, 10, "the daemon's first heartbeat")  # noqa: B023
        else:  # during engine work and group commit
            outputs = lambda: list((root / "processing" / "testhost").glob("*/output.jsonl"))
            wait_for(outputs, 10, "output.jsonl")
            target = complete_lines(outputs()[0]) + rng.randint(10, 150)
            out = outputs()[0]
            wait_for(lambda: complete_lines(out) > target, 10, "progress")  # noqa: B023 (used at once)
        d.kill9()
        kills += 1
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    wait_for(lambda: outbox_jobs(root), 120, "the job after the kills")
    d.terminate()
    assert kills == 8
    (job,) = outbox_jobs(root)
    check_exactly_once(job, {f"req-{i}" for i in range(1500)}, {1501, 1502})
    assert list((root / "processing" / "testhost").glob("*/")) == []


def test_spoold_cancel_publishes_what_is_done_and_the_daemon_goes_on(daemon, tmp_path):
    import subprocess
    import sys

    from ..helpers import REPO, Subscriber, read_jsonl

    sub = Subscriber(f"ipc://{tmp_path}/events.sock")
    try:
        write_jsonl(daemon.root / "inbox" / "long.jsonl", [chat_line(i) for i in range(20000)])
        (daemon.root / "inbox" / "long.jsonl.ready").touch()
        out = wait_for(lambda: list((daemon.root / "processing" / "testhost").glob("*/output.jsonl")), 10, "output")
        wait_for(lambda: complete_lines(out[0]) > 100, 10, "some results")
        job_id = out[0].parent.name
        # Frozen while the cancel is asked for, so the job cannot finish first on a loaded machine: what is
        # tested is what the daemon does with a cancel, not a race with a subprocess's start-up.
        os.killpg(daemon.proc.pid, signal.SIGSTOP)
        try:
            done = subprocess.run([sys.executable, "-m", "spoold", "cancel", job_id, "--config",
                                   str(daemon.config)], capture_output=True, text=True, cwd=REPO)
        finally:
            os.killpg(daemon.proc.pid, signal.SIGCONT)
        assert done.returncode == 0 and f"cancelling {job_id}" in done.stdout
        (job,) = wait_for(lambda: outbox_jobs(daemon.root), 10, "the cancelled job in the outbox")
        write_jsonl(tmp_path / "next.jsonl", [chat_line(i) for i in range(5)])
        os.rename(tmp_path / "next.jsonl", daemon.root / "inbox" / "next.jsonl")
        wait_for(lambda: len(outbox_jobs(daemon.root)) == 2, 10, "a job after the cancelled one")
        cancelled = wait_for(lambda: sub.of("spoold.job.cancelled", job=job_id), 5, "the cancelled event")
    finally:
        sub.close()
    batch = json.loads((job / "batch.json").read_text())
    ids = [o["custom_id"] for o in read_jsonl(job / "output.jsonl")]
    assert batch["status"] == "cancelled" and batch["cancelled_at"]
    assert 100 < len(ids) < 20000 and len(ids) == len(set(ids))
    assert batch["request_counts"] == {"total": 20000, "completed": len(ids), "failed": 0}
    assert cancelled[0]["request_counts"] == batch["request_counts"]
    missing = subprocess.run([sys.executable, "-m", "spoold", "cancel", "nope", "--config", str(daemon.config)],
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 1 and "no job 'nope'" in missing.stderr
