"""A drop's end reaches a real receiver as a signed webhook, through a daemon killed twice while the batch
runs and once while it retries, and a receiver that was down until after the batch ended."""

import base64
import os

import openai

from ..helpers import (DaemonProcess, WebhookReceiver, chat_line, check_exactly_once, complete_lines, outbox_jobs,
                       wait_for, write_config, write_jsonl)

LINES = 1000


def kill_at(daemon, root, done):
    """kill -9 the daemon once the running job has `done` durable results, then start it again."""
    running = lambda: list((root / "processing" / "testhost").glob("*/output.jsonl"))  # noqa: E731
    wait_for(lambda: running() and complete_lines(running()[0]) >= done, 60, f"{done} results")
    daemon.kill9()
    daemon.start()
    daemon.wait_ready(root, timeout=60)

SECRET = "whsec_" + base64.b64encode(b"e2e-webhook-secret-0123456789ab").decode()


def test_a_drop_ends_in_one_verified_webhook_id_though_the_receiver_was_down_and_the_daemon_killed(tmp_path):
    hook = WebhookReceiver([503] * 1000)  # down until the test says otherwise
    secret = tmp_path / "webhook-secret"
    secret.write_text(SECRET + "\n")
    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root, engine="max_inflight = 4\n[engine.args]\ndelay = 0.02",
                          extra=f'[webhooks]\nurl = "{hook.url}"\nsecret_file = "{secret}"\n')
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        daemon.wait_ready(root, timeout=60)
        write_jsonl(tmp_path / "scores.jsonl", [chat_line(i) for i in range(LINES)])
        os.rename(tmp_path / "scores.jsonl", root / "inbox" / "scores.jsonl")
        kill_at(daemon, root, 50)  # killed twice while the batch runs (about 5 s of work at 4 in flight)
        kill_at(daemon, root, 150)
        (job,) = wait_for(lambda: outbox_jobs(root), 60, "the job in the outbox")
        hook.wait_for(2)  # it tried, and tried again
        daemon.kill9()
        tried = len(hook.got)
        hook.statuses.clear()  # the receiver is back
        daemon.start()
        delivered = wait_for(lambda: [g for g in hook.got if g[2] == 200], 30, "the delivery after the restart")
        wait_for(lambda: "delivered after" in (tmp_path / "daemon.log").read_text(), 10, "the daemon to see the 2xx")
    finally:
        daemon.terminate()
        hook.close()
    assert len(delivered) == 1 and len(hook.got) > tried
    assert len({headers["webhook-id"] for headers, _, _ in hook.got}) == 1, "one event, one id, every try"
    headers, body, _ = delivered[0]
    event = openai.OpenAI(api_key="unused", webhook_secret=SECRET).webhooks.unwrap(body, headers)
    assert event.type == "batch.completed" and event.data.id == job.name
    check_exactly_once(job, {f"req-{i}" for i in range(LINES)}, set())
    assert "spoold.webhook" not in body.decode() and "Score candidate" not in body.decode()  # ids only
    log = (tmp_path / "daemon.log").read_text()
    assert "try 1 failed: HTTP 503" in log and SECRET not in log
    assert not list((root / "webhooks" / "testhost").glob("evt_*.json")), "a delivered event still waits"
