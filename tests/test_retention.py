"""Retention: what the API made expires and is swept; nothing queued, running or dropped by hand ever is."""

import json
import os

import openai
import pytest

from spoold.apibatch import read_api_batch
from spoold.apikeys import ApiKeys, Tenant
from spoold.config import ApiSettings, Config, ConfigError, SpoolSettings, parse_config, retention_seconds
from spoold.retention import STALE_SECONDS, expires_after_seconds

from .helpers import ApiServer, chat_line

KEY = "dana-key-0123456789abcdef0"
BATCH = (json.dumps(chat_line(0)) + "\n").encode()
DAY = 86400


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("spool")
    config = Config(spool=SpoolSettings(root=root, host_id="h"), api=ApiSettings(file_retention="2d"))
    server = ApiServer(config, ApiKeys({KEY: Tenant("dana")}))
    server.root, server.sweeper = root, server.app.state.sweeper
    yield server
    server.stop()


def upload(client, **kwargs):
    return client.files.create(file=("b.jsonl", BATCH), purpose="batch", **kwargs)


def test_an_upload_expires_after_file_retention_and_is_then_swept(api):
    client = api.client(KEY)
    source = upload(client)
    assert source.expires_at == source.created_at + 2 * DAY
    assert client.files.retrieve(source.id).expires_at == source.expires_at
    api.sweeper.sweep(now=source.expires_at - 1)
    assert client.files.content(source.id).content == BATCH
    assert api.sweeper.sweep(now=source.expires_at).files >= 1
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(source.id)
    assert not (api.root / "files" / source.id).exists()


def test_an_upload_kept_for_what_its_client_asked(api):
    client = api.client(KEY)
    source = upload(client, expires_after={"anchor": "created_at", "seconds": 3600})
    assert source.expires_at == source.created_at + 3600
    api.sweeper.sweep(now=source.created_at + 3600)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(source.id)


@pytest.mark.parametrize("policy", [{"anchor": "created_at", "seconds": 59},
                                    {"anchor": "created_at", "seconds": 31 * DAY},
                                    {"anchor": "last_active_at", "seconds": 3600}])
def test_an_upload_with_a_bad_expiry_is_refused_and_leaves_nothing(api, policy):
    before = sorted(os.listdir(api.root / "files"))
    with pytest.raises(openai.BadRequestError) as refused:
        upload(api.client(KEY), expires_after=policy)
    assert refused.value.body["param"] == "expires_after" and "expires_after" in refused.value.body["message"]
    assert sorted(os.listdir(api.root / "files")) == before


def test_a_queued_batch_is_never_swept_however_old(api):
    client = api.client(KEY)
    made = client.batches.create(input_file_id=upload(client).id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
    api.sweeper.sweep(now=made.created_at + 3650 * DAY)
    assert client.batches.retrieve(made.id).status == "validating"
    assert (api.root / "inbox" / f"{made.id}.jsonl").read_bytes() == BATCH  # its copy: the upload expired


def test_a_batch_cancelled_before_its_claim_is_swept_with_its_result_files_after_retention(api):
    client = api.client(KEY)
    made = client.batches.create(input_file_id=upload(client).id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
    cancelled = client.batches.cancel(made.id)
    results = {read_api_batch(api.root / "batches", made.id).output_file_id,
               read_api_batch(api.root / "batches", made.id).error_file_id}
    assert results <= set(os.listdir(api.root / "files"))
    api.sweeper.sweep(now=cancelled.cancelled_at + 2 * DAY - 1)
    assert client.batches.retrieve(made.id).status == "cancelled"
    api.sweeper.sweep(now=cancelled.cancelled_at + 2 * DAY)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve(made.id)
    assert not results & set(os.listdir(api.root / "files"))
    assert not (api.root / "batches" / f"{made.id}.json").exists()


def test_results_of_a_drop_made_through_the_inbox_are_never_swept(api):
    job = api.root / "outbox" / "scores-20250101T000000-0123456789abcdef"
    job.mkdir(parents=True)
    (job / "batch.json").write_text(json.dumps({"id": job.name, "input_file": "scores.jsonl", "host": "h",
                                                "status": "completed", "created_at": 1, "completed_at": 2}))
    api.sweeper.sweep(now=3650 * DAY)
    assert (job / "batch.json").exists()


def test_only_the_apis_own_stale_leftovers_are_removed(api):
    inbox, files = api.root / "inbox", api.root / "files"
    stale_upload = files / f".file-{'A' * 24}.tmp"
    stale_upload.mkdir()
    (stale_upload / "content").write_bytes(b"half")
    live_upload = files / f".file-{'B' * 24}.tmp"
    live_upload.mkdir()
    (live_upload / "content").write_bytes(b"still coming")
    stale_copy = inbox / f".batch_{'C' * 24}.jsonl.0123abcd.tmp"
    stale_copy.write_bytes(b"half")
    theirs = inbox / ".scores.jsonl.0123abcd.tmp"  # a submitter's rsync temp: not ours to touch
    theirs.write_bytes(b"half")
    old = 1_000_000
    for path in (stale_upload, stale_upload / "content", live_upload, stale_copy, theirs):
        os.utime(path, (old, old))
    swept = api.sweeper.sweep(now=old + STALE_SECONDS + 1)
    assert swept.debris == 2
    assert not stale_upload.exists() and not stale_copy.exists()
    assert (live_upload / "content").exists() and theirs.exists()


def test_with_retention_never_nothing_expires_unless_asked(tmp_path):
    config = Config(spool=SpoolSettings(root=tmp_path, host_id="h"), api=ApiSettings(file_retention="never"))
    server = ApiServer(config, ApiKeys({KEY: Tenant("dana")}))
    try:
        client = server.client(KEY)
        kept, asked = upload(client), upload(client, expires_after={"anchor": "created_at", "seconds": 3600})
        assert kept.expires_at is None and asked.expires_at == asked.created_at + 3600
        assert server.app.state.sweeper.sweep(now=kept.created_at + 3650 * DAY).files == 1
        assert client.files.retrieve(kept.id).id == kept.id
    finally:
        server.stop()


def test_retention_spans():
    assert retention_seconds("30d") == 30 * DAY and retention_seconds("12h") == 12 * 3600
    assert retention_seconds("never") is None
    for bad in ("30", "0d", "1w", "forever", "-1d", ""):
        with pytest.raises(ConfigError, match=r"\[api\] file_retention"):
            parse_config({"api": {"file_retention": bad}})
    assert expires_after_seconds({"anchor": "created_at", "seconds": 3600}, "x") == 3600
    for bad in ({"anchor": "created_at"}, {"anchor": "created_at", "seconds": True}, [], None,
                {"anchor": "created_at", "seconds": 3600, "extra": 1}):
        with pytest.raises(ValueError, match="^'x"):
            expires_after_seconds(bad, "x")
