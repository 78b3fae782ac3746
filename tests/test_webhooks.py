"""Webhook deliveries against a real local HTTP receiver, verified with `openai`'s own `webhooks.unwrap`."""

import asyncio
import base64
import json
import os
import threading

import openai
import pytest

from spoold.config import ConfigError, TenantWebhook, WebhooksSettings, parse_config
from spoold.jobrecord import JobRecord
from spoold.lifecycle import JobStatus
from spoold.spool import JobDir
from spoold.webhooks import (UNCLAIMED, Deliveries, WebhookSender, event_id, job_published, read_secret, read_secrets,
                             record_end)

from .helpers import WebhookReceiver

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
WRONG = "whsec_" + base64.b64encode(b"w" * 32).decode()


@pytest.fixture
def receiver():
    made = []
    yield lambda statuses=(): made.append(WebhookReceiver(statuses)) or made[-1]
    for r in made:
        r.close()


class Told(list):
    """What the sender told the feed, (topic, fields) each; `wait_for(n)` until n were told."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()

    def __call__(self, topic: str, fields: dict) -> None:
        with self.changed:
            self.append((topic, fields))
            self.changed.notify_all()

    def wait_for(self, n: int, timeout: float = 20) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self) >= n, timeout), f"{len(self)} of {n} told"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr("spoold.webhooks.FIRST_BACKOFF_SECONDS", 0.05)
    monkeypatch.setattr("spoold.webhooks.POLL_SECONDS", 0.2)  # what the daemon's wake at a job's end does


def sender(root, url, told, max_age=3600.0):
    settings = WebhooksSettings(url=url, max_age_seconds=max_age)
    return WebhookSender(Deliveries(root, "h"), settings, {"": SECRET}, job_published(root), told)


async def running(the_sender, until, timeout=20):
    task = asyncio.create_task(the_sender.run())
    try:
        await asyncio.wait_for(asyncio.to_thread(until), timeout)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def unwrap(headers, body, secret=SECRET):
    return openai.OpenAI(api_key="unused", webhook_secret=secret).webhooks.unwrap(body, headers)


def test_a_jobs_end_is_delivered_signed_as_openai_verifies_it_and_a_wrong_secret_fails(tmp_path, receiver):
    hook, told = receiver(), Told()
    (tmp_path / "outbox" / "scores-1").mkdir(parents=True)
    recorded = Deliveries(tmp_path, "h").record("scores-1", "completed")
    asyncio.run(running(sender(tmp_path, hook.url, told), lambda: told.wait_for(1)))
    ((headers, body, _),) = hook.got
    event = unwrap(headers, body)
    assert event.type == "batch.completed" and event.data.id == "scores-1" and event.id == recorded.id
    assert headers["webhook-id"] == recorded.id
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(headers, body, WRONG)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(headers, body.replace(b"scores-1", b"scores-2"))
    assert Deliveries(tmp_path, "h").pending() == [] and told[-1][0] == "spoold.webhook.delivered"


def test_a_receiver_failing_three_times_gets_the_same_webhook_id_and_body_four_times(tmp_path, receiver):
    hook, told = receiver([500, 503, 500]), Told()
    (tmp_path / "failed" / "broken-1").mkdir(parents=True)
    Deliveries(tmp_path, "h").record("broken-1", "failed")
    asyncio.run(running(sender(tmp_path, hook.url, told), lambda: told.wait_for(4)))
    assert [status for _, _, status in hook.got] == [500, 503, 500, 200]
    assert len({(h["webhook-id"], body) for h, body, _ in hook.got}) == 1
    for headers, body, _ in hook.got:
        assert unwrap(headers, body).type == "batch.failed"
    assert [t for t, _ in told] == ["spoold.webhook.failed"] * 3 + ["spoold.webhook.delivered"]
    assert told[-1][1]["attempts"] == 4 and Deliveries(tmp_path, "h").pending() == []


def test_a_delivery_waits_until_its_job_is_published(tmp_path, receiver):
    hook, told = receiver(), Told()
    Deliveries(tmp_path, "h").record("late-1", "completed")  # recorded just before the job's rename

    def publish_then_wait():
        assert not hook.got
        (tmp_path / "outbox" / "late-1").mkdir(parents=True)
        told.wait_for(1)
    asyncio.run(running(sender(tmp_path, hook.url, told), publish_then_wait))
    assert unwrap(*hook.got[0][:2]).data.id == "late-1"


def test_a_new_sender_resumes_a_failed_delivery_with_the_same_id(tmp_path, receiver):
    down, told = receiver([500]), Told()
    (tmp_path / "outbox" / "resumed-1").mkdir(parents=True)
    Deliveries(tmp_path, "h").record("resumed-1", "cancelled")
    asyncio.run(running(sender(tmp_path, down.url, told), lambda: told.wait_for(1)))
    (waiting,) = Deliveries(tmp_path, "h").pending()
    assert waiting.attempts == 1 and waiting.last_error == "HTTP 500" and waiting.next_attempt_at > 0
    up = receiver()
    asyncio.run(running(sender(tmp_path, up.url, told), lambda: told.wait_for(2)))  # as after a restart
    assert up.got[0][0]["webhook-id"] == down.got[0][0]["webhook-id"] == waiting.id
    assert unwrap(*up.got[0][:2]).type == "batch.cancelled"


def test_a_delivery_past_max_age_is_given_up_and_kept_for_a_person(tmp_path, receiver):
    hook, told = receiver([500]), Told()
    (tmp_path / "outbox" / "old-1").mkdir(parents=True)
    Deliveries(tmp_path, "h").record("old-1", "expired")
    asyncio.run(running(sender(tmp_path, hook.url, told, max_age=0), lambda: told.wait_for(1)))
    deliveries = Deliveries(tmp_path, "h")
    assert deliveries.pending() == [] and deliveries.counts() == {"pending": 0, "given_up": 1}
    assert told == [("spoold.webhook.failed", {**told[0][1], "given_up": True})]


def test_a_job_finished_again_after_a_crash_records_the_same_delivery_not_a_second(tmp_path):
    deliveries = Deliveries(tmp_path, "h")
    first, again = deliveries.record("j-1", "completed"), deliveries.record("j-1", "completed")
    assert first.id == again.id == event_id("j-1", "batch.completed") and len(deliveries.pending()) == 1
    assert json.loads(first.body()) == {"object": "event", "id": first.id, "type": "batch.completed",
                                        "created_at": first.created_at, "data": {"id": "j-1"}}


def test_the_secret_must_be_a_whsec_secret(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(SECRET + "\n")
    bad.write_text("not a secret!\n")
    os.chmod(bad, 0o600)
    assert read_secret(str(good)) == SECRET
    for path, says in ((bad, "whsec_"), (tmp_path / "none", "cannot read")):
        with pytest.raises(ConfigError, match=rf"\[webhooks\] secret_file .*{says}"):
            read_secret(str(path))


def test_spoold_status_shows_deliveries_waiting_and_given_up(tmp_path):
    from spoold.config import SpoolSettings
    from spoold.spool import Spool
    from spoold.status import render_status, spool_status

    deliveries = Deliveries(tmp_path, "gpu-1")
    deliveries.record("a-1", "completed")
    deliveries.give_up(deliveries.record("b-1", "failed"))
    Deliveries(tmp_path, UNCLAIMED).record("withdrawn-1", "cancelled", waits_for_job=False)
    status = spool_status(Spool(SpoolSettings(root=tmp_path, host_id="gpu-1")))
    assert status["webhooks"] == [{"host": UNCLAIMED, "pending": 1, "given_up": 0},
                                  {"host": "gpu-1", "pending": 1, "given_up": 1}]
    assert "webhooks [gpu-1]: 1 waiting to be delivered, 1 given up" in render_status(status)


ACME = "whsec_" + base64.b64encode(b"a" * 32).decode()


def ended_job(root, job_id, tenant):
    """A finished job's directory, as before_publish sees it: its record says whose it is."""
    job = JobDir(root / "outbox" / job_id)
    job.path.mkdir(parents=True)
    JobRecord(job_id, "x.jsonl", "h", status=JobStatus.COMPLETED, tenant=tenant).save(job.batch)
    return job


def test_a_tenant_with_its_own_receiver_gets_its_batches_signed_with_its_secret_others_the_global(tmp_path, receiver):
    shared, acme, told = receiver(), receiver(), Told()
    settings = WebhooksSettings(url=shared.url, tenants={"acme": TenantWebhook(acme.url, "unused")})
    secrets = {"": SECRET, "acme": ACME}
    record = record_end(Deliveries(tmp_path, "h"), secrets)
    for job_id, tenant in (("acme-batch", "acme"), ("bob-batch", "bob"), ("a-drop", "")):
        record(ended_job(tmp_path, job_id, tenant))
    the_sender = WebhookSender(Deliveries(tmp_path, "h"), settings, secrets, job_published(tmp_path), told)
    asyncio.run(running(the_sender, lambda: told.wait_for(3)))
    ((headers, body, _),) = acme.got
    assert unwrap(headers, body, ACME).data.id == "acme-batch"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(headers, body, SECRET)  # one tenant's secret never verifies another's events
    assert sorted(unwrap(h, b).data.id for h, b, _ in shared.got) == ["a-drop", "bob-batch"]


def test_with_only_tenant_receivers_other_jobs_record_no_delivery(tmp_path):
    record = record_end(Deliveries(tmp_path, "h"), {"acme": ACME})
    record(ended_job(tmp_path, "a-drop", ""))
    record(ended_job(tmp_path, "acme-batch", "acme"))
    assert [(d.job_id, d.tenant) for d in Deliveries(tmp_path, "h").pending()] == [("acme-batch", "acme")]


def test_tenant_receivers_are_read_from_webhooks_name_tables_with_their_own_secret_file(tmp_path):
    (tmp_path / "acme.secret").write_text(ACME + "\n")
    config = parse_config({"webhooks": {"acme": {"url": "https://acme.example.com/hook",
                                                 "secret_file": str(tmp_path / "acme.secret")}}})
    assert config.webhooks.tenants == {"acme": TenantWebhook("https://acme.example.com/hook",
                                                             str(tmp_path / "acme.secret"))}
    assert read_secrets(config.webhooks) == {"acme": ACME}  # no [webhooks] url: no global receiver
    with pytest.raises(ConfigError, match=r"\[webhooks.acme\] secret_file .*missing: cannot read"):
        read_secrets(WebhooksSettings(tenants={"acme": TenantWebhook("https://a.example", str(tmp_path / "missing"))}))
    with pytest.raises(ConfigError, match=r"unknown setting \[webhooks.acme\] ulr \(did you mean 'url'\?\)"):
        parse_config({"webhooks": {"acme": {"ulr": "https://a.example", "secret_file": "s"}}})
    with pytest.raises(ConfigError, match=r"\[webhooks.acme\]: needs both url and secret_file"):
        parse_config({"webhooks": {"acme": {"url": "https://a.example"}}})


def test_a_batch_withdrawn_through_the_api_before_any_claim_is_told_by_a_daemons_sender(tmp_path, receiver):
    from spoold.apikeys import ApiKeys, Tenant
    from spoold.config import Config, SpoolSettings

    from .helpers import ApiServer, chat_line

    hook, told = receiver(), Told()
    config = Config(spool=SpoolSettings(root=tmp_path, host_id="h"), webhooks=WebhooksSettings(url=hook.url))
    api = ApiServer(config, ApiKeys({"carol-key-0123456789abcdef": Tenant("carol")}))
    try:
        client = api.client("carol-key-0123456789abcdef")
        source = client.files.create(file=("b.jsonl", (json.dumps(chat_line(0)) + "\n").encode()), purpose="batch")
        made = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        assert client.batches.cancel(made.id).status == "cancelled"  # withdrawn: no daemon ever runs it
    finally:
        api.stop()
    asyncio.run(running(sender(tmp_path, hook.url, told), lambda: told.wait_for(1)))
    ((headers, body, _),) = hook.got
    event = unwrap(headers, body)
    assert event.type == "batch.cancelled" and event.data.id == made.id
    assert not list((tmp_path / "webhooks" / ".unclaimed").glob("evt_*.json"))  # taken, then sent


def test_a_silent_hosts_deliveries_are_taken_over_after_claim_timeout_and_a_beating_hosts_are_not(tmp_path):
    from spoold.spool import PeerClocks

    dead, alive = Deliveries(tmp_path, "dead"), Deliveries(tmp_path, "alive")
    waiting = dead.record("dead-1", "completed")
    alive.record("alive-1", "failed")
    beat = tmp_path / "processing" / "alive" / "heartbeat.json"
    beat.parent.mkdir(parents=True)
    mine, clocks = Deliveries(tmp_path, "me"), PeerClocks()
    for now in (0.0, 50.0, 99.0):  # the first look starts the clocks; a beat restarts its host's
        assert mine.adopt_from_silent_hosts(100.0, clocks, now) == []
        beat.write_text(str(now))
        os.utime(beat, ns=(int(now * 1e9) + 1, int(now * 1e9) + 1))
    assert mine.adopt_from_silent_hosts(100.0, clocks, 101.0) == ["dead"]
    assert [(d.id, d.job_id) for d in mine.pending()] == [(waiting.id, "dead-1")] and dead.pending() == []
    assert [d.job_id for d in alive.pending()] == ["alive-1"]
    waiting.attempts = 1
    assert not dead.save(waiting) and dead.pending() == []  # the dead host came back: it sends it no more


def test_a_sender_sends_a_silent_hosts_delivery_with_its_id(tmp_path, receiver):
    hook, told = receiver(), Told()
    (tmp_path / "outbox" / "orphan-1").mkdir(parents=True)
    waiting = Deliveries(tmp_path, "dead").record("orphan-1", "completed")
    settings = WebhooksSettings(url=hook.url)
    the_sender = WebhookSender(Deliveries(tmp_path, "h"), settings, {"": SECRET}, job_published(tmp_path), told,
                               claim_timeout=0.3)
    asyncio.run(running(the_sender, lambda: told.wait_for(1)))
    assert hook.got[0][0]["webhook-id"] == waiting.id and unwrap(*hook.got[0][:2]).data.id == "orphan-1"
    assert Deliveries(tmp_path, "dead").pending() == [] == Deliveries(tmp_path, "h").pending()
