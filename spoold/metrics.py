"""Prometheus metrics: spoold's own, beside vLLM's, in one process registry.

vLLM's in-process engine registers its `vllm:*` metrics in prometheus_client's
default registry; spoold's `spoold_*` metrics go in the same one, so one
scrape of `[metrics] listen` (or one node_exporter textfile) has both.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

GPU_GAUGES = {
    "utilization_pct": ("spoold_gpu_utilization_ratio", "GPU busy share (0..1)", 0.01),
    "memory_used_bytes": ("spoold_gpu_memory_used_bytes", "GPU memory in use", 1),
    "memory_total_bytes": ("spoold_gpu_memory_total_bytes", "GPU memory in all", 1),
    "temperature_c": ("spoold_gpu_temperature_celsius", "GPU temperature", 1),
    "power_w": ("spoold_gpu_power_watts", "GPU power draw", 1),
}


class Metrics:
    """spoold's metric families and the ways they are exported."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.jobs = Gauge("spoold_jobs", "Jobs by state (queued: drops in the inbox; processing: this "
                          "host's claimed jobs; running: those running now)", ["state"], registry=registry)
        self.jobs_finished = Counter("spoold_jobs_finished", "Jobs finished by this daemon, by outcome",
                                     ["status"], registry=registry)
        self.requests = Counter("spoold_requests", "Lines durably finished, by result",
                                ["result"], registry=registry)
        self.inflight = Gauge("spoold_requests_inflight", "Requests handed to the engine, not yet answered",
                              registry=registry)
        self.rate = Gauge("spoold_requests_per_second", "Durable lines per second, over the running jobs",
                          registry=registry)
        self.tokens_rate = Gauge("spoold_output_tokens_per_second", "Output tokens per second, over the running jobs",
                                 registry=registry)
        self.job_total = Gauge("spoold_job_lines", "Lines of the running jobs", registry=registry)
        self.job_done = Gauge("spoold_job_lines_done", "Lines of the running jobs with a durable result",
                              registry=registry)
        self.last_progress = Gauge("spoold_last_progress_timestamp_seconds",
                                   "When the last result became durable", registry=registry)
        self.stalled = Gauge("spoold_stalled", "1 while in-flight work makes no progress for "
                             "[watchdog] stall_seconds", registry=registry)
        self.webhooks = Counter("spoold_webhook_deliveries", "Webhook tries: delivered, failed (to be retried), "
                                "given_up (past [webhooks] max_age_seconds)", ["result"], registry=registry)
        self.swaps = Counter("spoold_model_swaps", "Models unloaded to load another one", registry=registry)
        self.loop_failures = Counter("spoold_loop_failures", "Background loops (heartbeat, progress, watchdog) "
                                     "that failed and were restarted", ["loop"], registry=registry)
        self.gpu = {key: Gauge(name, doc, ["gpu"], registry=registry) for key, (name, doc, _) in GPU_GAUGES.items()}
        for state in ("queued", "processing", "running"):
            self.jobs.labels(state)
        for result in ("completed", "failed"):
            self.requests.labels(result)
            self.jobs_finished.labels(result)

    def serve(self, listen: str) -> None:
        """Serve /metrics on HOST:PORT; "" turns it off. A busy or bad port is logged, not fatal.

        PORT may be `BASE+N` (`9470+%i` in spoold@.service: one port per GPU
        index, however many GPUs).
        """
        if not listen:
            return
        from prometheus_client import start_http_server

        host, _, port_text = listen.rpartition(":")
        try:
            port = listen_port(port_text)
            start_http_server(port, addr=host or "127.0.0.1", registry=self.registry)
            log.info("metrics on http://%s:%s/metrics", host or "127.0.0.1", port)
        except (OSError, ValueError, OverflowError) as e:
            log.error("cannot serve metrics on %s: %s (the daemon goes on without them)", listen, e)

    def write_textfile(self, path: str) -> None:
        """Write the node_exporter textfile (atomically, as node_exporter wants)."""
        if not path:
            return
        from prometheus_client import write_to_textfile

        try:
            write_to_textfile(path, self.registry)
        except OSError as e:
            log.warning("cannot write metrics textfile %s: %s", path, e)

    def set_gpus(self, gpus: list[dict[str, Any]]) -> None:
        """Record the latest NVML readings (nothing where there is no NVML)."""
        for gpu in gpus:
            for key, (_, _, scale) in GPU_GAUGES.items():
                self.gpu[key].labels(str(gpu["index"])).set(gpu[key] * scale)


def listen_port(text: str) -> int:
    """A TCP port from `PORT` or `BASE+N`; ValueError names what is wrong."""
    try:
        port = sum(int(part) for part in text.split("+"))
    except ValueError:
        raise ValueError(f"port {text!r} is not a number (or BASE+N)") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {text!r} is {port}, outside 1-65535")
    return port
