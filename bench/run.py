"""spoold against raw vLLM and `vllm run-batch`, side by side, in one run.

    .venv/bin/python -m bench.run [--requests 2000] [--rounds 3] [--workloads default,mixed]

Same input file, same engine arguments, contenders alternated each round
(the machine is shared and noisy). Model loading is timed separately and
excluded from throughput. Prints a table and writes bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spoold.tinymodel import build_tiny_model

from .workloads import default_rows, mixed_rows, write_workload

REPO = Path(__file__).resolve().parent.parent
ENGINE = {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 64, "enforce_eager": True}
ENV = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           PYTHONPATH=str(REPO))
CONTENDERS = ("raw", "run_batch", "spoold", "spoold_default")
#: Raw `LLM` turns vLLM's stats logging off by default; the others get the same
#: (spoold_default shows spoold's shipped config, which keeps it on for metrics).
SAME_ARGS = {"disable_log_stats": True}


def run_raw(model: Path, workload: Path, tmp: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.raw_vllm", "--input", str(workload), "--model", str(model),
                          "--engine", json.dumps({**ENGINE, **SAME_ARGS})], capture_output=True, text=True, env=ENV, cwd=REPO,
                         timeout=900)
    line = next((l for l in out.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"raw vLLM failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[len("BENCH_RESULT "):])


def run_run_batch(model: Path, workload: Path, tmp: Path) -> dict:
    """`vllm run-batch`: engine phase = from its "Reading batch" log line to its output file's mtime."""
    output = tmp / "run_batch_out.jsonl"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(workload), "-o", str(output),
           "--model", str(model), "--served-model-name", str(model), "--dtype", ENGINE["dtype"],
           "--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
           "--enforce-eager", "--disable-log-stats"]
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO)
    reading_at = None
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if reading_at is None and "Reading batch from" in line:
            reading_at = time.time()
    proc.wait(timeout=900)
    if proc.returncode != 0 or reading_at is None or not output.exists():
        raise RuntimeError("run-batch failed:\n" + "".join(tail))
    finished_at = output.stat().st_mtime
    results = [json.loads(l) for l in output.read_text().split("\n") if l]
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results)
    return {"load_s": reading_at - started, "engine_s": finished_at - reading_at, "requests": len(results),
            "output_tokens": tokens, "first_result_s": finished_at - reading_at}


def run_spoold(model: Path, workload: Path, tmp: Path, engine_args: dict | None = None) -> dict:
    """spoold: drop-to-outbox time, and the engine phase from batch.json.

    `engine_args` goes to `[engine.args]`, for trying variants.
    """
    root = tmp / "spool"
    (root / "inbox").mkdir(parents=True)
    config = tmp / "spoold.toml"
    engine = "\n".join(f"{k} = {json.dumps(v)}" for k, v in ENGINE.items())
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in (engine_args or {}).items())
    config.write_text(f'[spool]\nroot = "{root}"\nhost_id = "bench"\npoll_seconds = 0.2\n'
                      f'[engine]\nmodel = "{model}"\n{engine}\n[engine.args]\n{extra}\n'
                      f'[events]\nendpoint = "ipc://{tmp}/events.sock"\n[metrics]\nlisten = ""\n')
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "spoold", "run", "--config", str(config)],
                            stdout=open(tmp / "spoold.log", "wb"), stderr=subprocess.STDOUT, env=ENV, cwd=REPO,
                            start_new_session=True)
    try:
        beat = root / "processing" / "bench" / "heartbeat.json"
        while not (beat.exists() and json.loads(beat.read_text() or "{}").get("state") == "idle"):
            if proc.poll() is not None:
                raise RuntimeError("spoold exited:\n" + (tmp / "spoold.log").read_text()[-3000:])
            time.sleep(0.05)
        load_s = time.time() - started
        staged = root / "inbox" / ".bench.jsonl.tmp"
        staged.write_bytes(workload.read_bytes())
        dropped = time.monotonic()
        os.rename(staged, root / "inbox" / "bench.jsonl")
        first_seen = None
        while True:
            done = list((root / "outbox").glob("*/batch.json"))
            if done:
                break
            if first_seen is None and any(p.stat().st_size for p in root.glob("processing/bench/*/output.jsonl")):
                first_seen = time.monotonic() - dropped
            time.sleep(0.01)
        end_to_end = time.monotonic() - dropped
        batch = json.loads(done[0].read_text())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    t = batch["timings"]
    return {"load_s": load_s, "engine_s": t["engine_seconds"], "end_to_end_s": end_to_end,
            "requests": batch["request_counts"]["completed"], "output_tokens": batch["usage"]["output_tokens"],
            "first_result_s": t["first_result_seconds"], "first_line_after_drop_s": first_seen}


RUNNERS = {"raw": run_raw, "run_batch": run_run_batch,
           "spoold": lambda model, workload, tmp: run_spoold(model, workload, tmp, SAME_ARGS),
           "spoold_default": run_spoold}


def bench_workload(name: str, rows: list[dict], model: Path, rounds: int) -> dict:
    results: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix=f"spoold-bench-{name}-") as tmpdir:
        workload = write_workload(Path(tmpdir) / f"{name}.jsonl", rows)
        for r in range(rounds):
            k = r % len(CONTENDERS)
            order = CONTENDERS[k:] + CONTENDERS[:k]  # alternate who goes first
            for contender in order:
                with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
                    res = RUNNERS[contender](model, workload, Path(tmp))
                res["rps"] = res["requests"] / res["engine_s"]
                res["tps"] = res["output_tokens"] / res["engine_s"]
                results[contender].append(res)
                print(f"  {name} round {r + 1} {contender:9s} {res['rps']:7.1f} req/s  "
                      f"{res['tps']:8.1f} tok/s  load {res['load_s']:5.1f}s", flush=True)
    summary = {c: {k: statistics.median(x[k] for x in results[c])
                   for k in ("rps", "tps", "engine_s", "load_s", "first_result_s")} for c in CONTENDERS}
    for c in ("spoold", "spoold_default"):
        summary[c]["end_to_end_s"] = statistics.median(x["end_to_end_s"] for x in results[c])
        summary[c]["first_line_after_drop_s"] = statistics.median(
            x["first_line_after_drop_s"] for x in results[c] if x["first_line_after_drop_s"] is not None)
    ratios = {f"{ours}/{other}": statistics.median(s["rps"] / o["rps"] for s, o in zip(results[ours], results[other], strict=True))
              for ours in ("spoold", "spoold_default") for other in ("raw", "run_batch")}
    return {"requests": len(rows), "rounds": results, "median": summary, "median_pairwise_ratio": ratios}


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    import vllm

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "vllm": vllm.__version__,
            "engine_args": ENGINE, "model": "tiny local Llama (2 layers, hidden 128; spoold.tinymodel)",
            "date": time.strftime("%Y-%m-%d")}


def table(report: dict) -> str:
    lines = ["| workload | contender | req/s | output tok/s | engine s | load s | first durable line s |",
             "|---|---|---|---|---|---|---|"]
    for name, w in report["workloads"].items():
        for c in CONTENDERS:
            m = w["median"][c]
            lines.append(f"| {name} ({w['requests']}) | {c} | {m['rps']:.1f} | {m['tps']:.0f} | "
                         f"{m['engine_s']:.2f} | {m['load_s']:.1f} | {m['first_result_s']:.2f} |")
        r = w["median_pairwise_ratio"]
        lines.append(f"| {name} | median pairwise ratio | **spoold/raw {r['spoold/raw']:.3f}** | "
                     f"**spoold/run-batch {r['spoold/run_batch']:.3f}** | "
                     f"spoold_default/raw {r['spoold_default/raw']:.3f} | "
                     f"spoold_default/run-batch {r['spoold_default/run_batch']:.3f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="default,mixed")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    args = parser.parse_args()
    model = build_tiny_model(REPO / ".cache" / "tiny-llama")
    makers = {"default": default_rows, "mixed": mixed_rows}
    report = {"machine": machine(), "workloads": {}}
    for name in args.workloads.split(","):
        print(f"workload {name}: {args.requests} requests, {args.rounds} rounds", flush=True)
        report["workloads"][name] = bench_workload(name, makers[name](args.requests, str(model)), model, args.rounds)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
