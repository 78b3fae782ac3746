"""Shared test helpers: batch lines, result files, and `spoold run` as a process."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def chat_line(i: int, model: str | None = "fake-model", **body) -> dict:
    """One valid chat request line."""
    b = {"messages": [{"role": "user", "content": f"Score candidate {i}"}], "max_tokens": 8, **body}
    if model is not None:
        b["model"] = model
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings for bad lines) one per line."""
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    # Only "\n" ends a JSONL line: str.splitlines() would also split on
    # U+2028 or U+0085, which JSON allows unescaped inside strings.
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def complete_lines(path: Path) -> int:
    """Complete lines in a file the daemon may be appending to right now."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def api_drop(root: Path, owner: str, rows: list, metadata: dict | None = None) -> str:
    """A batch of tenant `owner` as `spoold api` makes one, without the HTTP in front: its record in
    batches/ (spoold.apibatch, as the API writes it), then its input renamed into the inbox. Returns
    the drop's name."""
    from spoold.apibatch import ApiBatch, drop_name, random_id

    now = int(time.time())
    batch = ApiBatch(random_id("batch_"), owner, random_id("file-"), "/v1/chat/completions", "24h", now,
                     now + 86400, random_id("file-"), random_id("file-"), metadata)
    (root / "batches").mkdir(exist_ok=True)
    batch.save(root / "batches")
    staged = write_jsonl(root / f"{batch.id}.staged", rows)
    os.rename(staged, root / "inbox" / drop_name(batch.id))
    return drop_name(batch.id)


def write_config(path: Path, root: Path, *, adapter: str = "tests.fake_engine:EchoEngine",
                 model: str = "fake-model", engine: str = "", extra: str = "",
                 metrics_listen: str = "", progress_seconds: float = 0.2,
                 events_endpoint: str | None = None, settle_seconds: float = 1) -> Path:
    """A config for a test spool; `engine` adds lines to [engine].

    Events go to an ipc socket beside the config unless `events_endpoint`
    says otherwise, so test daemons never meet.
    """
    if events_endpoint is None:
        events_endpoint = f"ipc://{path.parent}/events.sock"
    path.write_text(f"""
[spool]
root = "{root}"
host_id = "testhost"
settle_seconds = {settle_seconds}
poll_seconds = 0.2

[engine]
adapter = "{adapter}"
model = "{model}"
{engine}

[heartbeat]
seconds = 0.2

[events]
endpoint = "{events_endpoint}"
progress_seconds = {progress_seconds}

[metrics]
listen = "{metrics_listen}"
{extra}
""")
    return path


def check_exactly_once(job_dir: Path, valid_ids: set[str], bad_lines: set[int]) -> None:
    """Every valid line has exactly one output line, every bad line exactly one error."""
    outputs = read_jsonl(job_dir / "output.jsonl")
    errors = read_jsonl(job_dir / "errors.jsonl")
    out_ids = Counter(o["custom_id"] for o in outputs)
    dup = [k for k, n in out_ids.items() if n > 1]
    assert not dup, f"duplicated results: {dup[:5]}"
    assert set(out_ids) == valid_ids, (
        f"missing {sorted(valid_ids - set(out_ids))[:5]}, extra {sorted(set(out_ids) - valid_ids)[:5]}")
    err_lines = Counter(e["error"]["line"] for e in errors)
    assert all(n == 1 for n in err_lines.values()), f"duplicated errors: {err_lines}"
    assert set(err_lines) == bad_lines
    assert not (set(out_ids) & {e["custom_id"] for e in errors if e["custom_id"]} - valid_ids)
    check_output_ids_name_their_line(job_dir, outputs)
    batch = json.loads((job_dir / "batch.json").read_text())
    counts = batch["request_counts"]
    assert counts["total"] == len(valid_ids) + len(bad_lines)
    assert counts["completed"] + counts["failed"] == counts["total"]


ALL_CPUS = os.sched_getaffinity(0)
needs_two_cpus = pytest.mark.skipif(len(ALL_CPUS) < 2, reason="needs 2 CPUs to leave one to the daemon")


def _bind_and_wait(cpu: int, ready, done) -> None:
    os.sched_setaffinity(0, {cpu})
    ready.set()
    done.wait(30)


def start_bound_worker(cpu: int):
    """A child bound to one core, as vLLM's CPU worker binds its compute threads; returns (process, done event)."""
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_bind_and_wait, args=(cpu, ready, done))
    child.start()
    assert ready.wait(30)
    return child, done


def check_output_ids_name_their_line(job_dir: Path, outputs: list[dict]) -> None:
    """An output id's line number (what a restart relies on) is the line its custom_id is on."""
    from spoold.formats import OUTPUT_ID

    inputs = (job_dir / "input.jsonl").read_bytes().split(b"\n")
    for record in outputs:
        if m := re.fullmatch(OUTPUT_ID, record["id"]):
            line = inputs[int(m.group(1)) - 1].removeprefix(b"\xef\xbb\xbf")
            assert json.loads(line)["custom_id"] == record["custom_id"], f"id {record['id']} names the wrong line"


class DaemonProcess:
    """`spoold run` as a real subprocess in its own process group."""

    def __init__(self, config: Path, log: Path, env: dict | None = None) -> None:
        self.config, self.log = config, log
        self.env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **(env or {}))
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DaemonProcess":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "spoold", "run", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True, cwd=REPO)
        return self

    def wait_ready(self, root: Path, timeout: float = 300, host: str = "testhost") -> None:
        """Wait until the host heartbeat says the engine is loaded."""
        beat = root / "processing" / host / "heartbeat.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited early:\n{self.log_tail()}"
            try:
                if json.loads(beat.read_text())["state"] in ("idle", "working"):
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready in {timeout}s:\n{self.log_tail()}")

    def kill9(self) -> None:
        """SIGKILL the whole process group, engine processes included; the daemon must die of it."""
        assert self.proc.poll() is None, f"the daemon had already exited {self.proc.returncode}:\n{self.log_tail()}"
        os.killpg(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait() == -signal.SIGKILL, "the daemon ended before the SIGKILL landed"

    def terminate(self, timeout: float = 120) -> int:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self._reap_group()

    def _reap_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def as_user(name: str) -> dict:
    """subprocess keyword arguments that run a child as user `name`, with exactly its groups."""
    import grp
    import pwd

    pw = pwd.getpwnam(name)
    groups = [g.gr_gid for g in grp.getgrall() if name in g.gr_mem]
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": groups}


NOBODY = 65534


def as_nobody(work, gid: int = 65534) -> dict:
    """`work()` in a forked child that dropped root for uid 65534 and group `gid` (nobody's own by default):
    the kernel's own permission checks."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(gid)
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




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subscriber:
    """A real ZeroMQ SUB socket collecting spoold events in a thread."""

    def __init__(self, endpoint: str, read: bool = True) -> None:
        import zmq

        self.events: list[tuple[str, dict]] = []
        # A context of its own, ended in close(): its connections are gone
        # before a publisher in this same process closes. With the shared
        # Context.instance() libzmq 4.3.5 aborted the test process about 1
        # run in 35 ("Resource temporarily unavailable (src/session_base.cpp:
        # 233)", a half-read two-frame message at teardown); never in 100
        # runs this way, nor in 120 with subscribers in other processes, as
        # `spoold watch` is.
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        if not read:
            self._sock.setsockopt(zmq.RCVHWM, 1)
        self._sock.connect(endpoint)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"spoold.")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if read:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(100):
                topic, body = self._sock.recv_multipart()
                self.events.append((topic.decode(), json.loads(body)))

    def of(self, topic: str, **match) -> list[dict]:
        return [p for t, p in list(self.events) if t == topic and all(p.get(k) == v for k, v in match.items())]

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sock.close(linger=0)
        self._ctx.term()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll until predicate() is truthy; return its value or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def outbox_jobs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "outbox").glob("*") if p.is_dir())


class ApiServer:
    """`spoold api`'s app served by uvicorn in a thread, on a free loopback port."""

    def __init__(self, config, keys) -> None:
        import uvicorn

        from spoold.api import create_app

        self.app = create_app(config, keys)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_config=None,
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "the API server to start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"

    def client(self, key: str):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class WebhookReceiver:
    """A real HTTP server answering each POST with the next scripted status (200 once the script is out);
    `got` holds each request's headers, body and the status it was answered."""

    def __init__(self, statuses=()) -> None:
        self.statuses, self.got = list(statuses), []
        self.arrived = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.end_headers()
                with outer.arrived:
                    outer.got.append((dict(self.headers), body, status))
                    outer.arrived.notify_all()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, n: int, timeout: float = 20) -> list:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.got) >= n, timeout), f"{len(self.got)} of {n} arrived"
            return list(self.got)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
