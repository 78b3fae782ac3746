import logging

from spoold.gpu import GpuReader
from spoold.heartbeat import status_line
from spoold.progress import JobProgress


def test_without_nvml_readings_are_absent_and_quiet(caplog):
    caplog.set_level(logging.INFO)
    reader = GpuReader()
    if reader._nvml is not None:  # a machine with NVML: at least one GPU, with real numbers
        gpus = reader.read()
        assert gpus, "NVML is there but gave no readings"
        for gpu in gpus:
            assert 0 <= gpu["utilization_pct"] <= 100 and gpu["memory_total_bytes"] > 0
        return
    assert reader.read() == [] and reader.read() == []
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_status_line_shows_gpu_use_when_there_is_a_gpu():
    p = JobProgress("batch_5k-1", "batch_5k.jsonl", state="in_progress", total=5000, done=1762)
    gpus = [{"index": 0, "utilization_pct": 97}]
    line = status_line([p], 0, gpus)
    assert line.startswith("batch_5k: 1762/5000 (35%)") and line.endswith("GPU 97%")
    assert status_line([], 3, []) == "idle, 3 queued"


def test_the_status_line_sums_up_several_running_jobs():
    jobs = [JobProgress("big-1", "big.jsonl", state="in_progress", total=170000, done=4210),
            JobProgress("s-1", "s.jsonl", state="in_progress", total=50, done=37),
            JobProgress("v-1", "v.jsonl", state="validating")]
    assert status_line(jobs, 2, []).startswith("3 jobs: 4210/170000 (2%), 37/50, validating; ")
    many = jobs + [JobProgress(f"m-{i}", "m.jsonl", state="in_progress", total=9, done=i) for i in range(5)]
    assert status_line(many, 0, []).startswith("8 jobs: 4210/170000 (2%), 37/50, validating, 0/9, ...; ")
