"""GPU memory through pynvml (nvidia-ml-py), when a GPU is present."""

from __future__ import annotations

from typing import NamedTuple

import structlog

log = structlog.get_logger("inference_worker.gpu")


class GpuMemory(NamedTuple):
    used: int
    free: int
    total: int


class GpuMonitor:
    """Reads per-GPU memory; ``available`` is False on CPU-only machines
    (no NVIDIA driver: pynvml cannot load ``libnvidia-ml.so.1``)."""

    def __init__(self) -> None:
        self.available = False
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.available = pynvml.nvmlDeviceGetCount() > 0
        except Exception as exc:  # no driver, no device: a CPU machine
            log.info("no_gpu", reason=str(exc) or type(exc).__name__, kv_figures="engine")

    def memory(self) -> dict[str, GpuMemory]:
        """Bytes used / free / total per GPU index (empty without a GPU)."""
        if not self.available or self._nvml is None:
            return {}
        nv = self._nvml
        out = {}
        for i in range(nv.nvmlDeviceGetCount()):
            info = nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i))
            out[str(i)] = GpuMemory(int(info.used), int(info.free), int(info.total))
        return out
