import io

from rich.console import Console
from rich.progress import Progress

from spoold.viewer import JobBars, bar_columns


def test_names_that_look_like_markup_are_shown_as_they_are():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    bars = JobBars()
    with Progress(*bar_columns(), console=console, auto_refresh=False) as progress:
        bars.show(progress, "spoold.job.claimed", {"seq": 1, "job": "j1", "input_file": "[/x].jsonl"})
        bars.show(progress, "spoold.job.progress", {"seq": 2, "job": "j1", "input_file": "[bold]a\nb.jsonl",
                                                    "state": "in_progress", "total": 4, "done": 1})
        progress.refresh()
    text = out.getvalue()
    assert "claimed [/x].jsonl as j1" in text
    assert "[bold]a\\x0ab.jsonl [in_progress]" in text


def test_every_running_job_gets_a_bar_and_an_ended_one_leaves_them():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    bars = JobBars()
    jobs = [{"job": f"j{i}", "input_file": f"b{i}.jsonl", "state": "in_progress", "total": 10, "done": i}
            for i in range(3)]
    with Progress(*bar_columns(), console=console, auto_refresh=False) as progress:
        bars.show(progress, "spoold.daemon.heartbeat", {"seq": 1, "host": "h", "state": "working", "jobs": jobs})
        assert [t.description for t in progress.tasks] == [f"b{i}.jsonl [in_progress]" for i in range(3)]
        counts = {"total": 10, "completed": 4, "failed": 1}
        bars.show(progress, "spoold.job.completed", {"seq": 2, "job": "j0", "input_file": "b0.jsonl",
                                                     "request_counts": counts})
        bars.show(progress, "spoold.job.cancelled", {"seq": 3, "job": "j1", "input_file": "b1.jsonl",
                                                     "request_counts": counts})
        bars.show(progress, "spoold.job.failed", {"seq": 4, "job": "j2", "input_file": "b2.jsonl",
                                                  "errors": [{"message": "not JSONL"}]})
        assert progress.tasks == []
    text = out.getvalue()
    assert "completed b0.jsonl: 4 ok, 1 failed of 10" in text
    assert "cancelled b1.jsonl: 5 of 10 lines have a result" in text and "FAILED b2.jsonl: not JSONL" in text


def test_more_jobs_than_the_terminal_has_rows_for_share_one_last_row():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200, height=10)  # 7 rows for bars
    bars = JobBars()
    jobs = [{"job": f"j{i:02d}", "input_file": f"b{i:02d}.jsonl", "state": "in_progress", "total": 100,
             "done": i, "requests_per_second": 2.5} for i in range(12)]
    with Progress(*bar_columns(), console=console, auto_refresh=False) as progress:
        bars.show(progress, "spoold.daemon.heartbeat", {"seq": 1, "host": "h", "state": "working", "jobs": jobs})
        shown = [(t.description, t.completed, t.total, t.fields["rate"]) for t in progress.tasks if t.visible]
        assert shown == [(f"b{i:02d}.jsonl [in_progress]", i, 100, "2.5 req/s") for i in range(6)] + [
            ("... and 6 more jobs", sum(range(6, 12)), 600, "15.0 req/s")]
        screen = Console(file=io.StringIO(), width=200)
        screen.print(progress.get_renderable())
        assert "... and 6 more jobs" in screen.file.getvalue() and "b06.jsonl" not in screen.file.getvalue()
        for i in range(5):
            bars.show(progress, "spoold.job.completed", {"seq": 2 + i, "job": f"j{i:02d}", "input_file": "",
                                                         "request_counts": {"total": 100, "completed": 100,
                                                                            "failed": 0}})
        assert [t.description for t in progress.tasks if t.visible] == [
            f"b{i:02d}.jsonl [in_progress]" for i in range(5, 12)]  # seven fit: no row for the rest
    assert len(progress.tasks) == 7


def test_a_split_batch_is_one_bar_with_its_parts_counted_not_a_bar_per_part():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    bars = JobBars()
    part = {"job": "big-1-part0002", "group": "big-1", "input_file": "big.jsonl", "state": "in_progress",
            "total": 1000, "done": 400}
    whole = {"job": "big-1", "input_file": "big.jsonl", "state": "in_progress", "total": 3000, "done": 1400,
             "parts": 3, "parts_done": 1}
    with Progress(*bar_columns(), console=console, auto_refresh=False) as progress:
        bars.show(progress, "spoold.job.progress", {"seq": 1, **part})
        bars.show(progress, "spoold.job.progress", {"seq": 2, **whole})
        bars.show(progress, "spoold.daemon.heartbeat", {"seq": 3, "host": "h", "state": "working", "jobs": [part]})
        assert [(t.description, t.completed, t.total) for t in progress.tasks] == [
            ("big.jsonl [in_progress] 1/3 parts", 1400, 3000)]
        counts = {"total": 1000, "completed": 1000, "failed": 0}
        bars.show(progress, "spoold.job.completed", {"seq": 4, "job": "big-1-part0002", "group": "big-1",
                                                     "input_file": "big.jsonl", "request_counts": counts})
        assert len(progress.tasks) == 1, "a part's end ended the batch's bar"
        bars.show(progress, "spoold.job.completed", {"seq": 5, "job": "big-1", "input_file": "big.jsonl", "parts": 3,
                                                     "request_counts": dict(counts, total=3000, completed=3000)})
        assert progress.tasks == []
    text = out.getvalue()
    assert "completed big.jsonl (part0002): 1000 ok" in text and "completed big.jsonl: 3000 ok" in text
