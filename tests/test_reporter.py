"""The reporter measures and tells; its stall verdicts are what the daemon acts on."""

import asyncio
import time
from dataclasses import replace

from spoold.config import Config, SpoolSettings, WatchdogSettings
from spoold.gpu import GpuReader
from spoold.progress import JobProgress
from spoold.lifecycle import DaemonState, JobStatus
from spoold.notify import Notifier
from spoold.reporter import Reporter, Shown
from spoold.spool import Spool


class Events:
    def __init__(self):
        self.sent = []

    def publish(self, topic, payload):
        self.sent.append((topic, payload))


class Running:
    """What the reporter reads of a job runner: its progress."""

    def __init__(self, progress):
        self.progress = progress

    def refresh(self):
        return self.progress


def make(tmp_path, stall=60.0, restart=600.0):
    config = Config(spool=SpoolSettings(root=tmp_path, host_id="h"),
                    watchdog=WatchdogSettings(stall_seconds=stall, restart_seconds=restart))
    spool = Spool(config.spool)
    spool.ensure_dirs()
    return Reporter(config, spool, Notifier(), GpuReader(), events=Events())


def progress(idle_for, inflight=4):
    return JobProgress("job-1", "a.jsonl", JobStatus.IN_PROGRESS, total=10, done=3, inflight=inflight,
                       last_progress_at=time.time() - idle_for)


def test_no_result_for_stall_seconds_is_a_stall_and_for_restart_seconds_a_hung_engine(tmp_path):
    report = make(tmp_path, stall=60, restart=600)
    assert not report.progress(Running(progress(10))).stalled
    stall = report.progress(Running(progress(120)))
    assert stall.stalled and not stall.hung and report.stalled
    assert [t for t, _ in report.events.sent].count("spoold.engine.stalled") == 1
    report.progress(Running(progress(130)))
    assert [t for t, _ in report.events.sent].count("spoold.engine.stalled") == 1  # once per stall
    assert report.progress(Running(progress(700))).hung
    assert not report.progress(Running(progress(700, inflight=0))).stalled  # nothing asked, nothing late


def test_a_stall_shows_in_the_state_and_the_status_line_a_pause_wins(tmp_path):
    report = make(tmp_path, stall=1)
    runner = Running(progress(5))
    report.progress(runner)
    shown = Shown(DaemonState.WORKING, "m", runners=(runner,), queued=2, retry_seconds=5)
    assert report.shown_state(shown) is DaemonState.STALLED
    assert report.status_line(shown, [runner.progress]).startswith("STALLED: a: 3/10")
    paused = replace(shown, paused="No space left on device")
    assert report.shown_state(paused) is DaemonState.PAUSED
    assert report.status_line(paused, [runner.progress]) == "PAUSED: No space left on device; retrying every 5s"


def test_a_heartbeat_is_on_disk_with_the_shown_state(tmp_path):
    import json

    report = make(tmp_path)
    asyncio.run(report.heartbeat(Shown(DaemonState.IDLE, "m", queued=3)))
    beat = json.loads((tmp_path / "processing" / "h" / "heartbeat.json").read_text())
    assert beat["state"] == "idle" and beat["model"] == "m"
    ((topic, payload),) = report.events.sent
    assert topic == "spoold.daemon.heartbeat" and payload["queued"] == 3


class Ended:
    """What the reporter reads of a job runner at its end: its job, record, progress and assembled batch."""

    def __init__(self, job, record, progress, assembled=None):
        self.job, self.record, self.progress, self.assembled = job, record, progress, assembled

    def refresh(self):
        return self.progress


def test_a_split_batch_is_counted_once_when_assembled_and_its_parts_are_told_as_its_parts(tmp_path):
    from prometheus_client import CollectorRegistry

    from spoold.jobrecord import JobRecord
    from spoold.lifecycle import Outcome
    from spoold.metrics import Metrics
    from spoold.spool import JobDir

    report = make(tmp_path)
    report.metrics = Metrics(CollectorRegistry())
    finished = report.metrics.jobs_finished.labels("completed")
    batch = JobDir(tmp_path / "outbox" / "big-1")
    batch.path.mkdir()
    whole = JobRecord("big-1", "big.jsonl", "h", parts=[{"id": "big-1-part0001"}, {"id": "big-1-part0002"}])
    whole.complete(2000, 0, {}, {})
    whole.save(batch.batch)
    for n, assembled in ((1, None), (2, batch)):
        part = JobRecord(f"big-1-part000{n}", "big.jsonl", "h", group={"id": "big-1", "first_line": 1 + 1000 * (n - 1)})
        part.complete(1000, 0, {}, {})
        told = JobProgress(part.id, "big.jsonl", JobStatus.COMPLETED, total=1000, done=1000, group="big-1")
        report.job_ended(Ended(JobDir(tmp_path / part.id), part, told, assembled), Outcome.COMPLETED)
    ends = [p for t, p in report.events.sent if t == "spoold.job.completed"]
    assert [(p["job"], p.get("group"), p.get("parts")) for p in ends] == [
        ("big-1-part0001", "big-1", None), ("big-1-part0002", "big-1", None), ("big-1", None, 2)]
    assert finished._value.get() == 1, "a split batch's parts were counted as finished jobs beside it"


def test_a_split_batchs_progress_counts_the_part_this_daemon_runs_as_it_stands_not_as_last_beaten(tmp_path):
    """The combined bar of a split batch moves with its part's own: the part this daemon runs is counted
    from what it tells of it, not from its heartbeat ([heartbeat] seconds old); another host's part from
    that host's heartbeat."""
    import dataclasses
    import json

    from spoold.groups import Groups

    from .helpers import chat_line
    from .test_jobrunner import run_job, setup

    spool, job, engine = setup(tmp_path, [chat_line(i) for i in range(6)])
    spool.settings = dataclasses.replace(spool.settings, split_lines=2)
    run_job(spool, job, engine)  # split into three parts of 2 lines
    peer = Spool(dataclasses.replace(spool.settings, host_id="h2"))
    peer.ensure_dirs()
    (theirs, _), = Groups(peer).claimable(set())
    theirs = Groups(peer).claim(theirs)
    theirs.heartbeat.write_text(json.dumps({"job": {"completed": 1, "failed": 0, "requests_per_second": 0.5}}))
    (ours, _), = Groups(spool).claimable(set())
    ours = Groups(spool).claim(ours)
    report = Reporter(Config(spool=spool.settings), spool, Notifier(), GpuReader(), events=Events())
    for done in (1, 2):
        report.progress(Running(JobProgress(ours.id, "batch.jsonl", JobStatus.IN_PROGRESS, total=2, done=done,
                                            completed=done, group=job.id)))
    whole = [p for t, p in report.events.sent if t == "spoold.job.progress" and p["job"] == job.id]
    assert [(p["done"], p["parts"], p["total"]) for p in whole] == [(2, 3, 6), (3, 3, 6)]


def test_a_job_paused_for_a_swap_says_so_on_the_feed_not_running_at_its_last_rate(tmp_path):
    """`spoold watch` shows each job as its last progress event says: a job paused for another model's
    turn (or waiting for its next model) must not look as if it were still running, with an ETA."""
    from spoold.jobrecord import JobRecord
    from spoold.lifecycle import Outcome
    from spoold.spool import JobDir

    report = make(tmp_path)
    for outcome in (Outcome.PAUSED, Outcome.WAITING):
        running = JobProgress("big-1", "big.jsonl", JobStatus.IN_PROGRESS, total=6000, done=1789, inflight=64)
        running.started, running.done_at_start = time.monotonic() - 10, 0  # 178.9 req/s so far
        runner = Ended(JobDir(tmp_path / "big-1"), JobRecord("big-1", "big.jsonl", "h"), running)
        report.job_started(runner)
        report.job_ended(runner, outcome)
        last = [p for t, p in report.events.sent if t == "spoold.job.progress"][-1]
        assert (last["job"], last["state"], last["done"], last["inflight"]) == ("big-1", outcome.value, 1789, 0)
        assert last["requests_per_second"] == 0 and last["eta_seconds"] is None
