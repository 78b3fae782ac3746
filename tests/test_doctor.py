"""`spoold doctor`: a good setup passes; each broken thing fails its own check, with its own message."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from .helpers import DaemonProcess, free_port, write_config


def doctor(config, *args):
    """Run `spoold doctor --json` as a user would; (exit code, {check name: [checks]})."""
    done = subprocess.run([sys.executable, "-m", "spoold", "doctor", "--json", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(done.stdout)
    assert report["ok"] == (done.returncode == 0), done.stdout
    by_name = {}
    for check in report["checks"]:
        by_name.setdefault(check["name"], []).append(check)
    return done.returncode, by_name


def status(checks, name):
    return [c["status"] for c in checks[name]]


def model_dir(path):
    """What the model check reads: a directory with config.json and weights (no engine loads it here)."""
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


def test_a_running_daemon_on_a_good_setup_passes(tmp_path):
    root = tmp_path / "spool"
    port = free_port()
    config = write_config(tmp_path / "c.toml", root, metrics_listen=f"127.0.0.1:{port}",
                          extra=f'[models]\nlocal = "{model_dir(tmp_path / "model")}"\n')
    d = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        d.wait_ready(root, timeout=60)
        code, checks = doctor(config)
    finally:
        d.terminate()
    for name in ("config", "model", "vllm", "spool", "filesystem", "events", "metrics", "heartbeat", "disk"):
        assert status(checks, name) == ["ok"] * len(checks[name]), checks[name]
    assert "in use by spoold" in checks["events"][0]["message"]
    assert "in use by spoold" in checks["metrics"][0]["message"]
    assert "testhost (idle)" in checks["heartbeat"][0]["message"]
    assert status(checks, "gpu_memory") == ["skip"]  # no GPU on this machine; never shown as ok
    # systemd is not PID 1 here (skip); where it is, spoold's unit is not installed by the tests (fail)
    assert code == (1 if status(checks, "unit") == ["fail"] else 0)


def test_a_bad_config_fails_its_check_and_names_the_key(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[spool]\nroot = "/tmp/x"\nsettle_secs = 1\n')
    code, checks = doctor(config)
    assert code == 1
    assert status(checks, "config") == ["fail"]
    message = checks["config"][0]["message"]
    assert str(config) in message and "settle_secs" in message and "settle_seconds" in message
    assert status(checks, "spool") == ["skip"]


def test_a_missing_model_path_fails_the_model_check(tmp_path):
    root = tmp_path / "spool"
    config = write_config(tmp_path / "c.toml", root, extra=f'[models]\ngone = "{tmp_path / "no-such-model"}"\n')
    code, checks = doctor(config)
    assert code == 1
    failed = [c for c in checks["model"] if c["status"] == "fail"]
    assert len(failed) == 1 and "no-such-model: no model directory there" in failed[0]["message"]
    assert "[models]" in failed[0]["fix"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to check as another user")
def test_a_model_the_service_user_cannot_read_fails(tmp_path):
    model = model_dir(tmp_path / "private-model")
    model.chmod(0o700)
    config = write_config(tmp_path / "c.toml", tmp_path / "spool", extra=f'[models]\nmine = "{model}"\n')
    code, checks = doctor(config, "--user", "nobody")
    failed = [c for c in checks["model"] if c["status"] == "fail"]
    assert code == 1 and len(failed) == 1
    assert "user nobody cannot read" in failed[0]["message"] and "private-model" in failed[0]["message"]


def test_a_spool_with_a_wrong_mode_fails_the_spool_check(tmp_path):
    root = tmp_path / "spool"
    for name in ("inbox", "processing", "outbox", "failed"):
        (root / name).mkdir(parents=True, mode=0o750)
        (root / name).chmod(0o750)
    (root / "processing").chmod(0o755)
    (root / "inbox").chmod(0o773)
    config = write_config(tmp_path / "c.toml", root)
    code, checks = doctor(config)
    assert code == 1 and status(checks, "spool") == ["fail"]
    message = checks["spool"][0]["message"]
    assert "processing/ is mode 0755: others may read it" in message
    assert "inbox/ is mode 0773: others may write it" in message and "not sticky" in message
    assert "outbox" not in message and "failed/" not in message


def test_a_processing_directory_its_group_may_not_look_into_fails_the_spool_check(tmp_path):
    import grp

    group = grp.getgrgid(os.getegid()).gr_name
    root = tmp_path / "spool"
    for name in ("inbox", "processing", "outbox", "failed"):
        (root / name).mkdir(parents=True, mode=0o750)
    os.chown(root / "processing", -1, 65534)  # as spoold.tmpfiles made it before: the daemon's group
    config = write_config(tmp_path / "c.toml", root)
    config.write_text(config.read_text().replace("[spool]\n", f'[spool]\ngroup = "{group}"\n', 1))
    code, checks = doctor(config)
    assert status(checks, "spool") == ["fail"]
    assert f"processing/ has group {grp.getgrgid(65534).gr_name}, not [spool] group {group}" in \
        checks["spool"][0]["message"]
    assert "processing 0750" in checks["spool"][0]["fix"]


def test_a_daemon_that_stopped_is_told_apart_from_one_that_is_stuck(tmp_path):
    root = tmp_path / "spool"
    beat = root / "processing" / "testhost" / "heartbeat.json"
    beat.parent.mkdir(parents=True)
    beat.write_text(json.dumps({"state": "stopping", "ts": time.time() - 3 * 3600}))
    code, checks = doctor(write_config(tmp_path / "c.toml", root))
    (heartbeat,) = checks["heartbeat"]
    assert code == 1 and heartbeat["status"] == "fail"
    assert heartbeat["message"] == "testhost: spoold stopped 3.0h ago"
    assert heartbeat["fix"] == "systemctl start spoold (or spoold run)"


def test_a_heartbeat_is_shown_in_display_form_never_sent_to_the_terminal_as_written(tmp_path):
    root = tmp_path / "spool"
    beat = root / "processing" / "gpu\x1b]0;owned\x07" / "heartbeat.json"
    beat.parent.mkdir(parents=True)
    beat.write_text(json.dumps({"state": "\x1b[2Jworking", "ts": time.time() - 3600}))
    _, checks = doctor(write_config(tmp_path / "c.toml", root))
    message = checks["heartbeat"][0]["message"]
    assert re.fullmatch(r"gpu\\x1b]0;owned\\x07 \(\\x1b\[2Jworking\) beat 36\d\ds ago: .*", message), message


def test_a_metrics_port_held_by_another_program_and_a_stale_heartbeat_fail(tmp_path):
    root = tmp_path / "spool"
    beat = root / "processing" / "testhost" / "heartbeat.json"
    beat.parent.mkdir(parents=True)
    beat.write_text(json.dumps({"state": "working"}))
    old = time.time() - 3600
    os.utime(beat, (old, old))
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        config = write_config(tmp_path / "c.toml", root, metrics_listen=f"127.0.0.1:{port}")
        code, checks = doctor(config)
    assert code == 1
    assert status(checks, "metrics") == ["fail"]
    assert f"127.0.0.1:{port} is in use by another program" in checks["metrics"][0]["message"]
    assert status(checks, "heartbeat") == ["fail"]
    assert re.search(r"testhost \(working\) beat 36\d\ds ago", checks["heartbeat"][0]["message"])


def test_the_text_report_names_each_failure_and_what_to_do(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[spool\n")
    done = subprocess.run([sys.executable, "-m", "spoold", "doctor", "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("fail  config") and "not valid TOML" in lines[0]
    assert lines[1].strip().startswith("-> edit")
    assert lines[-1].startswith("1 check(s) failed: config")
