"""The SGLang CPU compat patches, one by one (no server needed)."""

import importlib.metadata
import sys

import pytest

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
