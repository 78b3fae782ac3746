"""The spool's own costs, with the fast engine double (the engine is not what is measured).

    .venv/bin/python -m bench.spool_bench [--lines 1000000]

- durable write path: results fsynced per second with group commit, fsyncs per second;
- validation: lines per second of `spoold validate` on a large file;
- a 1,000,000-line job through `spoold run`: peak RSS (sampled as the job runs);
- peak RSS of whole jobs of 250K, 1M and 2M lines: flat, or growing with the file;
- resume after kill -9 at 60%: time until the daemon found its place;
- claim latency: renamed-in drop (inotify) and in-place write (settle + poll).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from spoold.config import EngineSettings, LimitsSettings, SpoolSettings
from spoold.jobrunner import JobRunner
from spoold.spool import Spool
from spoold.submit import validate_file
from spoold.validation import ModelResolver
from spoold.window import FairWindow

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.fake_engine import EchoEngine  # noqa: E402  (the double lives under tests/ only)
from tests.helpers import DaemonProcess, write_config  # noqa: E402


def write_lines(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write('{"custom_id": "c-%d", "method": "POST", "url": "/v1/chat/completions", "body": '
                    '{"model": "fake-model", "max_tokens": 8, "messages": [{"role": "user", '
                    '"content": "Score candidate %d from 1 to 10 for the data engineer role."}]}}\n' % (i, i))
    return path


def write_path(tmp: Path, n: int) -> dict:
    """In-process JobRunner with an instant engine: dispatch (each line parsed again), the double, group commit.

    Timed from the first dispatch to the last fsync (validation is measured
    on its own below).
    """
    spool = Spool(SpoolSettings(root=tmp / "wp", host_id="h"))
    spool.ensure_dirs()
    write_lines(spool.inbox / "w.jsonl", n)
    job = spool.claim_drop("w.jsonl")

    async def go():
        runner = JobRunner(spool, job, EchoEngine(EngineSettings(model="fake-model")), ModelResolver({}, "fake-model"),
                           LimitsSettings(), FairWindow(512).join(job.id), asyncio.Event())
        await runner.run()
        return runner
    runner = asyncio.run(go())
    timings = json.loads((spool.outbox / job.id / "batch.json").read_text())["timings"]
    assert sum(1 for _ in open(spool.outbox / job.id / "output.jsonl")) == n
    fsyncs = runner._writer.fsyncs
    return {"lines": n, "lines_per_second": n / timings["engine_seconds"], "engine_seconds": timings["engine_seconds"],
            "fsyncs": fsyncs, "fsyncs_per_second": fsyncs / timings["engine_seconds"]}


def fsync_rate(tmp: Path, n: int) -> dict:
    """Group commit in isolation: the writer alone, fed as fast as the event loop can.

    The feeding loop never lets go of the GIL, so the commit thread only gets
    it at the interpreter's switch interval: groups come out few and large
    here. The write path below shows the grouping of a real job.
    """
    from spoold.records import EngineResult
    from spoold.formats import Tally
    from spoold.writer import GroupCommitWriter

    body = json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "7"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}})
    result = EngineResult(200, body, 20, 1)

    async def go():
        writer = GroupCommitWriter(tmp / "o.jsonl", tmp / "e.jsonl", Tally())
        task = asyncio.create_task(writer.run())
        start = time.perf_counter()
        for i in range(n):
            writer.add_result(i + 1, f"c-{i}", result)
            if i % 500 == 0:
                await asyncio.sleep(0)  # results arrive over time, as from an engine
        await writer.flush()
        elapsed = time.perf_counter() - start
        task.cancel()
        writer.close()
        return elapsed, writer.fsyncs
    elapsed, fsyncs = asyncio.run(go())
    return {"lines": n, "lines_per_second": n / elapsed, "fsyncs": fsyncs, "fsyncs_per_second": fsyncs / elapsed}


def validation(path: Path, n: int) -> dict:
    start = time.perf_counter()
    report = validate_file(str(path), ModelResolver({}, "fake-model"), LimitsSettings())
    elapsed = time.perf_counter() - start
    assert report.lines == n and not report.errors
    return {"lines": n, "lines_per_second": n / elapsed}


def rss_kib(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    get = lambda key: int(re.search(rf"{key}:\s+(\d+)", status).group(1))
    return get("VmRSS"), get("VmHWM")


def million(tmp: Path, big: Path, n: int) -> dict:
    """`spoold run` on an n-line file: RSS as it goes, then kill -9 at 60% and time the resume."""
    root = tmp / "spool"
    config = write_config(tmp / "c.toml", root, engine="max_inflight = 512")
    (root / "inbox").mkdir(parents=True)
    log = tmp / "daemon.log"
    daemon = DaemonProcess(config, log).start()
    time.sleep(2)
    os.link(big, root / "inbox" / "million.jsonl.tmp")
    os.rename(root / "inbox" / "million.jsonl.tmp", root / "inbox" / "million.jsonl")
    samples = []
    out = None
    while True:
        out = out or next(iter(root.glob("processing/testhost/*/output.jsonl")), None)
        done = out.stat().st_size // 370 if out and out.exists() else 0  # rough, for sampling only
        samples.append((done, rss_kib(daemon.proc.pid)[0]))
        if out and out.exists() and sum(1 for _ in open(out, "rb")) >= 0.6 * n:
            break
        time.sleep(1)
    peak = rss_kib(daemon.proc.pid)[1]
    daemon.kill9()
    restart = time.monotonic()
    daemon.start()  # same log, appended
    while not list((root / "outbox").glob("*/batch.json")):
        peak = max(peak, rss_kib(daemon.proc.pid)[1])
        time.sleep(0.5)
    wall_resume = time.monotonic() - restart
    daemon.terminate()
    found = float(re.search(r"already done \(found in ([\d.]+)s\)", log.read_text()).group(1))
    batch = json.loads(next((root / "outbox").glob("*/batch.json")).read_text())
    assert batch["request_counts"]["completed"] == n
    return {"lines": n, "peak_rss_mib": peak / 1024, "rss_samples_mib": [round(r / 1024) for _, r in samples],
            "resume_found_place_s": found, "resume_to_outbox_s": wall_resume}


def peak_by_length(tmp: Path, lengths: tuple[int, ...]) -> dict:
    """Peak RSS of one fresh `spoold run` per file length, each job run to the outbox.

    The target is that memory does not grow with the file: the peaks of a
    short and a long file should be the same, give or take the allocator.
    """
    peaks = {}
    for n in lengths:
        root = tmp / f"len{n}"
        config = write_config(tmp / f"len{n}.toml", root, engine="max_inflight = 512")
        (root / "inbox").mkdir(parents=True)
        big = write_lines(tmp / f"len{n}.jsonl", n)
        daemon = DaemonProcess(config, tmp / f"len{n}.log").start()
        time.sleep(2)
        idle = rss_kib(daemon.proc.pid)[0]
        os.rename(big, root / "inbox" / big.name)
        while not list((root / "outbox").glob("*/batch.json")):
            time.sleep(0.5)
        peaks[n] = {"idle_rss_mib": round(idle / 1024, 1), "peak_rss_mib": round(rss_kib(daemon.proc.pid)[1] / 1024, 1)}
        daemon.terminate()
        shutil.rmtree(root)
    return peaks


def claim_latency(tmp: Path) -> dict:
    root = tmp / "claim"
    config = write_config(tmp / "claim.toml", root)  # settle 1 s, poll 0.2 s
    (root / "inbox").mkdir(parents=True)
    daemon = DaemonProcess(config, tmp / "claim.log").start()
    time.sleep(2)
    results = {}
    for kind in ("renamed_in_inbox", "moved_from_outside", "in_place"):
        name = f"{kind}.jsonl"
        if kind == "renamed_in_inbox":  # rsync, spoold submit: hidden temp name, then rename
            write_lines(root / "inbox" / f".{name}.tmp", 10)
            start = time.monotonic()
            os.rename(root / "inbox" / f".{name}.tmp", root / "inbox" / name)
        elif kind == "moved_from_outside":  # mv on the same filesystem
            write_lines(tmp / name, 10)
            start = time.monotonic()
            os.rename(tmp / name, root / "inbox" / name)
        else:  # scp / NFS: written in place, claimed once settled
            start = time.monotonic()
            write_lines(root / "inbox" / name, 10)
        while (root / "inbox" / name).exists():
            time.sleep(0.005)
        results[f"{kind}_claim_s"] = time.monotonic() - start
    daemon.terminate()
    results["settle_seconds"], results["poll_seconds"] = 1.0, 0.2
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--out", default=str(REPO / "bench" / "spool_results.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spoold-spool-bench-") as d:
        tmp = Path(d)
        report = {"fsync_group_commit": fsync_rate(tmp, 200_000)}
        print("group commit:", report["fsync_group_commit"], flush=True)
        report["write_path"] = write_path(tmp, 100_000)
        print("write path (dispatch + commit, instant engine):", report["write_path"], flush=True)
        big = write_lines(tmp / "big.jsonl", args.lines)
        report["validation"] = validation(big, args.lines)
        print("validation:", report["validation"], flush=True)
        report["claim"] = claim_latency(tmp)
        print("claim latency:", report["claim"], flush=True)
        report["million"] = million(tmp, big, args.lines)
        print("1M-line job:", {k: v for k, v in report["million"].items() if k != "rss_samples_mib"}, flush=True)
        print("  RSS samples (MiB) as the job ran:", report["million"]["rss_samples_mib"], flush=True)
        report["peak_by_length"] = peak_by_length(tmp, (250_000, args.lines, 2 * args.lines))
        print("peak RSS by file length (lines: MiB):", report["peak_by_length"], flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
