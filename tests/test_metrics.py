import importlib.util
import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from spoold.metrics import Metrics

from .helpers import REPO


def test_textfile_holds_spoold_metrics_and_gpu_readings(tmp_path):
    metrics = Metrics(CollectorRegistry())
    metrics.requests.labels("completed").inc(5)
    metrics.set_gpus([{"index": 0, "utilization_pct": 97, "memory_used_bytes": 1, "memory_total_bytes": 2,
                       "temperature_c": 60, "power_w": 300.5}])
    metrics.write_textfile(str(tmp_path / "spoold.prom"))
    text = (tmp_path / "spoold.prom").read_text()
    assert 'spoold_requests_total{result="completed"} 5.0' in text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["spoold_gpu_utilization_ratio"] == 0.97 and samples["spoold_gpu_power_watts"] == 300.5


def test_the_grafana_dashboard_only_queries_metrics_that_exist():
    dashboard = json.loads((REPO / "packaging" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b(spoold_[a-z_]+|vllm:[a-z_:]+)", e)}
    registry = CollectorRegistry()
    Metrics(registry)
    ours = {s.name for f in registry.collect() for s in f.samples} | {f.name for f in registry.collect()}
    for name in names:
        if name.startswith("spoold_"):
            assert name in ours, f"dashboard queries {name}, which spoold does not export"
    # vLLM is installed wherever the tests run (make test installs it): found by import, never skipped.
    source = Path(importlib.util.find_spec("vllm.v1.metrics.loggers").origin).read_text()
    assert names - ours, "the dashboard queries no vLLM metric: this check would check nothing"
    for name in names - ours:
        assert f'"{name.removesuffix("_total")}"' in source, f"vLLM has no metric {name}"


def test_a_port_per_gpu_index_is_base_plus_index_and_a_bad_one_is_not_fatal(caplog):
    from spoold.metrics import listen_port

    assert listen_port("9470+10") == 9480 and listen_port("9464") == 9464
    for bad in ("94710", "abc", "0"):
        with pytest.raises(ValueError):
            listen_port(bad)
    Metrics(CollectorRegistry()).serve("127.0.0.1:94710")  # spoold@10 before: OverflowError killed the daemon
    assert "cannot serve metrics" in caplog.text
