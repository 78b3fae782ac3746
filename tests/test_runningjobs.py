"""How a running job's end becomes a verdict, and what the daemon does with each one."""

import asyncio
import errno
import signal
from pathlib import Path

from spoold.config import Config, EngineSettings, SpoolSettings
from spoold.daemon import Daemon
from spoold.engine import EngineDead
from spoold.jobrunner import IncompleteJob
from spoold.lifecycle import Outcome
from spoold.runningjobs import JobEnd, Trouble
from spoold.writer import JobLost

from .fake_engine import EchoEngine

LINE = ('{"custom_id": "a%d", "method": "POST", "url": "/v1/chat/completions", '
        '"body": {"model": "fake-model", "messages": []}}\n')


def make_daemon(tmp_path, **args) -> Daemon:
    config = Config(spool=SpoolSettings(root=tmp_path / "spool", host_id="h"),
                    engine=EngineSettings(adapter="tests.fake_engine:EchoEngine", model="fake-model", args=args))
    daemon = Daemon(config, EchoEngine(config.engine))
    daemon.spool.ensure_dirs()
    return daemon


def run_one_job(daemon: Daemon, lines: int = 3) -> list[JobEnd]:
    """Claim one drop and run it beside nothing; the verdicts the daemon was handed."""
    ends, act = [], daemon.jobs.on_end
    daemon.jobs.on_end = lambda end: (ends.append(end), act(end))
    (daemon.spool.inbox / "d.jsonl").write_text("".join(LINE % i for i in range(lines)))

    async def go():
        daemon._stop = asyncio.Event()
        daemon._start(await daemon.work.claim("d.jsonl"))
        await daemon.jobs.settle()
    asyncio.run(go())
    return ends


def test_a_job_that_completes_ends_with_no_trouble_and_the_daemon_goes_idle(tmp_path):
    daemon = make_daemon(tmp_path)
    (end,) = run_one_job(daemon)
    assert end.outcome is Outcome.COMPLETED and end.trouble is None
    assert len(daemon.jobs) == 0 and daemon.state == "idle" and daemon._trouble is None


def test_an_engine_that_dies_under_a_job_makes_the_daemon_replace_it(tmp_path):
    daemon = make_daemon(tmp_path, fail_all=True)
    (end,) = run_one_job(daemon)
    assert end.trouble is Trouble.ENGINE and "engine died" in end.reason
    assert daemon._trouble == end.reason  # the loop replaces the engine next
    assert daemon.jobs.window.closed  # and sends the dead one nothing more
    assert daemon.pause.reason is None


class _Job:
    id = "j1"
    path = Path("/spool/processing/h/j1")


class _Runner:
    """A runner whose run ends in `error`: the ends a real job reaches only by a fault."""

    def __init__(self, error):
        self.job, self.error = _Job(), error

    async def run(self):
        raise self.error


def ending(tmp_path, error) -> JobEnd:
    daemon = make_daemon(tmp_path)
    return asyncio.run(daemon.jobs._ending(_Runner(error)))


def test_a_failing_disk_is_a_pause_naming_the_job_and_the_error(tmp_path):
    end = ending(tmp_path, OSError(errno.ENOSPC, "No space left on device", "/spool/out"))
    assert end.trouble is Trouble.DISK and end.outcome is Outcome.INTERRUPTED
    assert end.reason == "job j1: No space left on device (/spool/out)"


def test_a_job_taken_over_by_another_host_is_left_alone(tmp_path):
    end = ending(tmp_path, JobLost("moved"))
    assert end.trouble is None and end.outcome is Outcome.INTERRUPTED


def test_a_job_with_lines_left_unanswered_or_a_bug_is_stuck_until_the_next_start(tmp_path):
    assert ending(tmp_path, IncompleteJob("2 lines have no result")).trouble is Trouble.STUCK
    assert ending(tmp_path, KeyError("a bug")).trouble is Trouble.STUCK
    assert ending(tmp_path, EngineDead("gone")).trouble is Trouble.ENGINE


def test_the_daemon_acts_on_each_verdict(tmp_path):
    daemon = make_daemon(tmp_path)
    daemon._job_ended(JobEnd("j1", Outcome.INTERRUPTED, Trouble.STUCK, "bug"))
    assert "j1" in daemon.work.stuck and daemon.pause.reason is None
    daemon._job_ended(JobEnd("j2", Outcome.INTERRUPTED, Trouble.DISK, "job j2: No space left on device"))
    assert daemon.pause.reason == "job j2: No space left on device" and daemon._trouble is None


def test_a_job_paused_for_a_swap_as_the_daemon_is_told_to_stop_is_told_it_resumes_on_the_next_start(
        tmp_path, caplog):
    daemon = make_daemon(tmp_path, delay=0.05)
    ends, act = [], daemon.jobs.on_end
    daemon.jobs.on_end = lambda end: (ends.append(end), act(end))
    (daemon.spool.inbox / "d.jsonl").write_text("".join(LINE % i for i in range(1000)))

    async def go():
        daemon._stop = asyncio.Event()
        daemon._start(await daemon.work.claim("d.jsonl"))
        assert daemon.jobs.pause_all() == 1  # a swap is due; then SIGTERM, before the job has settled
        daemon._on_signal(signal.SIGTERM)
        await daemon.jobs.settle()
    with caplog.at_level("INFO", logger="spoold"):
        asyncio.run(go())
    (end,) = ends
    assert end.outcome is Outcome.INTERRUPTED and not end.waits_from_now  # before: PAUSED, waiting for a swap back
    assert "resumes on the next start" in caplog.text and "loaded again" not in caplog.text
