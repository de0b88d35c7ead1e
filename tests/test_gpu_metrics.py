"""GpuMetrics: {} without a GPU; names and units parsed from NVML through a stand-in `pynvml`;
on a GPU machine (bench/gpu_suite.sh runs this file there) real readings checked against
torch's own view of the device."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from megatron_opd.gpu_metrics import GIB, GpuMetrics

HAVE_GPU = torch.cuda.is_available() and getattr(torch.version, "hip", None) is None
gpu_only = pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU (bench/gpu_suite.sh)")


class NVMLError(Exception):
    pass


def fake_pynvml(devices: list[dict], init_error: Exception | None = None) -> types.ModuleType:
    """A stand-in for nvidia-ml-py with exactly the calls GpuMetrics makes. Each device dict:
    util (%), used / total (bytes), power (mW); a value of None raises NVMLError (NotSupported)."""
    m = types.ModuleType("pynvml")
    m.calls = []

    def value(i, key):
        v = devices[i][key]
        if v is None:
            raise NVMLError("Not Supported")
        return v

    def init():
        m.calls.append("init")
        if init_error is not None:
            raise init_error

    m.NVMLError = NVMLError
    m.nvmlInit = init
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(
        gpu=value(h[1], "util"), memory=0)
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        used=value(h[1], "used"), total=value(h[1], "total"), free=0)
    m.nvmlDeviceGetPowerUsage = lambda h: value(h[1], "power")
    return m


H100 = dict(util=87, used=int(61.5 * GIB), total=int(79.6 * GIB), power=512_345)


@pytest.mark.skipif(HAVE_GPU, reason="a GPU is present: test_real_readings checks it")
def test_no_gpu_here_returns_empty():
    metrics = GpuMetrics()
    assert metrics.sample() == {}
    assert metrics.sample() == {}  # stays quiet on later calls
    assert not metrics.available
    assert metrics.unavailable_reason
    metrics.close()


def test_pynvml_missing_returns_empty(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    metrics = GpuMetrics()
    assert metrics.sample() == {}
    assert "not importable" in metrics.unavailable_reason


def test_nvml_library_missing_returns_empty(monkeypatch):
    fake = fake_pynvml([H100], init_error=NVMLError("NVML Shared Library Not Found"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    metrics = GpuMetrics()
    assert metrics.sample() == {}
    assert "NVML Shared Library Not Found" in metrics.unavailable_reason


def test_zero_devices_returns_empty_and_shuts_down(monkeypatch):
    fake = fake_pynvml([])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    metrics = GpuMetrics()
    assert metrics.sample() == {}
    assert metrics.unavailable_reason == "no GPU"
    assert fake.calls == ["init", "shutdown"]


def test_names_and_units(monkeypatch):
    second = dict(util=3, used=512 * 1024 ** 2, total=int(139.8 * GIB), power=70_000)
    fake = fake_pynvml([H100, second])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with GpuMetrics() as metrics:
        out = metrics.sample()
        assert fake.calls == ["init"]  # initialised once
        assert metrics.sample() == out
    assert fake.calls == ["init", "shutdown"]
    assert out == pytest.approx({
        "gpu/0/util": 87.0, "gpu/0/mem_used_gib": 61.5, "gpu/0/mem_total_gib": 79.6,
        "gpu/0/power_w": 512.345,
        "gpu/1/util": 3.0, "gpu/1/mem_used_gib": 0.5, "gpu/1/mem_total_gib": 139.8,
        "gpu/1/power_w": 70.0}, rel=1e-9)
    assert all(isinstance(v, float) for v in out.values())


def test_unsupported_metric_is_left_out(monkeypatch):
    fake = fake_pynvml([dict(H100, power=None, util=None)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    out = GpuMetrics().sample()
    assert set(out) == {"gpu/0/mem_used_gib", "gpu/0/mem_total_gib"}


def test_device_selection(monkeypatch):
    fake = fake_pynvml([H100, H100, H100])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    out = GpuMetrics(devices=[2, 7]).sample()  # 7 does not exist: ignored
    assert {k.split("/")[1] for k in out} == {"2"}


def _nvml_index(device: int) -> int:
    """NVML numbers every GPU, CUDA only the visible ones: match by UUID."""
    import pynvml

    uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "")).lower()
    uuid = uuid.removeprefix("gpu-")
    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        for i in range(count):
            got = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            got = (got.decode() if isinstance(got, bytes) else got).lower().removeprefix("gpu-")
            if uuid and got == uuid:
                return i
    finally:
        pynvml.nvmlShutdown()
    if count == 1 and torch.cuda.device_count() == 1:
        return 0
    raise AssertionError(f"CUDA device {device} (uuid {uuid}) not found by NVML")


@gpu_only
def test_real_readings():
    """Every metric is read, in range, and memory agrees with torch's CUDA view: the total within
    2 % of cudaMemGetInfo's (NVML counts a little the driver reserves), and 2 GiB allocated by
    this process show up in mem_used_gib."""
    i = _nvml_index(0)
    free, total = torch.cuda.mem_get_info(0)  # (creates this process's CUDA context first)
    with GpuMetrics(devices=[i]) as metrics:
        before = metrics.sample()
        assert set(before) == {f"gpu/{i}/{k}" for k in ("util", "mem_used_gib", "mem_total_gib",
                                                          "power_w")}, before
        assert before[f"gpu/{i}/mem_total_gib"] == pytest.approx(total / GIB, rel=0.02)
        assert 0.0 <= before[f"gpu/{i}/util"] <= 100.0
        assert 10.0 < before[f"gpu/{i}/power_w"] < 1500.0
        block = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()
        after = metrics.sample()
        grown = after[f"gpu/{i}/mem_used_gib"] - before[f"gpu/{i}/mem_used_gib"]
        assert 1.9 <= grown <= 2.6, (before, after)  # + the allocator's rounding, other processes
        del block
