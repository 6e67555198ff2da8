"""GPU memory through pynvml (nvidia-ml-py), when a GPU is present."""

from __future__ import annotations

import structlog

log = structlog.get_logger("inference_worker.gpu")


class GpuMonitor:
    """Reads per-GPU memory; ``available`` is False on CPU-only machines."""

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

    def memory_used(self) -> dict[str, int]:
        """Bytes in use per GPU index (empty without a GPU)."""
        if not self.available or self._nvml is None:
            return {}
        nv = self._nvml
        return {
            str(i): int(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i)).used)
            for i in range(nv.nvmlDeviceGetCount())
        }
