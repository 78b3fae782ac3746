"""`spoold demo`: the main job, end to end, on a machine with no GPU and no network.

Builds the tiny local model, starts `spoold run` on a temporary spool,
submits a sample batch (with two deliberately bad lines), shows progress,
and prints where the results are and how to point the config at a real model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .submit import submit_file
from .tinymodel import build_tiny_model, default_model_dir

#: How long the demo waits for the model to load and the batch to finish.
DEMO_TIMEOUT_SECONDS = 900


def demo_config(root: Path, model: Path) -> str:
    """A config for the tiny model on a temporary spool (CPU-friendly settings)."""
    return f"""# spoold demo config: tiny local model, temporary spool
[spool]
root = "{root}"
settle_seconds = 1
poll_seconds = 0.5

[engine]
model = "tiny"
dtype = "float32"
max_model_len = 512
max_num_seqs = 64
enforce_eager = true

[models]
tiny = "{model}"
"""


def sample_batch(path: Path, lines: int) -> None:
    """A chat batch of `lines` requests, plus one non-JSON line and one duplicate id."""
    with open(path, "w") as f:
        for i in range(lines):
            f.write(json.dumps({
                "custom_id": f"candidate-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "tiny", "max_tokens": 16, "temperature": 0,
                         "messages": [{"role": "user", "content": f"Score candidate {i} from 1 to 10."}]},
            }) + "\n")
        f.write("this line is not JSON\n")
        f.write(json.dumps({"custom_id": "candidate-0", "method": "POST", "url": "/v1/chat/completions",
                            "body": {"messages": []}}) + "\n")


def run_demo(lines: int = 200) -> int:
    """Run the demo; returns 0 when the sample batch came back complete."""
    print("1/4 building the tiny local model (once) ...", flush=True)
    model = build_tiny_model(default_model_dir())
    root = Path(tempfile.mkdtemp(prefix="spoold-demo-"))
    (root / "inbox").mkdir()
    config = root / "spoold.toml"
    config.write_text(demo_config(root, model))
    env = dict(os.environ, HF_HUB_OFFLINE="1", SPOOLD_CONFIG=str(config))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log_path = root / "daemon.log"
    print(f"2/4 starting `spoold run --config {config}` (log: {log_path}) ...", flush=True)
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen([sys.executable, "-m", "spoold", "run", "--config", str(config)],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        batch = root / "sample_batch.jsonl"
        sample_batch(batch, lines)
        dest = submit_file(str(batch), root / "inbox")
        print(f"3/4 submitted {lines + 2} lines as {dest} (2 of them bad on purpose)", flush=True)
        job = _follow(root, daemon, lines + 2)
    finally:
        _stop(daemon)
    if job is None:
        print(f"demo failed: the job did not finish; see {log_path}", file=sys.stderr)
        return 1
    _show(job, config, root)
    return 0


def _follow(root: Path, daemon: subprocess.Popen, total: int) -> Path | None:
    """Show a progress bar until the job is in the outbox; its directory, or None."""
    from tqdm import tqdm

    deadline = time.monotonic() + DEMO_TIMEOUT_SECONDS
    # No rate on the bar: tqdm counts from the bar's start, so the model's load (most of a demo's
    # wall time on a CPU) would show as seconds per line; the summary gives the job's own rate.
    bar = tqdm(total=total, unit="line", desc="4/4 loading model",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
    try:
        while time.monotonic() < deadline and daemon.poll() is None:
            done = list((root / "outbox").glob("*/batch.json"))
            if done:
                bar.set_description("4/4 done", refresh=False)  # a 40-line job may end between two looks
                bar.update(total - bar.n)
                return done[0].parent
            beats = list((root / "processing").glob("*/*/heartbeat.json"))
            job = _read(beats[0]).get("job") if beats else None
            if job:
                bar.set_description("4/4 running")
                bar.update(max(0, job["done"] - bar.n))
            time.sleep(0.5)
        return None
    finally:
        bar.close()


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _stop(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


def _show(job: Path, config: Path, root: Path) -> None:
    batch = _read(job / "batch.json")
    counts, timings = batch["request_counts"], batch.get("timings", {})
    print(f"\nDone: {counts['completed']} answered, {counts['failed']} failed, of {counts['total']} lines "
          f"({timings.get('requests_per_second', 0):.1f} req/s).")
    print(f"  results: {job / 'output.jsonl'}")
    print(f"  errors:  {job / 'errors.jsonl'}   (one line per bad input line, with its line number)")
    print(f"  summary: {job / 'batch.json'}")
    print("\nTo run a real model, put this in /etc/spoold/spoold.toml and start the service:")
    print('  [engine]\n  model = "qwen3:4b"\n\n  [models]\n  "qwen3:4b" = "Qwen/Qwen3-4B-Instruct-2507"')
    print(f"\nThe demo spool is {root} (config: {config}); remove it with `rm -r {root}`.")
