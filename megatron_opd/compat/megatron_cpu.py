"""Run megatron-core on a CPU-only machine (gloo), for tests and the embedded quickstart.

megatron-core calls CUDA directly in many places. Each patch below redirects one such call to its
CPU equivalent, names the upstream target and the version it was written against, and is applied
only by `install_megatron_cpu_compat()` when CUDA is absent (on GPUs nothing is patched). They
patch process-wide state, so only the learner process (never SGLang's) installs them.
"""

from __future__ import annotations


import torch

from megatron_opd.compat import warn_if_untested

TESTED_MEGATRON_CORE = ("0.16.1",)
_installed: set[str] = set()


def patch_cuda_current_device() -> None:
    """Target: `torch.cuda.current_device()` as used by megatron-core 0.16.1 to place buffers
    (e.g. RotaryEmbedding.get_emb moves inv_freq there). Why: without CUDA it raises; "cpu" is a
    valid device argument everywhere megatron passes the result."""
    torch.cuda.current_device = lambda: "cpu"


def patch_cuda_rng_to_cpu() -> None:
    """Target: megatron.core.tensor_parallel.random (0.16.1): CudaRNGStatesTracker and
    model_parallel_cuda_manual_seed use torch.cuda.{get_rng_state, manual_seed} and
    `_get_cuda_rng_state` / `_set_cuda_rng_state`. Why: the model-parallel RNG tracker must exist (layers fork it);
    on CPU it tracks the CPU generator instead."""
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: \
        torch.set_rng_state(new_state)
    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: \
        torch.get_rng_state()


class _NoStream:
    """Stands in for torch.cuda.Stream/Event on CPU: work is synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _NoStream()

    def record(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def patch_cuda_streams() -> None:
    """Target: torch.cuda.Stream / Event / current_stream / stream() / synchronize as created by
    megatron-core 0.16.1 MoE token dispatchers (MoEAlltoAllTokenDispatcher.cuda_dtoh_stream).
    Why: CPU execution is synchronous, so a stream that never waits is exact."""
    import contextlib

    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda device=None: _NoStream()
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


def patch_moe_te_general_gemm_name() -> None:
    """Target: megatron.core.transformer.moe.moe_utils.te_general_gemm (0.16.1). Why: the name is
    only bound when Transformer Engine imports, but RouterGatingLinearFunction reads it
    unconditionally (NameError without TE); None selects its torch matmul path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


_PATCHES = (patch_cuda_current_device, patch_cuda_rng_to_cpu, patch_cuda_streams,
            patch_moe_te_general_gemm_name)


def install_megatron_cpu_compat() -> list[str]:
    """Apply every patch (once) when CUDA is absent; returns the names applied by this call."""
    if torch.cuda.is_available():
        return []
    warn_if_untested("megatron-core", TESTED_MEGATRON_CORE, "megatron_opd.compat.megatron_cpu")
    applied = []
    for patch in _PATCHES:
        if patch.__name__ not in _installed:
            patch()
            _installed.add(patch.__name__)
            applied.append(patch.__name__)
    return applied
