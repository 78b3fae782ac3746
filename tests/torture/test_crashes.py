"""Crashes at every step, at random steps, and power cuts: nothing lost, nothing doubled.

A fast engine double runs the jobs (the crash windows are in the spool code,
not in the engine); tests/torture/oswrap.py counts the daemon's
file-system steps so a crash can be placed just before any one of them.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .harness import (Drop, announced, durable_lines, make_drop, make_failing_drops, merge, published, read_record,
                      rebuild, run_to_crash, run_until_idle, save_result, snapshot, verdict, write_config)

#: Two trials at a time: each is mostly a Python process starting up.
PARALLEL = 2


def small_spool(root: Path) -> list[Drop]:
    """Two drops, one with bad lines: every kind of step in a few dozen of them."""
    (root / "inbox").mkdir(parents=True)
    return [make_drop(root / "inbox", "alpha.jsonl", 6), make_drop(root / "inbox", "beta.jsonl", 3, bad=False)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One clean, recorded run of the small spool: its steps and what each made durable."""
    return recorded_run(tmp_path_factory.mktemp("reference"), small_spool)


@pytest.fixture(scope="module")
def reference_with_failures(tmp_path_factory):
    """The small spool plus two drops that must fail (one refused at claim, one given up after)."""
    return recorded_run(tmp_path_factory.mktemp("reference-failing"),
                        lambda root: small_spool(root) + make_failing_drops(root))


#: [spool] keys of the split batch's runs: its 5 valid lines become 3 parts.
SPLIT = "split_lines = 2"


def split_spool(root: Path) -> list[Drop]:
    """One drop of 5 valid lines and 2 bad ones, split into parts of 2: split, parts, assembly."""
    (root / "inbox").mkdir(parents=True)
    return [make_drop(root / "inbox", "whole.jsonl", 5)]


@pytest.fixture(scope="module")
def split_reference(tmp_path_factory):
    """One clean, recorded run of a batch split into 3 parts and assembled."""
    return recorded_run(tmp_path_factory.mktemp("reference-split"), split_spool, SPLIT)


def recorded_run(base: Path, make_spool, spool: str = "") -> dict:
    """Run the spool `make_spool` makes to idle under the recording wrapper (`spool`: [spool] keys)."""
    template = base / "template"
    drops = make_spool(template)
    root = base / "spool"
    subprocess.run(["cp", "-a", str(template), str(root)], check=True)  # hard links stay links
    initial = snapshot(root)
    config = write_config(base / "c.toml", root, heartbeat=3600, spool=spool)
    record = base / "record.jsonl"
    run_until_idle(config, root, drops, base / "log", plan={"root": str(root), "record": str(record)})
    v = verdict(root, drops)
    assert v.ok, v
    return {"template": template, "drops": drops, "initial": initial, "record": read_record(record), "base": base,
            "spool": spool}


def crash_then_recover(template: Path, drops: list[Drop], work: Path, step: int,
                       spool: str = "") -> tuple[bool, object]:
    """Crash a daemon just before `step` on a fresh copy of the spool, then run one to idle."""
    root = work / "spool"
    shutil.copytree(template, root)
    config = write_config(work / "c.toml", root, heartbeat=3600, spool=spool)
    crashed = run_to_crash(config, root, drops, work / "log", {"root": str(root), "crash_at": step})
    run_until_idle(config, root, drops, work / "log")
    return crashed, verdict(root, drops)


def test_a_crash_before_each_step_loses_and_doubles_nothing(reference, tmp_path):
    steps = max(e["step"] for e in reference["record"])
    # Steps after the last job reached the outbox (heartbeats while idle,
    # the stop) may not come before the harness stops an idle daemon.
    working = max(e["step"] for e in reference["record"] if e["op"] == "rename" and "/outbox/" in e["dst"])
    with ThreadPoolExecutor(PARALLEL) as pool:
        trials = list(pool.map(lambda n: crash_then_recover(reference["template"], reference["drops"],
                                                            _mkdir(tmp_path / str(n)), n), range(1, steps + 1)))
    crashes = sum(crashed for crashed, _ in trials)
    total = merge([v for _, v in trials])
    save_result("Crash before each fsync, write, rename, mkdir (deterministic walk)", crashes, total,
                f"{steps} steps of a run of 2 jobs at once")
    assert total.ok, total.problems[:5]
    assert working >= 60 and crashes >= working - 5, (steps, working, crashes)
    assert most_jobs_at_once(reference["record"]) == 2, "the walk must cross two jobs running together"


def test_a_crash_before_each_step_of_a_split_batch(split_reference, tmp_path):
    """Through the split (parts staged, committed, the original removed), the parts and the assembly."""
    record = split_reference["record"]
    steps = max(e["step"] for e in record)
    assert any(e["op"] == "rename" and "/groups/" in e["dst"] for e in record), "the run split nothing"
    with ThreadPoolExecutor(PARALLEL) as pool:
        trials = list(pool.map(lambda n: crash_then_recover(split_reference["template"], split_reference["drops"],
                                                            _mkdir(tmp_path / str(n)), n, SPLIT),
                               range(1, steps + 1)))
    crashes = sum(crashed for crashed, _ in trials)
    total = merge([v for _, v in trials])
    save_result("Crash before each step of a batch split in 3 parts and assembled (deterministic walk)", crashes,
                total, f"{steps} steps")
    assert total.ok, total.problems[:5]
    assert crashes >= steps // 2, (steps, crashes)


def test_random_kills_through_many_jobs(tmp_path):
    """One spool, crashed again and again at random steps: claims, validation, commits, finalize.

    A new drop arrives whenever the spool runs dry, so every run has work
    to be killed in, until 130 kills have landed.
    """
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    drops = [make_drop(root / "inbox", f"d{i}.jsonl", 150) for i in range(4)]
    config = write_config(tmp_path / "c.toml", root, inflight=4, delay=0.002)
    rng = random.Random(7)
    kills = 0
    while kills < 130:
        plan = {"root": str(root), "crash_at": rng.randint(1, 70)}
        if run_to_crash(config, root, drops, tmp_path / "log", plan):
            kills += 1
        else:
            drops.append(make_drop(root / "inbox", f"d{len(drops)}.jsonl", 150))
    run_until_idle(config, root, drops, tmp_path / "log")
    v = verdict(root, drops)
    save_result("SIGKILL at a random step, again and again", kills, v,
                f"{len(drops)} jobs of 152 lines")
    assert v.ok, v.problems[:5]


#: Files replaced atomically but never fsynced, by design: the next beat
#: replaces a heartbeat within seconds, and losing one loses no work.
NOT_DURABLE = ("heartbeat.json",)


def test_the_order_of_durable_steps(reference):
    """File fsync before its rename; directory fsync after each rename, mkdir and creation."""
    check_order_of_durable_steps(reference)


def test_the_order_of_durable_steps_of_a_split_batch(split_reference):
    """The same rules through a split and an assembly."""
    check_order_of_durable_steps(split_reference)


def check_order_of_durable_steps(reference: dict) -> None:
    record = [e for e in reference["record"]
              if not (e["op"] == "rename" and os.path.basename(e["dst"]) in NOT_DURABLE)]
    problems = []
    last_write: dict[str, int] = {}
    last_fsync: dict[str, int] = {}
    for i, e in enumerate(record):
        if e["op"] == "write":
            last_write[e["id"]] = i
        elif e["op"] == "fsync_file":
            last_fsync[e["id"]] = i
        elif e["op"] == "rename" and last_write.get(e["id"], -1) > last_fsync.get(e["id"], -1):
            problems.append(f"{e['path']} renamed with unsynced writes")
        needs = {"rename": [e.get("dst_parent"), e.get("src_parent")], "mkdir": [e.get("parent")]}.get(e["op"], [])
        for parent in needs:
            if not _synced_before_next_announcement(record, i, parent):
                problems.append(f"{e['op']} of {e['path']}: its directory not fsynced afterwards")
    created = {e["id"]: i for i, e in enumerate(record) if e["op"] == "create"}
    renamed = {e["id"] for e in record if e["op"] == "rename"}
    for ident, i in created.items():
        if ident in last_fsync and ident not in renamed and not _dir_lists(record, i, ident):
            problems.append(f"{record[i]['path']} created and fsynced, but its entry never made durable")
    assert not problems, problems[:10]
    ops = {e["op"] for e in record}
    assert {"rename", "mkdir", "create", "fsync_file", "fsync_dir", "write", "announce"} <= ops


def _synced_before_next_announcement(record: list[dict], i: int, dir_id: str) -> bool:
    for e in record[i + 1:]:
        if e["op"] == "fsync_dir" and e["id"] == dir_id:
            return True
        if e["op"] == "announce" and _may_depend_on(e, record[i]):
            return False
    return False


def _may_depend_on(announcement: dict, step: dict) -> bool:
    """Whether what was announced may rest on `step`: a job's validation or end, or news naming no job.

    Jobs run at once, so another job's news may come between a step and its
    fsync; and progress counts, which the reporter samples at any moment,
    rest only on the results' fsyncs (the power cuts check those line by line).
    """
    job = announcement.get("job")
    if not job:
        return True
    return announcement["topic"] != "spoold.job.progress" and any(
        job in str(step.get(key, "")) for key in ("path", "dst"))


def _dir_lists(record: list[dict], i: int, ident: str) -> bool:
    return any(e["op"] == "fsync_dir" and any(v[0] == ident for v in e["entries"].values())
               for e in record[i + 1:])


def test_power_cuts_lose_nothing_that_was_counted(reference_with_failures, tmp_path):
    """Rebuild the spool from only what was durable at 50 cut points, restart, check.

    Failed drops too: a cut inside a failure's moves must leave one failed
    job, never two, never none, never the drop back in the inbox for good.
    """
    record = reference_with_failures["record"]
    total = power_cuts(reference_with_failures, 50, tmp_path)
    save_result("Power cut (only fsynced data and fsynced directory entries survive)", 50, total,
                f"{len(record)} steps of a 4-drop run: 2 jobs at once, a hard link refused at claim, a gzip file given up")
    assert total.ok, total.problems[:5]
    assert most_jobs_at_once(record) >= 2, "the cuts must fall while two jobs run together"


def test_power_cuts_through_a_split_and_its_assembly(split_reference, tmp_path):
    """A cut anywhere in a split or an assembly: the original or every part, the group assembled once."""
    total = power_cuts(split_reference, 30, tmp_path)
    save_result("Power cut through a batch split in 3 parts and assembled", 30, total,
                f"{len(split_reference['record'])} steps")
    assert total.ok, total.problems[:5]


def power_cuts(reference: dict, count: int, tmp_path: Path):
    """`count` power cuts at random points of a recorded run, each restarted to idle; their merged verdict."""
    record = reference["record"]
    # After each rename too: a cut between a rename and its directory's fsync
    # is where an entry can survive in two places.
    cuts = [i + 1 for i, e in enumerate(record) if e["op"] in ("fsync_dir", "fsync_file", "announce", "rename")]
    rng = random.Random(11)
    chosen = sorted(rng.sample(cuts, min(count, len(cuts))))
    assert len(chosen) == count

    def trial(cut: int):
        work = _mkdir(tmp_path / str(cut))
        root = work / "spool"
        rebuild(reference["initial"], record, cut, root, random.Random(cut))
        done, completed = announced(record, cut)
        problems = [f"cut {cut}: {job} announced {n} lines, {durable_lines(root, job)} survived"
                    for job, n in done.items() if (durable_lines(root, job) or 0) < n]
        problems += [f"cut {cut}: {job} announced completed, not in outbox/"
                     for job in completed if not published(root, job)]
        config = write_config(work / "c.toml", root, heartbeat=3600, spool=reference["spool"])
        run_until_idle(config, root, reference["drops"], work / "log")
        v = verdict(root, reference["drops"])
        v.problems += problems
        return v

    with ThreadPoolExecutor(PARALLEL) as pool:
        return merge(list(pool.map(trial, chosen)))


def most_jobs_at_once(record: list[dict]) -> int:
    """The most jobs claimed and not yet in outbox/ or failed/ at any one step of a recorded run."""
    running = most = 0
    for e in record:
        if e["op"] == "rename" and "/inbox/" in e["path"] and e["dst"].endswith("/input.jsonl"):
            running += 1
        elif e["op"] == "rename" and ("/outbox/" in e["dst"] or "/failed/" in e["dst"]):
            running -= 1
        most = max(most, running)
    return most


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
