import asyncio
import json
import os

import pytest

from spoold.records import EngineResult, LineError
from spoold.formats import Tally
from spoold.writer import GroupCommitWriter, WriterFailed, recover_results

OK = EngineResult(200, '{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}', 3, 2)


async def _write(tmp_path, n, errors=0):
    writer = GroupCommitWriter(tmp_path / "output.jsonl", tmp_path / "errors.jsonl", Tally())
    task = asyncio.create_task(writer.run())
    for i in range(n):
        writer.add_result(i + 1, f"id-{i}", OK)
    for j in range(errors):
        writer.add_error(LineError(100 + j, None, "invalid_json", "bad"))
    counted_before_flush = writer.tally.done
    await writer.flush()
    task.cancel()
    writer.close()
    return writer, counted_before_flush


def test_lines_are_counted_only_after_their_fsync(tmp_path):
    writer, before = asyncio.run(_write(tmp_path, 500, errors=2))
    assert before == 0
    assert writer.tally.done == 502 and writer.tally.completed == 500 and writer.tally.failed == 2
    lines = (tmp_path / "output.jsonl").read_text().split("\n")[:-1]
    assert [json.loads(l)["custom_id"] for l in lines] == [f"id-{i}" for i in range(500)]
    assert [json.loads(l)["id"].rsplit("_", 1)[1] for l in lines] == [str(i + 1) for i in range(500)]
    assert writer.fsyncs <= 4  # one group: one fsync per file, not one per line
    assert oct(os.stat(tmp_path / "output.jsonl").st_mode & 0o777) == "0o640"


def test_recovery_cuts_a_torn_tail_and_reads_back_what_is_done(tmp_path):
    asyncio.run(_write(tmp_path, 10, errors=1))
    with open(tmp_path / "output.jsonl", "ab") as f:
        f.write(b'{"id":"x","custom_id":"id-10","respo')
    rec = recover_results(tmp_path / "output.jsonl", tmp_path / "errors.jsonl")
    assert rec.done_lines == set(range(1, 11))  # by line number, from the ids
    assert rec.error_lines == {100}
    assert rec.tally.completed == 10 and rec.tally.failed == 1 and rec.tally.input_tokens == 30
    assert (tmp_path / "output.jsonl").read_bytes().endswith(b"}\n")


def test_a_failed_write_is_raised_and_nothing_is_counted(tmp_path):
    async def go():
        writer = GroupCommitWriter(tmp_path / "missing-dir" / "o.jsonl", tmp_path / "e.jsonl", Tally())
        task = asyncio.create_task(writer.run())
        writer.add_result(1, "a", OK)
        with pytest.raises(WriterFailed):
            await writer.flush()
        await asyncio.gather(task, return_exceptions=True)
        return writer
    writer = asyncio.run(go())
    assert writer.tally.done == 0


def test_recovery_reads_vllm_style_bodies_and_never_cuts_an_odd_but_valid_line(tmp_path):
    from spoold.formats import output_line

    vllm_body = ('{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
                 '"content":"the \\"usage\\" is: {}"},"finish_reason":"length"}],'
                 '"usage":{"prompt_tokens":21,"total_tokens":29,"completion_tokens":8}}')
    with open(tmp_path / "output.jsonl", "wb") as f:
        f.write(output_line(1, "a", EngineResult(200, vllm_body)))
        f.write(b'{"custom_id": "b", "id": "x", "response": {"status_code": 400, "body": null}, "error": null}\n')
        f.write(output_line(3, "c\u2028\"quoted\"", EngineResult(200, vllm_body)))
        f.write(b'{"custom_id": "d", "id": "batch_req_0123456789abcdef_4", "response": {"status_code": 200}}\n')
    rec = recover_results(tmp_path / "output.jsonl", tmp_path / "errors.jsonl")
    assert rec.done_lines == {1, 3, 4}
    # "b" has an id that names no input line: not spoold's, so not a result (and never cut)
    assert rec.tally.completed == 3 and rec.tally.failed == 0
    assert rec.tally.input_tokens == 42 and rec.tally.output_tokens == 16
    assert len((tmp_path / "output.jsonl").read_bytes().split(b"\n")) == 5  # nothing cut


def test_recovery_counts_the_tokens_of_responses_api_bodies(tmp_path):
    from spoold.formats import output_line

    body = ('{"id":"resp_1","object":"response","output":[],"status":"completed",'
            '"usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},"output_tokens":5,'
            '"output_tokens_details":{"reasoning_tokens":0},"total_tokens":16}}')
    with open(tmp_path / "output.jsonl", "wb") as f:
        f.write(output_line(1, "a", EngineResult(200, body)))
    rec = recover_results(tmp_path / "output.jsonl", tmp_path / "errors.jsonl")
    assert (rec.tally.input_tokens, rec.tally.output_tokens) == (11, 5)


def test_the_write_path_needs_nothing_of_validation_nor_numpy():
    import subprocess
    import sys

    probe = "import sys, spoold.writer; print('numpy' in sys.modules, 'spoold.validation' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
