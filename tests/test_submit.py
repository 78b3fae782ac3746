import io
import json

import pytest

from spoold.durable import rename_noreplace
from spoold.submit import rewrite_models

from .helpers import chat_line


def test_a_model_rewrite_keeps_every_line_where_it_was():
    long_line = b'{"custom_id": "' + b"x" * 5000 + b'"}\n'
    src = (json.dumps(chat_line(0, model="a")).encode() + b"\n" + b"\n" + b"not json\n" + long_line
           + json.dumps(chat_line(1, model="a")).encode() + b"\r\n")
    out = b"".join(rewrite_models(io.BytesIO(src), "b", max_line_bytes=1000)).split(b"\n")
    assert json.loads(out[0])["body"]["model"] == "b"
    assert out[1] == b"" and out[2] == b"not json" and out[3] == long_line[:-1]
    assert json.loads(out[4])["body"]["model"] == "b" and out[4].endswith(b"\r")


def test_a_model_rewrite_passes_a_line_nested_too_deeply_as_it_is():
    """`spoold submit --model` over a line the daemon will report as nested too deeply: no traceback."""
    deep = b"[" * 5000 + b"]" * 5000 + b"\n"
    src = deep + json.dumps(chat_line(0, model="a")).encode() + b"\n"
    out = b"".join(rewrite_models(io.BytesIO(src), "b", max_line_bytes=1 << 20)).split(b"\n")
    assert out[0] == deep[:-1] and json.loads(out[1])["body"]["model"] == "b"


def test_a_rename_that_would_replace_a_drop_is_refused(tmp_path):
    (tmp_path / "new").write_text("mine")
    (tmp_path / "drop.jsonl").write_text("someone else's, just arrived")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "new", tmp_path / "drop.jsonl")
    assert (tmp_path / "drop.jsonl").read_text() == "someone else's, just arrived"
    rename_noreplace(tmp_path / "new", tmp_path / "free.jsonl")
    assert (tmp_path / "free.jsonl").read_text() == "mine" and not (tmp_path / "new").exists()
