"""GPU utilisation, memory and power from NVML (nvidia-ml-py, imported as `pynvml`).

    metrics = GpuMetrics()      # never raises
    metrics.sample()            # {"gpu/0/util": 87.0, "gpu/0/mem_used_gib": 61.2, ...} or {}
    metrics.close()

Per device index i (NVML numbering, which ignores CUDA_VISIBLE_DEVICES; pass `devices` to pick):
- gpu/i/util          % of the last sample period during which a kernel ran
- gpu/i/mem_used_gib  device memory in use (GiB, all processes)
- gpu/i/mem_total_gib device memory size (GiB)
- gpu/i/power_w       board power draw (W)
Without pynvml, without the NVML library (CPU machines) or without a GPU, `sample()` returns {}.
A metric a device does not support (NVML raises NotSupported) is left out; nothing raises.
"""

from __future__ import annotations

import importlib

GIB = 1024 ** 3


class GpuMetrics:
    def __init__(self, devices: list[int] | None = None):
        self._wanted = devices
        self._nvml = None
        self._handles: list[tuple[int, object]] = []
        self._started = False
        self.unavailable_reason: str | None = None

    def _start(self) -> None:
        self._started = True
        try:
            nvml = importlib.import_module("pynvml")
        except Exception as e:
            self.unavailable_reason = f"pynvml not importable: {type(e).__name__}: {e}"
            return
        try:
            nvml.nvmlInit()
        except Exception as e:
            self.unavailable_reason = f"NVML init failed: {type(e).__name__}: {e}"
            return
        try:
            count = int(nvml.nvmlDeviceGetCount())
            indices = (range(count) if self._wanted is None
                       else [i for i in self._wanted if 0 <= i < count])
            self._handles = [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
        except Exception as e:
            self.unavailable_reason = f"NVML device query failed: {type(e).__name__}: {e}"
            self._handles = []
        if not self._handles:
            self.unavailable_reason = self.unavailable_reason or "no GPU"
            try:
                nvml.nvmlShutdown()
            except Exception:
                pass
            return
        self._nvml = nvml

    @property
    def available(self) -> bool:
        if not self._started:
            self._start()
        return self._nvml is not None

    def sample(self) -> dict[str, float]:
        if not self.available:
            return {}
        nvml, out = self._nvml, {}
        for i, handle in self._handles:
            prefix = f"gpu/{i}/"
            try:
                out[prefix + "util"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:
                pass
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                out[prefix + "mem_used_gib"] = mem.used / GIB
                out[prefix + "mem_total_gib"] = mem.total / GIB
            except Exception:
                pass
            try:
                out[prefix + "power_w"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW
            except Exception:
                pass
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self._nvml, self._handles = None, []

    def __enter__(self) -> "GpuMetrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
