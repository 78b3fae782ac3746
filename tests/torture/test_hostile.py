"""Every bad file people actually drop: a clear per-line or per-file error, and the daemon stays up."""

from __future__ import annotations

import gzip
import json
import os
import socket
import time
from pathlib import Path

import pytest

from ..helpers import DaemonProcess, chat_line, read_jsonl, wait_for
from ..helpers import write_config as write_helper_config
from .harness import Drop, Verdict, _reap, check_job, job_of, save_figures, save_result, start, tail, write_config


def line(cid, **over) -> bytes:
    row = dict(chat_line(0), custom_id=cid)
    row.update(over)
    return json.dumps(row).encode()


def lines(*rows: bytes, end: bytes = b"\n") -> bytes:
    return b"".join(r + end for r in rows)


BODY = chat_line(0)["body"]

#: name -> (bytes, {line: error code}, valid custom_ids)
LINE_CASES = {
    "no_newline.jsonl": (line("a") + b"\n" + line("b"), {}, {"a", "b"}),
    "crlf.jsonl": (lines(line("a"), line("b"), end=b"\r\n"), {}, {"a", "b"}),
    "bom.jsonl": (b"\xef\xbb\xbf" + lines(line("a"), line("b")), {}, {"a", "b"}),
    "utf8.jsonl": (lines(line("a"), b'{"custom_id": "x\xff"}', line("b")), {2: "invalid_json"}, {"a", "b"}),
    "nul.jsonl": (lines(line("a"), b'{"custom_id": "x\x00y"}', b"\x00\x00"), {2: "invalid_json", 3: "invalid_json"},
                  {"a"}),
    "huge_line.jsonl": (lines(line("a"), b'{"custom_id": "' + b"x" * (50 << 20) + b'"}', line("b")),
                        {2: "line_too_long"}, {"a", "b"}),
    "nested.jsonl": (lines(b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, line("a")),
                     {1: "invalid_json", 2: "invalid_json"}, {"a"}),
    "not_objects.jsonl": (lines(b"[1, 2]", b'"hello"', b"42", b"null", line("a")),
                          {1: "not_an_object", 2: "not_an_object", 3: "not_an_object", 4: "not_an_object"}, {"a"}),
    "custom_ids.jsonl": (lines(line("a"), line("a"), line(None), line(""), line(7), line("k" * 10_240),
                               json.dumps({k: v for k, v in json.loads(line("z")).items() if k != "custom_id"}).encode()),
                         {2: "duplicate_custom_id", 3: "missing_custom_id", 4: "missing_custom_id",
                          5: "missing_custom_id", 6: "custom_id_too_long", 7: "missing_custom_id"}, {"a"}),
    "requests.jsonl": (lines(line("get", method="GET"), line("url", url="/v1/images"), line("nobody", body=None),
                             line("strbody", body="hi"), line("stream", body={**BODY, "stream": True}),
                             line("model", body={**BODY, "model": "gpt-9"}),
                             line("neg", body={**BODY, "max_tokens": -1}), line("ok")),
                       {1: "invalid_method", 2: "unsupported_url", 3: "invalid_body", 4: "invalid_body",
                        5: "stream_not_supported", 6: "unknown_model"}, {"neg", "ok"}),
    "with space.jsonl": (lines(line("a")), {}, {"a"}),
    "ünïcødé-名前.jsonl": (lines(line("a")), {}, {"a"}),
    "new\nline.jsonl": (lines(line("a")), {}, {"a"}),
    "-leading-dash.jsonl": (lines(line("a")), {}, {"a"}),
}

#: name -> (how to make it, words the failure reason must contain)
FILE_CASES = {
    "empty.jsonl": (lambda p: p.write_bytes(b""), "no request lines"),
    "blank.jsonl": (lambda p: p.write_bytes(b"\n  \n\t\n\r\n"), "no request lines"),
    "image.jsonl": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(4000)), "PNG image"),
    "packed.jsonl": (lambda p: p.write_bytes(gzip.compress(lines(line("a")))), "gzip"),
    "shadow.jsonl": (lambda p: p.symlink_to("/etc/shadow"), "not a regular file"),
    "outside.jsonl": (lambda p: p.symlink_to(p.parent.parent.parent / "secret.txt"), "not a regular file"),
    "fifo.jsonl": (lambda p: os.mkfifo(p), "not a regular file"),
    "sock.jsonl": (lambda p: _bind_socket(p), "not a regular file"),
    "dir.jsonl": (lambda p: p.mkdir(), "not a regular file"),
}

_sockets: list[socket.socket] = []


def _bind_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    _sockets.append(s)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    root = base / "spool"
    (root / "inbox").mkdir(parents=True)
    (base / "secret.txt").write_text("not for the daemon to read\n")
    proc = start(write_config(base / "c.toml", root), base / "log")
    wait_for(lambda: (root / "processing" / "testhost" / "heartbeat.json").exists(), 30, "the daemon up")
    yield root, proc, base / "log"
    _reap(proc)
    for s in _sockets:
        s.close()


def test_bad_lines_get_one_error_each_naming_the_line(daemon):
    root, proc, log = daemon
    for name, (data, _, _) in LINE_CASES.items():
        tmp = root / "inbox" / f".{len(name)}-{abs(hash(name))}.tmp"
        tmp.write_bytes(data)
        os.rename(tmp, root / "inbox" / name)
    jobs = {name: wait_for(lambda n=name: job_of(root, "outbox", n), 90, f"{name!r} done")
            for name in LINE_CASES}
    assert proc.poll() is None, tail(log)
    v = Verdict()
    for name, (_, errors, valid) in LINE_CASES.items():
        job = jobs[name]
        got_errors = [(e["error"]["line"], e["error"]["code"]) for e in read_jsonl(job / "errors.jsonl")]
        outputs = [o["custom_id"] for o in read_jsonl(job / "output.jsonl")]
        v.lost += len(valid - set(outputs)) + len(set(errors.items()) - set(got_errors))
        v.doubled += len(outputs) - len(set(outputs)) + len(got_errors) - len(set(got_errors))
        if dict(got_errors) != errors or set(outputs) != valid:
            v.problems.append(f"{name!r}: errors {dict(got_errors)}, outputs {sorted(outputs)}")
        if not all(e["error"]["message"] for e in read_jsonl(job / "errors.jsonl")):
            v.problems.append(f"{name!r}: an error without a message")
    save_result("Hostile lines (encodings, nesting, 50 MB line, bad ids/requests, odd names)", len(LINE_CASES),
                v, "each bad line: one error naming its line")
    assert v.ok, v.problems
    statuses = {o["custom_id"]: o["response"]["status_code"] for o in read_jsonl(jobs["requests.jsonl"] / "output.jsonl")}
    assert statuses == {"neg": 400, "ok": 200}  # the engine's refusal is a result line


def test_unreadable_files_fail_with_the_reason_and_nothing_is_followed(daemon):
    root, proc, log = daemon
    for name, (make, _) in FILE_CASES.items():
        make(root / "inbox" / name)
        (root / "inbox" / f"{name}.ready").touch()
    jobs = {name: wait_for(lambda n=name: job_of(root, "failed", n), 30, f"{name!r} failed")
            for name in FILE_CASES}
    assert proc.poll() is None, tail(log)
    v = Verdict()
    for name, (_, reason) in FILE_CASES.items():
        batch = json.loads((jobs[name] / "batch.json").read_text())
        if batch["status"] != "failed" or reason not in batch["errors"][0]["message"]:
            v.problems.append(f"{name!r}: {batch['status']} {batch['errors']}")
        if job_of(root, "outbox", name) is not None:
            v.problems.append(f"{name!r}: also in outbox/")
    save_result("Unprocessable files (empty, binary, symlinks, FIFO, socket, directory)", len(FILE_CASES),
                v, "each: failed/ with the reason in batch.json")
    assert v.ok, v.problems
    assert (jobs["shadow.jsonl"] / "input.jsonl").is_symlink()  # moved as a link, never read


def test_a_marker_nested_too_deeply_is_ignored_and_the_daemon_stays_up(daemon):
    """A `.ready` marker of 8,000 nested brackets fits its 16 KiB limit; reading it once ended the daemon
    (a RecursionError is not a ValueError), and under systemd again on every restart, the drop still there."""
    root, proc, log = daemon
    (root / "inbox" / "deep-marker.jsonl.ready").write_bytes(b"[" * 8000 + b"]" * 8000)
    tmp = root / "inbox" / ".deep-marker.tmp"
    tmp.write_bytes(lines(line("a")))
    os.rename(tmp, root / "inbox" / "deep-marker.jsonl")
    job = wait_for(lambda: job_of(root, "outbox", "deep-marker.jsonl") or proc.poll() is not None, 30,
                   "the drop done, or the daemon gone")
    assert proc.poll() is None, tail(log)
    assert [o["custom_id"] for o in read_jsonl(job / "output.jsonl")] == ["a"]
    assert json.loads((job / "batch.json").read_text()).get("metadata") is None
    assert "inbox/deep-marker.jsonl.ready: its metadata is ignored (its JSON is nested too deeply)" in tail(log)


def test_a_file_that_keeps_growing_is_claimed_only_once_it_stops(tmp_path):
    """Written in place (scp, NFS) for 2.5 s: claimed whole, after `settle_seconds` of quiet."""
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    proc = start(write_config(tmp_path / "c.toml", root, settle=1.0), tmp_path / "log")
    try:
        target = root / "inbox" / "growing.jsonl"
        with open(target, "wb") as f:
            for i in range(25):
                f.write(line(f"g{i}") + b"\n")
                f.flush()
                time.sleep(0.1)
                assert target.exists(), f"claimed while still growing, after {i + 1} lines"
        job = wait_for(lambda: job_of(root, "outbox", "growing.jsonl"), 30, "the grown file done")
        assert proc.poll() is None, tail(tmp_path / "log")
    finally:
        _reap(proc)
    assert sorted(o["custom_id"] for o in read_jsonl(job / "output.jsonl")) == sorted(f"g{i}" for i in range(25))


def test_a_million_line_file_runs_in_bounded_memory(tmp_path):
    """Peak RSS of the daemon (the fast double has no model) after a 100K-line and a 1M-line job."""
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    proc = start(write_config(tmp_path / "c.toml", root, inflight=64), tmp_path / "log")
    template = line("ID").replace(b"%", b"%%").replace(b'"ID"', b'"%d"')
    try:
        peaks = []
        for n in (100_000, 1_000_000):
            name = f"m{n}.jsonl"
            with open(tmp_path / name, "wb") as f:
                for start_at in range(0, n, 10_000):
                    f.write(b"".join(template % i + b"\n" for i in range(start_at, start_at + 10_000)))
            os.rename(tmp_path / name, root / "inbox" / name)
            job = wait_for(lambda nm=name: job_of(root, "outbox", nm), 600, f"{name} done", interval=0.5)
            peaks.append(_peak_rss_mib(proc.pid))
            batch = json.loads((job / "batch.json").read_text())
            assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    finally:
        _reap(proc)
    save_figures("memory", {"peak_rss_mib_100k": round(peaks[0], 1), "peak_rss_mib_1m": round(peaks[1], 1)})
    assert peaks[1] < 300, f"peak RSS {peaks[1]:.0f} MiB for 1M lines"
    # Flat: the duplicate check holds one run of 65,536 lines at a time and
    # a resume holds one bit per line. Any per-line Python object (a set of
    # ids or of line numbers: 50+ MiB for 900K lines) breaks this bound.
    assert peaks[1] - peaks[0] < 20, f"peak RSS grew {peaks[1] - peaks[0]:.0f} MiB from 100K to 1M lines"


def _peak_rss_mib(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) / 1024
    raise AssertionError("no VmHWM")


#: Drop names that try to become sd_notify fields, or cannot be sent at all.
HOSTILE_NAMES = [b"a\nWATCHDOG=trigger\nb.jsonl", b"x\nSTOPPING=1\nMAINPID=1\nSTATUS=pwned.jsonl",
                 b"\xff\xfe.jsonl", b"[bold]x[red.jsonl", b"esc\x1b]0;title\x07.jsonl"]

#: Every field the daemon itself sends to systemd, and what its value may be.
OWN_FIELDS = {"READY": "1", "WATCHDOG": "1", "STOPPING": "1", "RELOADING": "1",
              "MONOTONIC_USEC": None, "EXTEND_TIMEOUT_USEC": None, "STATUS": None}


def test_a_file_name_never_becomes_a_notify_field_and_the_daemon_stays_up(tmp_path):
    """The daemon under a real NOTIFY_SOCKET, as systemd gives it: hostile names are data."""
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    config = write_helper_config(tmp_path / "c.toml", root)
    daemon = DaemonProcess(config, tmp_path / "log", env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                                          "WATCHDOG_USEC": "400000"}).start()
    fields: list[str] = []

    def receive_until(predicate, what):
        deadline = time.monotonic() + 60
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{daemon.log_tail()}"
            assert daemon.proc.poll() is None, f"the daemon died:\n{daemon.log_tail()}"
            try:
                fields.extend(notify.recv(65536).decode().split("\n"))
            except socket.timeout:
                pass

    try:
        receive_until(lambda: "READY=1" in fields, "READY=1")
        for i, name in enumerate(HOSTILE_NAMES):
            tmp = root / "inbox" / f".drop{i}.tmp"
            tmp.write_bytes(line(f"c{i}") + b"\n")
            os.rename(tmp, os.path.join(os.fsencode(root / "inbox"), name))
        done = lambda: len(list((root / "outbox").iterdir())) == len(HOSTILE_NAMES)
        receive_until(done, "every hostile drop in the outbox")
        pings = fields.count("WATCHDOG=1")
        receive_until(lambda: fields.count("WATCHDOG=1") > pings + 2, "watchdog pings after the jobs")
        assert daemon.proc.poll() is None
    finally:
        status = daemon.terminate(timeout=30)
        notify.close()
    assert status == 0
    for field in fields:
        key, _, value = field.partition("=")
        assert key in OWN_FIELDS and OWN_FIELDS[key] in (None, value), f"a field the daemon never sends: {field!r}"
    assert not any(f.startswith("STOPPING") for f in fields[:-2]), "STOPPING before the SIGTERM"
    v = Verdict()
    for i, name in enumerate(HOSTILE_NAMES):
        job = job_of(root, "outbox", os.fsdecode(name))
        assert job is not None, name
        batch = json.loads((job / "batch.json").read_text())
        assert batch["input_file"].isprintable() and "\n" not in batch["input_file"]
        check_job(job, Drop(batch["input_file"], {f"c{i}"}, set()), v)
    save_result("Drop names that try to be notify fields (newlines, not UTF-8, markup, escapes)",
                len(HOSTILE_NAMES), v, "the daemon under a real NOTIFY_SOCKET")
    assert v.ok, v.problems[:5]
