"""spoold against raw vLLM and `vllm run-batch`, side by side, in one run.

    .venv/bin/python -m bench.run [--requests 2000] [--rounds 5] [--workloads default,mixed]
        [--model HF_ID_OR_PATH] [--engine-arg dtype='"auto"' ...] [--out FILE]

Same input file, same engine arguments, contenders alternated each round
(the machine is shared and noisy). Raw vLLM and both spoold daemons load
their model once and stay loaded, so a round's contenders run seconds apart
and the machine's slow drifts hit them alike; run-batch loads afresh each
time (that is how it runs). Model loading is timed separately and excluded
from throughput. Prints a table and writes bench/results.json.

The tiny model and CPU settings (`ENGINE`) unless `--model` names another
and `--engine-arg` changes a setting for all four contenders alike: on a
GPU box, e.g. `--engine-arg dtype='"auto"' --engine-arg enforce_eager=false`.
"""

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
#: Offline, and a small CPU KV cache, unless the environment says otherwise (a GPU box fetching its model).
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, "PYTHONPATH": str(REPO)}
CONTENDERS = ("raw", "run_batch", "spoold", "spoold_default")
#: Raw `LLM` turns vLLM's stats logging off by default; the others get the same
#: (spoold_default shows spoold's shipped config, which keeps it on for metrics).
SAME_ARGS = {"disable_log_stats": True}


class RawVllm:
    """`LLM.chat` in a process of its own (bench.raw_vllm), loaded once, run per workload."""

    def __init__(self, model: str | Path, tmp: Path, engine: dict) -> None:
        self.log = open(tmp / "raw.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.raw_vllm", "--model", str(model),
             "--engine", json.dumps({**engine, **SAME_ARGS})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=ENV, cwd=REPO)
        self.load_s = json.loads(self._reply("READY "))["load_s"]

    def _reply(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        raise RuntimeError(f"raw vLLM exited (log: {self.log.name})")

    def run(self, workload: Path) -> dict:
        self.proc.stdin.write(f"{workload}\n")
        self.proc.stdin.flush()
        return {**json.loads(self._reply("BENCH_RESULT ")), "load_s": self.load_s}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def run_run_batch(model: str | Path, workload: Path, tmp: Path, engine: dict) -> dict:
    """`vllm run-batch`: engine phase = from its "Reading batch" log line to its output file's mtime."""
    output = tmp / "run_batch_out.jsonl"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(workload), "-o", str(output),
           "--model", str(model), "--served-model-name", str(model), *cli_flags({**engine, **SAME_ARGS})]
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


class Spoold:
    """One `spoold run` daemon, loaded once; each run drops the workload into its inbox.

    `engine_settings` override `[engine]` keys (max_num_seqs, max_inflight),
    `spool_settings` `[spool]` keys (max_active_jobs), and `engine_args` go to
    `[engine.args]`, for trying variants.
    """

    def __init__(self, model: str | Path, tmp: Path, engine_args: dict | None = None,
                 engine_settings: dict | None = None, spool_settings: dict | None = None) -> None:
        self.root = tmp / "spool"
        (self.root / "inbox").mkdir(parents=True)
        self.config = config = tmp / "spoold.toml"
        engine = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**ENGINE, **(engine_settings or {})}.items())
        extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in (engine_args or {}).items())
        spool = "".join(f"{k} = {json.dumps(v)}\n" for k, v in (spool_settings or {}).items())
        config.write_text(f'[spool]\nroot = "{self.root}"\nhost_id = "bench"\npoll_seconds = 0.2\n{spool}'
                          f'[engine]\nmodel = "{model}"\n{engine}\n[engine.args]\n{extra}\n'
                          f'[events]\nendpoint = "ipc://{tmp}/events.sock"\n[metrics]\nlisten = ""\n')
        self.log = tmp / "spoold.log"
        started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "spoold", "run", "--config", str(config)],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=ENV, cwd=REPO,
                                     start_new_session=True)
        beat = self.root / "processing" / "bench" / "heartbeat.json"
        while not (beat.exists() and json.loads(beat.read_text() or "{}").get("state") == "idle"):
            if self.proc.poll() is not None:
                raise RuntimeError("spoold exited:\n" + self.log.read_text()[-3000:])
            time.sleep(0.05)
        self.load_s = time.time() - started
        self.drops = 0

    def run(self, workload: Path) -> dict:
        """Drop-to-outbox time, and the engine phase from batch.json."""
        self.drops += 1
        name = f"bench{self.drops}.jsonl"
        staged = self.root / "inbox" / f".{name}.tmp"
        staged.write_bytes(workload.read_bytes())
        dropped = time.monotonic()
        os.rename(staged, self.root / "inbox" / name)
        first_seen = None
        while not (done := list((self.root / "outbox").glob(f"bench{self.drops}-*/batch.json"))):
            if self.proc.poll() is not None:
                raise RuntimeError("spoold exited:\n" + self.log.read_text()[-3000:])
            if first_seen is None and any(p.stat().st_size for p in
                                          self.root.glob(f"processing/bench/bench{self.drops}-*/output.jsonl")):
                first_seen = time.monotonic() - dropped
            time.sleep(0.01)
        end_to_end = time.monotonic() - dropped
        batch = json.loads(done[0].read_text())
        t = batch["timings"]
        return {"load_s": self.load_s, "engine_s": t["engine_seconds"], "end_to_end_s": end_to_end,
                "requests": batch["request_counts"]["completed"], "output_tokens": batch["usage"]["output_tokens"],
                "first_result_s": t["first_result_seconds"], "first_line_after_drop_s": first_seen}

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=120)


def cli_flags(engine: dict) -> list[str]:
    """Engine arguments as vLLM's command line takes them: `--max-num-seqs 64`, `--enforce-eager` for
    True; False is left out (every flag of ENGINE's is off unless given)."""
    flags = []
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    return flags


def bench_workloads(workloads: dict[str, list[dict]], model: str | Path, rounds: int, engine: dict) -> dict:
    """Every workload, `rounds` rounds each, with the warm contenders loaded once for all; `engine`: the
    engine arguments every contender gets."""
    report = {}
    with tempfile.TemporaryDirectory(prefix="spoold-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for sub in ("raw", "spoold", "spoold_default"):
            (tmp / sub).mkdir()
        warm: dict = {}
        try:
            # One at a time: loads compete for the CPU, and their times are reported.
            warm["raw"] = RawVllm(model, tmp / "raw", engine)
            warm["spoold"] = Spoold(model, tmp / "spoold", SAME_ARGS, engine_settings=engine)
            warm["spoold_default"] = Spoold(model, tmp / "spoold_default", engine_settings=engine)
            print("loaded: " + ", ".join(f"{c} {w.load_s:.1f}s" for c, w in warm.items()), flush=True)
            # One untimed small run each, so no timed run pays a warm contender's first-use costs.
            warmup = write_workload(tmp / "warmup.jsonl", next(iter(workloads.values()))[:64])
            for contender in warm.values():
                contender.run(warmup)
            for name, rows in workloads.items():
                workload = write_workload(tmp / f"{name}.jsonl", rows)
                report[name] = bench_workload(name, workload, len(rows), model, rounds, warm, tmp, engine)
        finally:
            for contender in warm.values():
                contender.close()
    return report


def bench_workload(name: str, workload: Path, requests: int, model: str | Path, rounds: int,
                   warm: dict, tmp: Path, engine: dict) -> dict:
    """`rounds` rounds of every contender on one workload, who goes first rotating."""
    results: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    print(f"workload {name}: {requests} requests, {rounds} rounds", flush=True)
    for r in range(rounds):
        k = r % len(CONTENDERS)
        for contender in CONTENDERS[k:] + CONTENDERS[:k]:
            if contender in warm:
                res = warm[contender].run(workload)
            else:
                with tempfile.TemporaryDirectory(dir=tmp) as run_tmp:
                    res = run_run_batch(model, workload, Path(run_tmp), engine)
            res["rps"] = res["requests"] / res["engine_s"]
            res["tps"] = res["output_tokens"] / res["engine_s"]
            results[contender].append(res)
            print(f"  {name} round {r + 1} {contender:14s} {res['rps']:7.1f} req/s  "
                  f"{res['tps']:8.1f} tok/s  load {res['load_s']:5.1f}s", flush=True)
    summary = {c: {k: statistics.median(x[k] for x in results[c])
                   for k in ("rps", "tps", "engine_s", "load_s", "first_result_s")} for c in CONTENDERS}
    for c in ("spoold", "spoold_default"):
        summary[c]["end_to_end_s"] = statistics.median(x["end_to_end_s"] for x in results[c])
        summary[c]["first_line_after_drop_s"] = statistics.median(
            x["first_line_after_drop_s"] for x in results[c] if x["first_line_after_drop_s"] is not None)
    ratios = {f"{ours}/{other}": statistics.median(s["rps"] / o["rps"] for s, o in zip(results[ours], results[other], strict=True))
              for ours in ("spoold", "spoold_default") for other in ("raw", "run_batch")}
    return {"requests": requests, "rounds": results, "median": summary, "median_pairwise_ratio": ratios}


#: How a result names the model the tests build, which the benches run unless `--model` names another.
TINY_MODEL = "tiny local Llama (2 layers, hidden 128; spoold.tinymodel)"


def model_to_serve(named: str | None) -> str:
    """`--model`'s Hugging Face id or path, else the tiny model the tests build (built here once)."""
    return named or str(build_tiny_model(REPO / ".cache" / "tiny-llama"))


def settings(pairs: list[str]) -> dict:
    """`--engine-arg`/`--spool-arg` pairs (`KEY=JSON`, e.g. `max_num_seqs=16`) as settings."""
    return {key: json.loads(value) for key, value in (pair.split("=", 1) for pair in pairs)}


def machine(model: str = TINY_MODEL, engine: dict | None = None) -> dict:
    """What a result was measured on: CPU, cores, GPUs (NVML's names; none on a CPU box), versions,
    the model and the `[engine]` settings in effect, so numbers from two boxes are never confused."""
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    import vllm

    from spoold.gpu import GpuReader

    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": [g["name"] for g in GpuReader().read()],
            "python": platform.python_version(), "vllm": vllm.__version__,
            "engine_args": {**ENGINE, **(engine or {})}, "model": model, "date": time.strftime("%Y-%m-%d")}


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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", default="default,mixed")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    parser.add_argument("--model", help="a Hugging Face id or local path to serve instead of the tiny model the "
                                        "tests build (a real one, on a GPU box)")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=JSON",
                        help="an engine argument for every contender, over ENGINE's, e.g. enforce_eager=false")
    args = parser.parse_args()
    model = model_to_serve(args.model)
    engine = {**ENGINE, **settings(args.engine_arg)}
    makers = {"default": default_rows, "mixed": mixed_rows}
    workloads = {name: makers[name](args.requests, model) for name in args.workloads.split(",")}
    report = {"machine": machine(args.model or TINY_MODEL, engine), "rounds": args.rounds,
              "workloads": bench_workloads(workloads, model, args.rounds, engine)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
