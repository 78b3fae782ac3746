"""Several models in one daemon, with the fast engine double: swaps, mixed files, a model that will not load."""

import json
import os
import signal
import time

from ..helpers import DaemonProcess, Subscriber, chat_line, outbox_jobs, read_jsonl, wait_for, write_config, write_jsonl

MODELS = '[models]\n"a:1b" = "org/model-a"\n"b:3b" = "org/model-b"\n[models.broken]\nmodel = "org/broken"\n'


def start(tmp_path, engine_args=""):
    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root, model="a:1b",
                          engine=f"[engine.args]\ndelay = 0.001\n{engine_args}", extra=MODELS)
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
        # goes first although it came second.
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
    claimed = [p["input_file"] for t, p in sub.events if t == "spoold.job.claimed"]
    assert claimed[:2] == ["for_a.jsonl", "for_b.jsonl"]


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
