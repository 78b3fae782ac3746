"""Who may read and change what in a packaged spool, tried with real unprivileged users.

The spool is made with the modes of packaging/spoold.tmpfiles; two
submitters (alice, bob, both in the submitter group) and an outsider
(carol) try what a shell user can. The daemon runs as root, as everywhere
in these tests: the interpreter of a test venv lives where other users may
not go (/root/.pyenv); what it creates (groups, modes) is what is tested.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from spoold.spool import JobDir

from ..helpers import REPO, DaemonProcess, as_user, chat_line, wait_for, write_config, write_jsonl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making users needs root")

ALICE, BOB, CAROL, SUBMIT = "spt-alice", "spt-bob", "spt-carol", "spt-submit"
#: packaged name -> this test's
OWNERS = {"spoold": "root", "spoold-submit": SUBMIT}


@pytest.fixture(scope="module")
def users():
    """Two submitters and an outsider: made here, removed after."""
    _remove_users()
    subprocess.run(["groupadd", "--system", SUBMIT], check=True)
    for name in (ALICE, BOB, CAROL):
        member = [] if name == CAROL else ["-G", SUBMIT]
        subprocess.run(["useradd", "--system", "-M", "-s", "/usr/sbin/nologin", *member, name], check=True)
    yield
    _remove_users()


def _remove_users():
    for name in (ALICE, BOB, CAROL):
        subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", SUBMIT], capture_output=True)


def spool_from_tmpfiles(root: Path) -> None:
    """The spool's directories exactly as systemd-tmpfiles makes them from the packaged file."""
    for line in (REPO / "packaging" / "spoold.tmpfiles").read_text().splitlines():
        if not line.startswith("d /var/spool/spoold"):
            continue
        _, path, mode, user, group, _ = line.split()
        directory = root / Path(path).relative_to("/var/spool/spoold")
        directory.mkdir(exist_ok=True)
        shutil.chown(directory, OWNERS[user], OWNERS[group])
        os.chmod(directory, int(mode, 8))


def as_(user: str, script: str) -> subprocess.CompletedProcess:
    """`script` in a shell as `user` (with only that user's groups)."""
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, cwd="/", **as_user(user))


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr


def refused(result: subprocess.CompletedProcess) -> None:
    assert result.returncode != 0 and ("not permitted" in result.stderr or "denied" in result.stderr), \
        (result.returncode, result.stdout, result.stderr)


@pytest.fixture
def spool(users):
    base = Path(tempfile.mkdtemp(prefix="spoold-perms-"))
    base.chmod(0o755)
    root = base / "spool"
    root.mkdir()
    spool_from_tmpfiles(root)
    home = {}
    for name in (ALICE, BOB):
        home[name] = base / name
        home[name].mkdir(mode=0o700)
        shutil.chown(home[name], name, name)
    lines = write_jsonl(base / "lines.jsonl", [chat_line(i) for i in range(3)])
    lines.chmod(0o644)
    config = write_config(base / "c.toml", root, settle_seconds=120,  # 800 lines/s at most: a big job runs a while
                          engine="max_inflight = 8\n[engine.args]\ndelay = 0.01")
    config.write_text(config.read_text().replace("[spool]\n", f'[spool]\ngroup = "{SUBMIT}"\n', 1))
    daemon = DaemonProcess(config, base / "daemon.log").start()
    try:
        daemon.wait_ready(root, timeout=60)
        yield root, home, lines, daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.terminate()
        shutil.rmtree(base, ignore_errors=True)


def job_of(directory: Path, drop: str) -> Path | None:
    for job in directory.glob("*"):
        try:
            if json.loads((job / "batch.json").read_text())["drop"]["name"] == drop:
                return job
        except (OSError, ValueError, KeyError):
            continue
    return None


def test_a_drop_stays_its_submitters_results_are_the_groups_failed_inputs_the_daemons(spool):
    root, home, lines, daemon = spool
    inbox, outbox, failed = root / "inbox", root / "outbox", root / "failed"

    # alice writes a drop in place (like scp: not complete until it settles)
    ok(as_(ALICE, f"cp {lines} {inbox}/a.jsonl"))
    # bob can neither delete, replace nor force-claim it
    refused(as_(BOB, f"rm -f {inbox}/a.jsonl"))
    ok(as_(BOB, f"cp {lines} {home[BOB]}/b.jsonl"))
    refused(as_(BOB, f"mv -f {home[BOB]}/b.jsonl {inbox}/a.jsonl"))
    ok(as_(BOB, f"touch {inbox}/a.jsonl.ready"))
    # a drop renamed in is claimed at once: when it is done, the daemon has weighed bob's marker
    ok(as_(ALICE, f"cp {lines} {inbox}/.go.tmp && mv {inbox}/.go.tmp {inbox}/go.jsonl"))
    wait_for(lambda: job_of(outbox, "go.jsonl"), 20, "the renamed drop in the outbox")
    assert (inbox / "a.jsonl").exists(), "bob's marker claimed alice's unfinished drop"
    assert job_of(root / "processing" / "testhost", "a.jsonl") is None
    # the daemon removes bob's marker (it would squat the name), and alice's own does claim her drop
    wait_for(lambda: not (inbox / "a.jsonl.ready").exists(), 10, "bob's marker removed")
    ok(as_(ALICE, f"touch {inbox}/a.jsonl.ready"))
    job = wait_for(lambda: job_of(outbox, "a.jsonl"), 20, "alice's drop in the outbox")

    # results are the group's: bob reads them, carol (not in the group) cannot
    read = as_(BOB, f"cat {job}/output.jsonl")
    ok(read)
    assert {json.loads(line)["custom_id"] for line in read.stdout.splitlines()} == {"req-0", "req-1", "req-2"}
    ok(as_(BOB, f"cat {job}/batch.json"))
    refused(as_(CAROL, f"cat {job}/output.jsonl"))

    # failed inputs are the daemon's alone: a hard link alice made of a file in her private directory...
    ok(as_(ALICE, f"mkdir -m 700 {home[ALICE]}/private && cp {lines} {home[ALICE]}/private/p.jsonl && "
                  f"chgrp {SUBMIT} {home[ALICE]}/private/p.jsonl && chmod 640 {home[ALICE]}/private/p.jsonl && "
                  f"ln {home[ALICE]}/private/p.jsonl {inbox}/h.jsonl"))
    linked = wait_for(lambda: job_of(failed, "h.jsonl"), 20, "the hard link in failed/")
    # ...and a file the daemon could not make sense of (gzip)
    ok(as_(ALICE, f"gzip -c {lines} > {inbox}/.z.tmp && mv {inbox}/.z.tmp {inbox}/z.jsonl"))
    packed = wait_for(lambda: job_of(failed, "z.jsonl"), 20, "the gzip drop in failed/")
    for job in (linked, packed):
        assert json.loads((job / "batch.json").read_text())["status"] == "failed"
        refused(as_(BOB, f"cat {job}/input.jsonl"))
        refused(as_(ALICE, f"cat {job}/input.jsonl"))
    ok(as_(BOB, f"ls {failed}"))  # the names are there to see
    assert daemon.proc.poll() is None


def test_the_group_sees_what_runs_and_how_far_it_is_and_only_its_owner_may_cancel_it(spool):
    root, home, lines, daemon = spool
    inbox, host = root / "inbox", root / "processing" / "testhost"
    big = write_jsonl(home[ALICE].parent / "big.jsonl", [chat_line(i) for i in range(5_000)])
    big.chmod(0o644)
    ok(as_(ALICE, f"cp {big} {inbox}/.big.tmp && mv {inbox}/.big.tmp {inbox}/big.jsonl"))
    job = wait_for(lambda: job_of(host, "big.jsonl"), 20, "the big drop claimed")
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # held running while the others look
    try:
        # another member of the group sees the daemon and the running job: `spoold status` reads just these
        ok(as_(BOB, f"cat {host}/heartbeat.json"))
        listed = as_(BOB, f"ls {host}")
        ok(listed)
        assert job.name in listed.stdout.split()
        shown = as_(BOB, f"cat {job}/batch.json")
        ok(shown)
        assert json.loads(shown.stdout)["input_file"] == "big.jsonl"
        # ...but may not change it, and an outsider sees nothing
        refused(as_(BOB, f"touch {job}/cancel.requested"))
        refused(as_(CAROL, f"ls {root}/processing"))
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    # a cancel is asked for in the inbox (as `spoold cancel` by a submitter does): bob's, for alice's job,
    # is removed unheeded, and the job runs on...
    request = inbox / f"{job.name}.cancel"
    ok(as_(BOB, f"touch {request}"))
    wait_for(lambda: not request.exists(), 20, "bob's request removed")
    assert job.is_dir() and not (job / "cancel.requested").exists()
    # ...and alice's, its owner's, cancels it
    ok(as_(ALICE, f"touch {request}"))
    cancelled = wait_for(lambda: job_of(root / "outbox", "big.jsonl"), 30, "the cancelled job in the outbox")
    assert json.loads((cancelled / "batch.json").read_text())["status"] == "cancelled"
    assert not request.exists()


def test_a_split_batch_is_cancelled_whole_by_its_owner_who_may_not_look_into_groups(spool):
    root, home, lines, daemon = spool
    daemon.terminate()  # this one splits big batches: parts of 2,000 lines, some 2.5 s each here
    config = root.parent / "c.toml"
    config.write_text(config.read_text().replace("[spool]\n", "[spool]\nsplit_lines = 2000\n", 1))
    splitting = DaemonProcess(config, root.parent / "splitting.log").start()
    try:
        splitting.wait_ready(root, timeout=60)
        inbox, host = root / "inbox", root / "processing" / "testhost"
        big = write_jsonl(home[ALICE].parent / "big.jsonl", [chat_line(i) for i in range(20_000)])
        big.chmod(0o644)
        ok(as_(ALICE, f"cp {big} {inbox}/.big.tmp && mv {inbox}/.big.tmp {inbox}/big.jsonl"))
        part = wait_for(lambda: next(host.glob("big-*-part*"), None), 30, "a part of the split batch running")
        group_id = part.name.rpartition("-part")[0]
        refused(as_(ALICE, f"ls {root}/groups"))  # where its other parts wait, and its input: the daemon's
        # bob's request for alice's batch is removed unheeded, and it runs on...
        request = inbox / f"{group_id}.cancel"
        ok(as_(BOB, f"touch {request}"))
        wait_for(lambda: not request.exists(), 20, "bob's request removed")
        assert not (root / "groups" / group_id / "cancel.requested").exists()
        # ...and alice's, its owner's, stops every part: the batch is assembled as cancelled
        ok(as_(ALICE, f"touch {request}"))
        batch = wait_for(lambda: JobDir(root / "outbox" / group_id).read_batch(), 60, "the cancelled batch")
        assert batch["status"] == "cancelled" and batch["request_counts"]["completed"] < 20_000
        assert not request.exists() and splitting.proc.poll() is None
    finally:
        splitting.terminate()
