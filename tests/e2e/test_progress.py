"""Seeing progress from outside: the event feed, `spoold watch` and `spoold status` on a terminal."""

import json
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from ..helpers import (REPO, DaemonProcess, Subscriber, chat_line, complete_lines, outbox_jobs, wait_for,
                       write_config, write_jsonl)


def start(tmp_path, delay, heartbeat=None, inflight=8):
    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root, progress_seconds=0.3,
                          engine=f"max_inflight = {inflight}\n[engine.args]\ndelay = {delay}")
    if heartbeat:
        config.write_text(config.read_text().replace("[heartbeat]\nseconds = 0.2", f"[heartbeat]\nseconds = {heartbeat}"))
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    d.wait_ready(root, timeout=60)
    d.root, d.endpoint = root, f"ipc://{tmp_path}/events.sock"
    return d


def drop(root, name, n):
    write_jsonl(root / "inbox" / name, [chat_line(i) for i in range(n)])
    (root / "inbox" / f"{name}.ready").touch()


def test_a_late_subscriber_gets_the_current_state_at_once(tmp_path):
    d = start(tmp_path, delay=0.02, heartbeat=30)  # heartbeats too rare to explain a quick answer
    try:
        drop(d.root, "late.jsonl", 2000)
        out = wait_for(lambda: list(d.root.glob("processing/testhost/late-*/output.jsonl")), 10, "the job to start")
        wait_for(lambda: complete_lines(out[0]) >= 20, 10, "the job well under way")  # then subscribe, late
        sub = Subscriber(d.endpoint)
        started = time.monotonic()
        wait_for(lambda: sub.of("spoold.job.progress") and sub.of("spoold.daemon.heartbeat"), 2,
                 "the snapshot")
        assert time.monotonic() - started < 1.5
        (beat,) = sub.of("spoold.daemon.heartbeat")[:1]
        assert beat["state"] == "working" and beat["job"]["input_file"] == "late.jsonl"
        progress = sub.of("spoold.job.progress")[0]
        assert progress["total"] == 2000 and 0 < progress["done"] < 2000
        sub.close()
    finally:
        d.terminate()


def job_seconds(d, name, n):
    drop(d.root, name, n)
    start = time.monotonic()
    wait_for(lambda: any(p.name.startswith(name[:-6]) for p in outbox_jobs(d.root)), 120, name)
    return time.monotonic() - start


def test_a_subscriber_that_never_reads_does_not_slow_the_daemon(tmp_path):
    d = start(tmp_path, delay=0.001, inflight=32)
    try:
        base = [job_seconds(d, f"free{i}.jsonl", 3000) for i in range(2)]
        stuck = Subscriber(d.endpoint, read=False)  # connected and subscribed, never reads
        slowed = [job_seconds(d, f"stuck{i}.jsonl", 3000) for i in range(2)]
        stuck.close()
        print(f"job seconds without a stuck subscriber {base}, with one {slowed}")
        assert min(slowed) < 1.5 * max(base) + 0.5
    finally:
        d.terminate()


def tmux(*args):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def screen_showing(target: str, *words: str) -> str:
    """The tmux pane's screen once it shows every one of `words` (the program has drawn it)."""
    def drawn():
        screen = tmux("capture-pane", "-p", "-t", target)
        return screen if all(w in screen for w in words) else None
    try:
        return wait_for(drawn, 20, f"the screen to show {words}")
    except AssertionError as e:
        raise AssertionError(f"{e}; it shows:\n{tmux('capture-pane', '-p', '-t', target)}") from None


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make test installs it)")
def test_watch_and_status_on_a_terminal_show_name_counts_and_eta(tmp_path):
    d = start(tmp_path, delay=0.05, inflight=4)
    session = f"spoold-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "c.toml"
    try:
        tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "30", "-c", str(REPO),
             f"{sys.executable} -m spoold watch --config {config}")
        drop(d.root, "candidates.jsonl", 3000)
        out = wait_for(lambda: list(d.root.glob("processing/testhost/candidates-*/output.jsonl")), 10, "job")
        wait_for(lambda: complete_lines(out[0]) > 100, 20, "progress")
        screen_showing(session, "candidates.jsonl", "/3000", "req/s", "ETA")

        tmux("new-window", "-t", session, f"{sys.executable} -m spoold status --config {config}; sleep 60")
        screen_showing(f"{session}:1", "processing (1):", "candidates-", "/3000", "ETA", "heartbeat")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        d.terminate()


def test_a_stuck_engine_is_marked_stalled_in_status_events_and_metrics(tmp_path):
    from urllib.request import urlopen

    from ..helpers import free_port

    root = tmp_path / "spool"
    port = free_port()
    config = write_config(tmp_path / "c.toml", root, metrics_listen=f"127.0.0.1:{port}", progress_seconds=0.2,
                          engine='max_inflight = 4\n[engine.args]\nhang_on = "req-50"',
                          extra="[watchdog]\nstall_seconds = 1\n")
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        d.wait_ready(root, timeout=60)
        sub = Subscriber(f"ipc://{tmp_path}/events.sock")
        drop(root, "stuck.jsonl", 100)
        (stalled,) = wait_for(lambda: sub.of("spoold.engine.stalled"), 10, "the stalled event")
        assert stalled["inflight"] == 1 and stalled["job"].startswith("stuck-")
        status = subprocess.run([sys.executable, "-m", "spoold", "status", "--json", "--config", str(config)],
                                capture_output=True, text=True, cwd=REPO).stdout
        assert [p["status"] for p in json.loads(status)["processing"]] == ["stalled"]
        metrics = urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert "spoold_stalled 1.0" in metrics
        assert "the engine looks stuck" in d.log_tail()
        sub.close()
    finally:
        d.terminate()
