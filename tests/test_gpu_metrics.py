"""pynvml's code path on a machine without a GPU: a worker process loads a
fake ``libnvidia-ml.so.1`` (tests/fake_nvml, compiled here) through the real
pynvml and exports used and free VRAM per GPU."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from baton.dev.testing import LocalStack, http_get, metric

SOURCE = Path(__file__).parent / "fake_nvml" / "fake_nvml.c"
GIB = 2**30


@pytest.fixture(scope="module")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the fake NVML library")
    out = tmp_path_factory.mktemp("nvml")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out / "libnvidia-ml.so.1"), str(SOURCE)],
                   check=True)  # fmt: skip
    return out


def test_worker_exports_used_and_free_vram_per_gpu(stack: LocalStack, fake_nvml: Path) -> None:
    worker = stack.worker(
        LD_LIBRARY_PATH=str(fake_nvml),
        FAKE_NVML_GPUS="2",
        FAKE_NVML_TOTAL=str(24 * GIB),
        FAKE_NVML_USED=str(3 * GIB),
    )
    try:
        worker.wait_ready()
        deadline = time.monotonic() + 20
        while metric(worker.url, "baton_worker_gpu_memory_free_bytes", gpu="1") == 0:
            assert time.monotonic() < deadline, "no GPU memory figures exported"
            time.sleep(0.25)
        used = [metric(worker.url, "baton_worker_gpu_memory_used_bytes", gpu=g) for g in "01"]
        free = [metric(worker.url, "baton_worker_gpu_memory_free_bytes", gpu=g) for g in "01"]
        assert used == [3 * GIB, 6 * GIB]
        assert free == [21 * GIB, 18 * GIB]
        assert metric(worker.url, "baton_worker_gpu_memory_used_bytes", gpu="2") == 0
    finally:
        worker.terminate(timeout=20)
        stack.procs.remove(worker)


def test_no_gpu_figures_without_nvml(stack: LocalStack) -> None:
    # The session's worker has no NVML library: it exports no GPU series.
    worker = next(p for p in stack.procs if p.name == "inference-worker")
    assert "baton_worker_gpu_memory_free_bytes{" not in http_get(f"{worker.url}/metrics")
