"""`spoold retry` and `spoold results`: a job's failed lines run again, and one result per custom_id over both."""

import asyncio
import io
import json
import os
import subprocess
import sys

import pytest

from spoold.backoff import RetryPolicy
from spoold.config import EngineSettings, LimitsSettings, SpoolSettings
from spoold.formats import error_line, output_line
from spoold.records import EngineResult, LineError
from spoold.retries import (RETRY_OF, accept_retry_of, final_lines, finished_job, may_retry, merge_results,
                            retry_chain, write_retry)
from spoold.spool import Spool
from spoold.validation import ModelResolver
from spoold.window import FairWindow
from spoold.jobrunner import JobRunner

from .fake_engine import EchoEngine
from .helpers import REPO, as_nobody, chat_line, read_jsonl, write_config, write_jsonl


def run_drop(spool, name, **engine_args):
    """Claim inbox/NAME and run it to the outbox with the engine double; the finished job's directory."""
    job = spool.claim_drop(name)
    engine = EchoEngine(EngineSettings(model="fake-model", args=engine_args))

    async def go():
        runner = JobRunner(spool, job, engine, ModelResolver({}, "fake-model"), LimitsSettings(),
                           FairWindow(8).join(job.id), asyncio.Event(), retry=RetryPolicy(max_attempts=1))
        return await runner.run()
    asyncio.run(go())
    return spool.outbox / job.id


def make_spool(tmp_path):
    spool = Spool(SpoolSettings(root=tmp_path / "spool", host_id="h"))
    spool.ensure_dirs()
    return spool


def test_a_retry_runs_only_the_lines_without_a_final_answer_and_results_merges_them(tmp_path):
    spool = make_spool(tmp_path)
    rows = [chat_line(i) for i in range(10)] + ["not json", chat_line(10, max_tokens=-1)]
    write_jsonl(spool.inbox / "scores.jsonl", rows)
    first = run_drop(spool, "scores.jsonl", server_error_on=["req-2", "req-7"])  # an overloaded server

    drop = write_retry(finished_job(spool.outbox, first.name), spool.inbox, 1 << 20)
    assert dict(drop.reasons) == {"server_error": 2}
    assert [json.loads(r)["custom_id"] for r in drop.path.read_bytes().splitlines()] == ["req-2", "req-7"]
    marker = json.loads((spool.inbox / (drop.path.name + ".ready")).read_text())
    assert marker == {RETRY_OF: first.name}

    second = run_drop(spool, drop.path.name)  # the server is fine now
    batch = json.loads((second / "batch.json").read_text())
    assert batch["retry_of"] == first.name and "metadata" not in batch

    out = io.BytesIO()
    merged = merge_results(retry_chain(spool.outbox, first.name), out)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    by_id = {x["custom_id"]: x for x in lines}
    assert len(lines) == 12 and merged.results == 12 and merged.from_retries == 2
    assert all(by_id[f"req-{i}"]["response"]["status_code"] == 200 for i in range(10))
    assert by_id["req-10"]["response"]["status_code"] == 400  # a 4xx is final: never retried
    assert by_id[None]["error"]["code"] == "invalid_json" and merged.failing == 2


def test_a_cancelled_jobs_unrun_lines_and_its_expired_and_crashed_lines_are_retried(tmp_path):
    spool = make_spool(tmp_path)
    job = spool.outbox / "cut-20261203T100000-0123456789abcdef"
    job.mkdir()
    write_jsonl(job / "input.jsonl", [chat_line(i) for i in range(6)])
    (job / "output.jsonl").write_bytes(output_line(1, "req-0", EngineResult(200, "{}"))
                                       + output_line(2, "req-1", EngineResult(502, "{}")))
    (job / "errors.jsonl").write_bytes(error_line(LineError(3, "req-2", "engine_crashed", "died"))
                                       + error_line(LineError(4, "req-3", "batch_expired", "late"))
                                       + error_line(LineError(5, "req-4", "invalid_body", "bad")))
    final, retryable = final_lines(job)
    assert final == {1, 5} and retryable == {2: "server_error", 3: "engine_crashed", 4: "batch_expired"}
    drop = write_retry(job, spool.inbox, 1 << 20)
    assert dict(drop.reasons) == {"server_error": 1, "engine_crashed": 1, "batch_expired": 1, "never_ran": 1}
    assert [json.loads(r)["custom_id"] for r in drop.path.read_bytes().splitlines()] == [
        "req-1", "req-2", "req-3", "req-5"]


def test_a_job_with_every_answer_final_makes_no_drop(tmp_path):
    spool = make_spool(tmp_path)
    write_jsonl(spool.inbox / "fine.jsonl", [chat_line(i) for i in range(3)])
    done = run_drop(spool, "fine.jsonl")
    drop = write_retry(done, spool.inbox, 1 << 20)
    assert drop.path is None and drop.lines == 0
    assert [p.name for p in spool.inbox.iterdir()] == []  # not even a temp file left


def test_the_latest_success_wins_over_a_retry_of_a_retry(tmp_path):
    spool = make_spool(tmp_path)
    write_jsonl(spool.inbox / "a.jsonl", [chat_line(i) for i in range(4)])
    first = run_drop(spool, "a.jsonl", server_error_on=["req-1", "req-2"])
    second = run_drop(spool, write_retry(first, spool.inbox, 1 << 20).path.name, server_error_on=["req-2"])
    third = run_drop(spool, write_retry(second, spool.inbox, 1 << 20).path.name)
    assert json.loads((third / "batch.json").read_text())["retry_of"] == second.name
    assert retry_chain(spool.outbox, first.name) == [first, second, third]
    out = io.BytesIO()
    merged = merge_results(retry_chain(spool.outbox, first.name), out)
    statuses = {x["custom_id"]: x["response"]["status_code"] for x in map(json.loads, out.getvalue().splitlines())}
    assert statuses == {f"req-{i}": 200 for i in range(4)} and merged.failing == 0 and merged.from_retries == 2


def test_a_drop_may_name_only_a_finished_job_whose_input_its_owner_submitted(tmp_path):
    spool = make_spool(tmp_path)
    write_jsonl(spool.inbox / "a.jsonl", [chat_line(0)])
    done = run_drop(spool, "a.jsonl")
    owner = os.lstat(done / "input.jsonl").st_uid
    assert accept_retry_of({RETRY_OF: done.name, "priority": "2"}, owner, spool.outbox) == done.name
    someone_else = owner + 4242 if owner else 4242
    os.chown(done / "input.jsonl", someone_else, -1)
    assert accept_retry_of({RETRY_OF: done.name}, 31337, spool.outbox) is None  # not theirs to extend
    for name in ("../outbox", "nope-20261203T100000-0123456789abcdef", ".hidden", "a/b"):
        assert accept_retry_of({RETRY_OF: name}, owner, spool.outbox) is None
    metadata = {RETRY_OF: "missing", "priority": "3"}
    accept_retry_of(metadata, owner, spool.outbox)
    assert metadata == {"priority": "3"}  # never kept as metadata, accepted or not



@pytest.mark.skipif(os.geteuid() != 0, reason="files of other owners need root")
def test_a_retry_root_runs_for_a_user_shares_the_engine_as_that_user(tmp_path):
    spool = make_spool(tmp_path)
    write_jsonl(spool.inbox / "a.jsonl", [chat_line(i) for i in range(3)])
    os.chown(spool.inbox / "a.jsonl", 1001, 1001)  # alice's
    first = run_drop(spool, "a.jsonl", server_error_on=["req-1"])
    retry = write_retry(first, spool.inbox, 1 << 20).path  # root runs `spoold retry` for her
    assert os.lstat(retry).st_uid == 0
    assert spool.drop_owner(retry.name) == ("uid:1001", 1)  # the scheduler's look before the claim
    job = spool.claim_drop(retry.name)
    record = job.read_record()[0]
    assert (record.retry_of, record.submitter_uid, record.share_tenant()) == (first.name, 1001, "uid:1001")


@pytest.mark.skipif(os.geteuid() != 0, reason="files of other owners need root")
def test_a_retry_shares_as_the_retried_inputs_owner_when_its_record_has_no_submitter(tmp_path):
    spool = make_spool(tmp_path)
    write_jsonl(spool.inbox / "a.jsonl", [chat_line(0)])
    os.chown(spool.inbox / "a.jsonl", 1001, 1001)
    first = run_drop(spool, "a.jsonl", server_error_on=["req-0"])
    doc = json.loads((first / "batch.json").read_text())
    del doc["submitter_uid"]  # claimed by a spoold from before submitters were recorded
    (first / "batch.json").write_text(json.dumps(doc))
    retry = write_retry(first, spool.inbox, 1 << 20).path
    assert spool.claim_drop(retry.name).read_record()[0].share_tenant() == "uid:1001"
    outsider = spool.inbox / "b.jsonl"  # another user naming her job: not accepted, so a job of his own
    write_jsonl(outsider, [chat_line(0)])
    (spool.inbox / "b.jsonl.ready").write_text(json.dumps({RETRY_OF: first.name}))
    os.chown(outsider, 1003, 1003)
    os.chown(spool.inbox / "b.jsonl.ready", 1003, 1003)
    assert spool.drop_owner("b.jsonl") == ("uid:1003", 1)
    record = spool.claim_drop("b.jsonl").read_record()[0]
    assert (record.retry_of, record.share_tenant()) == (None, "uid:1003")


@pytest.mark.skipif(os.geteuid() != 0, reason="files of other owners need root")
def test_a_user_may_retry_the_retry_root_made_of_her_job_and_nobody_else_may(tmp_path):
    spool = make_spool(tmp_path)
    write_jsonl(spool.inbox / "a.jsonl", [chat_line(i) for i in range(3)])
    os.chown(spool.inbox / "a.jsonl", 1001, 1001)  # alice's
    first = run_drop(spool, "a.jsonl", server_error_on=["req-1", "req-2"])
    second = run_drop(spool, write_retry(first, spool.inbox, 1 << 20).path.name, server_error_on=["req-2"])
    assert os.lstat(second / "input.jsonl").st_uid == 0  # root retried it for her: its input is root's
    third = write_retry(second, spool.inbox, 1 << 20).path
    for path in (third, spool.inbox / (third.name + ".ready")):
        os.chown(path, 1001, 1001)  # now she retries that retry herself
    record = spool.claim_drop(third.name).read_record()[0]
    assert (record.retry_of, record.share_tenant()) == (second.name, "uid:1001")
    assert not may_retry(second, 1003, daemon_uid=4242)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_retry_of_someone_elses_job_is_refused_before_any_drop_is_made():
    import contextlib
    import shutil
    import tempfile
    from pathlib import Path

    # Imported here: the child, as nobody, may not read this interpreter's library.
    import spoold.access  # noqa: F401
    import spoold.submit  # noqa: F401
    import spoold.validation  # noqa: F401
    from spoold.cli import main

    base, group = Path(tempfile.mkdtemp(prefix="spoold-retry-")), 4242  # a submitters' group nobody is put in
    try:
        base.chmod(0o755)
        spool = make_spool(base)
        write_jsonl(spool.inbox / "a.jsonl", [chat_line(i) for i in range(2)])
        os.chown(spool.inbox / "a.jsonl", 1001, 1001)  # alice's
        job = run_drop(spool, "a.jsonl", server_error_on=["req-1"])
        for path in (spool.root, spool.inbox, spool.outbox, job, *job.iterdir()):
            os.chown(path, -1, group)
            path.chmod(0o770 if path == spool.inbox else 0o750 if path.is_dir() else 0o640)
        config = write_config(base / "c.toml", spool.root)
        config.chmod(0o644)

        def retry():
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = main(["retry", job.name, "--config", str(config)])
            return code, err.getvalue()

        code, said = as_nobody(retry, gid=group)["ok"]
        assert code == 1 and said == (f"spoold: cannot retry {job.name!r}: it is uid 1001's job; only its submitter, "
                                      f"the daemon's user and root may retry it (sudo spoold retry ...)\n")
        assert list(spool.inbox.iterdir()) == []  # nothing dropped that would run unmerged in nobody's share
    finally:
        shutil.rmtree(base, ignore_errors=True)


def spoold(*args, config):
    return subprocess.run([sys.executable, "-m", "spoold", *args, "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_the_retry_and_results_verbs(tmp_path):
    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root)
    spool = Spool(SpoolSettings(root=root, host_id="h"))
    spool.ensure_dirs()
    write_jsonl(spool.inbox / "v.jsonl", [chat_line(i) for i in range(5)])
    first = run_drop(spool, "v.jsonl", server_error_on=["req-3"])

    done = spoold("retry", first.name, config=config)
    assert done.returncode == 0, done.stderr
    assert "1 lines (1 server_error)" in done.stdout and f"spoold results {first.name}" in done.stdout
    (drop,) = [p.name for p in spool.inbox.glob("*.jsonl")]
    run_drop(spool, drop)

    merged = tmp_path / "merged.jsonl"
    done = spoold("results", first.name, "-o", str(merged), config=config)
    assert done.returncode == 0, done.stderr
    assert "5 results, 1 of them from 1 retries; 0 still without a success" in done.stderr
    assert sorted(x["custom_id"] for x in read_jsonl(merged)) == [f"req-{i}" for i in range(5)]
    assert oct(merged.stat().st_mode & 0o777) == "0o640"  # results are personal data

    missing = spoold("retry", "no-such-job", config=config)
    assert missing.returncode == 1 and "no finished job 'no-such-job'" in missing.stderr
