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
