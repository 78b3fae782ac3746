"""Two real models in one daemon (vLLM on the tiny local models): swaps free memory, mixed files split,
and a pooling model (a cross-encoder) serves score and rerank lines beside a generating one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ..helpers import REPO, DaemonProcess, Subscriber, outbox_jobs, read_jsonl, wait_for, write_config, write_jsonl

pytestmark = pytest.mark.vllm


def chat(i, model):
    return {"custom_id": f"{model}-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": f"Rate {i}"}]}}


def ranking(i, model):
    """A /v1/score line, or a /v2/rerank one, for the tiny cross-encoder."""
    if i % 4 == 1:
        return {"custom_id": f"{model}-{i}", "method": "POST", "url": "/v1/score",
                "body": {"model": model, "text_1": f"candidate {i}", "text_2": ["data engineer", "nurse"]}}
    return {"custom_id": f"{model}-{i}", "method": "POST", "url": "/v2/rerank",
            "body": {"model": model, "query": f"ticket {i}", "documents": ["refund", "outage", "login"]}}


def job_named(root, name):
    for job in outbox_jobs(root):
        if json.loads((job / "batch.json").read_text())["input_file"] == name:
            return job
    return None


def test_two_models_swap_with_memory_freed_and_a_mixed_file_split(tmp_path, tiny_model, tiny_scorer):
    # openai has no score or rerank types: the bodies are checked against vLLM's own, as `vllm serve` returns
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse, ScoreResponse

    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root, adapter="spoold.vllm_adapter:VllmEngine", model="tiny",
                          engine='dtype = "float32"\nmax_model_len = 512\nmax_num_seqs = 16\nenforce_eager = true',
                          extra=f'[models]\ntiny = "{tiny_model}"\n[models.rank]\nmodel = "{tiny_scorer}"\n'
                                f'max_model_len = 256\n')
    rpc = Path(tempfile.mkdtemp(prefix="rpc-"))  # where vLLM makes its engines' sockets (short: /tmp unless set)
    d = DaemonProcess(config, tmp_path / "daemon.log", env={"VLLM_RPC_BASE_PATH": str(rpc)}).start()
    sub = Subscriber(f"ipc://{tmp_path}/events.sock")
    try:
        d.wait_ready(root, timeout=300)
        os.kill(d.proc.pid, signal.SIGSTOP)  # both queued before either is claimed
        for name, make, model in (("rank.jsonl", ranking, "rank"), ("tiny.jsonl", chat, "tiny")):
            write_jsonl(tmp_path / name, [make(i, model) for i in range(8)])
            os.rename(tmp_path / name, root / "inbox" / name)
            time.sleep(0.05)
        os.kill(d.proc.pid, signal.SIGCONT)
        wait_for(lambda: job_named(root, "rank.jsonl"), 300, "the job for the second model", interval=0.5)
        mixed = [ranking(i, "rank") if i % 2 else chat(i, "tiny") for i in range(10)]
        write_jsonl(tmp_path / "mixed.jsonl", mixed)
        os.rename(tmp_path / "mixed.jsonl", root / "inbox" / "mixed.jsonl")
        job = wait_for(lambda: job_named(root, "mixed.jsonl"), 300, "the mixed job", interval=0.5)
    finally:
        d.terminate()
        sub.close()
    served = {"tiny": str(tiny_model), "rank": str(tiny_scorer)}
    for name in ("tiny.jsonl", "rank.jsonl", "mixed.jsonl"):
        outputs = read_jsonl(job_named(root, name) / "output.jsonl")
        assert all(o["response"]["status_code"] == 200 for o in outputs), name
        assert {o["custom_id"]: o["response"]["body"]["model"] for o in outputs} == {
            o["custom_id"]: served[o["custom_id"].split("-")[0]] for o in outputs}, name
    ranked = [o["response"]["body"] for o in read_jsonl(job_named(root, "rank.jsonl") / "output.jsonl")]
    scores = [ScoreResponse.model_validate(b) for b in ranked if b.get("object") == "list"]
    reranks = [RerankResponse.model_validate(b) for b in ranked if "results" in b]
    assert len(scores) == 2 and all(len(s.data) == 2 for s in scores)
    assert len(reranks) == 6 and all(sorted(r.index for r in rr.results) == [0, 1, 2] for rr in reranks)
    usage = json.loads((job_named(root, "rank.jsonl") / "batch.json").read_text())["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] == 0  # a cross-encoder generates nothing
    assert len(read_jsonl(job / "output.jsonl")) == len(mixed)
    unloaded = [p for t, p in sub.events if t == "spoold.engine.unloaded"]
    assert [u["model"] for u in unloaded] == [str(tiny_model), str(tiny_scorer)]
    for u in unloaded:
        # vLLM's engine process (weights and a 1 GiB KV cache) is gone after unloading.
        assert u["memory_mib_loaded"] - u["memory_mib_after_unload"] > 1500, u
    # Back to where it was before loading; the first load also imported vLLM
    # and torch into the daemon (~600 MiB, once), so compare a later one.
    assert abs(unloaded[1]["memory_mib_after_unload"] - unloaded[1]["memory_mib_before_load"]) < 100, unloaded[1]
    # vLLM made seven sockets there for each engine (tiny, rank, tiny again): none is left behind.
    left = list(rpc.iterdir())
    shutil.rmtree(rpc)
    assert left == []


def test_bench_models_on_the_tiny_models(tmp_path, tiny_model, tiny_model_b):
    config = write_config(tmp_path / "c.toml", tmp_path / "spool", adapter="spoold.vllm_adapter:VllmEngine",
                          model="tiny", engine='dtype = "float32"\nmax_model_len = 256\nenforce_eager = true',
                          extra=f'[models]\ntiny = "{tiny_model}"\nwide = "{tiny_model_b}"\ngpu_hour_price = 2.5\n')
    rows = [chat(i, "tiny") for i in range(30)]
    for row in rows[:10]:
        row["body"]["messages"][0]["content"] = f"Give a score from 1 to 5 for candidate {row['custom_id']}"
        row["body"]["temperature"] = 0
    write_jsonl(tmp_path / "cands.jsonl", rows + ["{broken"])
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "spoold", "bench-models", str(tmp_path / "cands.jsonl"),
                           "--models", "tiny,wide", "--sample", "20", "--out", str(out), "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [m["alias"] for m in report["models"]] == ["tiny", "wide"] and report["reference"] == "tiny"
    table = (out / "report.md").read_text().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    for line, model in zip(table[2:4], report["models"]):
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        assert cells["model"] == model["alias"] and cells["req/s"] == str(model["requests_per_second"])
        assert cells["p95 s"] == str(model["latency_p95_seconds"])
        assert cells["agreement"] == str(model["agreement"]) and cells["load s"] == str(model["load_seconds"])
    tiny, wide = report["models"]
    assert tiny["lines"] == wide["lines"] == 20 and tiny["errors"] == 0
    assert tiny["agreement"] == 1.0 and 0 <= wide["agreement"] <= 1
    assert tiny["requests_per_second"] > 0 and tiny["latency_p50_seconds"] <= tiny["latency_p95_seconds"]
    assert tiny["cost_per_1000_lines"] > 0 and tiny["peak_memory_mib"] > 500
    from PIL import Image

    png = Image.open(out / "report.png")
    assert png.format == "PNG" and png.size == (800, 500) and (out / "report.png").stat().st_size > 10_000


def test_one_daemon_drives_two_engine_replicas_with_vllm_data_parallelism(tmp_path, tiny_model):
    """[engine] data_parallel_size = 2 on this CPU build: vLLM's DP coordinator and two engine cores behind
    one daemon and one queue; a drop completes with every line answered once."""
    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root, adapter="spoold.vllm_adapter:VllmEngine", model="tiny",
                          engine='dtype = "float32"\nmax_model_len = 512\nmax_num_seqs = 16\nenforce_eager = true\n'
                                 'data_parallel_size = 2', extra=f'[models]\ntiny = "{tiny_model}"\n')
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        d.wait_ready(root, timeout=300)
        rows = [chat(i, "tiny") for i in range(60)]
        write_jsonl(tmp_path / "dp.jsonl", rows)
        os.rename(tmp_path / "dp.jsonl", root / "inbox" / "dp.jsonl")
        job = wait_for(lambda: job_named(root, "dp.jsonl"), 300, "the job", interval=0.5)
    finally:
        d.terminate()
    outputs = read_jsonl(job / "output.jsonl")
    assert sorted(o["custom_id"] for o in outputs) == sorted(r["custom_id"] for r in rows)
    assert all(o["response"]["status_code"] == 200 for o in outputs)
    log = (tmp_path / "daemon.log").read_text()
    assert "DP Coordinator" in log and "EngineCore_DP0" in log and "EngineCore_DP1" in log
