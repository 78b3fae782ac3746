"""Scaling out: one big batch split across N daemons on one spool, with the fast engine double.

    .venv/bin/python -m bench.scale [--daemons 1,2,4,8,16] [--lines 170000] [--service 0.2] [--inflight 64]
                                    [--drops 10000] [--nfs-ms 3] [--nfs-daemons 8]

Each daemon's engine is the double of tests/ answering each request after
`--service` seconds, `--inflight` at a time: a fixed rate per daemon
(inflight / service lines per second), so each daemon stands in for one GPU
and the ideal time with N daemons is one daemon's time / N. The batch is split
into N parts (`split_lines` = lines / N; one daemon runs it unsplit). Timed from
the drop's rename into the inbox to its assembled `outbox/<id>/batch.json`.

Reported per N: the time, the scaling efficiency ((T1 / N) / TN), the
spool's own steps from the daemons' feeds (claim to split, split to the
last part claimed, last part's result to the assembled batch), and the
daemons' CPU per line (user + system of every daemon over the run, divided
by the lines), so the figure can be projected to real GPUs: a daemon keeps up
with a GPU as long as the GPU's lines per second times that CPU stays well
under the cores it has.

Then `--drops` one-line drops queued at once in front of 16 daemons: claims
(whole jobs) per second, and every drop exactly once in the outbox. Then the
split run again at `--nfs-daemons` with every rename and directory fsync
delayed by `--nfs-ms` (tests/torture/oswrap.py's `delays`), as on NFS, where
each metadata operation is a round trip to the server. Every run checks that
no line is lost or doubled (the torture harness's verdict). Writes
bench/scale_results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.cpu import cpu_seconds  # noqa: E402
# The double, the feed subscriber and the verdict live under tests/ only.
from tests.helpers import Subscriber, wait_for  # noqa: E402
from tests.torture.harness import _reap, make_drop, start, tail, verdict, write_config  # noqa: E402


class Daemons:
    """N `spoold run` processes sharing one spool, each with its feed subscribed."""

    def __init__(self, tmp: Path, root: Path, n: int, *, service: float, inflight: int, split_lines: int,
                 plan: dict | None = None) -> None:
        self.tmp, self.root, self.hosts = tmp, root, [f"d{i:02d}" for i in range(n)]
        configs = [write_config(tmp / f"{h}.toml", root, host=h, delay=service, inflight=inflight,
                                heartbeat=1.0, progress=1.0, spool=f"split_lines = {split_lines}")
                   for h in self.hosts]
        self.procs = [start(c, tmp / f"{h}.log", plan) for c, h in zip(configs, self.hosts)]
        self.feeds = [Subscriber(f"ipc://{tmp}/{h}.sock") for h in self.hosts]

    def wait_ready(self) -> None:
        def ready(host: str) -> bool:
            try:
                return json.loads((self.root / "processing" / host / "heartbeat.json").read_text())["state"] == "idle"
            except (OSError, ValueError, KeyError):
                return False

        wait_for(lambda: all(ready(h) for h in self.hosts), 300, f"{len(self.hosts)} daemons idle", interval=0.2)
        self.cpu_at_start = self.cpu_seconds()

    def cpu_seconds(self) -> float:
        """User + system seconds of every daemon so far (the double runs inside them)."""
        return sum(spent["user"] + spent["system"] for spent in map(cpu_seconds, (p.pid for p in self.procs)))

    def check_alive(self) -> None:
        for h, p in zip(self.hosts, self.procs):
            assert p.poll() is None, f"{h} exited {p.returncode}:\n{tail(self.tmp / f'{h}.log')}"

    def events(self, topic: str) -> list[dict]:
        return [e for feed in self.feeds for e in feed.of(topic)]

    def stop(self) -> None:
        for feed in self.feeds:
            feed.close()
        for p in self.procs:
            _reap(p)


def split_run(tmp: Path, n: int, lines: int, service: float, inflight: int, plan_delays: dict | None = None) -> dict:
    """One `lines`-line drop through n daemons; its time, the spool's own steps and the daemons' CPU per line."""
    root = tmp / "spool"
    (root / "inbox").mkdir(parents=True)
    plan = {"root": str(root), "delays": plan_delays} if plan_delays else None
    split_lines = 0 if n == 1 else math.ceil(lines / n)
    staging = tmp / "staging"
    staging.mkdir()
    drop = make_drop(staging, "big.jsonl", lines, bad=False)
    daemons = Daemons(tmp, root, n, service=service, inflight=inflight, split_lines=split_lines, plan=plan)
    try:
        daemons.wait_ready()
        started = time.time()
        os.rename(staging / drop.name, root / "inbox" / drop.name)
        job = wait_for(lambda: _finished(root, daemons), 24 * 3600, "the batch in the outbox", interval=0.05)
        ended = time.time()
        cpu = daemons.cpu_seconds() - daemons.cpu_at_start
        wait_for(lambda: [e for e in daemons.events("spoold.job.completed") if e["job"] == job.name], 60,
                 "the batch's end on the feed")  # published just after the outbox rename
        events = {t: daemons.events(f"spoold.job.{t}") for t in ("claimed", "split", "completed")}
    finally:
        daemons.stop()
    v = verdict(root, [drop])
    assert v.ok, v.problems[:5]
    batch = json.loads((job / "batch.json").read_text())
    result = {"daemons": n, "lines": lines, "split_lines": split_lines, "seconds": round(ended - started, 2),
              "lines_per_second": round(lines / (ended - started), 1),
              "daemon_cpu_us_per_line": round(cpu / lines * 1e6, 1), "lost": 0, "doubled": 0}
    if n > 1:
        result.update(_spool_steps(job.name, events, batch))
    shutil.rmtree(root)  # 170,000 lines' results: not left for the next run's disk
    return result


def _finished(root: Path, daemons: Daemons) -> Path | None:
    daemons.check_alive()
    return next((j for j in (root / "outbox").iterdir() if (j / "batch.json").exists()), None)


def _spool_steps(group: str, events: dict[str, list[dict]], batch: dict) -> dict:
    """The spool's own steps of a split run, from the daemons' feeds (their clocks: one machine here)."""
    claimed = min(e["ts"] for e in events["claimed"] if e["job"] == group)
    split = min(e["ts"] for e in events["split"] if e["job"] == group)
    parts_claimed = [e["ts"] for e in events["claimed"] if e["job"].startswith(f"{group}-part")]
    parts_done = [e["ts"] for e in events["completed"] if e["job"].startswith(f"{group}-part")]
    # The last part's end is published after the assembly it triggers: the assembler's own timing
    # (from the last part's publish to the batch's rename into outbox/) is that step.
    return {"parts": len(batch["parts"]), "hosts": len({p["host"] for p in batch["parts"]}),
            "claim_to_split_s": round(split - claimed, 2),
            "split_to_last_part_claimed_s": round(max(parts_claimed) - split, 2),
            "first_to_last_part_done_s": round(max(parts_done) - min(parts_done), 2),
            "last_part_to_assembled_s": batch["timings"].get("assembly_seconds")}


def small_drops(tmp: Path, n: int, drops: int) -> dict:
    """`drops` one-line drops queued at once behind n stopped daemons, then timed until all are in the outbox."""
    root = tmp / "spool"
    (root / "inbox").mkdir(parents=True)
    daemons = Daemons(tmp, root, n, service=0.0, inflight=64, split_lines=0)
    staging = tmp / "staging"
    staging.mkdir()
    made = [make_drop(staging, f"d{i:05d}.jsonl", 1, bad=False) for i in range(drops)]
    try:
        daemons.wait_ready()
        for p in daemons.procs:
            os.kill(p.pid, signal.SIGSTOP)
        for d in made:
            os.rename(staging / d.name, root / "inbox" / d.name)
        started = time.monotonic()
        for p in daemons.procs:
            os.kill(p.pid, signal.SIGCONT)
        wait_for(lambda: daemons.check_alive() or _count(root / "outbox") >= drops, 3600, "every drop in the outbox",
                 interval=0.2)
        seconds = time.monotonic() - started
    finally:
        daemons.stop()
    v = verdict(root, made)  # each drop exactly one job, each line exactly one result
    assert v.ok, v.problems[:5]
    hosts = [json.loads((j / "batch.json").read_text())["host"] for j in (root / "outbox").iterdir()]
    return {"daemons": n, "drops": drops, "seconds": round(seconds, 2), "claims_per_second": round(drops / seconds, 1),
            "hosts_that_claimed": len(set(hosts)), "busiest_host_claims": max(hosts.count(h) for h in set(hosts)),
            "claimed_twice": 0}


def _count(directory: Path) -> int:
    return sum(1 for _ in os.scandir(directory))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--daemons", default="1,2,4,8,16", help="daemon counts to run (default 1,2,4,8,16)")
    parser.add_argument("--lines", type=int, default=170_000, help="lines in the big batch (default 170,000)")
    parser.add_argument("--service", type=float, default=0.2, help="seconds the double takes per request")
    parser.add_argument("--inflight", type=int, default=64, help="requests each daemon's double serves at once")
    parser.add_argument("--drops", type=int, default=10_000, help="one-line drops for the claims run (0: skip)")
    parser.add_argument("--nfs-ms", type=float, default=3.0, help="delay per rename and directory fsync (0: skip)")
    parser.add_argument("--nfs-daemons", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "bench" / "scale_results.json"))
    args = parser.parse_args()
    counts = [int(n) for n in args.daemons.split(",")]
    results: dict = {"service_seconds": args.service, "inflight": args.inflight,
                     "per_daemon_lines_per_second": round(args.inflight / args.service, 1), "cpus": os.cpu_count(),
                     "split": []}
    for n in counts:
        with tempfile.TemporaryDirectory(prefix=f"spoold-scale-{n}-") as tmp:
            run = split_run(Path(tmp), n, args.lines, args.service, args.inflight)
        if n == 1:
            results["one"] = run["seconds"]
        if "one" in results:
            run["efficiency"] = round(results["one"] / n / run["seconds"], 3)
        results["split"].append(run)
        print(json.dumps(run), flush=True)
    if args.nfs_ms:
        with tempfile.TemporaryDirectory(prefix="spoold-scale-nfs-") as tmp:
            run = split_run(Path(tmp), args.nfs_daemons, args.lines, args.service, args.inflight,
                            {"rename": args.nfs_ms / 1000, "fsync_dir": args.nfs_ms / 1000})
        run["nfs_delay_ms"] = args.nfs_ms
        if "one" in results:
            run["efficiency"] = round(results["one"] / args.nfs_daemons / run["seconds"], 3)
        results["nfs"] = run
        print(json.dumps(run), flush=True)
    if args.drops:
        with tempfile.TemporaryDirectory(prefix="spoold-scale-drops-") as tmp:
            results["small_drops"] = small_drops(Path(tmp), 16, args.drops)
        print(json.dumps(results["small_drops"]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
