"""`spoold demo` as a person runs it on a fresh machine: no GPU, no network."""

import os
import re
import subprocess
import sys

import pytest

from ..helpers import REPO

pytestmark = pytest.mark.vllm


def test_demo_runs_the_main_job_and_says_where_the_results_are(tiny_model, tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(REPO / ".cache" / "demo-home"), TMPDIR=str(tmp_path))
    # Reuse the tiny model the other tests built instead of building it again.
    cache = REPO / ".cache" / "demo-home" / "spoold"
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "tiny-llama").exists():
        os.symlink(tiny_model, cache / "tiny-llama")
    result = subprocess.run([sys.executable, "-m", "spoold", "demo", "--lines", "40"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Done: 40 answered, 2 failed, of 42 lines" in result.stdout
    assert "4/4 done: 100%" in result.stderr  # the bar ends saying so, not "loading model" at 100%
    # the bar shows no rate: counted from its start, it took the model's load for the job's ('1.84s/line'
    # above '129.7 req/s'); the summary's rate is the job's own
    assert not re.search(r"s/line|line/s", result.stderr)
    assert re.search(r"of 42 lines \(\d+\.\d req/s\)", result.stdout)
    output = re.search(r"results: (\S+)", result.stdout).group(1)
    assert os.path.exists(output)
    assert "[engine]" in result.stdout and "model =" in result.stdout
