"""A rehearsal of the job that started spoold: 170,000 scoring lines, two daemons, three kill -9s.

    .venv/bin/python -m bench.rehearsal [--lines 170000] [--kills 3] [--seed 1]

Real vLLM on the tiny local model (the tests' own), two `spoold run` daemons on
one spool (hosts `a` and `b`, the shipped `split_lines` of 20,000, so the
batch becomes nine parts both daemons run), and at random moments (at
random fractions of the batch done, between 10% and 90%) one of them, chosen
at random, is killed with SIGKILL, engine processes too, and started again at
once, as systemd would. Progress is read as `spoold status` reads it. At the
end: wall time from the drop to the assembled outbox, requests per second,
and every line checked: lost 0 and doubled 0 (the torture harness's
verdict). Not part of `make test` (it takes about a quarter of an hour
here); writes bench/rehearsal_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from spoold.config import load_config
from spoold.spool import Spool
from spoold.status import spool_status
from spoold.tinymodel import build_tiny_model

from .workloads import default_rows, write_workload

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The process helper and the verdict live under tests/ only.
from tests.helpers import DaemonProcess, wait_for, write_config  # noqa: E402
from tests.torture.harness import Drop, verdict  # noqa: E402

ENGINE = 'dtype = "float32"\nmax_model_len = 512\nmax_num_seqs = 64\nenforce_eager = true'


def daemon_config(tmp: Path, root: Path, host: str, model: Path) -> Path:
    """The tests' real-vLLM config, with this host's id and feed."""
    config = write_config(tmp / f"{host}.toml", root, adapter="spoold.vllm_adapter:VllmEngine", model="tiny",
                          engine=ENGINE, extra=f'[models]\ntiny = "{model}"\n', settle_seconds=0.2,
                          events_endpoint=f"ipc://{tmp}/{host}.sock")
    config.write_text(config.read_text().replace('host_id = "testhost"', f'host_id = "{host}"'))
    return config


def done_fraction(spool: Spool, total: int) -> float:
    """How much of the batch has a durable result, as `spoold status` shows it (0 before the split)."""
    split = spool_status(spool).get("split") or []
    return (split[0]["completed"] + split[0]["failed"]) / total if split else 0.0


def rehearse(tmp: Path, lines: int, kills: int, rng: random.Random) -> dict:
    model = build_tiny_model(REPO / ".cache" / "tiny-llama")
    root = tmp / "spool"
    configs = {host: daemon_config(tmp, root, host, model) for host in ("a", "b")}
    daemons = {host: DaemonProcess(c, tmp / f"{host}.log").start() for host, c in configs.items()}
    staging = tmp / "staging"
    staging.mkdir()
    rows = default_rows(lines, "tiny")
    write_workload(staging / "scoring.jsonl", rows)
    at = sorted(rng.uniform(0.1, 0.9) for _ in range(kills))
    killed = []
    try:
        for host, d in daemons.items():
            d.wait_ready(root, timeout=600, host=host)
        started = time.monotonic()
        os.rename(staging / "scoring.jsonl", root / "inbox" / "scoring.jsonl")
        spool = Spool(load_config(configs["a"]).spool)
        for fraction in at:
            wait_for(lambda: _assembled(root, daemons) or done_fraction(spool, lines) >= fraction, 3 * 3600,
                     f"{fraction:.0%} done", interval=1)
            if _assembled(root, daemons):
                break  # it finished first
            host = rng.choice(sorted(daemons))
            daemons[host].kill9()
            killed.append({"host": host, "at_fraction": round(fraction, 3),
                           "at_seconds": round(time.monotonic() - started, 1)})
            print(f"kill -9 of {host} at {fraction:.0%} ({killed[-1]['at_seconds']} s)", flush=True)
            daemons[host] = DaemonProcess(configs[host], tmp / f"{host}.log").start()
        wait_for(lambda: _assembled(root, daemons), 3 * 3600, "the batch in the outbox", interval=1)
        seconds = time.monotonic() - started
    finally:
        for d in daemons.values():
            if d.proc.poll() is None:
                d.terminate()
    v = verdict(root, [Drop("scoring.jsonl", {r["custom_id"] for r in rows}, set())])
    (job,) = list((root / "outbox").iterdir())
    batch = json.loads((job / "batch.json").read_text())
    return {"lines": lines, "seconds": round(seconds, 1), "requests_per_second": round(lines / seconds, 1),
            "kills": killed, "parts": [{k: p[k] for k in ("id", "lines", "host", "status")} for p in batch["parts"]],
            "request_counts": batch["request_counts"], "lost": v.lost, "doubled": v.doubled,
            "problems": v.problems[:5]}


def _assembled(root: Path, daemons: dict[str, DaemonProcess]) -> bool:
    for host, d in daemons.items():
        assert d.proc.poll() is None, f"daemon {host} exited:\n{d.log_tail()}"
    return any((job / "batch.json").exists() for job in (root / "outbox").iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=170_000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1, help="where the kills land and whom they hit")
    parser.add_argument("--out", default=str(REPO / "bench" / "rehearsal_results.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spoold-rehearsal-") as tmp:
        result = rehearse(Path(tmp), args.lines, args.kills, random.Random(args.seed))
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if result["lost"] or result["doubled"] or result["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
