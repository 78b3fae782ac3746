import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios

import pytest

from .helpers import NOBODY, REPO, as_nobody, chat_line, read_jsonl, write_config, write_jsonl


def spoold(*args, config=None):
    cmd = [sys.executable, "-m", "spoold", *args] + (["--config", str(config)] if config else [])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)


def test_help_explains_every_verb():
    out = spoold("--help").stdout
    for verb in ("run", "submit", "validate", "status", "watch", "cancel", "retry", "results", "models",
                 "bench-models", "demo"):
        assert verb in out
    assert "--model" in spoold("submit", "--help").stdout


def test_validate_reports_file_line_and_reason_and_exits_1(tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "spool")
    bad = write_jsonl(tmp_path / "in.jsonl", [chat_line(1), "{oops", {**chat_line(3), "method": "GET"}])
    result = spoold("validate", str(bad), config=config)
    assert result.returncode == 1
    assert f"{bad}:2: invalid_json:" in result.stdout
    assert f"{bad}:3: invalid_method:" in result.stdout
    assert "3 lines, 1 valid, 2 bad" in result.stdout


def test_validate_holds_a_line_without_max_tokens_to_the_configured_context(tmp_path):
    # [models] gives model b a context of 8,192 tokens: 200 choices that may each fill it are 1,638,400
    # tokens, over [limits] max_output_tokens_per_line (1 MiB by default), as the daemon would find.
    config = write_config(tmp_path / "c.toml", tmp_path / "spool",
                          extra='[models]\nb = { model = "org/b", max_model_len = 8192 }\n')
    lines = [dict(chat_line(1), body={"model": "b", "messages": [], "n": 200}),
             dict(chat_line(2), body={"model": "b", "messages": [], "n": 200, "max_tokens": 16})]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    result = spoold("validate", str(path), config=config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{path}:1: too_many_output_tokens:" in result.stdout and "context of 8192 tokens" in result.stdout
    assert "2 lines, 1 valid, 1 bad" in result.stdout


def test_validate_clean_file_exits_0(tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "spool")
    good = write_jsonl(tmp_path / "in.jsonl", [chat_line(1), chat_line(2)])
    result = spoold("validate", str(good), config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 lines, 2 valid, 0 bad" in result.stdout


def test_validate_and_submit_refuse_a_file_the_daemon_would_fail_whole_and_say_why(tmp_path):
    import gzip

    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "c.toml", root)
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n")
    packed = tmp_path / "packed.jsonl"
    packed.write_bytes(gzip.compress(json.dumps(chat_line(1)).encode() + b"\n"))
    for path, said in ((blank, "empty_file: no request lines"), (packed, "binary: this is a gzip file")):
        checked = spoold("validate", str(path), config=config)
        assert checked.returncode == 1 and f"{path}: {said}" in checked.stdout, checked.stdout
        assert "invalid_json" not in checked.stdout  # not one error per line of compressed bytes
        submitted = spoold("submit", str(path), config=config)  # without --strict too: it could never run
        assert submitted.returncode == 1 and f"{path}: {said}" in submitted.stderr, submitted.stderr
    assert list((root / "inbox").iterdir()) == []


def test_validate_says_how_to_convert_a_file_that_is_json_but_not_jsonl(tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "spool")
    rows = [chat_line(1), chat_line(2)]
    array = tmp_path / "array.jsonl"
    array.write_text(json.dumps(rows) + "\n")
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text("".join(json.dumps(r, indent=2) + "\n" for r in rows))
    for path, conversion in ((array, f"jq -c '.[]' {array} > fixed.jsonl"),
                             (pretty, f"jq -c . {pretty} > fixed.jsonl")):
        result = spoold("validate", str(path), config=config)
        assert result.returncode == 1 and "0 valid" in result.stdout
        assert f"{path}: no line is a JSON object" in result.stdout and conversion in result.stdout, result.stdout
    # lines that are requests, only wrong ones, get no such hint
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [chat_line(1, model="no-such-model")])
    result = spoold("validate", str(wrong), config=config)
    assert result.returncode == 1 and "unknown_model" in result.stdout and "jq" not in result.stdout


def on_a_terminal(*args, config):
    """`spoold ARGS` with its stderr on a 120-column pseudo-terminal, as a person at a shell runs it:
    (exit code, stdout, what the terminal received)."""
    master, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "spoold", *args, "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    shown = b""
    while select.select([master], [], [], 60)[0]:  # a minute of silence is a hang: stop reading, wait fails
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the program has exited and closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.wait(10), proc.stdout.read(), shown.decode(errors="replace")


def test_validate_and_submit_show_a_progress_bar_on_a_terminal_and_none_in_a_script(tmp_path):
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "c.toml", root)
    src = write_jsonl(tmp_path / "scores.jsonl", [chat_line(i) for i in range(10_000)])
    code, out, shown = on_a_terminal("validate", str(src), config=config)
    assert code == 0 and "10000 lines, 10000 valid" in out
    assert "checking scores.jsonl" in shown and "B/s" in shown, shown  # the bar, on stderr
    code, out, shown = on_a_terminal("submit", str(src), config=config)
    assert code == 0 and "checking scores.jsonl" in shown and "copying scores.jsonl" in shown, shown
    assert (root / "inbox" / "scores.jsonl").read_bytes() == src.read_bytes()
    piped = spoold("validate", str(src), config=config)  # a script, a pipe, a log: no bar to clutter it
    assert piped.returncode == 0 and piped.stderr == ""


def test_validate_reads_a_pipe_as_well_as_a_file(tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "spool")
    rows = [chat_line(i) for i in range(10_000)]  # past the lines between two progress updates
    piped = subprocess.run([sys.executable, "-m", "spoold", "validate", "/dev/stdin", "--config", str(config)],
                           input="".join(json.dumps(r) + "\n" for r in rows), capture_output=True, text=True,
                           cwd=REPO, timeout=60)  # as `spoold validate <(zcat scores.jsonl.gz)` reads one
    assert piped.returncode == 0 and "10000 lines, 10000 valid, 0 bad" in piped.stdout, piped.stderr


def test_config_error_names_the_key_and_exits_2(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[spool]\nsettle_secs = 3\n")
    result = spoold("status", config=config)
    assert result.returncode == 2
    assert "settle_secs" in result.stderr and "settle_seconds" in result.stderr


def test_run_without_a_model_says_what_to_set(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'[spool]\nroot = "{tmp_path}"\n')
    result = spoold("run", config=config)
    assert result.returncode == 2 and "[engine] model is not set" in result.stderr


def test_submit_model_rewrites_every_line_atomically(tmp_path):
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "c.toml", root, model="qwen3:4b",
                          extra='[models]\n"qwen3:4b" = "Qwen/Qwen3-4B-Instruct-2507"\n')
    src = write_jsonl(tmp_path / "scores.jsonl", [chat_line(i, model="gpt-4o-mini") for i in range(3)])
    result = spoold("submit", str(src), "--model", "qwen3:4b", config=config)
    assert result.returncode == 0, result.stderr
    (dropped,) = list((root / "inbox").iterdir())
    assert dropped.name == "scores.jsonl"
    assert [r["body"]["model"] for r in read_jsonl(dropped)] == ["qwen3:4b"] * 3
    assert [r["custom_id"] for r in read_jsonl(dropped)] == ["req-0", "req-1", "req-2"]
    # A second submit of the same name never overwrites the first.
    spoold("submit", str(src), "--model", "qwen3:4b", config=config)
    assert sorted(p.name for p in (root / "inbox").iterdir()) == ["scores-2.jsonl", "scores.jsonl"]


def test_submit_priority_travels_in_the_ready_marker_to_the_claimed_job(tmp_path):
    from spoold.config import SpoolSettings
    from spoold.spool import Spool

    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "c.toml", root)
    src = write_jsonl(tmp_path / "urgent.jsonl", [chat_line(1)])
    for _ in range(2):
        assert spoold("submit", str(src), "--priority", "7", config=config).returncode == 0
    assert sorted(p.name for p in (root / "inbox").iterdir()) == [
        "urgent-2.jsonl", "urgent-2.jsonl.ready", "urgent.jsonl", "urgent.jsonl.ready"]
    job = Spool(SpoolSettings(root=root, host_id="h")).claim_drop("urgent-2.jsonl")
    assert job.read_record()[0].weight() == 7
    for bad in ("0", "101", "high"):
        result = spoold("submit", str(src), "--priority", bad, config=config)
        assert result.returncode == 2 and "not a whole number from 1 to 100" in result.stderr


def test_submit_says_when_no_daemon_runs_to_claim_the_drop(tmp_path):
    import time

    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "c.toml", root)
    src = write_jsonl(tmp_path / "scores.jsonl", [chat_line(0)])
    alone = spoold("submit", str(src), config=config)
    assert alone.returncode == 0 and (root / "inbox" / "scores.jsonl").exists()
    assert (f"spoold: no daemon is running on this spool, so the drops wait in {root / 'inbox'}/: start one with "
            "`systemctl start spoold`") in alone.stderr, alone.stderr

    beat = root / "processing" / "testhost" / "heartbeat.json"
    beat.parent.mkdir(parents=True)
    beat.write_text(json.dumps({"state": "idle", "ts": time.time()}))
    served = spoold("submit", str(src), config=config)
    assert served.returncode == 0 and "no daemon" not in served.stderr, served.stderr


def test_watch_says_when_no_daemon_runs_to_send_events(tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "spool")
    watch = subprocess.Popen([sys.executable, "-m", "spoold", "watch", "--json", "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert select.select([watch.stderr], [], [], 60)[0], "nothing said within a minute"
        said = watch.stderr.readline()
    finally:
        watch.terminate()
        watch.wait(10)
    assert said.startswith("spoold: no daemon is running on this spool, so no events come until one starts: "
                           "start one with `systemctl start spoold`"), said


def test_submit_rejects_an_unknown_model(tmp_path):
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "c.toml", root)
    src = write_jsonl(tmp_path / "s.jsonl", [chat_line(1)])
    result = spoold("submit", str(src), "--model", "no-such-model", config=config)
    assert result.returncode == 2 and "unknown model 'no-such-model'" in result.stderr
    assert list((root / "inbox").iterdir()) == []


def test_status_lists_queued_drops_as_json(tmp_path):
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    write_jsonl(root / "inbox" / "waiting.jsonl", [chat_line(1)])
    config = write_config(tmp_path / "c.toml", root)
    result = spoold("status", "--json", config=config)
    assert [q["name"] for q in json.loads(result.stdout)["queued"]] == ["waiting.jsonl"]
    assert "waiting.jsonl" in spoold("status", config=config).stdout


def test_cancel_retry_and_results_by_file_name_say_which_job_it_became_and_touch_nothing(tmp_path):
    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root)
    finished = root / "outbox" / "scores-20261201T090000-0123456789abcdef"
    running = root / "processing" / "gpu1" / "scores-20261202T090000-fedcba9876543210"
    for job in (finished, running):
        job.mkdir(parents=True)
        write_jsonl(job / "input.jsonl", [chat_line(1)])
    for verb in ("cancel", "retry", "results"):
        done = spoold(verb, "scores.jsonl", config=config)
        assert done.returncode == 1, done.stderr
        assert (f"jobs from drops named scores.jsonl, newest first: {running.name} (running on gpu1), "
                f"{finished.name} (finished, in outbox/)") in done.stderr, done.stderr
    done = spoold("results", running.name, config=config)
    assert f"{running.name} is running on gpu1" in done.stderr and done.returncode == 1
    assert sorted(p.name for p in running.iterdir()) == ["input.jsonl"]  # no cancel asked on a guess
    assert not (root / "inbox").exists() or not list((root / "inbox").iterdir())  # no retry dropped


@pytest.fixture
def cancel_as_nobody(monkeypatch):
    """(a spool root with an open inbox and no daemon, `cancel(JOB)`: `spoold cancel JOB` run as nobody, its
    [exit code, stdout, stderr]). The spool is not under pytest's tmp_path, which is root's alone."""
    import contextlib
    import io
    import shutil
    import tempfile
    from pathlib import Path

    import spoold.groups  # noqa: F401  (imported here: the child may not read this interpreter's library)
    from spoold import owncancel
    from spoold.cli import main

    monkeypatch.setattr(owncancel, "TAKE_WAIT_SECONDS", 0.3)  # no daemon here: how long it waits to be taken
    base = Path(tempfile.mkdtemp(prefix="spoold-cancel-"))
    base.chmod(0o755)
    root = base / "spool"
    (root / "inbox").mkdir(parents=True)
    (root / "inbox").chmod(0o1777)  # sticky and open, as the packaged inbox is to its group
    config = write_config(base / "c.toml", root)
    config.chmod(0o644)

    def cancel(job_id):
        def run():
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                return main(["cancel", job_id, "--config", str(config)]), out.getvalue(), err.getvalue()
        return as_nobody(run)["ok"]
    try:
        yield root, cancel
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_cancel_by_a_user_who_may_not_write_the_job_asks_the_daemon_if_the_job_is_theirs(cancel_as_nobody):
    root, cancel = cancel_as_nobody
    running = root / "processing" / "gpu1" / "scores-20261202T090000-fedcba9876543210"
    running.mkdir(parents=True)
    (running / "input.jsonl").write_text("{}\n")  # root's: as another submitter's drop is to nobody
    inbox = root / "inbox"
    request = inbox / f"{running.name}.cancel"

    # a member of the group may look into the running job, not write there; it is not theirs
    for d in (root / "processing", root / "processing" / "gpu1", running):
        d.chmod(0o755)
    assert cancel(running.name) == [1, "", f"spoold: cannot cancel '{running.name}': it is root's job; only its "
                                           "owner, the daemon's user and root may cancel it\n"]
    assert not request.exists() and not (running / "cancel.requested").exists()
    (running / "batch.json").write_text(json.dumps({"input_file_id": "file-abc"}))  # made through the API
    assert cancel(running.name) == [1, "", f"spoold: cannot cancel '{running.name}' here: it is a batch made "
                                           "through `spoold api`, which its owner cancels through the API "
                                           "(client.batches.cancel)\n"]
    (running / "batch.json").unlink()

    # their own: asked for in the inbox, for the daemon to take (none runs here, so it waits there)
    os.chown(running / "input.jsonl", NOBODY, NOBODY)
    code, out, err = cancel(running.name)
    assert (code, err) == (0, "") and out == (f"asked for the cancel of {running.name} in {inbox}/; its daemon "
                                              "has not taken the request yet, and will once it runs the job "
                                              "again (`spoold status`)\n")
    assert os.stat(request).st_uid == NOBODY
    request.unlink()

    # a user outside the group sees no running job at all
    for d in (root / "processing", root / "processing" / "gpu1", running):
        d.chmod(0o750)
    assert cancel(running.name) == [1, "", f"spoold: cannot cancel '{running.name}': a running job in "
                                           f"{root / 'processing'}/ is changed by its owner, the daemon's "
                                           "user and root only; run it as root (sudo spoold cancel ...)\n"]
    assert not request.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_a_split_batch_is_cancelled_whole_by_its_owner_who_may_not_look_into_groups(cancel_as_nobody):
    root, cancel = cancel_as_nobody
    group_id = "big-20261202T090000-fedcba9876543210"
    part = root / "processing" / "gpu1" / f"{group_id}-part0002"  # one part runs; the rest wait in groups/
    part.mkdir(parents=True)
    for d in (root / "processing", root / "processing" / "gpu1", part):
        d.chmod(0o755)  # a member of the spool's group may look in, as packaged
    (root / "groups" / group_id).mkdir(parents=True)
    (root / "groups").chmod(0o750)  # the daemon's alone
    (part / "input.jsonl").write_text("{}\n")  # written by the daemon's split
    inbox = root / "inbox"
    request = inbox / f"{group_id}.cancel"

    def record(submitter):
        group = {"id": group_id, "part": 2, "parts": 9, "first_line": 20001}
        (part / "batch.json").write_text(json.dumps({"id": part.name, "submitter_uid": submitter, "group": group}))

    record(0)  # root's batch
    assert cancel(group_id) == [1, "", f"spoold: cannot cancel '{group_id}': it is root's batch; only its owner, "
                                       "the daemon's user and root may cancel it\n"]
    assert not request.exists()
    record(NOBODY)  # theirs: asked for in the inbox, for the runner of any part to take (none runs here)
    assert cancel(group_id) == [0, f"asked for the cancel of {group_id} in {inbox}/; no daemon has taken the "
                                   "request yet, and the next one to run one of its parts will (`spoold status`)\n", ""]
    assert os.stat(request).st_uid == NOBODY
    request.unlink()
    # a part is not cancelled alone: its lines are the batch's
    assert cancel(part.name) == [1, "", f"spoold: cannot cancel '{part.name}' alone: it is a part of split batch "
                                        f"{group_id}, which its owner cancels whole (spoold cancel {group_id})\n"]
    assert not list(inbox.iterdir())


def test_a_user_kept_out_of_the_spool_is_told_whose_it_is_and_how_to_get_in():
    import contextlib
    import io
    import shutil
    import tempfile
    from pathlib import Path

    import tqdm  # noqa: F401  (imported here: the child may not read this interpreter's library)

    import spoold.access, spoold.catalog, spoold.joblookup, spoold.retries, spoold.spool  # noqa: F401, E401
    import spoold.submit  # noqa: F401
    from spoold.cli import main

    base = Path(tempfile.mkdtemp(prefix="spoold-access-"))  # not under pytest's tmp_path, which is root's alone
    try:
        base.chmod(0o755)
        root = base / "spool"
        finished = root / "outbox" / "scores-20261202T090000-fedcba9876543210"
        finished.mkdir(parents=True)
        (finished / "input.jsonl").write_text("")
        for name in ("inbox", "processing", "failed"):
            (root / name).mkdir()
        for d in (root / "inbox", root / "processing", root / "outbox", root / "failed"):
            d.chmod(0o750)  # a user outside the group of each, as a packaged spool is to a non-submitter
        root.chmod(0o755)
        config = write_config(base / "c.toml", root)
        lines = write_jsonl(base / "in.jsonl", [chat_line(1)])
        for f in (config, lines):
            f.chmod(0o644)

        def run(*argv):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([*argv, "--config", str(config)])
            return code, out.getvalue(), err.getvalue()

        def closed(path):
            return (f"{path} (owner root, group root, drwxr-x---) is closed to nobody, who is not in group root: "
                    f"ask for it (sudo usermod -aG root nobody, then log in again), or run it as root")

        said = as_nobody(lambda: [run("results", finished.name), run("retry", finished.name),
                                  run("submit", str(lines)), run("models")])
        results, retry, submit, models = said["ok"]
        assert results == [1, "", f"spoold: {closed(root / 'outbox')}\n"]
        assert retry == results
        assert submit == [1, "", f"{lines}: cannot submit: {closed(root / 'inbox')}\n"]
        code, table, err = models
        assert code == 0 and err == "", models
        assert table.splitlines()[1].split()[-2] == "?", table  # where it is loaded: unknown, not nowhere
        assert "which this user may not read" in table.splitlines()[-1]
        assert not list((root / "inbox").iterdir())
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_spool_that_is_not_there_is_said_with_the_config_that_named_it(tmp_path, monkeypatch):
    import argparse

    from spoold.cli import NoSpool, _spool
    from spoold.config import load_config

    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root)
    lines = write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    for argv in (["status"], ["status", "--json"], ["submit", str(lines)], ["results", "x-20261202T090000-0123"],
                 ["cancel", "x"], ["retry", "x"]):
        result = spoold(*argv, config=config)
        assert (result.returncode, result.stdout) == (2, ""), (argv, result)
        assert result.stderr == (f"spoold: no spool at {root}: that is [spool] root in {config}; the daemon makes "
                                 f"the spool when it first starts\n"), argv
    assert not root.exists()

    # no config where one was looked for: the default root, and the likely cause named
    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv("SPOOLD_CONFIG", str(missing))
    with pytest.raises(NoSpool) as said:
        _spool(argparse.Namespace(config=None), load_config(config))
    assert str(said.value) == (f"no spool at {root}: {missing} does not exist, so that is the default [spool] root; "
                               f"name your config with --config PATH (or $SPOOLD_CONFIG)")

    # the spool made, its inbox not yet: the daemon makes it
    root.mkdir()
    result = spoold("submit", str(lines), config=config)
    assert result.returncode == 2 and result.stderr.startswith(
        f"spoold: inbox {root / 'inbox'} does not exist: the daemon makes it when it first starts"), result


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "c.toml", root)
    for verb in ("status", "models"):
        read, write = os.pipe()
        os.close(read)  # as `spoold status | head -1` once head has its line
        try:
            done = subprocess.run([sys.executable, "-m", "spoold", verb, "--config", str(config)], stdout=write,
                                  stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=60)
        finally:
            os.close(write)
        assert done.returncode == 141 and done.stderr == "", (verb, done.returncode, done.stderr)


def test_models_lists_aliases_settings_and_where_each_is_loaded(tmp_path):
    import time

    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root, model="a:1b",
                          extra='[models]\n"a:1b" = "org/a"\n[models.b]\nmodel = "org/b"\n'
                                'served_names = ["b:3b"]\nmax_model_len = 2048\n')
    (root / "processing" / "gpu0").mkdir(parents=True)
    (root / "processing" / "gpu0" / "heartbeat.json").write_text(
        json.dumps({"state": "idle", "model": "org/b", "ts": time.time()}))
    (root / "processing" / "gone").mkdir()
    (root / "processing" / "gone" / "heartbeat.json").write_text(
        json.dumps({"state": "working", "model": "org/a", "ts": time.time() - 3600}))
    rows = {r["model"]: r for r in json.loads(spoold("models", "--json", config=config).stdout)}
    assert rows["org/a"]["names"] == ["a:1b"] and rows["org/a"]["default"] and rows["org/a"]["loaded_on"] == []
    assert rows["org/b"]["names"] == ["b", "b:3b"] and rows["org/b"]["loaded_on"] == ["gpu0"]
    assert rows["org/b"]["settings"] == {"max_model_len": 2048}
    text = spoold("models", config=config).stdout
    assert "a:1b (default)" in text and "gpu0" in text and "max_model_len=2048" in text
