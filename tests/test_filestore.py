"""The API's file records as listings see them: read once, yet each listing shows the files as they are now."""

import json

from spoold.apibatch import random_id
from spoold.filestore import FileStore


def test_a_batchs_results_are_listed_once_they_exist_with_their_size_and_not_after_they_are_deleted(tmp_path):
    files = FileStore(tmp_path, retention=3600)
    files.ensure_dir()
    output = random_id("file-")
    files.add_result(output, "alice", "b_output.jsonl", "outbox/b/output.jsonl", expires_after=600)
    assert files.list("alice") == []  # named at create; the batch has not ended
    (tmp_path / "outbox" / "b").mkdir(parents=True)
    (tmp_path / "outbox" / "b" / "output.jsonl").write_text("{}\n" * 5)
    (tmp_path / "outbox" / "b" / "batch.json").write_text(json.dumps({"id": "b", "status": "completed",
                                                                       "created_at": 900, "completed_at": 1000}))
    [listed] = files.list("alice")
    assert (listed.id, listed.bytes, listed.expires_at) == (output, 15, 1600)
    assert files.list("bob") == []
    (tmp_path / "outbox" / "b" / "output.jsonl").write_text("{}\n" * 7)  # as seen now, not when first listed
    assert files.list("alice")[0].bytes == 21
    files.remove(output)
    assert files.list("alice") == []
