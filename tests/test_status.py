"""`spoold status` as whoever runs it: what they may read is shown, what they may not is named."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from spoold.config import SpoolSettings
from spoold.spool import DropRefused, Spool
from spoold.status import render_status, spool_status

from .helpers import chat_line, write_jsonl

NOBODY = 65534


def as_nobody(work) -> dict:
    """`work()` in a forked child that dropped root for uid/gid 65534: the kernel's own permission checks."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = {"ok": work()}
        except BaseException as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_a_user_who_may_not_look_into_processing_sees_the_rest_and_is_told():
    base = Path(tempfile.mkdtemp(prefix="spoold-status-"))
    try:
        base.chmod(0o755)
        spool = Spool(SpoolSettings(root=base, host_id="h"))
        spool.ensure_dirs()
        for d, mode in ((base / "inbox", 0o755), (spool.processing, 0o750), (spool.outbox, 0o755),
                        (spool.failed, 0o755)):
            d.chmod(mode)  # as packaged: processing/ is the daemon's; the others this user may list
        write_jsonl(spool.inbox / "waiting.jsonl", [chat_line(0)])
        write_jsonl(spool.inbox / "running.jsonl", [chat_line(0)])
        spool.claim_drop("running.jsonl")
        os.symlink("/etc/hostname", spool.inbox / "link.jsonl")
        with pytest.raises(DropRefused):
            spool.claim_drop("link.jsonl")  # a failed job: its directory is the daemon's alone

        def status():
            shown = spool_status(spool)
            return {"status": shown, "text": render_status(shown)}
        result = as_nobody(status)
        assert "error" not in result, result
        shown = result["ok"]["status"]
        assert [q["name"] for q in shown["queued"]] == ["waiting.jsonl"]
        assert shown["processing"] == [] and shown["unreadable"] == ["processing"]
        text = result["ok"]["text"]
        assert "not readable by this user: processing" in text
        (failed,) = shown["failed"]
        assert f"{failed['id']}: details not readable by this user" in text
    finally:
        shutil.rmtree(base, ignore_errors=True)
