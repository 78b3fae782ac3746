"""batch.json as one typed record: what another host wrote is checked, what it added is kept."""

import json
import os

from spoold.jobrecord import JobRecord
from spoold.lifecycle import JobStatus


def test_a_record_round_trips_through_batch_json_keeping_keys_it_does_not_know(tmp_path):
    record = JobRecord("j-1", "a.jsonl", "h", drop={"name": "a.jsonl", "size": 3, "mtime_ns": 1})
    path = tmp_path / "batch.json"
    record.save(path)
    doc = json.loads(path.read_text())
    assert doc["object"] == "batch" and doc["status"] == "validating" and doc["request_counts"]["total"] == 0
    doc["from_a_newer_spoold"] = {"x": 1}
    path.write_text(json.dumps(doc))
    loaded, problem = JobRecord.load(path)
    assert problem is None and loaded == JobRecord.from_doc(doc)
    loaded.save(path)
    assert json.loads(path.read_text())["from_a_newer_spoold"] == {"x": 1}


def test_whom_a_job_shares_the_engine_as_its_key_else_its_submitter_else_the_default(tmp_path):
    path = tmp_path / "batch.json"
    JobRecord("j-1", "a.jsonl", "h", submitter_uid=1001).save(path)
    assert json.loads(path.read_text())["submitter_uid"] == 1001
    assert JobRecord.load(path)[0].share_tenant() == "uid:1001"
    assert JobRecord("j-2", "b.jsonl", "h", tenant="alice").share_tenant() == "alice"  # an API batch
    JobRecord("j-3", "c.jsonl", "h").save(path)  # claimed before submitters were kept
    assert "submitter_uid" not in json.loads(path.read_text()) and JobRecord.load(path)[0].share_tenant() == ""


def test_a_record_of_the_wrong_shape_says_which_field_and_never_raises(tmp_path):
    path = tmp_path / "batch.json"
    for doc, field in (({"created_at": "yesterday"}, "created_at"), ({"models": "fake-model"}, "models"),
                       ({"request_counts": {"total": "5"}}, "request_counts.total"), ({"errors": {}}, "errors"),
                       ({"models": {"m": True}}, "models")):
        path.write_text(json.dumps({"id": "j", "input_file": "a.jsonl", "host": "h", **doc}))
        record, problem = JobRecord.load(path)
        assert record is None and f"`{field}`" in problem, (doc, problem)
    for text in ("", "[1, 2]", "{torn"):  # no record at all: start again from validation
        path.write_text(text)
        assert JobRecord.load(path) == (None, None)
    assert JobRecord.load(tmp_path / "missing.json") == (None, None)


def test_the_transitions_set_what_the_openai_batch_object_says(tmp_path):
    record = JobRecord("j", "a.jsonl", "h")
    (tmp_path / "in").write_bytes(b"{}\n")
    record.validated(5, "/v1/chat/completions", "m1", {"m1": 3, "m2": 2, "m3": 0}, os.stat(tmp_path / "in"))
    assert record.status is JobStatus.IN_PROGRESS and record.in_progress_at and record.models == {"m1": 3, "m2": 2}
    assert record.next_model() == "m1"
    record.model_done("m1")
    assert record.next_model() == "m2"
    record.complete(4, 1, {"input_tokens": 9, "output_tokens": 7, "total_tokens": 16}, {"seconds": 1.0})
    doc = record.to_doc()
    assert doc["status"] == "completed" and doc["completed_at"] and doc["request_counts"] == {
        "total": 5, "completed": 4, "failed": 1}
    record.fail("gone", "input_changed")
    assert record.status is JobStatus.FAILED and record.errors[-1] == {"code": "input_changed", "message": "gone"}
    record.note_model_load_failed("m2", "out of memory")
    record.note_model_load_failed("m2", "out of memory")
    assert [e["code"] for e in record.errors] == ["input_changed", "model_load_failed"]


def test_a_cancelled_record_keeps_when_the_cancel_was_asked_for_as_openais_batch_does(tmp_path):
    record = JobRecord("j", "a.jsonl", "h")
    assert "cancelling_at" not in record.to_doc()  # never asked: not in batch.json at all
    record.cancel(3, 0, {}, asked_at=1_000_000.7)
    path = tmp_path / "batch.json"
    record.save(path)
    loaded, _ = JobRecord.load(path)
    assert loaded.cancelling_at == 1_000_000 and loaded.cancelled_at >= loaded.cancelling_at
    record.cancel(3, 0, {})  # no marker time known: asked and done at once
    assert record.cancelling_at == record.cancelled_at
