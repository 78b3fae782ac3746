import json
import logging
import os

import pytest

from spoold.config import SpoolSettings
from spoold.jobrecord import check_metadata
from spoold.readymarker import MAX_MARKER_BYTES, publish_with_metadata, read_metadata
from spoold.spool import Spool


def claim_with_marker(tmp_path, marker_bytes):
    spool = Spool(SpoolSettings(root=tmp_path / "spool", host_id="h1"))
    spool.ensure_dirs()
    (spool.inbox / "b.jsonl").write_text("{}\n")
    (spool.inbox / "b.jsonl.ready").write_bytes(marker_bytes)
    looked = spool.drop_owner("b.jsonl")  # the scheduler's look before the claim
    job = spool.claim_drop("b.jsonl")
    record = job.read_record()[0]
    assert looked == (record.share_tenant(), record.weight()) == (f"uid:{os.getuid()}", record.weight())
    assert not (spool.inbox / "b.jsonl.ready").exists()
    return job.read_record()[0]


def test_a_marker_with_a_priority_gives_the_claimed_job_its_metadata_and_weight(tmp_path):
    record = claim_with_marker(tmp_path, b'{"priority": "7", "team": "search"}\n')
    assert record.metadata == {"priority": "7", "team": "search"} and record.weight() == 7


def test_an_empty_marker_only_says_the_drop_is_whole(tmp_path):
    record = claim_with_marker(tmp_path, b"")
    assert record.metadata is None and record.weight() == 1


@pytest.mark.parametrize("content, why", [
    (b"{not json", "Expecting property name"),
    (b'["priority", 5]', "must be a JSON object"),
    (b'{"priority": "1000"}', "whole number from 1 to 100"),
    (b'{"priority": 5}', "must be a string"),
    (b"\xff\xfe", "codec can't decode"),
    (b'{"k": "' + b"v" * MAX_MARKER_BYTES + b'"}', f"larger than {MAX_MARKER_BYTES} bytes"),
    (b"[" * 8000 + b"]" * 8000, "nested too deeply"),  # within the size limit; a RecursionError, not a ValueError
])
def test_a_bad_marker_is_reported_by_name_and_the_drop_still_runs_at_the_default_weight(tmp_path, caplog,
                                                                                       content, why):
    with caplog.at_level(logging.WARNING, logger="spoold.readymarker"):
        record = claim_with_marker(tmp_path, content)
    assert record.metadata is None and record.weight() == 1 and record.status == "validating"
    assert "inbox/b.jsonl.ready: its metadata is ignored" in caplog.text and why in caplog.text
    assert caplog.text.count("its metadata is ignored") == 1  # by the claim; the scheduler's look said nothing


def test_a_marker_is_never_read_through_a_symlink(tmp_path, caplog):
    secret = tmp_path / "secret.json"
    secret.write_text('{"priority": "100"}')
    os.symlink(secret, tmp_path / "b.jsonl.ready")
    with caplog.at_level(logging.WARNING, logger="spoold.readymarker"):
        assert read_metadata(tmp_path / "b.jsonl.ready", os.geteuid()) is None
    assert "cannot read it" in caplog.text


def test_metadata_follows_openai_limits():
    assert check_metadata({f"k{i}": "v" for i in range(16)})
    with pytest.raises(ValueError, match="17 pairs"):
        check_metadata({f"k{i}": "v" for i in range(17)})
    with pytest.raises(ValueError, match="longer than 64"):
        check_metadata({"k" * 65: "v"})
    with pytest.raises(ValueError, match="at most 512"):
        check_metadata({"k": "v" * 513})
    for bad in ("0", "101", "-3", "2.5", "\u0665"):
        with pytest.raises(ValueError, match="priority"):
            check_metadata({"priority": bad})


def test_the_marker_is_in_place_before_the_drop_and_never_beside_someone_elses(tmp_path):
    (tmp_path / ".staged").write_text("{}\n")
    (tmp_path / "taken.jsonl").write_text("someone else's, half written")
    with pytest.raises(FileExistsError):
        publish_with_metadata(tmp_path / ".staged", tmp_path / "taken.jsonl", {"priority": "9"})
    assert not (tmp_path / "taken.jsonl.ready").exists()
    publish_with_metadata(tmp_path / ".staged", tmp_path / "free.jsonl", {"priority": "9"})
    assert json.loads((tmp_path / "free.jsonl.ready").read_text()) == {"priority": "9"}
    assert (tmp_path / "free.jsonl").read_text() == "{}\n" and not (tmp_path / ".staged").exists()
