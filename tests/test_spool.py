import json
import os
import shutil
import time

import pytest

from spoold.config import SpoolSettings
from spoold.spool import DropRefused, JobDir, Spool, is_drop_name


def make_spool(tmp_path, host="h1"):
    spool = Spool(SpoolSettings(root=tmp_path / "spool", host_id=host))
    spool.ensure_dirs()
    return spool


def test_drop_names():
    assert is_drop_name("batch.jsonl")
    for name in (".batch.jsonl", "batch.jsonl.tmp", "batch.jsonl.part", "batch.jsonl~", "batch.json", "x.jsonl.ready"):
        assert not is_drop_name(name)


def test_claim_moves_the_drop_into_a_job_dir_with_batch_json(tmp_path):
    spool = make_spool(tmp_path)
    (spool.inbox / "b.jsonl").write_text("{}\n")
    (spool.inbox / "b.jsonl.ready").touch()
    job = spool.claim_drop("b.jsonl")
    assert job.path.parent == spool.host_dir
    assert job.id.startswith("b-")
    assert job.input.read_text() == "{}\n"
    assert not (spool.inbox / "b.jsonl").exists()
    assert not (spool.inbox / "b.jsonl.ready").exists()
    batch = job.read_batch()
    assert batch["status"] == "validating" and batch["input_file"] == "b.jsonl" and batch["host"] == "h1"
    assert oct(job.batch.stat().st_mode & 0o777) == "0o640"


def test_only_one_of_two_hosts_claims_a_drop(tmp_path):
    a, b = make_spool(tmp_path, "a"), make_spool(tmp_path, "b")
    (a.inbox / "x.jsonl").write_text("{}\n")
    claims = [a.claim_drop("x.jsonl"), b.claim_drop("x.jsonl")]
    assert sum(c is not None for c in claims) == 1
    assert os.listdir(b.host_dir) == []  # the loser leaves nothing behind


def test_symlink_is_never_followed_and_goes_to_failed(tmp_path):
    spool = make_spool(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    os.symlink(secret, spool.inbox / "evil.jsonl")
    with pytest.raises(DropRefused) as refused:
        spool.claim_drop("evil.jsonl")
    (failed,) = list(spool.failed.iterdir())
    assert refused.value.job.path == failed
    batch = JobDir(failed).read_batch()
    assert batch["status"] == "failed" and "not a regular file" in batch["errors"][0]["message"]
    assert os.path.islink(failed / "input.jsonl")
    assert secret.read_text() == "do not read"


def test_half_made_claim_is_cleaned_up(tmp_path):
    spool = make_spool(tmp_path)
    (spool.host_dir / "x-20260101T000000-abcdef").mkdir()
    real = spool.host_dir / "y-20260101T000000-abcdef"
    real.mkdir()
    (real / "input.jsonl").write_text("{}\n")
    (real / "batch.json").write_text(json.dumps({"created_at": 1}))
    assert [j.id for j in spool.host_jobs()] == [real.name]
    assert not (spool.host_dir / "x-20260101T000000-abcdef").exists()


def test_move_to_outbox_is_one_rename(tmp_path):
    spool = make_spool(tmp_path)
    (spool.inbox / "b.jsonl").write_text("{}\n")
    job = spool.claim_drop("b.jsonl")
    moved = spool.move_to_outbox(job)
    assert moved.path == spool.outbox / job.id and moved.input.exists()
    assert not job.path.exists()


def test_recovery_removes_what_a_power_cut_left_in_two_places(tmp_path):
    spool, other = make_spool(tmp_path), make_spool(tmp_path, "h2")
    for name in ("published.jsonl", "claimed.jsonl", "taken.jsonl"):
        (spool.inbox / name).write_text("{}\n")
    published, claimed, taken = (spool.claim_drop(n) for n in ("published.jsonl", "claimed.jsonl", "taken.jsonl"))
    shutil.copytree(published.path, spool.outbox / published.id)          # outbox entry made durable
    os.link(claimed.input, spool.inbox / "claimed.jsonl")                  # inbox entry not yet removed
    shutil.copytree(taken.path, other.host_dir / taken.id)                 # old owner's entry not yet removed
    (spool.inbox / "new.jsonl").write_text("{}\n")                          # a real new drop stays
    (claimed.path / ".batch.json.1234.tmp").write_text("half")
    jobs = spool.recover()
    assert sorted(j.id for j in jobs) == sorted([claimed.id, taken.id])
    assert not published.path.exists() and (spool.outbox / published.id).is_dir()
    assert sorted(os.listdir(spool.inbox)) == ["new.jsonl"]
    assert not (other.host_dir / taken.id).exists()
    assert not list(claimed.path.glob(".*.tmp"))


def test_recovery_keeps_a_resubmission_that_only_looks_like_the_claimed_drop(tmp_path):
    spool = make_spool(tmp_path)
    (spool.inbox / "again.jsonl").write_text("{}\n")
    job = spool.claim_drop("again.jsonl")
    shutil.copy2(job.input, spool.inbox / "again.jsonl")  # `cp -p` / `rsync -a`: same size and mtime
    spool.recover()
    assert (spool.inbox / "again.jsonl").exists()


def test_a_job_id_that_is_taken_is_never_reused(tmp_path, monkeypatch):
    spool = make_spool(tmp_path)
    (spool.inbox / "same.jsonl").write_text('{"first": 1}\n')
    first = spool.claim_drop("same.jsonl")
    ids = iter([first.id, "same-20261201T000000-0123456789abcdef"])  # another host picked the same id first
    monkeypatch.setattr("spoold.spool.new_job_id", lambda name: next(ids))
    (spool.inbox / "same.jsonl").write_text('{"second": 2}\n')
    second = spool.claim_drop("same.jsonl")
    assert second.id != first.id
    assert first.input.read_text() == '{"first": 1}\n' and second.input.read_text() == '{"second": 2}\n'


def test_a_peer_is_judged_by_its_files_changing_here_not_by_their_timestamps(tmp_path):
    from spoold.spool import PeerClocks

    spool, peer = make_spool(tmp_path), make_spool(tmp_path, "h2")
    (peer.inbox / "p.jsonl").write_text("{}\n")
    job = peer.claim_drop("p.jsonl")
    future = time.time() + 100 * 365 * 86400  # a skewed clock, or a forged heartbeat
    for path in (peer.host_dir / "heartbeat.json", job.heartbeat):
        path.write_text("{}")
        os.utime(path, (future, future))
    clocks = PeerClocks()
    assert spool.orphaned_jobs(0.05, clocks) == []  # the first look starts the clock
    time.sleep(0.1)
    assert [j.path for j, _ in spool.orphaned_jobs(0.05, clocks)] == [job.path]
    job.heartbeat.write_text('{"beat": 2}')  # it beats again: alive
    assert spool.orphaned_jobs(0.05, clocks) == []


def test_a_late_write_of_the_old_owner_lands_nowhere_after_a_takeover(tmp_path):
    spool, peer = make_spool(tmp_path), make_spool(tmp_path, "h2")
    (peer.inbox / "p.jsonl").write_text("{}\n")
    job = peer.claim_drop("p.jsonl")
    job.output.write_text('{"line": 1}\n')
    stuck = os.open(job.output, os.O_WRONLY | os.O_APPEND)  # the old owner's descriptor
    taken = spool.take_over(job)
    os.write(stuck, b'{"line": 2}\n')  # its write, stuck until after the takeover
    os.close(stuck)
    assert taken.output.read_text() == '{"line": 1}\n'


def test_a_failed_drop_left_in_the_inbox_by_a_power_cut_fails_only_once(tmp_path):
    spool = make_spool(tmp_path)
    (spool.inbox / "moved.jsonl").write_text("{}\n")
    os.link(spool.inbox / "moved.jsonl", tmp_path / "elsewhere")  # two links: it fails as not_regular
    with pytest.raises(DropRefused):
        spool.claim_drop("moved.jsonl")
    (failed,) = list(spool.failed.iterdir())
    os.link(failed / "input.jsonl", spool.inbox / "moved.jsonl")  # the inbox entry a cut brought back
    assert spool.claim_drop("moved.jsonl") is None
    assert list(spool.failed.iterdir()) == [failed] and not (spool.inbox / "moved.jsonl").exists()


def test_a_results_group_the_daemon_cannot_use_is_refused_with_what_to_do(monkeypatch):
    import grp

    from spoold.spool import check_results_group

    with pytest.raises(ValueError, match="no group 'no-such-group-here'"):
        check_results_group("no-such-group-here")
    check_results_group("")  # none set: nothing to check
    other = next(g for g in grp.getgrall() if g.gr_gid not in (0, os.getegid()))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # as an unprivileged daemon not in the group
    monkeypatch.setattr(os, "getgroups", lambda: [])
    with pytest.raises(ValueError, match=f"not in group '{other.gr_name}'.*usermod -aG"):
        check_results_group(other.gr_name)
    monkeypatch.setattr(os, "getgroups", lambda: [other.gr_gid])
    check_results_group(other.gr_name)


def test_job_directories_get_the_results_group_and_failed_ones_the_daemons(tmp_path):
    import grp

    group = next(g for g in grp.getgrall() if g.gr_gid != os.getegid())
    if os.geteuid() != 0 and group.gr_gid not in os.getgroups():
        pytest.skip("needs a group this user may chown to")
    (tmp_path / "processing" / "h").mkdir(parents=True)  # made before [spool] group was set
    spool = Spool(SpoolSettings(root=tmp_path, host_id="h", group=group.gr_name))
    spool.ensure_dirs()
    assert os.stat(spool.host_dir).st_gid == group.gr_gid  # the group may look in: what runs, its progress
    (spool.inbox / "a.jsonl").write_text("{}\n")
    job = spool.claim_drop("a.jsonl")
    assert os.stat(job.path).st_gid == group.gr_gid
    assert os.stat(spool.move_to_outbox(job).path).st_gid == group.gr_gid
    os.chown(spool.failed, -1, group.gr_gid)
    os.chmod(spool.failed, 0o2750)  # as packaged: setgid, so new entries would get the results group
    os.symlink("/etc/hostname", spool.inbox / "l.jsonl")
    with pytest.raises(DropRefused):
        spool.claim_drop("l.jsonl")
    (refused,) = spool.failed.iterdir()
    assert os.stat(refused).st_gid == os.getegid()
    (spool.inbox / "b.jsonl").write_text("{}\n")
    given_up = spool.move_to_failed(spool.claim_drop("b.jsonl"))
    assert os.stat(given_up.path).st_gid == os.getegid()


def _api_batch(spool, batch_id="batch_" + "A" * 24):
    from spoold.apibatch import ApiBatch

    spool.batches.mkdir()
    ApiBatch(batch_id, "alice", "file-" + "F" * 24, "/v1/chat/completions", "24h", 1, 86401,
             "file-" + "O" * 24, "file-" + "E" * 24, {"priority": "7"}).save(spool.batches)
    (spool.inbox / f"{batch_id}.jsonl").write_text('{"custom_id": "a"}\n')
    return batch_id


def test_a_drop_the_api_made_becomes_the_job_of_its_batch_id_owner_and_request(tmp_path):
    spool = make_spool(tmp_path)
    batch_id = _api_batch(spool)
    job = spool.claim_drop(f"{batch_id}.jsonl")
    record = job.read_record()[0]
    assert job.id == batch_id and record.tenant == "alice" and record.weight() == 7
    assert (record.input_file_id, record.output_file_id, record.completion_window, record.expires_at) == (
        "file-" + "F" * 24, "file-" + "O" * 24, "24h", 86401)


def test_a_submitters_drop_under_a_batchs_name_is_an_ordinary_job_of_nobody(tmp_path):
    spool = make_spool(tmp_path)
    batch_id = _api_batch(spool)
    os.chown(spool.inbox / f"{batch_id}.jsonl", 12345, 12345)  # someone else's file
    job = spool.claim_drop(f"{batch_id}.jsonl")
    record = job.read_record()[0]
    assert job.id != batch_id and record.tenant == "" and record.input_file_id is None and record.weight() == 1


def test_a_batch_record_someone_else_wrote_is_not_believed(tmp_path):
    spool = make_spool(tmp_path)
    batch_id = _api_batch(spool)
    os.chown(spool.batches / f"{batch_id}.json", 12345, 12345)
    job = spool.claim_drop(f"{batch_id}.jsonl")
    assert job.id != batch_id and job.read_record()[0].tenant == ""


def test_a_cancel_asked_for_a_job_that_ends_first_leaves_the_inbox_with_the_job(tmp_path):
    # its owner's `spoold cancel` removes it itself, unless it was stopped while it waited
    spool = make_spool(tmp_path)
    for name in ("a.jsonl", "b.jsonl"):
        (spool.inbox / name).write_text("{}\n")
    done, failed = spool.claim_drop("a.jsonl"), spool.claim_drop("b.jsonl")
    for job in (done, failed):
        spool.ask_owner_cancel(job.id)
    spool.move_to_outbox(done)
    spool.move_to_failed(failed)
    assert sorted(p.name for p in spool.inbox.iterdir()) == []

    # a directory by that name (a submitter's) is left as any stray entry is, and fails no publish
    (spool.inbox / "c.jsonl").write_text("{}\n")
    job = spool.claim_drop("c.jsonl")
    spool.owner_cancel_request(job.id).mkdir()
    assert spool.move_to_outbox(job).path.is_dir() and spool.owner_cancel_request(job.id).is_dir()


def test_a_cancel_asked_for_in_the_inbox_counts_only_as_a_plain_file_of_the_jobs_owner(tmp_path):
    spool = make_spool(tmp_path)
    (spool.inbox / "a.jsonl").write_text("{}\n")
    os.chown(spool.inbox / "a.jsonl", 1000, 1000)  # a submitter's drop
    job = spool.claim_drop("a.jsonl")
    request = spool.owner_cancel_request(job.id)
    assert request.parent == spool.inbox and not is_drop_name(request.name)  # never claimed as a drop

    os.symlink(job.input, request)  # a link is never followed, nor removed: a stray entry like any other
    assert not spool.owner_cancel_asked(job.id) and not spool.take_owner_cancel(job)
    assert request.is_symlink() and not job.cancel_request.exists()
    request.unlink()

    request.write_text("")
    os.chown(request, 1001, 1001)  # another submitter
    assert spool.owner_cancel_asked(job.id) and not spool.take_owner_cancel(job)
    assert not request.exists() and not job.cancel_request.exists()

    request.write_text("")
    os.chown(request, 1000, 1000)  # the owner
    assert spool.take_owner_cancel(job)
    assert not request.exists() and job.cancel_request.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="files of other owners need root")
def test_the_person_a_retry_was_made_for_may_cancel_it_but_not_one_part_of_a_split_batch(tmp_path):
    spool = make_spool(tmp_path)

    def asked_by(uid, job):
        request = spool.owner_cancel_request(job.id)
        request.write_text("")
        os.chown(request, uid, uid)
        return spool.take_owner_cancel(job)

    (spool.inbox / "a-retry.jsonl").write_text("{}\n")  # root's drop, as `sudo spoold retry` leaves it
    retry = spool.claim_drop("a-retry.jsonl")
    record = retry.read_record()[0]
    record.submitter_uid = 1000  # the claim found it retries alice's job: hers, as she may retry it again
    spool.save(retry, record)
    assert not asked_by(1001, retry) and asked_by(1000, retry) and retry.cancel_request.exists()

    (spool.inbox / "big.jsonl").write_text("{}\n")
    part = spool.claim_drop("big.jsonl")  # as a part's input is, the daemon's
    record = part.read_record()[0]
    record.submitter_uid, record.group = 1000, {"id": "big", "part": 1, "parts": 2, "first_line": 1}
    spool.save(part, record)
    assert not asked_by(1000, part) and not part.cancel_request.exists()  # her batch is cancelled whole


def _as_claimed_before_submitters_were_kept(job):
    doc = json.loads(job.batch.read_text())
    del doc["submitter_uid"]
    job.batch.write_text(json.dumps(doc))


def test_a_job_claimed_before_submitters_were_kept_shares_as_its_owner_once_resumed_or_taken_over(tmp_path):
    from spoold.jobrecord import user_tenant

    spool, other = make_spool(tmp_path), make_spool(tmp_path, "h2")
    for name in ("resumed.jsonl", "taken.jsonl"):
        (spool.inbox / name).write_text("{}\n")
    resumed, old = spool.claim_drop("resumed.jsonl"), other.claim_drop("taken.jsonl")
    for job in (resumed, old):
        _as_claimed_before_submitters_were_kept(job)
        assert job.read_record()[0].share_tenant() == ""  # a tenant of its own beside its owner's new drops
    spool.recover()
    taken = spool.take_over(old)
    for job in (resumed, taken):
        record = job.read_record()[0]
        assert (record.submitter_uid, record.share_tenant()) == (os.getuid(), user_tenant(os.getuid()))


def test_an_api_batch_and_a_part_of_a_split_batch_keep_whose_they_are_when_resumed(tmp_path):
    spool = make_spool(tmp_path)
    batch = spool.claim_drop(f"{_api_batch(spool)}.jsonl")
    (spool.inbox / "part.jsonl").write_text("{}\n")
    part = spool.claim_drop("part.jsonl")
    record = part.read_record()[0]
    record.submitter_uid, record.group = None, {"id": "big-20261201T000000-0123456789abcdef", "part": 1,
                                                "parts": 2, "first_line": 1}
    spool.save(part, record)  # a part claimed before: its input is the daemon's, not its submitter's
    before = {job.id: job.batch.read_bytes() for job in (batch, part)}
    spool.recover()
    assert {job.id: job.batch.read_bytes() for job in (batch, part)} == before
