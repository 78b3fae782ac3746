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
