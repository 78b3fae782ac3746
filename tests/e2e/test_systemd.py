"""spoold under a real systemd: PID 1 of private PID and mount namespaces.

The units under test are the packaged ones (packaging/spoold.service and
packaging/spoold-api.service) with a drop-in that points them at this checkout, runs them as root (the machine's
/etc, where the spoold user would live, is left untouched) and shortens
timers. Everything systemd must see lives under .cache/ in the repository,
because its /tmp is a fresh tmpfs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ..helpers import (REPO, chat_line, check_exactly_once, complete_lines, free_port, outbox_jobs, wait_for,
                       write_config, write_jsonl)

BOOT = Path(__file__).with_name("systemd_boot.sh")
#: Where the boot script binds the checkout. Units see it there, so a clone
#: under /tmp stays visible even to a service with PrivateTmp=yes.
SEEN = Path("/run/spoold-keep")


def seen(path: Path) -> Path:
    """`path` (inside the checkout) as the services see it."""
    path = Path(path)
    return SEEN / path.relative_to(REPO) if path.is_relative_to(REPO) else path
#: The admin key of the API unit under test.
API_KEY = "ops-key-0123456789abcdef0000"
JOURNALD_UNITS = ("systemd-journald.service", "systemd-journald.socket", "systemd-journald-dev-log.socket")


def namespaces_permitted() -> str | None:
    """None when systemd can be booted here, else why not."""
    if not Path("/lib/systemd/systemd").exists():
        return "systemd is not installed"
    probe = subprocess.run(["unshare", "--fork", "--pid", "--mount", "--mount-proc", "--uts", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"PID/mount namespaces are not permitted here: {probe.stderr.strip()}"
    return None


_why_not = namespaces_permitted()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=f"SKIPPED systemd tests: {_why_not}")


class PrivateSystemd:
    """A booted private systemd and the helpers to drive it."""

    def __init__(self, base: Path, overlay: Path | None = None) -> None:
        """`overlay`: make /usr, /etc, /opt and /var/spool overlays writing there (systemd_boot.sh)."""
        self.base = base
        self.overlay = overlay
        self.units = base / "units"
        self.proc: subprocess.Popen | None = None
        self.pid = 0

    def boot(self) -> None:
        self.proc = subprocess.Popen(["unshare", "--fork", "--pid", "--mount", "--mount-proc", "--uts",
                                      str(BOOT), str(self.units), "spoold-test.target", str(REPO),
                                      *([str(self.overlay)] if self.overlay else [])],
                                     stdout=open(self.base / "systemd.log", "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = wait_for(self._child_pid, 10, "systemd to start")
        wait_for(lambda: self.run("systemctl", "is-system-running", check=False).stdout.strip()
                 in ("running", "degraded"), 30, "systemd to finish booting", interval=0.2)

    def _child_pid(self) -> int:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else 0

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a command inside the namespaces (systemctl, journalctl, pgrep, kill)."""
        result = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "-u", *cmd],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-P", prop, unit).stdout.strip()

    def journal(self, unit: str, *match: str) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat", *match, check=False).stdout

    def shutdown(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)  # PID 1 gone: the kernel ends the whole namespace
        if self.proc:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=30)


def write_units(base: Path, services: dict[str, tuple[str, str]]) -> None:
    """Journald, empty base targets, a target wanting journald, and units (name: packaged unit, drop-in)."""
    units = base / "units"
    units.mkdir(parents=True)
    for name in JOURNALD_UNITS:
        text = Path("/lib/systemd/system", name).read_text()
        (units / name).write_text(text.replace(" systemd-journald-audit.socket", ""))
    for target in ("sysinit", "basic", "shutdown"):
        (units / f"{target}.target").write_text(f"[Unit]\nDescription={target} (empty, for tests)\n")
    (units / "spoold-test.target").write_text("[Unit]\nDescription=spoold tests\nWants=systemd-journald.service\n")
    for name, (packaged, dropin) in services.items():
        (units / f"{name}.service").write_text((REPO / "packaging" / packaged).read_text())
        (units / f"{name}.service.d").mkdir()
        (units / f"{name}.service.d" / "test.conf").write_text(dropin)


#: ProtectHome=yes (spoold-api.service) hides /root and /home; a Python installed there (pyenv, as on the
#: test machine) is let through read-only. Installed, spoold runs from /usr.
HOME_PYTHON = ("ProtectHome=read-only\n"
               if str(Path(sys.executable).resolve()).startswith(("/root/", "/home/")) else "")


def dropin(config: Path, root: Path, watchdog_sec: int, runtime_dir: str) -> str:
    return f"""[Service]
RuntimeDirectory=
RuntimeDirectory={runtime_dir}
WatchdogSec={watchdog_sec}
TimeoutStopSec=60
{unit_dropin(config, root, "run")}"""


def unit_dropin(config: Path, root: Path, verb: str = "api") -> str:
    """What every unit under test changes: this checkout's python, root, the test spool, quick restarts."""
    return f"""[Service]
User=
Group=
ExecStart=
ExecStart={seen(Path(sys.executable))} -m spoold {verb} --config {seen(config)}
Environment=PYTHONPATH={SEEN} HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1
ReadWritePaths=
ReadWritePaths={seen(root)}
RestartSec=1
{HOME_PYTHON}"""


@pytest.fixture(scope="module")
def sd(tiny_model):
    base = REPO / ".cache" / f"systemd-{uuid.uuid4().hex[:8]}"
    base.mkdir(parents=True)
    fast_root, vllm_root = base / "fast", base / "vllm"
    for root in (fast_root, vllm_root):
        (root / "inbox").mkdir(parents=True)
    api_port, keys = free_port(), base / "api-keys"
    keys.write_text(f"ops:{API_KEY}:admin\n")
    fast_cfg = write_config(base / "fast.toml", seen(fast_root), progress_seconds=0.3, events_endpoint="",
                            engine="max_inflight = 4\n[engine.args]\ndelay = 0.01\nload_delay = 3",
                            extra=f'[api]\nlisten = "127.0.0.1:{api_port}"\nkeys_file = "{seen(keys)}"\n')
    vllm_cfg = write_config(base / "vllm.toml", seen(vllm_root), adapter="spoold.vllm_adapter:VllmEngine",
                            model="tiny", progress_seconds=0.3, events_endpoint="",
                            engine='dtype = "float32"\nmax_model_len = 512\nmax_num_seqs = 64\nenforce_eager = true',
                            extra=f'[models]\ntiny = "{seen(tiny_model)}"\n[watchdog]\nstall_seconds = 5\n')
    write_units(base, {"spoold": ("spoold.service", dropin(fast_cfg, fast_root, 30, "spoold")),
                       "spoold-vllm": ("spoold.service", dropin(vllm_cfg, vllm_root, 15, "spoold-vllm")),
                       "spoold-api": ("spoold-api.service", unit_dropin(fast_cfg, fast_root))})
    systemd = PrivateSystemd(base)
    try:
        systemd.boot()
        systemd.fast_root, systemd.vllm_root, systemd.fast_cfg = fast_root, vllm_root, fast_cfg
        systemd.api_url = f"http://127.0.0.1:{api_port}/v1"
        yield systemd
    finally:
        systemd.shutdown()
        shutil.rmtree(base, ignore_errors=True)


def drop(root: Path, stem: str, n: int) -> set[str]:
    rows = [chat_line(i) for i in range(n)]
    write_jsonl(root / "inbox" / f"{stem}.jsonl", rows)
    (root / "inbox" / f"{stem}.jsonl.ready").touch()
    return {r["custom_id"] for r in rows}


def running_output(root: Path, stem: str) -> Path:
    return wait_for(lambda: next(iter(root.glob(f"processing/testhost/{stem}-*/output.jsonl")), None), 30,
                    f"{stem} to start")


def finished(root: Path, stem: str, timeout: float = 120) -> Path:
    return wait_for(lambda: next((j for j in outbox_jobs(root) if j.name.startswith(stem + "-")), None),
                    timeout, f"{stem} in the outbox", interval=0.2)


def test_start_reaches_active_only_after_ready(sd):
    started = time.monotonic()
    sd.run("systemctl", "start", "--no-block", "spoold")
    wait_for(lambda: sd.show("spoold", "ActiveState") == "activating", 5, "activating")
    wait_for(lambda: sd.show("spoold", "StatusText").startswith("loading model"), 10, "the loading status")
    assert sd.show("spoold", "ActiveState") == "activating"
    wait_for(lambda: sd.show("spoold", "ActiveState") == "active", 30, "active", interval=0.1)
    assert time.monotonic() - started >= 2.5, "active before the (3 s) model load finished"
    assert sd.show("spoold", "StatusText") == "idle, 0 queued"


def test_status_line_and_journal_while_a_job_runs(sd):
    drop(sd.fast_root, "scoring", 2500)
    out = running_output(sd.fast_root, "scoring")
    wait_for(lambda: complete_lines(out) > 200, 30, "progress")

    def status_with_progress():
        status = sd.run("systemctl", "status", "spoold", "--no-pager", check=False).stdout
        return status if "Status: \"scoring: " in status and "/2500 (" in status else None
    status = wait_for(status_with_progress, 10, "the progress line in systemctl status")
    assert "req/s" in status and "ETA" in status, status
    job = finished(sd.fast_root, "scoring")
    journal = sd.journal("spoold")
    assert "claimed 'scoring.jsonl' as job" in journal and f"job {job.name} completed" in journal
    assert f"job {job.name} completed" in sd.journal("spoold", f"JOB_ID={job.name}")


def test_sigkill_of_the_main_process_restarts_and_the_job_completes_once(sd):
    ids = drop(sd.fast_root, "killed", 2500)
    out = running_output(sd.fast_root, "killed")
    wait_for(lambda: complete_lines(out) > 200, 30, "progress")
    restarts = int(sd.show("spoold", "NRestarts"))
    sd.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", "spoold")
    wait_for(lambda: int(sd.show("spoold", "NRestarts")) > restarts, 30, "systemd to restart spoold")
    check_exactly_once(finished(sd.fast_root, "killed"), ids, set())


def test_stop_mid_job_is_clean_and_start_resumes(sd):
    ids = drop(sd.fast_root, "stopped", 2500)
    out = running_output(sd.fast_root, "stopped")
    wait_for(lambda: complete_lines(out) > 200, 30, "progress")
    sd.run("systemctl", "stop", "spoold")
    assert sd.show("spoold", "Result") == "success" and sd.show("spoold", "ExecMainStatus") == "0"
    assert "warm stop" in sd.journal("spoold")
    assert 200 < complete_lines(out) < 2500 and out.exists(), "the job should wait in processing/"
    sd.run("systemctl", "start", "spoold")
    check_exactly_once(finished(sd.fast_root, "stopped"), ids, set())


def test_reload_applies_what_it_can_and_names_what_needs_a_restart(sd):
    if sd.show("spoold", "ActiveState") != "active":
        sd.run("systemctl", "start", "spoold")
    text = sd.fast_cfg.read_text()
    sd.fast_cfg.write_text(text.replace("settle_seconds = 1", "settle_seconds = 2")
                           .replace('model = "fake-model"', 'model = "other-model"'))
    try:
        sd.run("systemctl", "reload", "spoold")
        wait_for(lambda: "reloaded settings" in sd.journal("spoold"), 10, "the reload")
        assert "[engine] model changed; restart spoold to apply" in sd.journal("spoold")
        assert sd.show("spoold", "ActiveState") == "active"
    finally:
        sd.fast_cfg.write_text(text)


def test_the_api_unit_serves_the_sdk_reloads_its_keys_and_is_restarted_after_a_crash(sd):
    import openai

    if sd.show("spoold", "ActiveState") != "active":
        sd.run("systemctl", "start", "spoold")
    started = sd.run("systemctl", "start", "spoold-api", check=False)
    assert started.returncode == 0, sd.journal("spoold-api")
    client = openai.OpenAI(base_url=sd.api_url, api_key=API_KEY, max_retries=0)

    def answering():
        try:
            return client.models.list().data
        except openai.APIConnectionError:
            return None
    wait_for(answering, 30, "spoold-api to answer")
    status = sd.run("systemctl", "status", "spoold-api", "--no-pager", check=False).stdout
    assert "Active: active (running)" in status and "spoold api" in status, status
    lines = "".join(json.dumps(chat_line(i)) + "\n" for i in range(20)).encode()
    source = client.files.create(file=("unit.jsonl", lines), purpose="batch")
    made = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    main_pid, restarts = sd.show("spoold-api", "MainPID"), int(sd.show("spoold-api", "NRestarts"))
    sd.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", "spoold-api")
    wait_for(lambda: int(sd.show("spoold-api", "NRestarts")) > restarts and answering(), 30,
             "systemd to restart spoold-api")
    assert sd.show("spoold-api", "MainPID") != main_pid
    done = wait_for(lambda: (b := client.batches.retrieve(made.id)).status == "completed" and b, 60,
                    "the batch, through the restarted API", interval=0.2)
    assert done.request_counts.completed == 20
    assert len(client.files.content(done.output_file_id).text.splitlines()) == 20
    sd.run("systemctl", "reload", "spoold-api")
    wait_for(lambda: sd.journal("spoold-api").count("API keys: 1 tenant key(s)") >= 3, 10, "the keys reread")
    assert API_KEY not in sd.journal("spoold-api")
    sd.run("systemctl", "stop", "spoold-api")
    assert sd.show("spoold-api", "Result") == "success"


def test_a_stalled_engine_stops_the_watchdog_pings_and_the_job_still_completes(sd):
    sd.run("systemctl", "stop", "spoold")  # leave the two CPU cores to vLLM
    sd.run("systemctl", "start", "spoold-vllm")  # returns once READY=1 (the model is loaded)
    rows = [{**chat_line(i, model="tiny"), "body": {**chat_line(i, model="tiny")["body"], "max_tokens": 32,
                                                     "ignore_eos": True}} for i in range(3000)]
    write_jsonl(sd.vllm_root / "inbox" / "stall.jsonl", rows)
    (sd.vllm_root / "inbox" / "stall.jsonl.ready").touch()
    out = running_output(sd.vllm_root, "stall")
    wait_for(lambda: complete_lines(out) > 100, 120, "progress on vLLM")
    engine = sd.run("pgrep", "-f", "VLLM::EngineCore").stdout.split()
    assert engine, "no EngineCore process found"
    for pid in engine:
        sd.run("kill", "-STOP", pid)
    wait_for(lambda: "Failed with result 'watchdog'" in sd.journal("spoold-vllm"), 90, "the watchdog to fire",
             interval=0.5)
    assert "Watchdog timeout" in sd.journal("spoold-vllm")
    assert "the engine looks stuck" in sd.journal("spoold-vllm")
    job = finished(sd.vllm_root, "stall", timeout=300)
    check_exactly_once(job, {r["custom_id"] for r in rows}, set())
    assert json.loads((job / "batch.json").read_text())["timings"]["resumed"] is True
    sd.run("systemctl", "stop", "spoold-vllm")
