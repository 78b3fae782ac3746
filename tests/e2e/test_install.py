"""`make install` and `make uninstall` as root on a box, under a real systemd, the machine untouched.

systemd_boot.sh boots a private systemd whose /usr, /etc, /opt and
/var/spool are overlays: `make install` (DESTDIR empty, as a person runs
it) makes the virtualenv in /opt/spoold, the spoold user, the spool and the
config there, and systemd runs the installed unit as the spoold user, on
real vLLM with the tiny model. Only an environment drop-in is added, as an
operator would (offline, a small KV cache for this 2-core machine).
"""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from ..helpers import REPO, chat_line, free_port, wait_for, write_jsonl
from .test_systemd import PrivateSystemd, namespaces_permitted, write_units

_why_not = namespaces_permitted()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=f"SKIPPED install tests: {_why_not}")

SPOOL = "/var/spool/spoold"


@pytest.fixture(scope="module")
def box():
    """A private systemd on overlays of /usr, /etc, /opt and /var/spool."""
    base = REPO / ".cache" / f"install-{uuid.uuid4().hex[:8]}"
    write_units(base, {})
    # spoold.service wants network-online.target: here it is reached at once.
    (base / "units" / "network-online.target").write_text("[Unit]\nDescription=network (empty, for tests)\n")
    systemd = PrivateSystemd(base, overlay=base / "overlay")
    try:
        systemd.boot()
        yield systemd
    finally:
        systemd.shutdown()
        shutil.rmtree(base, ignore_errors=True)


def config_for(path, port):
    path.write_text(f"""# the operator's edit of /etc/spoold/spoold.toml
[engine]
model = "tiny"
dtype = "float32"
max_model_len = 512
max_num_seqs = 16
enforce_eager = true

[models]
tiny = "/opt/models/tiny"

[metrics]
listen = "127.0.0.1:{port}"
""")
    return path


def test_install_runs_the_service_as_its_user_and_uninstall_keeps_spool_and_config(box, tiny_model):
    installed = box.run("make", "-C", str(REPO), "install", timeout=1200)
    assert "spoold is installed in /opt/spoold" in installed.stdout, installed.stdout + installed.stderr
    assert box.run("readlink", "/usr/bin/spoold").stdout.strip() == "/opt/spoold/bin/spoold"
    assert box.run("stat", "-c", "%a %U %G", f"{SPOOL}/inbox").stdout.strip() == "3770 spoold spoold-submit"
    assert "spoold-submit" in box.run("id", "-nG", "spoold").stdout
    assert box.show("spoold", "LoadState") == "loaded" and box.show("spoold-api", "LoadState") == "loaded"

    # The operator's part: a model the spoold user can read, the config, an environment drop-in.
    box.run("mkdir", "-p", "/opt/models")
    box.run("cp", "-r", str(tiny_model), "/opt/models/tiny")
    box.run("chmod", "-R", "a+rX", "/opt/models")
    box.run("cp", str(config_for(box.base / "spoold.toml", free_port())), "/etc/spoold/spoold.toml")
    box.run("mkdir", "-p", "/etc/systemd/system/spoold.service.d")
    box.run("cp", str(_write(box.base / "env.conf", "[Service]\nEnvironment=HF_HUB_OFFLINE=1 "
                                                    "VLLM_CPU_KVCACHE_SPACE=1\n")),
            "/etc/systemd/system/spoold.service.d/env.conf")
    box.run("systemctl", "daemon-reload")
    started = box.run("systemctl", "start", "spoold", check=False, timeout=600)  # returns at READY=1
    assert started.returncode == 0, box.journal("spoold")
    assert box.show("spoold", "MainPID") != "0"
    assert box.run("ps", "-o", "user=", "-p", box.show("spoold", "MainPID")).stdout.strip() == "spoold"

    rows = [chat_line(i, model="tiny") for i in range(20)]
    write_jsonl(box.base / "scores.jsonl", rows)
    box.run("cp", str(box.base / "scores.jsonl"), f"{SPOOL}/inbox/.scores.jsonl.part")
    box.run("mv", f"{SPOOL}/inbox/.scores.jsonl.part", f"{SPOOL}/inbox/scores.jsonl")
    job = wait_for(lambda: box.run("sh", "-c", f"ls -d {SPOOL}/outbox/scores-*", check=False).stdout.strip(),
                   300, "the drop in the outbox", interval=1)
    outputs = [json.loads(line) for line in box.run("cat", f"{job}/output.jsonl").stdout.splitlines()]
    assert sorted(o["custom_id"] for o in outputs) == sorted(r["custom_id"] for r in rows)
    assert all(o["response"]["status_code"] == 200 for o in outputs)

    report = json.loads(box.run("spoold", "doctor", "--json", check=False, timeout=300).stdout)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert report["ok"], report
    assert {statuses[n] for n in ("config", "model", "vllm", "spool", "filesystem", "unit", "heartbeat")} == {"ok"}

    # Again, as an upgrade: the edited config stays, the new example goes beside it.
    again = box.run("make", "-C", str(REPO), "install", timeout=1200)
    assert "kept your /etc/spoold/spoold.toml" in again.stdout
    assert "the operator's edit" in box.run("cat", "/etc/spoold/spoold.toml").stdout
    assert "[engine]" in box.run("cat", "/etc/spoold/spoold.toml.example").stdout
    assert "keep the old code until restarted" in again.stdout

    removed = box.run("make", "-C", str(REPO), "uninstall", timeout=300)
    assert "kept: /etc/spoold" in removed.stdout
    assert box.show("spoold", "ActiveState") == "inactive", box.journal("spoold")[-6000:]
    for gone in ("/usr/bin/spoold", "/opt/spoold", "/usr/lib/systemd/system/spoold.service",
                 "/usr/lib/tmpfiles.d/spoold.conf", "/etc/spoold/spoold.toml.example"):
        assert box.run("test", "-e", gone, check=False).returncode == 1, gone
    assert "the operator's edit" in box.run("cat", "/etc/spoold/spoold.toml").stdout
    assert len(box.run("cat", f"{job}/output.jsonl").stdout.splitlines()) == 20


def _write(path, text):
    path.write_text(text)
    return path
