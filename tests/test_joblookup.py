"""Where a job is, found from the name of the file a person submitted."""

import calendar
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from spoold.config import SpoolSettings
from spoold.joblookup import MAX_SHOWN, hint
from spoold.spool import Spool, new_job_id

from .helpers import as_nobody


def at(day: int, hour: int) -> float:
    return calendar.timegm((2026, 12, day, hour, 0, 0))


def make_spool(tmp_path) -> Spool:
    spool = Spool(SpoolSettings(root=tmp_path / "spool", host_id="gpu1"))
    spool.ensure_dirs()
    return spool


def job(parent, drop_name: str, when: float) -> str:
    job_id = new_job_id(drop_name, when)
    (parent / job_id).mkdir(parents=True)
    return job_id


def test_a_drop_name_lists_its_jobs_newest_first_with_where_each_is(tmp_path):
    spool = make_spool(tmp_path)
    old = job(spool.outbox, "scores.jsonl", at(1, 9))
    failed = job(spool.failed, "scores.jsonl", at(2, 9))
    running = job(spool.host_dir, "scores.jsonl", at(3, 9))
    split = job(spool.root / "groups", "scores.jsonl", at(4, 9))
    job(spool.outbox, "scores-old.jsonl", at(5, 9))  # another drop whose name starts the same
    job(spool.outbox, "my-scores.jsonl", at(5, 9))

    said = hint(spool, "scores.jsonl")
    assert said == (f"jobs from drops named scores.jsonl, newest first: {split} (running, split across daemons), "
                    f"{running} (running on gpu1), {failed} (failed whole, in failed/: `spoold status` says why), "
                    f"{old} (finished, in outbox/)")
    assert hint(spool, "/home/ana/data/scores.jsonl") == said
    assert hint(spool, "scores") == said.replace("named scores.jsonl", "named scores")


def test_the_jobs_of_a_second_drop_of_the_same_file_are_listed_as_copies(tmp_path):
    spool = make_spool(tmp_path)
    first = job(spool.outbox, "scores.jsonl", at(1, 9))
    second = job(spool.host_dir, "scores-2.jsonl", at(1, 10))  # submitted again while the first waited
    job(spool.outbox, "scores-2026.jsonl", at(1, 11))  # a dated file of its own, not a copy
    job(spool.outbox, "scores-2-final.jsonl", at(1, 11))

    assert hint(spool, "scores.jsonl") == (
        f"jobs from drops named scores.jsonl (or scores-2.jsonl, ..., as `spoold submit` names another while one "
        f"waits), newest first: {second} (running on gpu1), {first} (finished, in outbox/)")
    # the copy typed by its own name is no copy of anything
    assert hint(spool, "scores-2.jsonl") == f"the job from a drop named scores-2.jsonl: {second} (running on gpu1)"


def test_one_job_is_named_as_one_and_a_long_list_is_cut(tmp_path):
    spool = make_spool(tmp_path)
    only = job(spool.outbox, "leads.jsonl", at(1, 0))
    assert hint(spool, "leads.jsonl") == f"the job from a drop named leads.jsonl: {only} (finished, in outbox/)"

    daily = [job(spool.outbox, "daily.jsonl", at(1, hour)) for hour in range(MAX_SHOWN + 3)]
    said = hint(spool, "daily.jsonl")
    assert all(job_id in said for job_id in daily[-MAX_SHOWN:]) and daily[0] not in said
    assert said.endswith("and 3 older")


def test_a_job_id_says_where_it_is_and_a_queued_drop_says_it_has_no_id_yet(tmp_path):
    spool = make_spool(tmp_path)
    running = job(spool.host_dir, "a.jsonl", at(1, 0))
    assert hint(spool, running) == f"{running} is running on gpu1"
    assert hint(spool, f"{spool.host_dir}/{running}/") == (f"{running} is running on gpu1: name it by its id "
                                                           "alone, without the directory")

    (spool.inbox / "b.jsonl").write_text("{}\n")
    assert hint(spool, "b.jsonl") == (f"b.jsonl is queued in {spool.inbox}/, not claimed yet: it has no job id "
                                      "until a daemon claims it")
    assert "queued" not in (hint(spool, "a.jsonl") or "")


def test_nothing_by_that_name_gives_no_hint(tmp_path):
    spool = make_spool(tmp_path)
    job(spool.outbox, "a.jsonl", at(1, 0))
    (spool.inbox / "notes.txt").write_text("not a drop")
    for typed in ("nope", "", "..", "notes.txt", "../outbox", "a.jsonl.part"):
        assert hint(spool, typed) is None, typed


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_a_user_who_may_not_look_into_processing_is_told_what_they_may_see():
    base = Path(tempfile.mkdtemp(prefix="spoold-lookup-"))  # not under pytest's tmp_path, which is root's alone
    try:
        base.chmod(0o755)
        spool = Spool(SpoolSettings(root=base, host_id="gpu1"))
        spool.ensure_dirs()
        for d, mode in ((spool.inbox, 0o755), (spool.processing, 0o750), (spool.outbox, 0o755), (spool.failed, 0o755)):
            d.chmod(mode)  # as packaged: processing/ is the daemon's
        finished = job(spool.outbox, "scores.jsonl", at(1, 0))
        job(spool.host_dir, "scores.jsonl", at(2, 0))
        said = as_nobody(lambda: hint(spool, "scores.jsonl"))
        assert said == {"ok": f"the job from a drop named scores.jsonl: {finished} (finished, in outbox/)"}
    finally:
        shutil.rmtree(base, ignore_errors=True)
