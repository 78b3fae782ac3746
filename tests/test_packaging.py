"""The packaged systemd files are valid and say what the README says."""

import os
import shutil
import stat
import subprocess

import pytest

from .helpers import REPO

PACKAGING = REPO / "packaging"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")


@needs_systemd
def test_systemd_analyze_verify_passes(tmp_path):
    # verify insists ExecStart exists: overlay /usr/bin with spoold in a private
    # mount namespace, so the machine itself is not touched.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(REPO / ".venv" / "bin" / "spoold", bin_dir / "spoold")
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(PACKAGING / "spoold.service", units / "spoold.service")
    shutil.copy(PACKAGING / "spoold@.service", units / "spoold@0.service")
    shutil.copy(PACKAGING / "spoold-api.service", units / "spoold-api.service")
    script = (f"mount --make-rprivate / && mount -t overlay overlay -o lowerdir={bin_dir}:/usr/bin /usr/bin && "
              f"systemd-analyze verify {units / 'spoold.service'} {units / 'spoold@0.service'} "
              f"{units / 'spoold-api.service'}")
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True)
    if result.returncode != 0 and "unshare failed" in result.stderr:
        pytest.skip(f"mount namespaces not permitted: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_units_have_what_a_notify_service_needs():
    unit = (PACKAGING / "spoold.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=spoold", "StateDirectory=spoold",
                 "RuntimeDirectory=spoold", "ProtectSystem=strict", "ReadWritePaths=/var/spool/spoold",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "RequiresMountsFor=/var/spool/spoold",
                 "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in unit
    assert "DynamicUser" not in unit
    api = (PACKAGING / "spoold-api.service").read_text()
    for line in ("ExecStart=/usr/bin/spoold api ", "User=spoold", "ReadWritePaths=/var/spool/spoold",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "Restart=on-failure"):
        assert line in api
    instance = (PACKAGING / "spoold@.service").read_text()
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in instance and "--host-id %H-gpu%i" in instance
    for text in (unit, instance):  # submitters reach the event socket (its own mode is owner+group)
        assert "RuntimeDirectoryMode=0755" in text


@needs_systemd
def test_sysusers_and_tmpfiles_create_the_user_and_the_spool(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(["systemd-sysusers", f"--root={root}", str(PACKAGING / "spoold.sysusers")], check=True,
                   capture_output=True)
    users = {l.split(":")[0]: l.split(":") for l in (root / "etc/passwd").read_text().splitlines()}
    groups = {l.split(":")[0]: l.split(":") for l in (root / "etc/group").read_text().splitlines()}
    assert "spoold" in users and "spoold" in groups["spoold-submit"][3].split(",")
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(PACKAGING / "spoold.tmpfiles")],
                   check=True, capture_output=True)
    inbox = os.stat(root / "var/spool/spoold/inbox")
    assert stat.S_IMODE(inbox.st_mode) == 0o3770  # setgid (drops keep the group), sticky (only their own)
    assert inbox.st_uid == int(users["spoold"][2]) and inbox.st_gid == int(groups["spoold-submit"][2])
    processing = os.stat(root / "var/spool/spoold/processing")
    assert stat.S_IMODE(processing.st_mode) == 0o750  # members may look in and see what runs; only spoold writes
    assert processing.st_gid == int(groups["spoold-submit"][2])
