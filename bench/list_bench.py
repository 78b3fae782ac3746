"""Listing batches and files through `spoold api` with the `openai` SDK when many exist: seconds per page.

    .venv/bin/python -m bench.list_bench [--batches 20000] [--pages 20]

An app written for OpenAI's Batch API finds its batches with
`client.batches.list()`, whose iterator fetches page after page of 20. The
spool is given BATCHES finished batches, as `spoold api` and a daemon leave
them (a month of a busy app's batches, before `[api] file_retention`
removes them: a record, an uploaded input, output and error files); the API
runs as its own process, and the bench times the first page (the API's
first look at the records, beside its start-up retention sweep), waits
for that sweep to end, and times PAGES more, followed as the SDK follows
them; then `client.files.list()` (its first page: 10,000 of the 3 x
BATCHES files) three times. Every record is of the one loopback tenant, so
every page is full.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.api_bench import api_process  # noqa: E402
from spoold.apibatch import ApiBatch, random_id  # noqa: E402
from spoold.apikeys import LOCAL  # noqa: E402
from spoold.filestore import StoredFile  # noqa: E402


def make_records(root: Path, count: int) -> None:
    """`count` finished batches of the loopback tenant, one second apart, as `spoold api` and a daemon
    leave them: the batch's record, its uploaded input, and its output and error files in outbox/."""
    for directory in ("batches", "files", "outbox"):
        (root / directory).mkdir(parents=True)
    now = int(time.time())
    for i in range(count):
        batch = ApiBatch(random_id("batch_"), LOCAL, random_id("file-"), "/v1/chat/completions", "24h", now - i,
                         now - i + 86400, random_id("file-"), random_id("file-"), {"run": str(i)})
        batch.save(root / "batches")
        job = root / "outbox" / batch.id
        job.mkdir()
        (job / "batch.json").write_text(json.dumps({"id": batch.id, "status": "completed", "created_at": now - i,
                                                    "completed_at": now - i + 60, "request_counts": {
                                                        "total": 1, "completed": 1, "failed": 0}}))
        for name in ("output.jsonl", "errors.jsonl"):
            (job / name).write_text("{}\n")
        _file(root, StoredFile(batch.input_file_id, 2, now - i, "input.jsonl", "batch", LOCAL), b"{}")
        _file(root, StoredFile(batch.output_file_id, 0, now - i + 60, f"{batch.id}_output.jsonl", "batch_output",
                               LOCAL, result_of=f"outbox/{batch.id}/output.jsonl"))
        _file(root, StoredFile(batch.error_file_id, 0, now - i + 60, f"{batch.id}_errors.jsonl", "batch_output",
                               LOCAL, result_of=f"outbox/{batch.id}/errors.jsonl"))


def _file(root: Path, stored: StoredFile, content: bytes | None = None) -> None:
    """A file's record (and an upload's bytes) where the API keeps them."""
    (root / "files" / stored.id).mkdir()
    (root / "files" / stored.id / "file.json").write_text(json.dumps(asdict(stored)))
    if content is not None:
        (root / "files" / stored.id / "content").write_bytes(content)


def wait_until_idle(pid: int) -> float:
    """Wait out the retention sweep that `spoold api` starts with (it reads every record too, and would
    share the CPU with the pages timed next): until the process uses under a tenth of a core for a
    second. Returns how long that took."""
    process, started = psutil.Process(pid), time.monotonic()
    while True:
        before = sum(process.cpu_times()[:2])
        time.sleep(1)
        if sum(process.cpu_times()[:2]) - before < 0.1:
            return time.monotonic() - started


def run(batches: int, pages: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="spoold-list-bench-") as tmp:
        tmp = Path(tmp)
        make_records(tmp / "spool", batches)
        with api_process(tmp) as (proc, client):
            started = time.monotonic()
            page = client.batches.list(limit=20)
            first_s = time.monotonic() - started
            settled_s = wait_until_idle(proc.pid)
            seconds, seen = [], [b.id for b in page.data]
            for _ in range(pages):
                started = time.monotonic()
                page = page.get_next_page()
                seconds.append(time.monotonic() - started)
                seen += [b.id for b in page.data]
            files_s = []
            for _ in range(3):
                started = time.monotonic()
                listed = client.files.list()
                files_s.append(time.monotonic() - started)
            rss_mib = psutil.Process(proc.pid).memory_info().rss / 2**20
    return {"batches": batches, "first_page_s": round(first_s, 3), "startup_sweep_s": round(settled_s, 1),
            "next_page_median_s": round(statistics.median(seconds), 3), "next_page_max_s": round(max(seconds), 3),
            "pages": pages + 1, "listed_once_each": len(seen) == len(set(seen)) == 20 * (pages + 1),
            "whole_walk_estimate_s": round(first_s + statistics.median(seconds) * (batches / 20 - 1), 1),
            "files": 3 * batches, "files_list_s": [round(x, 3) for x in files_s],
            "files_listed": len(listed.data), "api_rss_mib_after": round(rss_mib, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "bench" / "list_results.json"))
    args = parser.parse_args()
    result = run(args.batches, args.pages)
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
