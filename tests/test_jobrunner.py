import asyncio
import os
import json

import pytest

from spoold.config import EngineSettings, LimitsSettings, SpoolSettings
from spoold.engine import EngineDead
from spoold.backoff import RetryPolicy
from spoold.jobrunner import SUSPECT_WINDOW, JobRunner
from spoold.formats import output_line
from spoold.lifecycle import Outcome
from spoold.records import EngineResult
from spoold.spool import JobDir, Spool
from spoold.validation import ModelResolver
from spoold.window import FairWindow

from .fake_engine import EchoEngine
from .helpers import chat_line, check_exactly_once, complete_lines, read_jsonl, write_jsonl


def setup(tmp_path, rows, **engine_args):
    spool = Spool(SpoolSettings(root=tmp_path / "spool", host_id="h"))
    spool.ensure_dirs()
    write_jsonl(spool.inbox / "batch.jsonl", rows)
    job = spool.claim_drop("batch.jsonl")
    engine = EchoEngine(EngineSettings(model="fake-model", args=engine_args))
    return spool, job, engine


#: how often a failing line is tried in these tests, with waits short enough for a test
RETRY = RetryPolicy(max_attempts=3, first_backoff_seconds=0.01)


def run_job(spool, job, engine, stop=None, inflight=8, retry=RETRY):
    async def go():
        runner = JobRunner(spool, job, engine, ModelResolver({}, "fake-model"), LimitsSettings(),
                           FairWindow(inflight).join(job.id), stop or asyncio.Event(), retry=retry)
        return await runner.run(), runner
    return asyncio.run(go())


ROWS = [chat_line(i) for i in range(50)] + ["not json", chat_line(3)]
VALID = {f"req-{i}" for i in range(50)}


def test_a_job_ends_in_the_outbox_with_one_result_per_line(tmp_path):
    spool, job, engine = setup(tmp_path, ROWS)
    status, runner = run_job(spool, job, engine)
    assert status == "completed"
    done = spool.outbox / job.id
    check_exactly_once(done, VALID, {51, 52})
    batch = json.loads((done / "batch.json").read_text())
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 52, "completed": 50, "failed": 2}
    assert batch["usage"] == {"input_tokens": 150, "output_tokens": 100, "total_tokens": 250}
    assert batch["model"] == "fake-model" and batch["endpoint"] == "/v1/chat/completions"
    assert not job.path.exists()


def test_engine_4xx_is_an_output_line_counted_as_failed(tmp_path):
    spool, job, engine = setup(tmp_path, [chat_line(0), chat_line(1, max_tokens=-1)])
    run_job(spool, job, engine)
    out = {o["custom_id"]: o for o in read_jsonl(spool.outbox / job.id / "output.jsonl")}
    assert out["req-1"]["response"]["status_code"] == 400
    assert json.loads((spool.outbox / job.id / "batch.json").read_text())["request_counts"]["failed"] == 1


def test_resume_after_a_crash_skips_finished_lines_and_cuts_the_torn_tail(tmp_path):
    spool, job, engine = setup(tmp_path, ROWS)
    # A previous run validated the file and finished ten lines, then died mid-write.
    with open(job.output, "wb") as f:
        for i in range(10):
            f.write(output_line(i + 1, f"req-{i}", EngineResult(200, "{}")))
        f.write(output_line(11, "req-10", EngineResult(200, "{}"))[:40])
    status, _ = run_job(spool, job, engine)
    assert status == "completed"
    assert engine.handled == 40
    check_exactly_once(spool.outbox / job.id, VALID, {51, 52})


def test_stop_interrupts_and_a_rerun_finishes_exactly_once(tmp_path):
    spool, job, engine = setup(tmp_path, ROWS, delay=0.01)

    async def go():
        stop = asyncio.Event()
        runner = JobRunner(spool, job, engine, ModelResolver({}, "fake-model"), LimitsSettings(), FairWindow(4).join(job.id), stop)
        task = asyncio.create_task(runner.run())
        while runner.refresh().done < 10:
            await asyncio.sleep(0.01)
        stop.set()
        return await task
    assert asyncio.run(go()) == "interrupted"
    assert job.read_batch()["status"] == "in_progress"
    partial = len(read_jsonl(job.output))
    assert 10 <= partial < 50
    status, _ = run_job(spool, JobDir(job.path), EchoEngine(EngineSettings(model="fake-model")))
    assert status == "completed"
    check_exactly_once(spool.outbox / job.id, VALID, {51, 52})


def test_a_cancel_stops_the_job_and_publishes_what_is_done_without_the_daemon(tmp_path):
    rows = [chat_line(i) for i in range(2000)]  # some 5 s of work: the cancel lands long before the end
    spool, job, engine = setup(tmp_path, rows, delay=0.01)

    async def go():
        runner = JobRunner(spool, job, engine, ModelResolver({}, "fake-model"), LimitsSettings(), FairWindow(4).join(job.id),
                           asyncio.Event())  # nobody else will ever set this stop
        task = asyncio.create_task(runner.run())
        while runner.refresh().done < 10:
            await asyncio.sleep(0.01)
        assert spool.request_cancel(job.id) is not None  # what `spoold cancel` does
        return await task
    assert asyncio.run(go()) == Outcome.CANCELLED
    published = spool.outbox / job.id
    batch = JobDir(published).read_batch()
    assert batch["status"] == "cancelled" and batch["cancelled_at"]
    done = len(read_jsonl(published / "output.jsonl")) + len(read_jsonl(published / "errors.jsonl"))
    assert 10 <= done < 2000 and batch["request_counts"]["completed"] + batch["request_counts"]["failed"] == done


def test_a_cancel_its_owner_asks_for_in_the_inbox_stops_the_job_and_anyone_elses_is_removed_unheeded(tmp_path):
    rows = [chat_line(i) for i in range(2000)]  # some 5 s of work: the cancel lands long before the end
    spool, job, engine = setup(tmp_path, rows, delay=0.01)
    os.chown(job.input, 1000, 1000)  # a submitter's drop...
    record = job.read_record()[0]
    record.submitter_uid = 1000  # ...as its claim records it
    spool.save(job, record)
    request = spool.owner_cancel_request(job.id)

    def ask_as(uid):  # made whole, then renamed in: the runner never sees it as root's
        made = spool.inbox / ".request.tmp"
        made.write_text("")
        os.chown(made, uid, uid)
        os.rename(made, request)

    async def go():
        runner = JobRunner(spool, job, engine, ModelResolver({}, "fake-model"), LimitsSettings(), FairWindow(4).join(job.id),
                           asyncio.Event())
        task = asyncio.create_task(runner.run())
        while runner.refresh().done < 10:
            await asyncio.sleep(0.01)
        ask_as(1001)  # another submitter's request: removed, and the job runs on
        while request.exists():
            await asyncio.sleep(0.01)
        assert not task.done() and not job.cancel_request.exists()
        ask_as(1000)  # its owner's, as `spoold cancel` by the owner leaves it
        return await task
    assert asyncio.run(go()) == Outcome.CANCELLED
    assert JobDir(spool.outbox / job.id).read_batch()["status"] == "cancelled"
    assert not request.exists()


def test_a_job_cancelled_before_it_runs_is_published_unrun(tmp_path):
    spool, job, engine = setup(tmp_path, ROWS)
    spool.request_cancel(job.id)
    status, _ = run_job(spool, job, engine)
    assert status is Outcome.CANCELLED and engine.handled == 0
    assert JobDir(spool.outbox / job.id).read_batch()["status"] == "cancelled"


def test_engine_failure_writes_nothing_for_the_failed_request(tmp_path):
    spool, job, engine = setup(tmp_path, ROWS, fail_on="req-20")
    with pytest.raises(EngineDead):
        run_job(spool, job, engine)
    assert "req-20" not in {o["custom_id"] for o in read_jsonl(job.output)}
    assert job.path.exists()  # stays in processing/ to resume on a fresh engine
    status, _ = run_job(spool, JobDir(job.path), EchoEngine(EngineSettings(model="fake-model")))
    assert status == "completed"
    check_exactly_once(spool.outbox / job.id, VALID, {51, 52})


def test_in_flight_is_bounded(tmp_path):
    spool, job, engine = setup(tmp_path, [chat_line(i) for i in range(40)], delay=0.005)
    peak = active = 0
    handle = engine.handle

    async def counting(request):
        nonlocal peak, active
        active += 1
        peak = max(peak, active)
        try:
            return await handle(request)
        finally:
            active -= 1
    engine.handle = counting
    run_job(spool, job, engine, inflight=5)
    assert peak == 5


def test_a_file_of_blank_lines_fails_validating_with_openais_empty_file_code_and_never_ran(tmp_path):
    spool, job, engine = setup(tmp_path, [])
    job.input.write_bytes(b"\n  \n\r\n")
    status, _ = run_job(spool, job, engine)
    assert status == "failed" and engine.handled == 0
    batch = json.loads((spool.failed / job.id / "batch.json").read_text())
    assert [e["code"] for e in batch["errors"]] == ["empty_file"] and "no request lines" in batch["errors"][0]["message"]
    # as OpenAI shows a batch that fails validation: failed, never in progress
    assert batch["failed_at"] and batch["in_progress_at"] is None


def test_a_symlinked_input_fails_the_job_without_reading_it(tmp_path):
    spool, job, engine = setup(tmp_path, [chat_line(0)])
    target = tmp_path / "secret"
    target.write_text("x")
    job.input.unlink()
    job.input.symlink_to(target)
    status, _ = run_job(spool, job, engine)
    assert status == "failed"
    batch = json.loads((spool.failed / job.id / "batch.json").read_text())
    assert batch["status"] == "failed" and "symlink" in batch["errors"][0]["message"]


def test_resume_mid_validation_never_runs_a_duplicate_of_a_finished_line(tmp_path):
    rows = [chat_line(i) for i in range(20)] + [chat_line(5), chat_line(6)]  # lines 21, 22 repeat done ids
    spool, job, engine = setup(tmp_path, rows)
    with open(job.output, "wb") as f:
        for i in range(10):
            f.write(output_line(i + 1, f"req-{i}", EngineResult(200, "{}")))
    assert job.read_batch()["status"] == "validating"
    status, _ = run_job(spool, job, engine)
    assert status == "completed" and engine.handled == 10
    check_exactly_once(spool.outbox / job.id, {f"req-{i}" for i in range(20)}, {21, 22})


def test_resume_finds_finished_lines_by_the_line_number_in_their_ids(tmp_path):
    spool, job, engine = setup(tmp_path, ROWS)
    with open(job.output, "wb") as f:  # lines 1-10 done, in the order they finished
        for line in (3, 1, 2, 10, 4, 5, 6, 9, 7, 8):
            f.write(output_line(line, f"req-{line - 1}", EngineResult(200, "{}")))
    status, _ = run_job(spool, job, engine)
    assert status == "completed" and engine.handled == 40
    check_exactly_once(spool.outbox / job.id, VALID, {51, 52})


def test_repeated_custom_ids_are_found_when_the_file_is_read_and_never_run(tmp_path):
    rows = [chat_line(i) for i in range(30)] + [chat_line(2), {**chat_line(40), "custom_id": "req-7"}]
    spool, job, engine = setup(tmp_path, rows)
    status, _ = run_job(spool, job, engine)
    assert status == "completed" and engine.handled == 30
    check_exactly_once(spool.outbox / job.id, {f"req-{i}" for i in range(30)}, {31, 32})
    errors = {e["error"]["line"]: e["error"] for e in read_jsonl(spool.outbox / job.id / "errors.jsonl")}
    assert errors[31]["code"] == "duplicate_custom_id" and "on line 3" in errors[31]["message"]
    assert json.loads((spool.outbox / job.id / "batch.json").read_text())["models"] == {"fake-model": 30}


def slow_disk(monkeypatch) -> dict:
    """Commits that take 20 ms (a slow fsync, in the writer's thread); returns the most lines and
    bytes ever waiting for one, as it is updated."""
    import time

    from spoold.writer import GroupCommitWriter

    slow_commit, add, most = GroupCommitWriter._commit, GroupCommitWriter.add_result, {"lines": 0, "bytes": 0}

    def commit(self, out, err):
        time.sleep(0.02)
        slow_commit(self, out, err)

    def add_result(self, *args):
        add(self, *args)
        most["lines"] = max(most["lines"], self._added - self._committed)  # added, not yet durable
        most["bytes"] = max(most["bytes"], self._waiting_bytes)
    monkeypatch.setattr(GroupCommitWriter, "_commit", commit)
    monkeypatch.setattr(GroupCommitWriter, "add_result", add_result)
    return most


def test_a_slow_disk_pauses_dispatch_instead_of_piling_up_finished_lines(tmp_path, monkeypatch):
    monkeypatch.setattr("spoold.dispatch.MAX_PENDING_RESULTS", 20)
    most = slow_disk(monkeypatch)
    spool, job, engine = setup(tmp_path, [chat_line(i) for i in range(400)])
    status, _ = run_job(spool, job, engine, inflight=8)
    assert status == "completed"
    check_exactly_once(spool.outbox / job.id, {f"req-{i}" for i in range(400)}, set())
    assert 0 < most["lines"] <= 20 + 8  # the cap, plus what was in flight when dispatch paused


def test_big_answers_pause_dispatch_by_their_bytes_not_only_their_count(tmp_path, monkeypatch):
    monkeypatch.setattr("spoold.writer.MAX_WAITING_BYTES", 8000)  # some 20 of the double's answers
    most = slow_disk(monkeypatch)
    spool, job, engine = setup(tmp_path, [chat_line(i) for i in range(400)])
    status, _ = run_job(spool, job, engine, inflight=8)
    assert status == "completed"
    check_exactly_once(spool.outbox / job.id, {f"req-{i}" for i in range(400)}, set())
    line_bytes = len((spool.outbox / job.id / "output.jsonl").read_bytes()) // 400
    assert 0 < most["bytes"] <= 8000 + 8 * line_bytes  # the cap, plus what was in flight


def test_an_input_that_cannot_be_read_mid_job_is_raised_not_taken_for_done(tmp_path, monkeypatch):
    from spoold import jobrunner

    spool, job, engine = setup(tmp_path, ROWS)
    real_iter_lines = jobrunner.iter_lines

    def failing_iter_lines(f, max_line_bytes, *args, **kwargs):
        for number, raw in real_iter_lines(f, max_line_bytes, *args, **kwargs):
            if number == 30:
                raise OSError(5, "Input/output error")
            yield number, raw
    monkeypatch.setattr(jobrunner, "iter_lines", failing_iter_lines)  # the dispatch pass's reads
    with pytest.raises(OSError):
        run_job(spool, job, engine)
    assert job.path.exists() and not (spool.outbox / job.id).exists()


def test_a_line_in_flight_at_max_attempts_engine_deaths_gets_an_error_and_the_rest_run(tmp_path):
    spool, job, _ = setup(tmp_path, ROWS)
    deaths = 0
    while True:
        poisoned = EchoEngine(EngineSettings(model="fake-model", args={"fail_on": "req-20", "delay": 0.001}))
        try:
            status, _ = run_job(spool, JobDir(job.path), poisoned, inflight=16)
            break
        except EngineDead:
            deaths += 1
            assert deaths <= RETRY.max_attempts, "the poison line was run again after its deaths"
            assert "engine_crashes" in job.read_batch()  # recorded before the engine is replaced
    assert status == "completed" and deaths == RETRY.max_attempts
    done = spool.outbox / job.id
    crashed = {e["error"]["line"]: e["custom_id"] for e in read_jsonl(done / "errors.jsonl")
               if e["error"]["code"] == "engine_crashed"}
    assert "req-20" in crashed.values() and len(crashed) <= SUSPECT_WINDOW
    check_exactly_once(done, VALID - set(crashed.values()), {51, 52} | set(crashed))
    # every line in flight at a death but the last ones ran again: counted as retries
    assert json.loads((done / "batch.json").read_text())["retries"]["engine_died"] >= RETRY.max_attempts - 1


def test_a_line_answered_5xx_is_tried_again_until_it_succeeds_and_the_retries_are_counted(tmp_path):
    rows = [chat_line(i) for i in range(20)]
    spool, job, engine = setup(tmp_path, rows, server_error_on=["req-4", "req-9"], server_errors=2)
    status, _ = run_job(spool, job, engine)
    assert status == "completed"
    done = spool.outbox / job.id
    out = {o["custom_id"]: o["response"]["status_code"] for o in read_jsonl(done / "output.jsonl")}
    assert out == {f"req-{i}": 200 for i in range(20)}  # one result each: the final one
    assert engine.tries["req-4"] == engine.tries["req-9"] == 3 and engine.tries["req-0"] == 1
    batch = json.loads((done / "batch.json").read_text())
    assert batch["retries"] == {"server_error": 4} and batch["request_counts"]["failed"] == 0


def test_a_line_that_keeps_failing_gets_its_last_answer_after_max_attempts_and_4xx_is_never_retried(tmp_path):
    rows = [chat_line(0), chat_line(1, max_tokens=-1), chat_line(2)]
    spool, job, engine = setup(tmp_path, rows, server_error_on=["req-0"])
    run_job(spool, job, engine, retry=RetryPolicy(max_attempts=4, first_backoff_seconds=0.01))
    done = spool.outbox / job.id
    out = {o["custom_id"]: o["response"]["status_code"] for o in read_jsonl(done / "output.jsonl")}
    assert out == {"req-0": 503, "req-1": 400, "req-2": 200}
    assert engine.tries == {"req-0": 4, "req-1": 1, "req-2": 1}
    batch = json.loads((done / "batch.json").read_text())
    assert batch["retries"] == {"server_error": 3} and batch["request_counts"]["failed"] == 2


def test_max_attempts_1_never_retries(tmp_path):
    spool, job, engine = setup(tmp_path, [chat_line(0)], server_error_on=["req-0"], server_errors=1)
    run_job(spool, job, engine, retry=RetryPolicy(max_attempts=1))
    done = spool.outbox / job.id
    assert [o["response"]["status_code"] for o in read_jsonl(done / "output.jsonl")] == [503]
    assert "retries" not in json.loads((done / "batch.json").read_text())


def test_a_stop_during_a_retry_wait_leaves_the_line_for_the_next_start(tmp_path):
    spool, job, engine = setup(tmp_path, [chat_line(0), chat_line(1)], server_error_on=["req-1"], server_errors=1)

    async def go():
        stop = asyncio.Event()
        runner = JobRunner(spool, job, engine, ModelResolver({}, "fake-model"), LimitsSettings(),
                           FairWindow(4).join(job.id), stop, retry=RetryPolicy(3, first_backoff_seconds=3600))
        task = asyncio.create_task(runner.run())
        while engine.tries.get("req-1") != 1 or runner.refresh().done < 1:
            await asyncio.sleep(0.01)
        stop.set()  # the line waits an hour for its next try: the stop must not
        return await task
    assert asyncio.run(go()) == Outcome.INTERRUPTED
    assert [o["custom_id"] for o in read_jsonl(job.output)] == ["req-0"]  # no 503 written for req-1
    status, _ = run_job(spool, JobDir(job.path), EchoEngine(EngineSettings(model="fake-model")))
    assert status == "completed"
    check_exactly_once(spool.outbox / job.id, {"req-0", "req-1"}, set())


def test_an_input_appended_to_after_its_claim_fails_with_its_results_kept(tmp_path):
    spool, job, engine = setup(tmp_path, ROWS)
    with open(job.input, "ab"):  # a descriptor opened before the claim, still writing
        status, runner = run_job(spool, job, engine)
        assert status == "completed"
    spool, job, engine = setup(tmp_path / "2", ROWS)

    async def go():
        runner = JobRunner(spool, job, engine, ModelResolver({}, "fake-model"), LimitsSettings(), FairWindow(8).join(job.id),
                           asyncio.Event())
        task = asyncio.create_task(runner.run())
        while runner.progress.state == "validating" or runner.refresh().done < 5:
            await asyncio.sleep(0.001)
        with open(job.input, "ab") as f:
            f.write(json.dumps(chat_line(99)).encode() + b"\n")
        return await task
    engine.delay = 0.01
    assert asyncio.run(go()) == "failed"
    failed = spool.failed / job.id
    batch = json.loads((failed / "batch.json").read_text())
    assert batch["errors"][-1]["code"] == "input_changed"
    outputs = read_jsonl(failed / "output.jsonl")
    assert len(outputs) == 50 and "req-99" not in {o["custom_id"] for o in outputs}  # appended bytes never ran


def test_a_hard_linked_input_is_never_read(tmp_path):
    spool, job, engine = setup(tmp_path, ROWS)
    (tmp_path / "other-name").hardlink_to(job.input)
    status, _ = run_job(spool, job, engine)
    assert status == "failed"
    batch = json.loads((spool.failed / job.id / "batch.json").read_text())
    assert batch["errors"][-1]["code"] == "not_regular" and "hard links" in batch["errors"][-1]["message"]
    assert not (spool.failed / job.id / "output.jsonl").exists()


def _read_offset(path) -> int | None:
    """Where this process's open descriptor on `path` stands (from /proc), or None if none is open."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    return int(info.read().split("pos:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return None


def test_blank_lines_by_the_million_never_hold_the_event_loop(tmp_path):
    """Heartbeats and signals are served while a pass skips lines that are not requests:
    the loop gets turns while the reader is in the middle of the blank lines, in both passes."""
    rows = [chat_line(0)] + [""] * 4_000_000 + [chat_line(1)]
    spool, job, engine = setup(tmp_path, rows)
    first_end = len(json.dumps(rows[0])) + 1
    last_start = job.input.stat().st_size - len(json.dumps(rows[-1])) - 1
    inside: set[int] = set()  # read offsets seen from another task, strictly inside the blank lines

    async def go():
        runner = JobRunner(spool, job, engine, ModelResolver({}, "fake-model"), LimitsSettings(), FairWindow(8).join(job.id),
                           asyncio.Event())
        task = asyncio.create_task(runner.run())
        while not task.done():
            await asyncio.sleep(0)  # a turn the runner let the loop have
            offset = _read_offset(job.input)
            if offset is not None and first_end < offset < last_start:
                inside.add(offset)
        return await task
    assert asyncio.run(go()) == "completed"
    assert len(inside) >= 2, f"the loop ran only at read offsets {sorted(inside)} inside 4 MB of blank lines"
    check_exactly_once(spool.outbox / job.id, {"req-0", "req-1"}, set())


def test_a_sparse_terabyte_fails_as_too_big_before_it_is_read(tmp_path):
    spool, job, engine = setup(tmp_path, ROWS)
    os.truncate(job.input, 1 << 40)
    status, _ = run_job(spool, job, engine)
    assert status == "failed"
    error = json.loads((spool.failed / job.id / "batch.json").read_text())["errors"][-1]
    assert error["code"] == "too_big" and "max_file_bytes" in error["message"]


def _with_window(job, expires_at):
    """The job as an API batch whose window ends at `expires_at`."""
    record = job.read_record()[0]
    record.input_file_id, record.completion_window, record.expires_at = "file-" + "F" * 24, "1h", int(expires_at)
    record.save(job.batch)


def test_a_batch_past_its_window_is_expired_with_an_error_for_every_line_that_never_ran(tmp_path):
    import time

    spool, job, engine = setup(tmp_path, ROWS)
    _with_window(job, time.time() - 1)  # e.g. the daemon was down when the window ended
    status, _ = run_job(spool, job, engine)
    assert status == "expired" and engine.handled == 0
    done = spool.outbox / job.id
    check_exactly_once(done, set(), set(range(1, 53)))  # nothing ran: every line has exactly one error
    errors = {e["error"]["line"]: e["error"]["code"] for e in read_jsonl(done / "errors.jsonl")}
    assert errors == {**{n: "batch_expired" for n in range(1, 51)}, 51: "invalid_json", 52: "duplicate_custom_id"}
    batch = json.loads((done / "batch.json").read_text())
    assert batch["status"] == "expired" and batch["expired_at"]
    assert batch["request_counts"] == {"total": 52, "completed": 0, "failed": 52}


def test_a_batch_whose_window_ends_mid_run_keeps_what_ran_and_expires_the_rest_once(tmp_path):
    import time

    rows = [chat_line(i) for i in range(3000)]
    spool, job, engine = setup(tmp_path, rows, delay=0.002)
    _with_window(job, time.time() + 3600)

    async def go():
        runner = JobRunner(spool, job, engine, ModelResolver({}, "fake-model"), LimitsSettings(),
                           FairWindow(2).join(job.id), asyncio.Event())

        async def end_the_window_mid_run():  # not on a wall-clock bet: once 100 results are durable
            while complete_lines(job.output) < 100:
                await asyncio.sleep(0.01)
            runner.record.expires_at = int(time.time()) - 1
        ender = asyncio.create_task(end_the_window_mid_run())
        try:
            return await runner.run()
        finally:
            ender.cancel()
    assert asyncio.run(go()) == "expired"
    done = spool.outbox / job.id
    outputs, errors = read_jsonl(done / "output.jsonl"), read_jsonl(done / "errors.jsonl")
    ran = {o["custom_id"] for o in outputs}
    expired = {e["custom_id"] for e in errors if e["error"]["code"] == "batch_expired"}
    assert ran and expired and not ran & expired and ran | expired == {r["custom_id"] for r in rows}
    assert len(outputs) == len(ran) and len(errors) == len(expired)  # none twice
    batch = json.loads((done / "batch.json").read_text())
    assert batch["request_counts"] == {"total": 3000, "completed": len(ran), "failed": len(expired)}


def test_an_expired_batch_whose_move_a_crash_cut_short_is_published_expired_not_run_again(tmp_path):
    import time

    spool, job, engine = setup(tmp_path, ROWS)
    _with_window(job, time.time() - 1)
    record = job.read_record()[0]
    record.expire(0, 52, record.usage)  # saved as expired; the crash came before the move to outbox/
    record.save(job.batch)
    status, _ = run_job(spool, job, engine)
    assert status == "expired" and engine.handled == 0
    assert json.loads((spool.outbox / job.id / "batch.json").read_text())["status"] == "expired"


def test_a_line_that_sets_no_output_limit_is_held_to_the_limit_by_the_loaded_models_context(tmp_path):
    # 300 choices that may each fill a 4,096-token context: 1,228,800 tokens, over the 1 MiB default.
    rows = [chat_line(0), dict(chat_line(1), body={"messages": [], "n": 300}),
            dict(chat_line(2), body={"messages": [], "n": 200})]
    spool, job, _ = setup(tmp_path, rows)
    engine = EchoEngine(EngineSettings(model="fake-model", max_model_len=4096))
    status, _ = run_job(spool, job, engine)
    assert status == "completed" and engine.handled == 2
    (error,) = read_jsonl(spool.outbox / job.id / "errors.jsonl")
    assert (error["custom_id"], error["error"]["code"]) == ("req-1", "too_many_output_tokens")
    assert "context of 4096 tokens" in error["error"]["message"]


def test_a_mixed_files_line_is_held_to_its_own_models_context_when_that_model_runs(tmp_path):
    rows = [chat_line(0, model="a"), dict(chat_line(1), body={"model": "b", "messages": [], "n": 300}),
            chat_line(2, model="b")]
    spool, job, _ = setup(tmp_path, rows)
    resolver = ModelResolver({"a": "model-a", "b": "model-b"}, "a")

    async def run_with(model):  # the daemon loads each model in turn and runs the job again
        engine = EchoEngine(EngineSettings(model=model, max_model_len=4096 if model == "model-b" else 0))
        runner = JobRunner(spool, job, engine, resolver, LimitsSettings(), FairWindow(8).join(job.id),
                           asyncio.Event(), retry=RETRY)
        return await runner.run(), engine.handled

    assert asyncio.run(run_with("model-a")) == (Outcome.WAITING, 1)  # b's context is not known yet
    assert asyncio.run(run_with("model-b")) == (Outcome.COMPLETED, 1)
    (error,) = read_jsonl(spool.outbox / job.id / "errors.jsonl")
    assert (error["custom_id"], error["error"]["code"]) == ("req-1", "too_many_output_tokens")
    batch = json.loads((spool.outbox / job.id / "batch.json").read_text())
    assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
