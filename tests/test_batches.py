"""The Batches API with no daemon running: queued batches, paging, cancel before a claim, bad requests."""

import json
import time

import httpx
import openai
import pytest

from spoold.apibatch import read_api_batch
from spoold.apikeys import ApiKeys, Tenant
from spoold.batches import BatchStore, window_seconds
from spoold.config import Config, SpoolSettings
from spoold.filestore import FileStore
from spoold.jobrecord import JobRecord
from spoold.lifecycle import JobStatus
from spoold.spool import Spool

from .helpers import ApiServer, chat_line

KEY = "carol-key-0123456789abcdef"
BATCH = (json.dumps(chat_line(0)) + "\n").encode()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("spool")
    server = ApiServer(Config(spool=SpoolSettings(root=root, host_id="h")), ApiKeys({KEY: Tenant("carol")}))
    server.root = root
    yield server
    server.stop()


def create(client, **overrides):
    source = client.files.create(file=("b.jsonl", BATCH), purpose="batch")
    args = {"input_file_id": source.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **overrides}
    return client.batches.create(**args)


def queued(root) -> list[str]:
    return sorted(p.name for p in (root / "inbox").iterdir())


def test_a_new_batch_is_a_drop_named_by_its_id_and_validating_until_a_daemon_claims_it(api):
    made = create(api.client(KEY))
    assert made.status == "validating" and made.output_file_id is None
    # as OpenAI answers a create: zeros, so `made.request_counts.total` works before any line is counted
    assert made.request_counts.model_dump() == {"total": 0, "completed": 0, "failed": 0}
    assert f"{made.id}.jsonl" in queued(api.root)
    assert (api.root / "inbox" / f"{made.id}.jsonl").read_bytes() == BATCH
    assert read_api_batch(api.root / "batches", made.id).owner == "carol"
    assert api.client(KEY).batches.retrieve(made.id) == made


def test_the_sdk_pages_through_every_batch_once_newest_first(api):
    client = api.client(KEY)
    made = [create(client).id for _ in range(5)]
    first = client.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more and first.first_id == first.data[0].id
    walked = [b.id for b in client.batches.list(limit=2)]
    assert set(made) <= set(walked) and len(walked) == len(set(walked))
    created = [client.batches.retrieve(i).created_at for i in walked]
    assert created == sorted(created, reverse=True)


def test_a_listing_shows_each_batch_as_it_is_now_and_none_that_was_deleted(api):
    # the API reads a record once for listings (what never changes in it): what changes must still show
    client = api.client(KEY)
    kept, doomed = create(client), create(client)
    assert {kept.id, doomed.id} <= {b.id for b in client.batches.list()}
    client.batches.cancel(kept.id)
    client.batches.cancel(doomed.id)
    sweep = BatchStore(Spool(SpoolSettings(root=api.root, host_id="h")), FileStore(api.root))  # as retention's
    sweep.delete(read_api_batch(api.root / "batches", doomed.id))
    listed = {b.id: b.status for b in client.batches.list()}
    assert listed[kept.id] == "cancelled" and doomed.id not in listed


def test_a_walk_through_the_pages_meets_every_batch_once_though_retention_deletes_its_cursor(api):
    client = api.client(KEY)
    made = [create(client).id for _ in range(7)]
    for batch_id in made:
        client.batches.cancel(batch_id)  # ended, so retention may delete it
    sweep = BatchStore(Spool(SpoolSettings(root=api.root, host_id="h")), FileStore(api.root))  # as retention's
    walked = []
    for batch in client.batches.list(limit=2):  # the newest first: these seven, then the other tests' batches
        walked.append(batch.id)
        if batch.id in made and len(walked) % 2 == 0:  # the last of its page: the next page's cursor is gone
            sweep.delete(read_api_batch(api.root / "batches", batch.id))
    assert len(walked) == len(set(walked)), "a batch met twice: the walk started again from the top"
    assert set(made) <= set(walked)


def test_a_batch_cancelled_before_any_claim_is_withdrawn_from_the_inbox(api):
    client = api.client(KEY)
    made = create(client)
    cancelled = client.batches.cancel(made.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at and cancelled.cancelling_at
    assert f"{made.id}.jsonl" not in queued(api.root) and not any(n.startswith(".") for n in queued(api.root))
    assert client.batches.retrieve(made.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(made.id)


@pytest.mark.parametrize("overrides, param", [
    ({"input_file_id": "file-" + "Z" * 24}, "input_file_id"),
    ({"input_file_id": "../../etc/passwd"}, "input_file_id"),
    ({"endpoint": "/v1/images/generations"}, "endpoint"),
    ({"completion_window": "2w"}, "completion_window"),
    ({"completion_window": "0h"}, "completion_window"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"note": "x" * 513}}, "metadata"),
    ({"metadata": {"priority": "1000"}}, "metadata"),
    ({"output_expires_after": {"anchor": "created_at", "seconds": 60}}, "output_expires_after"),
    ({"output_expires_after": {"anchor": "completed_at", "seconds": 3600}}, "output_expires_after"),
    ({"output_expires_after": {"anchor": "created_at", "seconds": "3600"}}, "output_expires_after"),
    ({"extra_body": {"webhook_url": "http://example.com"}}, "webhook_url"),  # unknown: refused, not ignored
])
def test_a_bad_batch_request_is_a_clear_error_and_queues_nothing(api, overrides, param):
    client = api.client(KEY)
    before = (queued(api.root), sorted(p.name for p in (api.root / "batches").iterdir()))
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as refused:
        create(client, **overrides)
    assert refused.value.body["param"] == param and refused.value.body["message"]
    assert (queued(api.root), sorted(p.name for p in (api.root / "batches").iterdir())) == before


@pytest.mark.parametrize("body, param, says", [
    (b'{"input_file_id": "file-x", oops', None, "not valid JSON"),  # curl with a typo
    (b"", None, "must be a JSON object"),
    (b'["file-x"]', None, "must be a JSON object"),
    (b'{"endpoint": "/v1/chat/completions", "completion_window": "24h"}', "input_file_id",
     "Missing required parameter: 'input_file_id'"),
])
def test_a_request_that_is_not_the_parameters_as_json_says_what_is_wrong_as_openai_words_it(api, body, param, says):
    answer = httpx.post(f"{api.url}/batches", content=body, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and says in error["message"], error


def test_malformed_batch_ids_are_not_found(api):
    client = api.client(KEY)
    for bad in ("batch_../../x", "batch_" + "a" * 300, "../batches/x", "batch_ÄÖÜäöüßéèêëàâîïôûçñ12"):
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve(bad)


def test_completion_windows_in_hours_or_days():
    assert window_seconds("24h") == 86400 and window_seconds("7d") == 7 * 86400
    for bad in ("24", "h", "31d", "-1h", "1.5h", "24H"):
        with pytest.raises(ValueError, match="completion_window"):
            window_seconds(bad)


def test_a_batch_whose_input_never_reached_the_inbox_is_failed_not_validating_forever(api):
    client = api.client(KEY)
    made = create(client)
    (api.root / "inbox" / f"{made.id}.jsonl").unlink()  # as if the API had stopped between record and rename
    shown = client.batches.retrieve(made.id)
    assert shown.status == "failed" and shown.errors.data[0].code == "not_queued"


@pytest.mark.parametrize("endpoint", ["/v1/responses", "/v1/embeddings", "/v1/score", "/v1/rerank", "/v2/rerank"])
def test_a_batch_may_name_every_endpoint_the_daemon_serves(api, endpoint):
    assert create(api.client(KEY), endpoint=endpoint).endpoint == endpoint


def test_an_endpoint_the_daemon_does_not_serve_is_400_naming_the_ones_it_does(api):
    with pytest.raises(openai.BadRequestError) as refused:
        create(api.client(KEY), endpoint="/v1/moderations")
    error = refused.value.body
    assert refused.value.status_code == 400 and error["param"] == "endpoint" and "/v1/responses" in error["message"]



def ended_in_processing(api, end):
    """A batch whose job has saved its end (`end`: "cancel", "complete", "expire") in batch.json and is
    still in processing/, as the daemon leaves it just before its one rename into outbox/."""
    made = create(api.client(KEY))
    spool = Spool(SpoolSettings(root=api.root, host_id="h"))
    spool.ensure_dirs()
    job = spool.claim_drop(f"{made.id}.jsonl")
    record = JobRecord.load(job.batch)[0]
    record.validated(1, "/v1/chat/completions", "m", {"m": 1}, job.input.stat())
    counts = (1, 0, {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2})
    {"cancel": lambda: record.cancel(*counts, asked_at=time.time()), "complete": lambda: record.complete(*counts, {}),
     "expire": lambda: record.expire(*counts)}[end]()
    job.output.write_text(json.dumps({"custom_id": "req-0"}) + "\n")
    spool.save(job, record)
    return made, spool, job, record


@pytest.mark.parametrize("end, shown_as", [("cancel", "cancelling"), ("complete", "finalizing"),
                                           ("expire", "finalizing")])
def test_a_job_that_has_ended_but_is_not_yet_in_the_outbox_is_not_shown_ended(api, end, shown_as):
    # A reader that found the job in processing/ may read its ended record and then find the job gone
    # (its cancel marker with it): an ended status there would be a batch "cancelled" with no output
    # file, and a client would stop waiting.
    client = api.client(KEY)
    made, spool, job, record = ended_in_processing(api, end)
    shown = client.batches.retrieve(made.id)
    assert shown.status == shown_as and shown.output_file_id is None
    assert (shown.completed_at, shown.cancelled_at, shown.expired_at) == (None, None, None)  # not ended yet
    spool.move_to_outbox(job)
    shown = client.batches.retrieve(made.id)
    assert shown.status == record.status and shown.output_file_id is not None


def test_a_job_that_moves_to_the_outbox_while_it_is_read_is_shown_as_it_is_there(api, monkeypatch):
    made, spool, job, record = ended_in_processing(api, "complete")
    store = BatchStore(spool, FileStore(api.root))
    looked = store._locate

    def moved_just_after_the_look(batch_id):
        found = looked(batch_id)
        if found[1] == "processing":
            spool.move_to_outbox(job)
        return found

    monkeypatch.setattr(store, "_locate", moved_just_after_the_look)
    shown = store.batch_object(read_api_batch(api.root / "batches", made.id))
    assert shown.status == "completed" and shown.output_file_id is not None  # not "validating" with no counts


def test_a_running_job_that_moves_to_the_outbox_during_the_read_never_shows_its_counts_back_at_zero(api, monkeypatch):
    # Its counts come from the heartbeat while it runs: a job read as running, then published before its
    # heartbeat was read, showed `in_progress` with nothing done (a client's progress bar back at 0).
    import spoold.batches

    made, spool, job, record = ended_in_processing(api, "complete")
    running = JobRecord.load(job.batch)[0]
    running.status, running.request_counts.completed = JobStatus.IN_PROGRESS, 0  # counted only at the end
    spool.save(job, running)
    job.heartbeat.write_text(json.dumps({"job": {"total": 1, "completed": 1, "failed": 0}}))  # its last beat
    store = BatchStore(spool, FileStore(api.root))
    load = JobRecord.load

    def published_just_after_the_read(path):
        loaded = load(path)
        if job.path.is_dir():  # the daemon's end: its record, then its one rename into outbox/
            spool.save(job, record)
            spool.move_to_outbox(job)
        return loaded

    monkeypatch.setattr(spoold.batches.JobRecord, "load", published_just_after_the_read)
    shown = store.batch_object(read_api_batch(api.root / "batches", made.id))
    assert (shown.status, shown.request_counts.completed, shown.output_file_id is not None) == ("completed", 1, True)
