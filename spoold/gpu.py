"""GPU readings from NVML (pynvml); absent, quietly, where there is no NVML."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class GpuReader:
    """Reads utilisation, memory, temperature and power of each visible GPU."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as e:  # no driver, no library, no GPU: readings are absent
            log.debug("NVML not available: %s", e)

    def read(self) -> list[dict[str, Any]]:
        """One dict per GPU; [] without NVML or when a reading fails."""
        nvml = self._nvml
        if nvml is None:
            return []
        try:
            gpus = []
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                util = nvml.nvmlDeviceGetUtilizationRates(h)
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                gpus.append({
                    "index": i,
                    "name": _text(nvml.nvmlDeviceGetName(h)),
                    "utilization_pct": util.gpu,
                    "memory_used_bytes": mem.used,
                    "memory_total_bytes": mem.total,
                    "temperature_c": nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
                    "power_w": nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                })
            return gpus
        except Exception as e:
            log.debug("NVML reading failed: %s", e)
            return []


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def process_tree_mib() -> float:
    """Resident memory of this process and all its children (an engine's workers), in MiB.

    What an engine holds on a machine without NVML, and the host memory it
    holds beside the GPU's: the check that unloading a model really frees it.
    """
    import psutil

    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # exited while we looked
            continue
    return round(total / 2**20, 1)
