"""Several models in one daemon, with the fast engine double: swaps, mixed files, a model that will not load."""

import json
import os
import signal
import time

from ..helpers import DaemonProcess, Subscriber, chat_line, outbox_jobs, read_jsonl, wait_for, write_config, write_jsonl

MODELS = '[models]\n"a:1b" = "org/model-a"\n"b:3b" = "org/model-b"\n[models.broken]\nmodel = "org/broken"\n'


def start(tmp_path, engine_args="", models=MODELS, delay=0.001, engine=""):
    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root, model="a:1b",
                          engine=f"{engine}[engine.args]\ndelay = {delay}\n{engine_args}", extra=models)
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    d.wait_ready(root, timeout=60)
    return root, d


def drop(root, tmp_path, name, models):
    rows = [dict(chat_line(i, model=m), custom_id=f"{name}-{i}") for i, m in enumerate(models)]
    write_jsonl(tmp_path / name, rows)
    os.rename(tmp_path / name, root / "inbox" / name)
    return rows


def job_named(root, name):
    for job in outbox_jobs(root):
        if json.loads((job / "batch.json").read_text())["input_file"] == name:
            return job
    return None


def test_jobs_for_two_models_run_with_one_swap_and_a_mixed_file_with_one_more(tmp_path):
    root, d = start(tmp_path)
    sub = Subscriber(f"ipc://{tmp_path}/events.sock")
    try:
        # Queued together (the daemon paused meanwhile): the loaded model's job
        # runs first although it came second.
        os.kill(d.proc.pid, signal.SIGSTOP)
        b_rows = drop(root, tmp_path, "for_b.jsonl", ["b:3b"] * 30)
        time.sleep(0.05)
        a_rows = drop(root, tmp_path, "for_a.jsonl", ["a:1b"] * 30)
        os.kill(d.proc.pid, signal.SIGCONT)
        wait_for(lambda: job_named(root, "for_a.jsonl") and job_named(root, "for_b.jsonl"), 30, "both jobs")
        mixed = drop(root, tmp_path, "mixed.jsonl", ["a:1b", "b:3b", None, "org/model-b"] * 10)
        job = wait_for(lambda: job_named(root, "mixed.jsonl"), 30, "the mixed job")
    finally:
        d.terminate()
        sub.close()
    for name, rows in (("for_a.jsonl", a_rows), ("for_b.jsonl", b_rows), ("mixed.jsonl", mixed)):
        out = {o["custom_id"]: o["response"]["body"]["model"] for o in read_jsonl(job_named(root, name) / "output.jsonl")}
        want = {r["custom_id"]: {"a:1b": "org/model-a", "b:3b": "org/model-b", None: "org/model-a"}.get(
            r["body"].get("model"), r["body"].get("model")) for r in rows}
        assert out == want, name  # every line answered by its own model
    batch = json.loads((job / "batch.json").read_text())
    assert batch["models"] == {"org/model-a": 20, "org/model-b": 20}
    unloaded = [p["model"] for t, p in sub.events if t == "spoold.engine.unloaded"]
    # a (loaded) -> for_a, swap to b -> for_b and mixed's b lines, swap to a -> mixed's a lines
    assert unloaded == ["org/model-a", "org/model-b"], unloaded
    # for_a was done before the first swap. Which of the two was claimed first is a race between
    # their two rename hints (a fresh clone's run here claimed for_b first), and does not matter:
    # a claimed job waits for its model.
    timeline = [p["input_file"] if t == "spoold.job.completed" else f"unloaded {p['model']}"
                for t, p in sub.events if t in ("spoold.job.completed", "spoold.engine.unloaded")]
    assert timeline[:3] == ["for_a.jsonl", "unloaded org/model-a", "for_b.jsonl"], timeline


def test_a_model_that_fails_to_load_fails_its_lines_and_the_daemon_serves_others(tmp_path):
    root, d = start(tmp_path, engine_args='fail_load = "org/broken"')
    try:
        rows = drop(root, tmp_path, "bad_model.jsonl", ["broken"] * 5 + ["a:1b"] * 5)
        job = wait_for(lambda: job_named(root, "bad_model.jsonl"), 30, "the job")
        after = drop(root, tmp_path, "after.jsonl", ["a:1b"] * 5)
        later = wait_for(lambda: job_named(root, "after.jsonl"), 30, "a later job")
        assert d.proc.poll() is None
    finally:
        d.terminate()
    batch = json.loads((job / "batch.json").read_text())
    assert batch["status"] == "completed"
    assert batch["errors"][0]["code"] == "model_load_failed" and "org/broken" in batch["errors"][0]["message"]
    assert "(3 tries)" in batch["errors"][0]["message"]  # [engine] max_attempts, with backoff between
    statuses = {o["custom_id"]: o["response"]["status_code"] for o in read_jsonl(job / "output.jsonl")}
    assert statuses == {r["custom_id"]: 503 if r["body"]["model"] == "broken" else 200 for r in rows}
    assert len(read_jsonl(later / "output.jsonl")) == len(after)


def test_a_job_for_another_model_waits_at_most_max_wait_seconds_not_until_a_big_job_ends(tmp_path):
    """`max_wait_seconds` bounds the wait for a swap even behind a running job: the big job pauses at a
    line boundary, the other model's job runs, and the big job resumes and ends with every line once."""
    models = MODELS.replace("[models]\n", "[models]\nmax_wait_seconds = 1\n", 1)
    # 4 requests in flight, 0.02 s each: the big job alone takes at least 10 s
    root, d = start(tmp_path, "load_delay = 0.5", models, delay=0.02, engine="max_inflight = 4\n")
    sub = Subscriber(f"ipc://{tmp_path}/events.sock")
    try:
        big = drop(root, tmp_path, "big_a.jsonl", ["a:1b"] * 2000)
        wait_for(lambda: any(t == "spoold.job.progress" and p["done"] for t, p in sub.events), 30, "the big job running")
        small = drop(root, tmp_path, "small_b.jsonl", ["b:3b"] * 5)
        (big_dir,) = [job for job in root.glob("processing/testhost/*/")
                      if json.loads((job / "batch.json").read_text())["input_file"] == "big_a.jsonl"]
        paused = []

        def small_done():
            beat = _job_beat(big_dir)
            paused.extend([beat] if beat.get("state") == "paused" else [])
            return job_named(root, "small_b.jsonl")
        small_job = wait_for(small_done, 30, "the small job")
        assert job_named(root, "big_a.jsonl") is None  # before: it waited for all 2,000 lines
        big_job = wait_for(lambda: job_named(root, "big_a.jsonl"), 60, "the big job, resumed")
    finally:
        d.terminate()
        sub.close()
    assert paused and 0 < paused[0]["done"] < 2000 and paused[0]["inflight"] == 0  # status: paused, not stalled
    told = [p["state"] for t, p in sub.events if t == "spoold.job.progress" and p["job"] == big_job.name]
    assert "paused" in told and "in_progress" in told[told.index("paused"):]  # watch: paused, then running again
    for job, rows, model in ((big_job, big, "org/model-a"), (small_job, small, "org/model-b")):
        out = read_jsonl(job / "output.jsonl")
        assert sorted(o["custom_id"] for o in out) == sorted(r["custom_id"] for r in rows)  # each line once
        assert {o["response"]["body"]["model"] for o in out} == {model}
    unloaded = [p["model"] for t, p in sub.events if t == "spoold.engine.unloaded"]
    assert unloaded == ["org/model-a", "org/model-b"], unloaded  # a -> b for the small job, b -> a to resume
    log = d.log.read_text()
    assert log.count("for a model swap") == 1  # paused once, and not run again until its model was back


def _job_beat(job_dir):
    try:
        return json.loads((job_dir / "heartbeat.json").read_text())["job"] or {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
