"""Split batches: one big drop run by several daemons on one spool and assembled into one result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..helpers import REPO, Subscriber, wait_for
from .harness import _reap, idle, make_drop, save_result, spoold_env, start, tail, verdict, write_config


def test_three_daemons_share_a_split_batch(tmp_path):
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    staging = tmp_path / "staging"
    staging.mkdir()
    procs = [start(write_config(tmp_path / f"h{i}.toml", root, host=f"h{i}", delay=0.002,
                                spool="split_lines = 1000"), tmp_path / f"h{i}.log") for i in range(3)]
    try:
        wait_for(lambda: all((root / "processing" / f"h{i}" / "heartbeat.json").exists() for i in range(3)),
                 30, "three daemons up")
        drop = make_drop(staging, "big.jsonl", 5000)
        os.rename(staging / drop.name, root / "inbox" / drop.name)
        wait_for(lambda: idle(root, [drop]), 60, "the split batch assembled", interval=0.2)
        alive = [p.poll() is None for p in procs]
    finally:
        for p in procs:
            _reap(p)
    assert all(alive), [tail(tmp_path / f"h{i}.log") for i in range(3)]
    v = verdict(root, [drop])
    save_result("3 daemons sharing one 5,000-line batch split in 1,000-line parts", 1, v)
    assert v.ok, v.problems[:5]
    [job] = list((root / "outbox").iterdir())
    batch = json.loads((job / "batch.json").read_text())
    assert [p["lines"] for p in batch["parts"]] == [1000] * 5
    assert len({p["host"] for p in batch["parts"]}) >= 2, f"one daemon ran every part: {batch['parts']}"
    assert batch["status"] == "completed" and batch["request_counts"]["total"] == 5002
    assert not list((root / "groups").iterdir()), "the group directory is left behind"


def test_a_split_batch_is_shown_as_one_and_cancelled_as_one(tmp_path):
    """`spoold status` shows the group's combined progress; `spoold cancel GROUP` stops every part,
    claimed or not, and the batch is assembled as one cancelled batch: no line twice, none invented."""
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "h.toml", root, host="h", inflight=2, delay=0.01, spool="split_lines = 1000")
    proc = start(config, tmp_path / "h.log")
    feed = Subscriber(f"ipc://{tmp_path}/h.sock")
    try:
        wait_for(lambda: feed.of("spoold.daemon.heartbeat"), 60, "the daemon's feed")
        drop = make_drop(root / "inbox", "slow.jsonl", 3000, bad=False)
        group = wait_for(lambda: next((root / "groups").glob("slow-*"), None), 60, "the drop split")
        wait_for(lambda: json.loads(_spoold("status", "--json", config))["split"][0]["completed"] > 0, 60,
                 "a part's progress in spoold status")
        # The feed publishes now and then, so its latest combined event may predate the count status just
        # showed: wait for one that counts a line. (The unsplit job had this id too, hence "parts".)
        whole = wait_for(lambda: [p for p in feed.of("spoold.job.progress", job=group.name)
                                  if "parts" in p and p["done"] > 0], 30, "the batch's combined progress on the feed")[-1]
        assert whole["parts"] == 3 and whole["total"] == 3000, whole
        shown = json.loads(_spoold("status", "--json", config))["split"][0]
        assert shown["id"] == group.name and shown["parts"] == 3 and shown["total"] == 3000, shown
        assert group.name in _spoold("status", config)
        assert f"cancelling {group.name}" in _spoold("cancel", group.name, config)
        wait_for(lambda: (root / "outbox" / group.name / "batch.json").exists(), 60, "the cancelled batch assembled")
        ended = wait_for(lambda: feed.of("spoold.job.cancelled", job=group.name), 10, "the batch's end on the feed")
        alive = proc.poll() is None
    finally:
        feed.close()
        _reap(proc)
    assert feed.of("spoold.job.split", job=group.name)[0]["parts"] == 3
    of_parts = [p for p in feed.of("spoold.job.progress") if p["job"].startswith(f"{group.name}-part")]
    assert of_parts and {p.get("group") for p in of_parts} == {group.name}, "a part's progress does not name its batch"
    assert ended[0]["parts"] == 3 and ended[0]["request_counts"]["total"] == 3000
    assert alive, tail(tmp_path / "h.log")
    batch = json.loads((root / "outbox" / group.name / "batch.json").read_text())
    assert batch["status"] == "cancelled" and {p["status"] for p in batch["parts"]} == {"cancelled"}, batch["parts"]
    assert batch["cancelling_at"] <= batch["cancelled_at"]
    done = [json.loads(line)["custom_id"] for line in (root / "outbox" / group.name / "output.jsonl").open()]
    assert 0 < len(done) < 3000 and len(set(done)) == len(done) and set(done) <= drop.valid_ids
    assert batch["request_counts"]["completed"] == len(done)
    assert not list((root / "groups").iterdir()) and not list((root / "processing" / "h").glob("slow-*"))


def _spoold(*args) -> str:
    *verb, config = args
    done = subprocess.run([sys.executable, "-m", "spoold", *verb, "--config", str(config)], capture_output=True,
                          text=True, env=spoold_env(), cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout
