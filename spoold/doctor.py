"""`spoold doctor`: why is nothing happening? One line per check, with what to do.

Each check looks at one thing the daemon needs, in the order a person
would look: the config parses; every configured model resolves and the
service user can read it; vLLM imports, and its build (CPU or CUDA) fits
the GPUs NVML sees; those GPUs have the memory `gpu_memory_utilization`
asks for; the spool's directories exist with the packaged modes, on a
filesystem where rename and fsync work; the event socket and the metrics
port are free or spoold's own; the unit is active; the newest heartbeat is
fresh; the disk has room for what is queued. A check that does not apply
here (no GPU, no systemd) says so as `skip`, never as `ok`; the exit code
is 0 only when no check failed.

Reads only: the one write is the spool probe, a file created, fsynced,
renamed and removed in the spool root, and only where this user may write.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .access import group_name
from .config import Config, ConfigError, load_config
from .durable import atomic_write_json, durable_rename, fsync_dir
from .events import resolve_endpoint
from .gpu import GpuReader
from .heartbeat import host_beats, short_duration
from .lifecycle import DaemonState
from .names import display_name
from .validation import ModelResolver

OK, FAIL, SKIP = "ok", "fail", "skip"

#: The spool's directories: each must keep others out; the inbox, where the group may write, sticky.
SPOOL_DIRS = ("inbox", "processing", "outbox", "failed")

GIB = 2**30


@dataclass
class Check:
    """One finding: `status` is ok, fail or skip; `fix` says what to do when it is not ok."""

    name: str
    status: str
    message: str
    fix: str = ""


def run_checks(config_file: Path, unit: str = "spoold", service_user: str = "spoold") -> list[Check]:
    """Every check, in order; those that need a config are skipped when it does not parse."""
    try:
        config = load_config(config_file, must_exist=True)
    except ConfigError as e:  # it names the file
        first = Check("config", FAIL, str(e), f"edit {config_file} (sudo make install puts an example there), "
                                              "then run spoold doctor again")
        rest = ("model", "gpu_memory", "spool", "filesystem", "events", "metrics", "heartbeat", "disk")
        return [first, check_vllm(GpuReader().read()), check_unit(unit),
                *(Check(name, SKIP, "needs a config that parses") for name in rest)]
    checks = [Check("config", OK, f"{config_file} parses")]
    gpus = GpuReader().read()
    checks += check_models(config, service_user)
    beat = check_heartbeat(config)
    checks += [check_vllm(gpus), check_gpu_memory(config, gpus), check_spool_dirs(config),
               check_filesystem(config.spool.root), check_events(config, beat.status == OK),
               check_metrics(config), check_unit(unit), beat, check_disk(config.spool.root)]
    return checks


# -- the model ----------------------------------------------------------------

def check_models(config: Config, service_user: str) -> list[Check]:
    """Each configured model: a local directory the service user can read, or a Hugging Face id."""
    known = sorted(ModelResolver(config.models.aliases, config.engine.model).known)
    if not known:
        return [Check("model", FAIL, "no model is configured", "set [engine] model to a model directory or id")]
    return [_check_model(model, service_user) for model in known]


def _check_model(model: str, service_user: str) -> Check:
    path = Path(model)
    if not (path.is_absolute() or model.startswith(".") or path.exists()):
        return Check("model", OK, f"{model}: a Hugging Face id; the first start downloads it unless it is "
                                  "cached (HF_HUB_OFFLINE=1 needs it cached)")
    if not (path / "config.json").is_file():
        return Check("model", FAIL, f"{model}: no model directory there (no config.json)",
                     "set [engine] model (or [models]) to the directory holding config.json and the weights")
    who = _user(service_user)
    unreadable = [str(p) for p in _model_files(path) if not _readable_by(p, *who)]
    if unreadable:
        return Check("model", FAIL, f"{model}: user {who[2]} cannot read {unreadable[0]}"
                                    + (f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""),
                     f"chmod -R a+rX {model} (or give the group {who[2]} is in read access)")
    return Check("model", OK, f"{model}: readable by {who[2]}")


def _model_files(path: Path) -> Iterator[Path]:
    yield path
    for entry in sorted(path.iterdir()):
        if entry.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
            yield entry


def _user(name: str) -> tuple[int, set[int], str]:
    """uid, gids and name of `name`, or of this process's user when there is no such user."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return os.geteuid(), set(os.getgroups()) | {os.getegid()}, pwd.getpwuid(os.geteuid()).pw_name
    gids = {g.gr_gid for g in grp.getgrall() if name in g.gr_mem} | {entry.pw_gid}
    return entry.pw_uid, gids, name


def _readable_by(path: Path, uid: int, gids: set[int], _name: str = "") -> bool:
    """Whether `uid` may read `path` (and list it, for a directory) and reach it through every parent."""
    if uid == 0:
        return True
    for parent in reversed(path.resolve().parents):
        if not _allowed(parent.stat(), uid, gids, stat.S_IXUSR):
            return False
    st = path.stat()
    need = stat.S_IRUSR | (stat.S_IXUSR if stat.S_ISDIR(st.st_mode) else 0)
    return _allowed(st, uid, gids, need)


def _allowed(st: os.stat_result, uid: int, gids: set[int], user_bits: int) -> bool:
    """The permission bits `user_bits` (given as owner bits) for `uid`, by owner, group or other."""
    shift = 0 if st.st_uid == uid else 3 if st.st_gid in gids else 6
    return st.st_mode & (user_bits >> shift) == user_bits >> shift


# -- vLLM and the GPUs --------------------------------------------------------

def check_vllm(gpus: list[dict[str, Any]]) -> Check:
    """vLLM imports, and its build fits the GPUs NVML sees."""
    try:
        import vllm
        from vllm.platforms import current_platform
    except Exception as e:  # a broken install can raise anything on import
        return Check("vllm", FAIL, f"vLLM does not import: {type(e).__name__}: {e}",
                     "reinstall: sudo make install (the gpu extra where nvidia-smi works, else cpu)")
    build = "CPU" if current_platform.is_cpu() else str(current_platform.device_type).upper()
    seen = f"NVML sees {len(gpus)} GPU(s)" if gpus else "NVML sees no GPU"
    found = f"vLLM {vllm.__version__}, {build} build; {seen}"
    if build == "CPU" and gpus:
        return Check("vllm", FAIL, found + ": the GPUs go unused",
                     "install the gpu extra: sudo make install (it picks it where nvidia-smi works)")
    if build != "CPU" and not gpus:
        return Check("vllm", FAIL, found + ": the engine will not start",
                     "check the driver (nvidia-smi), or install the cpu extra on a machine without a GPU")
    return Check("vllm", OK, found)


def check_gpu_memory(config: Config, gpus: list[dict[str, Any]]) -> Check:
    """Each GPU has free the share of its memory vLLM will take (`gpu_memory_utilization`)."""
    if not gpus:
        return Check("gpu_memory", SKIP, "no GPU visible to NVML")
    share = config.engine.gpu_memory_utilization
    short = []
    for gpu in gpus:
        free, total = gpu["memory_total_bytes"] - gpu["memory_used_bytes"], gpu["memory_total_bytes"]
        if free < share * total:
            short.append(f"GPU {gpu['index']} has {free / GIB:.1f} GiB free of {total / GIB:.1f}, "
                         f"vLLM needs {share * total / GIB:.1f}")
    if short:
        return Check("gpu_memory", FAIL, "; ".join(short) + f" (gpu_memory_utilization {share})",
                     "stop what else holds it (nvidia-smi lists it; an old spoold?), or lower "
                     "[engine] gpu_memory_utilization")
    return Check("gpu_memory", OK, f"{len(gpus)} GPU(s) with at least {share:.0%} of memory free")


# -- the spool ------------------------------------------------------------------

def check_spool_dirs(config: Config) -> Check:
    """inbox/, processing/, outbox/, failed/ exist; others get no access but to drop (a sticky inbox)."""
    root, group, problems = config.spool.root, config.spool.group, []
    for name in SPOOL_DIRS:
        try:
            st = (root / name).stat()
        except OSError as e:
            problems.append(f"{name}/ {e.strerror.lower()}")
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o007:
            problems.append(f"{name}/ is mode {mode:04o}: others may {'write' if mode & 0o002 else 'read'} it")
        if name == "inbox" and mode & 0o022 and not mode & stat.S_ISVTX:
            problems.append(f"inbox/ is mode {mode:04o}, not sticky: a submitter may remove another's drop")
        if group and name in ("inbox", "processing", "outbox") and group_name(st.st_gid) != group:
            problems.append(f"{name}/ has group {group_name(st.st_gid)}, not [spool] group {group}")
    if problems:
        return Check("spool", FAIL, f"{root}: " + "; ".join(problems),
                     "systemd-tmpfiles --create (the packaged modes: inbox 3770, processing 0750, outbox "
                     "and failed 2750), or chmod/chgrp to match")
    return Check("spool", OK, f"{root}: the four directories, with modes that keep others out")


def check_filesystem(root: Path) -> Check:
    """The spool's filesystem (NFS named), and a probe of what spoold needs: write, fsync, rename."""
    kind = _fs_type(root)
    shared = " (a shared spool: give each host its own [spool] host_id and keep clocks in sync)" \
        if kind.startswith("nfs") else ""
    probe, moved = root / f".doctor-{os.getpid()}.tmp", root / f".doctor-{os.getpid()}"
    try:
        atomic_write_json(probe, {"probe": True})
        durable_rename(probe, moved)
        os.unlink(moved)
        fsync_dir(root)
    except PermissionError:
        return Check("filesystem", SKIP, f"{root} is on {kind}{shared}; not writable by this user, so "
                                         "rename and fsync were not probed (run as root or spoold)")
    except OSError as e:
        return Check("filesystem", FAIL, f"{root} ({kind}): {e.strerror}", "the spool needs a local or NFS "
                     "filesystem where rename and fsync work, and room to write")
    return Check("filesystem", OK, f"{root} is on {kind}{shared}; write, fsync and rename work")


def _fs_type(path: Path) -> str:
    """The type of the filesystem `path` is on, from /proc/self/mountinfo ("unknown" without it)."""
    target, best, kind = os.path.realpath(path), "", "unknown"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        fields = line.split()
        mount, fstype = fields[4], fields[fields.index("-") + 1]
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fstype
    return kind


# -- sockets, unit, heartbeat, disk ------------------------------------------

def check_events(config: Config, daemon_beating: bool) -> Check:
    """The event endpoint is free, or spoold's (`daemon_beating`: a heartbeat on this spool is fresh)."""
    # connect=True: the system service's socket first, where `spoold watch` looks
    endpoint = resolve_endpoint(config.events.endpoint, connect=True)
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://"):])
        in_use = path.is_socket() and _answers_unix(path)
    elif endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        in_use = _tcp_in_use("127.0.0.1" if host in ("*", "0.0.0.0", "") else host, int(port))
    else:
        return Check("events", SKIP, f"{endpoint}: not checked (only ipc:// and tcp://)")
    return _port_verdict("events", endpoint, in_use, daemon_beating)


def check_metrics(config: Config) -> Check:
    """The metrics port is free, or serves spoold's metrics."""
    if not config.metrics.listen:
        return Check("metrics", SKIP, "[metrics] listen is off")
    host, _, port = config.metrics.listen.rpartition(":")
    host = host or "127.0.0.1"
    in_use = _tcp_in_use(host, int(port))
    return _port_verdict("metrics", config.metrics.listen, in_use, in_use and _serves_spoold_metrics(host, int(port)))


def _port_verdict(name: str, where: str, in_use: bool, ours: bool) -> Check:
    if not in_use:
        return Check(name, OK, f"{where} is free for spoold")
    if ours:
        return Check(name, OK, f"{where} is in use by spoold")
    return Check(name, FAIL, f"{where} is in use by another program",
                 f"stop it (ss -lxp / ss -ltnp shows which), or set [{name}] to another "
                 f"{'endpoint' if name == 'events' else 'listen address'}")


def _answers_unix(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False  # a stale socket file: spoold replaces it at start


def _tcp_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(1.0)
        return s.connect_ex((host.strip("[]"), port)) == 0


def _serves_spoold_metrics(host: str, port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as answer:
            return b"spoold_" in answer.read(1 << 20)
    except OSError:
        return False


def check_unit(unit: str) -> Check:
    """systemctl's view of the unit: active, or why it stopped."""
    if not shutil.which("systemctl") or not Path("/run/systemd/system").is_dir():
        return Check("unit", SKIP, "systemd is not running here")
    shown = subprocess.run(["systemctl", "show", unit, "--property=LoadState,ActiveState,SubState,Result,"
                            "ExecMainStatus"], capture_output=True, text=True, timeout=30).stdout
    props = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    if props.get("LoadState") != "loaded":
        return Check("unit", FAIL, f"{unit}.service is not installed", "sudo make install")
    state = f"{props.get('ActiveState')} ({props.get('SubState')})"
    if props.get("ActiveState") == "active":
        return Check("unit", OK, f"{unit}.service is {state}")
    why = f", last result {props.get('Result')}, exit status {props.get('ExecMainStatus')}"
    return Check("unit", FAIL, f"{unit}.service is {state}{why}",
                 f"journalctl -u {unit} -n 50 says why; systemctl enable --now {unit}")


def check_heartbeat(config: Config) -> Check:
    """The newest heartbeat on this spool: which host, its state, how old."""
    processing = config.spool.root / "processing"
    try:
        beats = host_beats(processing, config.heartbeat.seconds)
    except PermissionError as e:
        return Check("heartbeat", SKIP, f"{e.filename} is not readable by this user (run as root, or as a member "
                                        f"of [spool] group)")
    if not beats:
        return Check("heartbeat", FAIL, "no heartbeat: spoold has not run on this spool",
                     "systemctl enable --now spoold (or spoold run)")
    beat = min(beats, key=lambda b: b.age_seconds)
    host = display_name(beat.host)  # another host's heartbeat is data: shown, never sent to the terminal as is
    where = f"{host} ({display_name(beat.state)}) beat {beat.age_seconds:.0f}s ago"
    if not beat.beating and beat.state == DaemonState.STOPPING:  # it said goodbye: stopped, not stuck
        return Check("heartbeat", FAIL, f"{host}: spoold stopped {short_duration(beat.age_seconds)} ago",
                     "systemctl start spoold (or spoold run)")
    if not beat.beating:
        return Check("heartbeat", FAIL, f"{where}: spoold is not running there, or is stuck",
                     "systemctl status spoold; journalctl -u spoold -n 50")
    return Check("heartbeat", OK, where)


def check_disk(root: Path) -> Check:
    """Free space in the spool against the input waiting there (results take about as much again)."""
    try:
        free = shutil.disk_usage(root).free
    except OSError as e:
        return Check("disk", FAIL, f"{root}: {e.strerror}", "create the spool (systemd-tmpfiles --create)")
    queued = sum(_sizes(root / "inbox", "*.jsonl")) + sum(_sizes(root / "processing", "*/*/input.jsonl"))
    found = f"{free / GIB:.1f} GiB free, {queued / GIB:.2f} GiB of input queued or running"
    if free < queued:
        return Check("disk", FAIL, found + ": the results may not fit",
                     "free space in the spool's filesystem; spoold pauses (it loses nothing) when it is full")
    return Check("disk", OK, found)


def _sizes(directory: Path, pattern: str) -> Iterator[int]:
    for path in directory.glob(pattern):
        with contextlib.suppress(OSError, ValueError):
            yield path.lstat().st_size


# -- output ---------------------------------------------------------------------

def render(checks: list[Check]) -> str:
    """One line per check (what to do indented below one that is not ok), then a summary."""
    lines = []
    for check in checks:
        lines.append(f"{check.status:<4}  {check.name:<10}  {check.message}")
        if check.fix and check.status != OK:
            lines.append(f"{'':<16}-> {check.fix}")
    failed = [c.name for c in checks if c.status == FAIL]
    lines.append(f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "all checks passed")
    return "\n".join(lines)


def as_json(checks: list[Check]) -> str:
    """The checks for scripts: {"ok": bool, "checks": [...]}."""
    return json.dumps({"ok": passed(checks), "checks": [asdict(c) for c in checks]}, indent=2)


def passed(checks: list[Check]) -> bool:
    """True when no check failed (skipped ones do not fail)."""
    return all(c.status != FAIL for c in checks)

