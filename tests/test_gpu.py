import logging

from spoold.gpu import GpuReader
from spoold.heartbeat import status_line
from spoold.jobrunner import JobProgress


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
    line = status_line(p, 0, gpus)
    assert line.startswith("batch_5k: 1762/5000 (35%)") and line.endswith("GPU 97%")
    assert status_line(None, 3, []) == "idle, 3 queued"
