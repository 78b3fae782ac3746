"""Claims per second from a backlog of one-line drops, with the fast engine double.

    .venv/bin/python -m bench.claim_bench [--drops 10000]

The drops are renamed into the inbox while the daemon is stopped (SIGSTOP),
as a burst from many clients would queue them; then it is let go and timed
until every drop is a job in the outbox. Each job is claimed, validated,
run and published, so this is whole jobs per second. A daemon that rescans
the inbox for every claim gets faster as the inbox empties: the two halves'
rates show it. The daemon's CPU per job, in user space and in the kernel,
comes from psutil.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.cpu import cpu_seconds  # noqa: E402
from tests.helpers import DaemonProcess, write_config  # noqa: E402  (the double lives under tests/ only)

LINE = ('{"custom_id": "c-0", "method": "POST", "url": "/v1/chat/completions", "body": '
        '{"model": "fake-model", "max_tokens": 8, "messages": [{"role": "user", "content": "Score it"}]}}\n')


def backlog(tmp: Path, drops: int) -> dict:
    """Queue `drops` one-line drops behind a stopped daemon, then time it through them."""
    root = tmp / "spool"
    daemon = DaemonProcess(write_config(tmp / "c.toml", root), tmp / "daemon.log").start()
    try:
        daemon.wait_ready(root, timeout=60)
        staging = tmp / "staging"
        staging.mkdir()
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        for i in range(drops):
            (staging / f"d{i:05d}.jsonl").write_text(LINE)
            os.rename(staging / f"d{i:05d}.jsonl", root / "inbox" / f"d{i:05d}.jsonl")
        start, cpu_before = time.monotonic(), cpu_seconds(daemon.proc.pid)
        os.kill(daemon.proc.pid, signal.SIGCONT)
        half_at = None
        while (done := _count(root / "outbox")) < drops:
            if half_at is None and done >= drops // 2:
                half_at = time.monotonic()
            assert daemon.proc.poll() is None, daemon.log_tail()
            time.sleep(0.2)
        end, cpu_after = time.monotonic(), cpu_seconds(daemon.proc.pid)
    finally:
        daemon.terminate()
    half_at = half_at or end
    return {"drops": drops, "seconds": round(end - start, 2),
            "jobs_per_second": round(drops / (end - start), 1),
            "first_half_jobs_per_second": round(drops / 2 / (half_at - start), 1),
            "second_half_jobs_per_second": round(drops / 2 / max(end - half_at, 1e-9), 1),
            **{f"daemon_{k}_cpu_ms_per_job": round((cpu_after[k] - cpu_before[k]) / drops * 1000, 2)
               for k in ("user", "system")}}


def _count(directory: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(directory))
    except FileNotFoundError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drops", type=int, default=10_000)
    parser.add_argument("--out", default=str(REPO / "bench" / "claim_results.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spoold-claims-") as tmp:
        result = backlog(Path(tmp), args.drops)
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
