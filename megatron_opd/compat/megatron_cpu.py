"""Run megatron-core on a CPU-only machine (gloo), for tests and the embedded quickstart.

megatron-core calls CUDA directly in many places. Each patch below redirects one such call to its
CPU equivalent, names the upstream target and the version it was written against, and is applied
only by `install_megatron_cpu_compat()` when CUDA is absent (on GPUs nothing is patched), except
`patch_moe_te_general_gemm_name`, which `install_megatron_compat()` (what the learner and the
converter call) also applies on a GPU without Transformer Engine. They patch process-wide state,
so only the learner process (never SGLang's) installs them.
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


class _CpuFactories:
    """A stand-in for the `torch` module inside one megatron module: identical except that tensor
    factories asked for device "cuda" build on the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "empty_like", "zeros_like")

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)
        return factory


# Modules (megatron-core 0.16.1) that build small bookkeeping tensors with device="cuda".
_CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens of every schedule
    "megatron.core.utils",  # local_multi_tensor_l2_norm (the grad norm without apex/TE)
    "megatron.core.optimizer.clip_grads",  # grad-norm and overflow buffers
    "megatron.core.optimizer.optimizer",  # found_inf / scale buffers of the mixed-precision path
    "megatron.core.transformer.moe.moe_utils",  # aux-loss tracker
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # save-plan reuse flag
    "megatron.core.dist_checkpointing.exchange_utils",  # load-time shard exchange buffers
)


def patch_cuda_device_factories() -> None:
    """Target: `torch.zeros/ones/empty/full/tensor(..., device="cuda")` in each module of
    `_CUDA_FACTORY_MODULES` (megatron-core 0.16.1). Why: these are scalars and flags that only
    need to live where the computation is; the module's `torch` name is replaced by a forwarding
    stand-in, so nothing outside those modules changes."""
    import importlib

    for name in _CUDA_FACTORY_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _CpuFactories):
            module.torch = _CpuFactories(module.torch)


def patch_tensor_type_strings() -> None:
    """Target: `param.type() == 'torch.cuda.FloatTensor'` checks in megatron-core 0.16.1
    optimizer/distrib_optimizer.py (`_build_model_and_main_param_groups`),
    optimizer/optimizer.py (`Float16OptimizerWithFloat16Params.__init__`) and
    optimizer/clip_grads.py (`clip_grad_by_total_norm_fp32`). Why: they only tell fp32 from
    fp16/bf16 tensors but spell the CUDA type; CPU tensors answer the CUDA spelling here. This
    changes `Tensor.type()` with no argument process-wide, hence learner processes only."""
    if getattr(torch.Tensor.type, "_megatron_opd_cpu", False):
        return
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    type_._megatron_opd_cpu = True
    torch.Tensor.type = type_


def patch_alltoall_split_sizes() -> None:
    """Target: `megatron.core.tensor_parallel.mappings.all_to_all` (0.16.1) as imported by the
    MoE alltoall token dispatcher, which passes uneven split sizes as numpy arrays. Why: the
    CPU build's `all_to_all_single` binding accepts only lists of ints (TypeError otherwise, with
    EP > 1); `.tolist()` is exact."""
    from megatron.core.tensor_parallel import mappings

    original = mappings.all_to_all
    if getattr(original, "_megatron_opd_cpu", False):
        return

    def all_to_all(group, input_, output_split_sizes_=None, input_split_sizes=None):
        as_list = lambda s: s.tolist() if hasattr(s, "tolist") else s  # noqa: E731
        return original(group, input_, as_list(output_split_sizes_), as_list(input_split_sizes))

    all_to_all._megatron_opd_cpu = True
    mappings.all_to_all = all_to_all
    from megatron.core.transformer.moe import token_dispatcher
    token_dispatcher.all_to_all = all_to_all


def patch_torch_norm_sequence_parallel() -> None:
    """Target: `megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__` (0.16.1), the
    norm of the local (non-Transformer-Engine) layer spec, which asserts `not sequence_parallel`.
    Why: MoE with TP > 1 requires sequence parallelism in megatron, and the local spec is all a
    CPU has. RMSNorm is per token, so on a sequence shard it is exact; only its weight gradient
    is partial per rank, and tagging the weight `sequence_parallel` makes megatron's
    `finalize_model_grads` all-reduce it over TP (what Transformer Engine's norm does)."""
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    if getattr(cls.__new__, "_megatron_opd_cpu", False):
        return
    original = cls.__new__

    def __new__(klass, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        sp = config.sequence_parallel
        config.sequence_parallel = False  # only for the assertion; restored below
        try:
            norm = original(klass, config, hidden_size, eps, persist_layer_norm,
                            zero_centered_gamma, normalization)
        finally:
            config.sequence_parallel = sp
        for p in norm.parameters():
            p.sequence_parallel = sp
        return norm

    __new__._megatron_opd_cpu = True
    cls.__new__ = __new__


def patch_distrib_optimizer_torch_adam_step() -> None:
    """Target: `DistributedOptimizer._set_main_param_and_optimizer_states` (megatron-core 0.16.1,
    optimizer/distrib_optimizer.py), reached when loading a `fully_reshardable` checkpoint.
    Why: without apex/Transformer Engine the inner optimizer is torch Adam, whose per-parameter
    state holds a `step` tensor that the checkpoint's per-parameter tensors do not (megatron keeps
    the step in the param groups and restores it in `load_state_dict`), so the upstream copy loop
    raises KeyError('step'). Copy only what the checkpoint has. (`load_state_dict`: see below.)"""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_megatron_opd_cpu", False):
        return

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)

    _set_main_param_and_optimizer_states._megatron_opd_cpu = True
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states

    # Same path, second bug: `load_state_dict` gives every parameter's state the *same* `step`
    # tensor, and torch Adam increments it in place once per parameter (measured: step 3 -> 98
    # after one step with 95 parameters), so bias correction is wrong after a resume.
    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    DistributedOptimizer.load_state_dict = load_state_dict


_PATCHES = (patch_cuda_current_device, patch_cuda_rng_to_cpu, patch_cuda_streams,
            patch_moe_te_general_gemm_name, patch_cuda_device_factories,
            patch_tensor_type_strings, patch_alltoall_split_sizes,
            patch_torch_norm_sequence_parallel, patch_distrib_optimizer_torch_adam_step)


def _transformer_engine_imports() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken build (missing CUDA libraries)
        return False
    return True


def install_megatron_compat() -> list[str]:
    """Every process that builds megatron models calls this, on any device: the CPU stand-ins
    when CUDA is absent, and on a GPU without Transformer Engine the one patch that is not a CPU
    stand-in (`patch_moe_te_general_gemm_name`: megatron-core's router raises NameError on any
    device without TE). Returns the names applied by this call."""
    applied = install_megatron_cpu_compat()
    if "patch_moe_te_general_gemm_name" not in _installed and not _transformer_engine_imports():
        patch_moe_te_general_gemm_name()
        _installed.add("patch_moe_te_general_gemm_name")
        applied.append("patch_moe_te_general_gemm_name")
    return applied


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
