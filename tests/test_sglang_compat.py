"""The SGLang CPU compat patches, one by one (no server needed)."""

import importlib.metadata
import sys

import pytest
import torch.distributed  # noqa: F401  (loaded before any test's clean_meta_path snapshot)

from megatron_opd.compat import sglang_cpu


@pytest.fixture
def clean_meta_path():
    saved_path, saved_mods = list(sys.meta_path), dict(sys.modules)
    yield
    sys.meta_path[:] = saved_path
    for k in list(sys.modules):
        if k not in saved_mods:
            del sys.modules[k]


def test_stand_in_answers_imports_only_when_the_real_module_is_absent(clean_meta_path):
    assert sglang_cpu._install_stand_in("megatron_opd_absent_pkg") is True
    import megatron_opd_absent_pkg.sub.deeper as mod  # noqa: F401  (submodules resolve too)
    from megatron_opd_absent_pkg import SomeKernel

    assert mod.__megatron_opd_stand_in__
    chained = SomeKernel.Mode.BICUBIC  # import-time attribute chains evaluate
    with pytest.raises(RuntimeError, match="stand-in"):
        chained()
    assert importlib.metadata.version("megatron_opd_absent_pkg") == sglang_cpu.STAND_IN_VERSION
    # a real, importable module is never shadowed
    assert sglang_cpu._install_stand_in("json") is False
    assert sglang_cpu._install_stand_in("megatron_opd_absent_pkg") is False  # idempotent


def test_named_patches_target_sgl_kernel_and_torchvision(clean_meta_path):
    sglang_cpu.patch_sgl_kernel_stand_in()
    sglang_cpu.patch_torchvision_stand_in()
    import sgl_kernel
    import torchvision.transforms as T

    assert sgl_kernel.__megatron_opd_stand_in__ and T.__megatron_opd_stand_in__
    from packaging.version import Version

    assert Version(importlib.metadata.version("torchvision")) < Version("0.27")


def test_install_is_a_no_op_with_cuda(monkeypatch, clean_meta_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = list(sys.meta_path)
    assert sglang_cpu.install_sglang_cpu_compat() == []
    assert sys.meta_path == before


def test_rendezvous_store_listens_on_the_host_it_is_given(monkeypatch):
    """SGLang's scheduler creates its torch.distributed store through
    `torch.distributed.rendezvous._create_c10d_store` (`tcp://<--host>:<port>`): upstream's
    server listens on every interface, the patched one on that host only."""
    import importlib
    import os
    from datetime import timedelta

    from megatron_opd.procs import free_port
    from tests.net_listeners import beyond_loopback, listeners

    rendezvous = importlib.import_module("torch.distributed.rendezvous")  # (the module)
    me, timeout = [os.getpid()], timedelta(seconds=30)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setattr(rendezvous, "_create_c10d_store", rendezvous._create_c10d_store)
    upstream = rendezvous._create_c10d_store("127.0.0.1", free_port(), 0, 1, timeout)
    assert any(port == upstream.port for _, port, _ in beyond_loopback(me))
    del upstream
    assert sglang_cpu.patch_rendezvous_store_binds_its_host() is True
    assert sglang_cpu.patch_rendezvous_store_binds_its_host() is False  # once
    port = free_port()
    store = rendezvous._create_c10d_store("127.0.0.1", port, 0, 1, timeout)
    assert {p: a for a, p, _ in listeners(me)}[port] == "127.0.0.1"
    client = rendezvous._create_c10d_store("127.0.0.1", port, 1, 2, timeout)  # rank 1: upstream
    client.set("k", "v")
    assert store.get("k") == b"v"
    assert not beyond_loopback(me)


class _ServerArgs:
    """What SGLang 0.5.23 hands `_server_args_for_logging`: the record with its launch command."""
    launch_command = ("--host 127.0.0.1 --port 30000 --model-path /models/student --dtype "
                      "float32 --max-total-tokens 16384 --skip-server-warmup --device cpu "
                      "--attention-backend torch_native --sleep-on-idle --weight-version 0")


def test_server_args_log_line_is_short_and_wrapped():
    import types

    def upstream(server_args):  # sglang 0.5.23: every resolved field, one dict
        return {f"field_{i}": f"value {i}" * 3 for i in range(546)}

    engine = types.ModuleType("engine")
    engine._server_args_for_logging = upstream
    assert len(f"server_args={upstream(_ServerArgs())}") > 15000
    assert sglang_cpu._short_server_args_log(engine) is True
    assert sglang_cpu._short_server_args_log(engine) is False  # once
    line = f"server_args={engine._server_args_for_logging(_ServerArgs())}"
    rows = line.splitlines()
    assert len(line) < 600 and all(len(r) <= sglang_cpu.LOG_LINE_WIDTH + 12 for r in rows), rows
    assert "546 resolved fields" in rows[0] and "/server_info" in rows[0]
    assert " ".join(r.strip() for r in rows).endswith(_ServerArgs.launch_command)
