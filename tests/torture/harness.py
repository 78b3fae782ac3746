"""The torture harness: drops, daemons run to a crash or to idle, the invariant, power cuts.

The invariant (the promise spoold makes): every valid input line has exactly
one result line across output.jsonl and errors.jsonl, every bad line exactly
one error line, each drop is one job in outbox/ and nowhere else (a drop
that cannot be read: one job in failed/ and nowhere else), and nothing is
left in processing/.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from spoold.formats import OUTPUT_ID

from ..helpers import REPO, chat_line, read_jsonl, write_jsonl

RESULTS = REPO / ".cache" / "reliability"


@dataclass
class Drop:
    """One input file and the answer it must get."""

    name: str
    valid_ids: set[str]
    bad_lines: set[int]
    #: the error code of a drop that must end in failed/ (None: in outbox/)
    fails_with: str | None = None


def make_drop(directory: Path, name: str, n: int, bad: bool = True) -> Drop:
    """n valid chat lines; with `bad`, a broken line (line 4 at most) and a duplicate custom_id at the end."""
    stem = name.removesuffix(".jsonl")
    rows: list = [dict(chat_line(i), custom_id=f"{stem}-{i}") for i in range(n)]
    bad_lines: set[int] = set()
    if bad:
        at = min(3, len(rows))
        rows.insert(at, '{"custom_id": "broken", ')
        rows.append(dict(chat_line(0), custom_id=f"{stem}-0"))
        bad_lines = {at + 1, len(rows)}
    write_jsonl(directory / name, rows)
    return Drop(name, {f"{stem}-{i}" for i in range(n)}, bad_lines)


def make_failing_drops(root: Path) -> list[Drop]:
    """Two drops that must fail: one refused unread at claim (a hard link), one given up after it (gzip).

    The hard link's other name is `root/keep/`, outside the spool's directories.
    """
    (root / "keep").mkdir()
    write_jsonl(root / "keep" / "linked.jsonl", [chat_line(0)])
    os.link(root / "keep" / "linked.jsonl", root / "inbox" / "linked.jsonl")
    (root / "inbox" / "packed.jsonl").write_bytes(b"\x1f\x8b\x08\x00" + bytes(60))
    return [Drop("linked.jsonl", set(), set(), fails_with="not_regular"),
            Drop("packed.jsonl", set(), set(), fails_with="binary")]


def write_config(path: Path, root: Path, host: str = "testhost", *, delay: float = 0.0,
                 inflight: int = 8, heartbeat: float = 0.2, spool: str = "", engine: str = "",
                 args: str = "", extra: str = "", settle: float = 0.05, progress: float = 0.05) -> Path:
    """A fast-double config: short settle and poll, events on an ipc socket beside it.

    `spool`, `engine` and `args` add keys to [spool], [engine] and
    [engine.args] (the double's knobs); `extra` adds sections at the end.
    """
    if "claim_timeout" not in spool:  # rare heartbeats (3600 s) need a claim_timeout of 3 of them
        spool += f"\nclaim_timeout = {max(600.0, 3 * heartbeat)}"
    path.write_text(f"""
[spool]
root = "{root}"
host_id = "{host}"
settle_seconds = {settle}
poll_seconds = 0.05
{spool}

[engine]
adapter = "tests.fake_engine:EchoEngine"
model = "fake-model"
max_inflight = {inflight}
{engine}
[engine.args]
delay = {delay}
{args}

[heartbeat]
seconds = {heartbeat}

[events]
endpoint = "ipc://{path.parent}/{path.stem}.sock"
progress_seconds = {progress}

[metrics]
listen = ""
{extra}
""")
    return path


def spoold_env(plan: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    if plan is not None:
        env["SPOOLD_TORTURE"] = json.dumps(plan)
    return env


def start(config: Path, log: Path, plan: dict | None = None) -> subprocess.Popen:
    """`spoold run`, wrapped by tests/torture/oswrap.py when there is a plan."""
    module = "tests.torture.oswrap" if plan is not None else "spoold"
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", module, "run", "--config", str(config)],
                                stdout=f, stderr=subprocess.STDOUT, env=spoold_env(plan),
                                cwd=REPO, start_new_session=True)


def idle(root: Path, drops: list[Drop]) -> bool:
    """No drop waiting, no job in processing/, and every drop finished somewhere."""
    if any(p.name.endswith(".jsonl") for p in _entries(root / "inbox")):
        return False
    if any(p.is_dir() for host in _entries(root / "processing") for p in _entries(host)):
        return False
    if _entries(root / "groups"):  # a split batch not assembled yet
        return False
    return len(_entries(root / "outbox")) + len(_entries(root / "failed")) >= len(drops)


def run_until_idle(config: Path, root: Path, drops: list[Drop], log: Path, plan: dict | None = None,
                   timeout: float = 60) -> int:
    """Run a daemon until the spool is idle, then SIGTERM it; returns its exit code."""
    proc = start(config, log, plan)
    try:
        deadline = time.monotonic() + timeout
        while not idle(root, drops):
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited {proc.returncode} before the spool was idle:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"spool not idle after {timeout}s:\n{tail(log)}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=30)
    finally:
        _reap(proc)


def run_to_crash(config: Path, root: Path, drops: list[Drop], log: Path, plan: dict,
                 timeout: float = 60) -> bool:
    """Run a wrapped daemon that kills itself at its planned step; False if it got idle first."""
    proc = start(config, log, plan)
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if idle(root, drops):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
                return False
            if time.monotonic() > deadline:
                raise AssertionError(f"no crash and no idle spool after {timeout}s:\n{tail(log)}")
            time.sleep(0.01)
        return proc.returncode == -signal.SIGKILL
    finally:
        _reap(proc)


def kill_after(config: Path, log: Path, seconds: float) -> None:
    """Start a daemon and SIGKILL it (engine and all) after `seconds`."""
    proc = start(config, log)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass
    _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def job_of(root: Path, where: str, name: str) -> Path | None:
    """The job in `root/where` (outbox, failed) made from the drop `name`, if there is one yet."""
    for job in _entries(root / where):
        try:
            batch = json.loads((job / "batch.json").read_text())
        except (OSError, ValueError):
            continue
        if batch.get("drop", {}).get("name", batch["input_file"]) == name:  # the name as dropped
            return job
    return None


def _entries(d: Path) -> list[Path]:
    try:
        return [p for p in d.iterdir() if not p.name.startswith(".")]
    except FileNotFoundError:
        return []


# -- the invariant ---------------------------------------------------------

@dataclass
class Verdict:
    """Lines lost and doubled, and anything else that broke the invariant."""

    lost: int = 0
    doubled: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.problems)


def verdict(root: Path, drops: list[Drop]) -> Verdict:
    """Check the invariant on an idle spool."""
    v = Verdict()
    left = [p for host in _entries(root / "processing") for p in _entries(host) if p.is_dir()]
    if left:
        v.problems.append(f"left in processing/: {[p.name for p in left]}")
    waiting = [p.name for p in _entries(root / "inbox") if p.name.endswith(".jsonl")]
    if waiting:
        v.problems.append(f"left in the inbox: {waiting}")
    jobs = _jobs_by_drop(root / "outbox")
    failed = _jobs_by_drop(root / "failed")
    for drop in drops:
        if drop.fails_with:
            _check_failed(drop, failed.pop(drop.name, []), jobs.pop(drop.name, []), v)
            continue
        found = jobs.get(drop.name, [])
        if len(found) != 1:
            v.problems.append(f"{drop.name}: {len(found)} jobs in outbox/")
            v.lost += len(drop.valid_ids) + len(drop.bad_lines) if not found else 0
            continue
        check_job(found[0], drop, v)
    if failed:
        v.problems.append(f"in failed/: {[p.name for found in failed.values() for p in found]}")
    return v


def _jobs_by_drop(directory: Path) -> dict[str, list[Path]]:
    jobs: dict[str, list[Path]] = {}
    for job in _entries(directory):
        try:
            batch = json.loads((job / "batch.json").read_text())
        except (OSError, ValueError):
            batch = {"input_file": f"{job.name} (no readable batch.json)"}
        jobs.setdefault(batch.get("drop", {}).get("name", batch["input_file"]), []).append(job)
    return jobs


def _check_failed(drop: Drop, failed: list[Path], finished: list[Path], v: Verdict) -> None:
    """A drop that cannot be read: exactly one failed job, saying why, holding the drop; none finished."""
    if len(failed) != 1 or finished:
        v.problems.append(f"{drop.name}: {len(failed)} jobs in failed/, {len(finished)} in outbox/ "
                          "(expected 1 and 0)")
        return
    batch = json.loads((failed[0] / "batch.json").read_text())
    codes = [e.get("code") for e in batch.get("errors", [])]
    if batch["status"] != "failed" or codes != [drop.fails_with]:
        v.problems.append(f"{failed[0].name}: batch.json says {batch['status']} {codes}, "
                          f"expected failed [{drop.fails_with}]")
    if not (failed[0] / "input.jsonl").exists():
        v.problems.append(f"{failed[0].name}: the failed drop's input.jsonl is gone")


def check_job(job: Path, drop: Drop, v: Verdict) -> None:
    """Add one finished job's lost and doubled lines (and other faults) to `v`."""
    out = Counter(o["custom_id"] for o in read_jsonl(job / "output.jsonl"))
    errs = Counter(e["error"]["line"] for e in read_jsonl(job / "errors.jsonl"))
    v.doubled += sum(n - 1 for n in out.values()) + sum(n - 1 for n in errs.values())
    v.lost += len(drop.valid_ids - set(out)) + len(drop.bad_lines - set(errs))
    extra = (set(out) - drop.valid_ids) | {f"line {n}" for n in set(errs) - drop.bad_lines}
    if extra:
        v.problems.append(f"{job.name}: results for lines that should have none: {sorted(extra)[:5]}")
    batch = json.loads((job / "batch.json").read_text())
    counts = batch["request_counts"]
    total = len(drop.valid_ids) + len(drop.bad_lines)
    if batch["status"] != "completed" or counts["total"] != total or counts["completed"] + counts["failed"] != total:
        v.problems.append(f"{job.name}: batch.json says {batch['status']} {counts}, expected {total} lines")


def save_result(fault: str, trials: int, v: Verdict, note: str = "") -> None:
    """Keep one fault class's figures for the README's Reliability table."""
    doc = {"fault": fault, "trials": trials, "lost": v.lost, "doubled": v.doubled,
           "problems": len(v.problems), "note": note}
    save_figures("".join(c if c.isalnum() else "_" for c in fault.lower())[:60], doc)


def save_figures(name: str, doc: dict) -> None:
    """Keep a measurement for the README (`make reliability` puts them there)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")


def merge(verdicts: list[Verdict]) -> Verdict:
    total = Verdict()
    for v in verdicts:
        total.lost += v.lost
        total.doubled += v.doubled
        total.problems += v.problems
    return total


# -- power cuts -------------------------------------------------------------

def snapshot(root: Path) -> dict:
    """The spool before the daemon starts, all of it durable: identities, entries, bytes, mtimes."""
    dirs, files, mtimes = {}, {}, {}

    def walk(path: Path) -> str:
        st = os.lstat(path)
        ident = f"{st.st_ino}.0"
        entries = {}
        for e in os.scandir(path):
            if e.is_dir(follow_symlinks=False):
                entries[e.name] = [walk(Path(e.path)), "d"]
            else:
                est = e.stat(follow_symlinks=False)
                fid = f"{est.st_ino}.0"
                files[fid] = Path(e.path).read_bytes()
                mtimes[fid] = est.st_mtime_ns
                entries[e.name] = [fid, "f"]
        dirs[ident] = entries
        return ident

    return {"root": walk(root), "dirs": dirs, "files": files, "mtimes": mtimes}


def read_record(path: Path) -> list[dict]:
    """The wrapped daemon's log; a last line cut short by its SIGKILL is dropped."""
    entries = []
    for line in path.read_text().split("\n"):
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def rebuild(initial: dict, record: list[dict], cut: int, dest: Path, rng: random.Random) -> None:
    """The spool as a power cut after record[cut - 1] leaves it.

    Only what was made durable survives: a file keeps the bytes of its last
    fsync (plus, sometimes, a torn piece of what was written after it), a
    directory keeps the entries of its last fsync. A new or renamed entry
    whose directory was never fsynced afterwards is gone, or still in its
    old place.
    """
    dirs, files, mtimes = dict(initial["dirs"]), dict(initial["files"]), dict(initial["mtimes"])
    for entry in record[:cut]:
        if entry["op"] == "fsync_dir":
            dirs[entry["id"]] = entry["entries"]
        elif entry["op"] == "fsync_file":
            files[entry["id"]] = base64.b64decode(entry["data"])
            mtimes[entry["id"]] = entry["mtime_ns"]  # a file's mtime is as durable as its bytes
    later: dict[str, bytes] = {}
    for entry in record[cut:]:
        if entry["op"] == "fsync_file" and entry["id"] not in later:
            later[entry["id"]] = base64.b64decode(entry["data"])

    def contents(ident: str) -> bytes:
        data = files.get(ident, b"")
        newer = later.get(ident)
        if newer is not None and newer.startswith(data) and len(newer) > len(data) and rng.random() < 0.5:
            data = newer[:rng.randint(len(data), len(newer))]  # written back in part before the cut
        return data

    made: dict[str, Path] = {}

    def build(ident: str, path: Path, depth: int = 0) -> None:
        path.mkdir()
        for name, (child, kind) in dirs.get(ident, {}).items():
            if kind == "d" and depth < 8:
                build(child, path / name, depth + 1)
            elif kind == "f" and child in made:
                os.link(made[child], path / name)  # one file in two directories: a rename cut short
            elif kind == "f":
                made[child] = path / name
                (path / name).write_bytes(contents(child))
                if child in mtimes:
                    os.utime(path / name, ns=(mtimes[child],) * 2)

    dest.parent.mkdir(parents=True, exist_ok=True)
    build(initial["root"], dest)


def announced(record: list[dict], cut: int) -> tuple[dict[str, int], set[str]]:
    """What the daemon had announced before the cut: lines done per job, and completed jobs."""
    done: dict[str, int] = {}
    completed: set[str] = set()
    for entry in record[:cut]:
        if entry["op"] != "announce":
            continue
        if entry["topic"] == "spoold.job.completed":
            completed.add(entry["job"])
        elif entry.get("done") is not None:
            done[entry["job"]] = max(done.get(entry["job"], 0), entry["done"])
    return done, completed


def published(root: Path, job_id: str) -> bool:
    """Whether a job is in outbox/; a part of a split batch: in its group's done/, or its batch in outbox/."""
    group_id, _, number = job_id.rpartition("-part")
    if group_id and number.isdigit():
        return (root / "outbox" / group_id).is_dir() or any(root.glob(f"groups/*/done/{job_id}"))
    return (root / "outbox" / job_id).is_dir()


def _part_ids(group: Path) -> list[str]:
    try:
        return [p["id"] for p in json.loads((group / "batch.json").read_text()).get("parts") or []]
    except (OSError, ValueError):
        return []


def durable_lines(root: Path, job_id: str) -> int | None:
    """Complete result lines a job holds in a rebuilt spool; None if the job is nowhere.

    A split batch's validation errors are in its group's directory until it
    is assembled, and its lines so far are those and its parts' (the batch's
    combined progress announces them). A part of it may be in its group's
    done/, or assembled into its batch in outbox/: then the batch's result
    lines in the part's range of the original's line numbers count (its
    validation errors among them).
    """
    for job in [*root.glob(f"processing/*/{job_id}"), root / "outbox" / job_id,
                *root.glob(f"groups/*/done/{job_id}"), root / "groups" / job_id]:
        if job.is_dir():
            n = 0
            for name in ("output.jsonl", "errors.jsonl"):
                try:
                    n += (job / name).read_bytes().count(b"\n")
                except FileNotFoundError:
                    pass
            if job == root / "groups" / job_id:
                n += sum(durable_lines(root, part_id) or 0 for part_id in _part_ids(job))
            return n
    group_id, _, number = job_id.rpartition("-part")
    batch = root / "outbox" / group_id / "batch.json"
    if not group_id or not number.isdigit() or not batch.exists():
        return None
    parts = json.loads(batch.read_text())["parts"]
    at = next(i for i, p in enumerate(parts) if p["id"] == job_id)
    first, end = parts[at]["first_line"], parts[at + 1]["first_line"] if at + 1 < len(parts) else float("inf")
    lines = [int(re.fullmatch(OUTPUT_ID, r["id"]).group(1)) for r in read_jsonl(root / "outbox" / group_id / "output.jsonl")]
    lines += [r["error"]["line"] for r in read_jsonl(root / "outbox" / group_id / "errors.jsonl")]
    return sum(first <= line < end for line in lines)
