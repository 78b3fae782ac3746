"""Batches through the real `openai` SDK: `spoold api` and `spoold run` (engine double) on one spool."""

import json

import openai
import pytest
from openai.types.chat import ChatCompletion

from spoold.apikeys import ApiKeys, Tenant
from spoold.config import load_config

from ..helpers import ApiServer, DaemonProcess, chat_line, wait_for, write_config

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef00"
OPS = "ops-key-0123456789abcdef000"  # an admin key


def jsonl(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batches")
    root = tmp / "spool"
    # A slow engine (4 requests at a time, 5 ms each) so a long batch is still running when it is cancelled.
    config = write_config(tmp / "c.toml", root, engine="max_inflight = 4\n[engine.args]\ndelay = 0.005")
    daemon = DaemonProcess(config, tmp / "daemon.log").start()
    daemon.wait_ready(root, timeout=120)
    api = ApiServer(load_config(config), ApiKeys({ALICE: Tenant("alice"), BOB: Tenant("bob"),
                                               OPS: Tenant("ops", admin=True)}))
    yield {"root": root, "api": api, "daemon": daemon}
    api.stop()
    daemon.terminate()


def finished(client, batch_id, timeout=60):
    final = ("completed", "failed", "cancelled", "expired")
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in final and b, timeout,
                    f"batch {batch_id} to finish", interval=0.1)


def test_a_batch_runs_to_completed_and_its_results_download_through_the_sdk(setup):
    alice = setup["api"].client(ALICE)
    rows = [chat_line(i) for i in range(5)] + ["{not json", {**chat_line(9), "url": "/v1/images"},
                                                {**chat_line(8), "url": "/v1/completions"}]
    source = alice.files.create(file=("scores.jsonl", jsonl(rows)), purpose="batch")
    made = alice.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                completion_window="24h", metadata={"project": "ranking", "priority": "3"})
    assert made.id.startswith("batch_") and made.status in ("validating", "in_progress", "completed")
    assert made.input_file_id == source.id and made.expires_at == made.created_at + 86400
    done = finished(alice, made.id)
    assert done.status == "completed" and done.metadata == {"project": "ranking", "priority": "3"}
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 5, 3)
    assert done.completed_at and done.in_progress_at and done.model == "fake-model"
    output = [json.loads(line) for line in alice.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == [f"req-{i}" for i in range(5)]
    for o in output:
        ChatCompletion.model_validate(o["response"]["body"])
    used = [o["response"]["body"]["usage"] for o in output]  # the batch's tokens: its lines' summed, for billing
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens) == (
        sum(u["prompt_tokens"] for u in used), sum(u["completion_tokens"] for u in used),
        sum(u["total_tokens"] for u in used)) != (0, 0, 0)
    errors = [json.loads(line) for line in alice.files.content(done.error_file_id).text.splitlines()]
    assert sorted(e["error"]["line"] for e in errors) == [6, 7, 8]
    assert [e["error"]["code"] for e in errors if e["error"]["line"] == 8] == ["url_mismatch"]  # as OpenAI: one endpoint
    # The job is the batch: its directory and batch.json carry the batch's id and owner.
    record = json.loads((setup["root"] / "outbox" / made.id / "batch.json").read_text())
    assert record["id"] == made.id and record["tenant"] == "alice" and record["input_file_id"] == source.id
    outputs = [f for f in alice.files.list() if f.purpose == "batch_output"]
    assert {done.output_file_id, done.error_file_id} <= {f.id for f in outputs}


def test_a_batchs_results_cannot_be_the_input_of_another_and_the_error_says_why(setup):
    alice = setup["api"].client(ALICE)
    source = alice.files.create(file=("one.jsonl", jsonl([chat_line(0)])), purpose="batch")
    done = finished(alice, alice.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                                completion_window="24h").id)
    assert alice.files.retrieve(done.output_file_id).purpose == "batch_output"
    with pytest.raises(openai.BadRequestError) as refused:  # as OpenAI: 400, not "no such file"
        alice.batches.create(input_file_id=done.output_file_id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    error = refused.value.body
    assert error["param"] == "input_file_id" and "'batch_output'" in error["message"]
    assert "purpose 'batch'" in error["message"]


def test_a_running_batch_cancelled_through_the_sdk_keeps_what_was_done(setup):
    alice = setup["api"].client(ALICE)
    source = alice.files.create(file=("long.jsonl", jsonl([chat_line(i) for i in range(3000)])), purpose="batch")
    made = alice.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    def running_with(n):
        counts = alice.batches.retrieve(made.id).request_counts
        return counts is not None and counts.completed >= n
    wait_for(lambda: running_with(50), 60, "live counts from the running job")
    asked = alice.batches.cancel(made.id)
    assert asked.status in ("cancelling", "cancelled")
    done = finished(alice, made.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert asked.cancelling_at and done.cancelling_at == asked.cancelling_at <= done.cancelled_at  # kept, as OpenAI
    counts = done.request_counts
    assert 50 <= counts.completed < 3000 and counts.total == 3000
    output = alice.files.content(done.output_file_id).text.splitlines()
    assert len(output) == counts.completed + counts.failed  # every finished line is there, once
    assert len({json.loads(line)["custom_id"] for line in output}) == len(output)
    with pytest.raises(openai.ConflictError):
        alice.batches.cancel(made.id)


def test_results_are_kept_as_output_expires_after_asks_then_swept_and_a_running_batch_never_is(setup):
    alice, sweeper = setup["api"].client(ALICE), setup["api"].app.state.sweeper
    source = alice.files.create(file=("kept.jsonl", jsonl([chat_line(i) for i in range(3)])), purpose="batch")
    made = alice.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h",
                                output_expires_after={"anchor": "created_at", "seconds": 3600})
    done = finished(alice, made.id)
    expires = done.completed_at + 3600  # the results' own creation is the anchor, as OpenAI's
    assert alice.files.retrieve(done.output_file_id).expires_at == expires
    long = alice.batches.create(input_file_id=alice.files.create(
        file=("long.jsonl", jsonl([chat_line(i) for i in range(3000)])), purpose="batch").id,
        endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: alice.batches.retrieve(long.id).status == "in_progress", 60, "the long batch running")
    sweeper.sweep(now=expires - 1)
    assert alice.files.content(done.output_file_id).text
    sweeper.sweep(now=expires + 3650 * 86400)
    for gone in (lambda: alice.batches.retrieve(made.id), lambda: alice.files.content(done.output_file_id)):
        with pytest.raises(openai.NotFoundError):
            gone()
    assert not (setup["root"] / "outbox" / made.id).exists()
    alice.batches.retrieve(long.id)  # not swept: it was running (3000 lines take ~4 s, the sweep ~10 ms)
    assert finished(alice, long.id).request_counts.completed == 3000


def test_another_tenant_cannot_see_cancel_or_use_a_batch_or_its_file(setup):
    alice, bob = setup["api"].client(ALICE), setup["api"].client(BOB)
    source = alice.files.create(file=("mine.jsonl", jsonl([chat_line(0)])), purpose="batch")
    made = alice.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (bob.batches.retrieve, bob.batches.cancel):
        with pytest.raises(openai.NotFoundError):
            call(made.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert made.id not in [b.id for b in bob.batches.list()]
    done = finished(alice, made.id)
    assert done.status == "completed", done
    with pytest.raises(openai.NotFoundError):
        bob.files.content(done.output_file_id)


def test_an_admin_key_sees_and_cancels_jobs_dropped_through_the_inbox_and_a_tenant_does_not(setup, tmp_path):
    import os

    ops, alice, inbox = setup["api"].client(OPS), setup["api"].client(ALICE), setup["root"] / "inbox"
    for name, lines in (("scp-short.jsonl", 4), ("scp-long.jsonl", 3000)):
        (tmp_path / name).write_bytes(jsonl([chat_line(i) for i in range(lines)]))
        os.rename(tmp_path / name, inbox / name)  # as scp, rsync or NFS would
    def job_of(name):
        return next((b for b in ops.batches.list() if b.id.startswith(name.removesuffix(".jsonl") + "-")), None)
    short = finished(ops, wait_for(lambda: job_of("scp-short.jsonl"), 30, "the short drop's job").id)
    assert short.status == "completed" and (short.request_counts.total, short.request_counts.completed) == (4, 4)
    assert short.endpoint == "/v1/chat/completions" and short.output_file_id is None  # its files are in outbox/
    long = wait_for(lambda: (b := job_of("scp-long.jsonl")) and b.status == "in_progress" and b, 30, "the long one")
    assert ops.batches.cancel(long.id).status in ("cancelling", "cancelled")
    assert finished(ops, long.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        ops.batches.cancel(short.id)
    for call in (alice.batches.retrieve, alice.batches.cancel):  # not a tenant's: the same 404 as no such batch
        with pytest.raises(openai.NotFoundError):
            call(short.id)
    assert not {short.id, long.id} & {b.id for b in alice.batches.list()}
    for bad in ("../outbox-20250101T000000-0123456789abcdef", ".x-20250101T000000-0123456789abcdef",
                short.id[:-1] + "Z"):
        with pytest.raises(openai.NotFoundError):
            ops.batches.retrieve(bad)


def test_kill9_of_the_daemon_mid_batch_the_client_keeps_polling_and_gets_every_line_once(setup, tmp_path):
    alice, daemon = setup["api"].client(ALICE), setup["daemon"]
    rows = [chat_line(i) for i in range(2000)]
    source = alice.files.create(file=("resumed.jsonl", jsonl(rows)), purpose="batch")
    made = alice.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    job = setup["root"] / "processing" / "testhost" / made.id
    wait_for(lambda: (job / "output.jsonl").exists() and (job / "output.jsonl").stat().st_size > 10_000, 60,
             "the batch to be part done")
    daemon.kill9()
    assert alice.batches.retrieve(made.id).status == "in_progress"  # the API answers while the daemon is down
    daemon.start()
    done = finished(alice, made.id, timeout=120)
    assert done.status == "completed" and done.request_counts.completed == 2000
    ids = [json.loads(line)["custom_id"] for line in alice.files.content(done.output_file_id).text.splitlines()]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows)  # every line exactly once across the kill


def test_kill9_of_the_api_mid_batch_loses_nothing_a_new_api_process_answers_for_it(setup, tmp_path):
    import os
    import subprocess
    import sys

    from ..helpers import REPO, free_port

    keys = tmp_path / "keys"
    keys.write_text(f"alice:{ALICE}\n")
    port = free_port()
    config = tmp_path / "api.toml"
    config.write_text(f'[spool]\nroot = "{setup["root"]}"\nhost_id = "api"\n'
                      f'[api]\nlisten = "127.0.0.1:{port}"\nkeys_file = "{keys}"\n')

    def start_api():
        proc = subprocess.Popen([sys.executable, "-m", "spoold", "api", "--config", str(config)], cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=ALICE, max_retries=0)
        wait_for(lambda: _answers(client), 60, "spoold api to listen")
        return proc, client

    proc, client = start_api()
    source = client.files.create(file=("k.jsonl", jsonl([chat_line(i) for i in range(1000)])), purpose="batch")
    made = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    proc.kill()
    assert proc.wait() == -9
    proc, client = start_api()
    try:
        done = finished(client, made.id, timeout=120)
        assert done.status == "completed" and done.request_counts.completed == 1000
        lines = client.files.content(done.output_file_id).text.splitlines()
        assert len({json.loads(line)["custom_id"] for line in lines}) == len(lines) == 1000
    finally:
        proc.kill()
        proc.wait()


def _answers(client) -> bool:
    try:
        client.models.list()
        return True
    except openai.APIConnectionError:
        return False


def test_a_batch_whose_window_ends_is_expired_with_batch_expired_for_exactly_the_unfinished_lines(setup):
    import os
    import signal
    import time

    from spoold.apibatch import read_api_batch

    alice, daemon, root = setup["api"].client(ALICE), setup["daemon"], setup["root"]
    rows = [chat_line(i) for i in range(3000)]
    source = alice.files.create(file=("late.jsonl", jsonl(rows)), purpose="batch")
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # queued, not claimed, while its window is cut short
    try:
        made = alice.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                    completion_window="1h")
        record = read_api_batch(root / "batches", made.id)
        record.expires_at = int(time.time()) + 2  # a window of seconds: the API takes hours at least
        record.save(root / "batches")
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    done = finished(alice, made.id, timeout=60)
    assert done.status == "expired" and done.expired_at
    outputs = [json.loads(x) for x in alice.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in alice.files.content(done.error_file_id).text.splitlines()]
    ran, expired = {o["custom_id"] for o in outputs}, {e["custom_id"] for e in errors}
    assert ran and expired and not ran & expired and ran | expired == {r["custom_id"] for r in rows}
    assert len(outputs) == len(ran) and len(errors) == len(expired)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert (done.request_counts.completed, done.request_counts.failed) == (len(ran), len(expired))
