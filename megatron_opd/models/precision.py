"""The learner's numeric precision: fp32 / bf16, and FP8 through Transformer Engine (TE).

`PrecisionConfig` is what a run asks for (the `precision:` config section); `resolve()` decides
what will actually run on a given GPU and TE version, and returns a `ResolvedPrecision` that
produces megatron-core's TransformerConfig / DDP / optimizer kwargs. When the requested FP8
recipe cannot run it either raises `PrecisionError` naming `precision.fp8` and the reason, or,
with `fp8_fallback: bf16`, returns an explicit bf16 result whose `fallback_reason` the learner
logs. Nothing here imports Transformer Engine except `detect_environment()`, and that only when
TE is installed, catching any failure.

Requirements (megatron-core 0.16.1 source, cross-checked against TE v1.13 .. v2.18 source):

========== ============================ ============================================= ==========
recipe     TE recipe class              GPU (compute capability)                      min TE
========== ============================ ============================================= ==========
delayed    DelayedScaling               >= 8.9 (Ada: CUDA >= 12.1)                    1.7.0 [1]
tensorwise Float8CurrentScaling         >= 8.9 (Ada: CUDA >= 12.1)                    2.2.0.dev0
blockwise  Float8BlockScaling           9.x (TE < 2.9), >= 9.0 (TE >= 2.9); CUDA 12.9 2.3.0.dev0
mxfp8      MXFP8BlockScaling            10.x / 11.x (Blackwell data-centre) [2]       2.1.0
========== ============================ ============================================= ==========

[1] megatron's TransformerConfig refuses FP8 for MoE models below TE 1.7.0; below TE 2.1.0
    `fp8_utils.get_fp8_recipe` only builds DelayedScaling. The other minimums are the versions
    at which `get_fp8_recipe` (megatron-core 0.16.1) builds the recipe class.
[2] TE >= 2.7 rejects MXFP8 on compute capability 12.x ("not supported on 12.0+ architectures
    yet"); it is refused here for every TE version.

The GPU checks mirror TE's `check_fp8_support` / `check_fp8_block_scaling_support` /
`check_mxfp8_support` (the Ada cuBLASLt >= 12.1.3 check is left to TE). FP8 exists only in TE
layers, so an FP8 run builds the model with megatron's TE layer spec (`needs_te_layer_spec`,
`gpt_layer_spec`); that spec fuses the input RMSNorm into `linear_qkv` (see
`TE_SPEC_PARAM_RENAMES`). FP8 GEMMs need token counts that are multiples of `alignment`
(megatron's `get_fp8_align_size`: 32 for mxfp8, 16 otherwise); megatron's SequentialMLP pads the
per-expert token counts itself, the dense layers see batch x sequence tokens.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is imported where it is used: the config tree loads without it
    import torch

FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")

# megatron-core 0.16.1: minimum TE version at which each recipe can be built for an MoE model.
MIN_TE_VERSION = {
    "delayed": "1.7.0",
    "tensorwise": "2.2.0.dev0",
    "blockwise": "2.3.0.dev0",
    "mxfp8": "2.1.0",
}
# TE lifted the "Hopper only" restriction of Float8BlockScaling in v2.9 (compute capability >= 9.0).
TE_BLOCKWISE_ANY_ARCH = "2.9.0"
MIN_CUDA_BLOCKWISE = (12, 9)
MIN_CUDA_ADA_FP8 = (12, 1)

# Parameter names that differ between megatron's local and TE layer specs (per decoder layer,
# relative to `decoder.layers.{i}.`): TE fuses the input norm into the QKV projection.
TE_SPEC_PARAM_RENAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight"}

# Defaults of the delayed-scaling knobs = megatron-core TransformerConfig's defaults.
_DELAYED_DEFAULTS = {"fp8_margin": 0, "fp8_amax_history_len": 1,
                     "fp8_amax_compute_algo": "most_recent"}


class PrecisionError(ValueError):
    """The requested precision cannot run here (or is inconsistent); the message names the key."""


@dataclass
class PrecisionConfig:
    # bf16: fp32 master weights in the optimizer
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    # FP8 GEMMs through Transformer Engine (GPU only); null = none.
    fp8: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] | None = None
    # hybrid: e4m3 forward, e5m2 gradients; e4m3: e4m3 everywhere.
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    # When the recipe cannot run here (no GPU / TE / capability): "error" stops the run,
    # "bf16" trains in bf16 and logs why.
    fp8_fallback: Literal["error", "bf16"] = "error"
    # Delayed scaling only: scale = FP8_MAX / amax / 2^margin, amax over the last N steps.
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    # Keep weights in FP8 and all-gather them in FP8 (needs train.distributed_optimizer).
    fp8_param_gather: bool = False

    def validate(self, prefix: str = "precision") -> None:
        def need(cond: bool, key: str, why: str) -> None:
            if not cond:
                raise ValueError(f"{prefix}.{key}: {why}")

        def one_of(key: str, choices) -> None:
            value = getattr(self, key)
            need(value in choices, key, f"must be one of {list(choices)}, got {value!r}")

        one_of("params_dtype", ("float32", "bfloat16"))
        one_of("fp8", (None, *FP8_RECIPES))
        one_of("fp8_format", ("hybrid", "e4m3"))
        one_of("fp8_fallback", ("error", "bf16"))
        one_of("fp8_amax_compute_algo", ("most_recent", "max"))
        for key in ("fp8_margin", "fp8_amax_history_len"):
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool), key,
                 f"expected an integer, got {value!r}")
        need(self.fp8_margin >= 0, "fp8_margin", "must be >= 0")
        need(self.fp8_amax_history_len >= 1, "fp8_amax_history_len", "must be >= 1")
        need(isinstance(self.fp8_param_gather, bool), "fp8_param_gather", "expected true/false")
        if self.fp8 is not None:
            need(self.params_dtype == "bfloat16", "params_dtype",
                 f"must be 'bfloat16' when {prefix}.fp8 is set (FP8 GEMMs run inside bf16 "
                 f"mixed precision, which is also what {prefix}.fp8_fallback=bf16 falls back to)")
        need(self.fp8 is not None or not self.fp8_param_gather, "fp8_param_gather",
             f"needs {prefix}.fp8 (FP8 parameters exist only with an FP8 recipe)")
        if self.fp8 != "delayed":
            for key, default in _DELAYED_DEFAULTS.items():
                need(getattr(self, key) == default, key,
                     f"only used by {prefix}.fp8=delayed (got {prefix}.fp8={self.fp8!r}); "
                     f"leave it at {default!r}")


@dataclass(frozen=True)
class ResolvedPrecision:
    """What will run. `fp8` is None when no FP8 recipe runs (then `fallback_reason` says why if
    one was requested)."""
    params_dtype: str
    fp8: str | None = None
    fp8_format: str = "hybrid"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    fp8_param_gather: bool = False
    requested_fp8: str | None = None
    fallback_reason: str | None = None

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.params_dtype)

    @property
    def needs_te_layer_spec(self) -> bool:
        """FP8 exists only in Transformer Engine layers: build with megatron's TE layer spec."""
        return self.fp8 is not None

    @property
    def alignment(self) -> int:
        """Tokens per micro-batch (batch x sequence) must be a multiple of this (FP8 GEMMs)."""
        if self.fp8 is None:
            return 1
        return 32 if self.fp8 == "mxfp8" else 16

    def transformer_config_kwargs(self) -> dict:
        """megatron-core TransformerConfig fields for this precision."""
        kwargs = dict(params_dtype=self.torch_dtype, bf16=self.params_dtype == "bfloat16",
                      fp16=False, fp8=None, fp8_param=False)
        if self.fp8 is not None:
            kwargs.update(fp8=self.fp8_format, fp8_recipe=self.fp8, fp8_param=self.fp8_param_gather)
            if self.fp8 == "delayed":
                kwargs.update(fp8_margin=self.fp8_margin,
                              fp8_amax_history_len=self.fp8_amax_history_len,
                              fp8_amax_compute_algo=self.fp8_amax_compute_algo)
        return kwargs

    def ddp_config_kwargs(self) -> dict:
        """megatron DistributedDataParallelConfig fields (all-gather FP8 parameters as FP8)."""
        return dict(fp8_param_gather=self.fp8 is not None and self.fp8_param_gather)

    def optimizer_config_kwargs(self) -> dict:
        """megatron OptimizerConfig fields: the distributed optimizer shards FP8 parameters
        differently for non-delayed recipes (distrib_optimizer reads `fp8_recipe`)."""
        return dict(fp8_recipe=self.fp8)

    def describe(self) -> str:
        if self.fp8 is None:
            text = self.params_dtype
            if self.fallback_reason:
                text += f" (fallback: {self.fallback_reason})"
            return text
        text = f"{self.params_dtype} + fp8 {self.fp8} ({self.fp8_format})"
        if self.fp8 == "delayed":
            text += (f", amax history {self.fp8_amax_history_len} {self.fp8_amax_compute_algo}, "
                     f"margin {self.fp8_margin}")
        if self.fp8_param_gather:
            text += ", fp8 params"
        return text


class Environment(tuple):
    """`(cuda_capability, te_version)`: unpacks as that pair; also carries `cuda_version`
    (torch.version.cuda) and `te_error` (why an installed TE could not be imported)."""

    def __new__(cls, cuda_capability, te_version, cuda_version=None, te_error=None):
        self = super().__new__(cls, (cuda_capability, te_version))
        self.cuda_version = cuda_version
        self.te_error = te_error
        return self

    @property
    def cuda_capability(self) -> tuple[int, int] | None:
        return self[0]

    @property
    def te_version(self) -> str | None:
        return self[1]


def _te_distribution_version() -> str | None:
    for name in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def detect_te() -> tuple[str | None, str | None]:
    """(TE version, error). Absent TE is never imported; an installed TE is imported
    (`transformer_engine.pytorch`, what megatron uses) and any failure is reported, not raised."""
    try:
        if importlib.util.find_spec("transformer_engine") is None:
            return None, None
    except Exception as e:  # a broken finder / namespace
        return None, f"looking up transformer_engine failed: {type(e).__name__}: {e}"
    try:
        importlib.import_module("transformer_engine.pytorch")
        te = importlib.import_module("transformer_engine")
    except Exception as e:
        return None, (f"transformer_engine is installed but `import transformer_engine.pytorch` "
                      f"fails: {type(e).__name__}: {e}")
    version = getattr(te, "__version__", None) or _te_distribution_version()
    if version is None:
        return None, "transformer_engine imports but reports no version"
    return str(version), None


def detect_environment() -> Environment:
    """This process's CUDA GPU (compute capability of the current device, None without CUDA;
    ROCm counts as none: the rules here are NVIDIA's) and TE version (None without TE)."""
    capability = cuda_version = None
    try:
        import torch

        if torch.cuda.is_available() and getattr(torch.version, "hip", None) is None:
            capability = tuple(int(x) for x in torch.cuda.get_device_capability())
            cuda_version = torch.version.cuda
    except Exception:
        capability = cuda_version = None
    te_version, te_error = detect_te()
    return Environment(capability, te_version, cuda_version, te_error)


def _version(text: str):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text)
    except InvalidVersion:
        return None


def _cuda_tuple(text: str | None) -> tuple[int, int] | None:
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except (ValueError, AttributeError):
        return None


def fp8_unavailable_reason(recipe: str, cuda_capability: tuple[int, int] | None,
                           te_version: str | None, cuda_version: str | None = None,
                           te_error: str | None = None) -> str | None:
    """Why `recipe` cannot run with this GPU / TE / CUDA, or None when it can. An unknown
    `cuda_version` (None) is not checked."""
    if cuda_capability is None:
        return "no CUDA GPU (FP8 GEMMs need an NVIDIA GPU)"
    if te_version is None:
        if te_error:
            return f"Transformer Engine is not usable: {te_error}"
        return "Transformer Engine is not installed (FP8 exists only in TE layers)"
    te = _version(te_version)
    if te is None:
        return f"cannot parse the Transformer Engine version {te_version!r}"
    need_te = MIN_TE_VERSION[recipe]
    if te < _version(need_te):
        return (f"needs Transformer Engine >= {need_te} for the {recipe} recipe with MoE in "
                f"megatron-core, found {te_version}")
    cap = tuple(cuda_capability)
    cap_text = f"{cap[0]}.{cap[1]}"
    cuda = _cuda_tuple(cuda_version) if cuda_version is not None else None
    if recipe in ("delayed", "tensorwise"):
        if cap < (8, 9):
            return f"needs compute capability >= 8.9 (Ada/Hopper/Blackwell), found {cap_text}"
        if cap < (9, 0) and cuda is not None and cuda < MIN_CUDA_ADA_FP8:
            return f"needs CUDA >= 12.1 for FP8 on Ada (8.9), found CUDA {cuda_version}"
    elif recipe == "blockwise":
        if te < _version(TE_BLOCKWISE_ANY_ARCH):
            if not (9, 0) <= cap < (10, 0):
                return (f"needs a Hopper GPU (compute capability 9.x) with Transformer Engine "
                        f"{te_version} (any >= 9.0 from TE {TE_BLOCKWISE_ANY_ARCH}), "
                        f"found {cap_text}")
        elif cap < (9, 0):
            return f"needs compute capability >= 9.0 (Hopper or newer), found {cap_text}"
        if cuda is not None and cuda < MIN_CUDA_BLOCKWISE:
            return f"needs CUDA >= 12.9 for FP8 block-scaled GEMMs, found CUDA {cuda_version}"
    elif recipe == "mxfp8":
        if not (10, 0) <= cap < (12, 0):
            return (f"needs a Blackwell data-centre GPU (compute capability 10.x, e.g. B200/GB200; "
                    f"TE does not run MXFP8 on 12.x), found {cap_text}")
    return None


def resolve(pc: PrecisionConfig, cuda_capability: tuple[int, int] | None,
            te_version: str | None, *, cuda_version: str | None = None,
            te_error: str | None = None, distributed_optimizer: bool | None = None,
            prefix: str = "precision") -> ResolvedPrecision:
    """Decide what runs. Raises PrecisionError (a ValueError naming `{prefix}.<key>`) when the
    config is invalid, when `fp8_param_gather` is asked without the distributed optimizer
    (`distributed_optimizer=False`; None = not checked), or when the FP8 recipe cannot run and
    `fp8_fallback` is "error"; with "bf16" returns bf16 with `fallback_reason` set."""
    try:
        pc.validate(prefix)
    except ValueError as e:
        raise PrecisionError(str(e)) from None
    if pc.fp8_param_gather and distributed_optimizer is False:
        raise PrecisionError(
            f"{prefix}.fp8_param_gather: needs train.distributed_optimizer=true (only megatron's "
            f"distributed optimizer re-quantizes the FP32 master weights into FP8 parameters)")
    if pc.fp8 is None:
        return ResolvedPrecision(params_dtype=pc.params_dtype)
    reason = fp8_unavailable_reason(pc.fp8, cuda_capability, te_version, cuda_version, te_error)
    if reason is None:
        return ResolvedPrecision(
            params_dtype=pc.params_dtype, fp8=pc.fp8, fp8_format=pc.fp8_format,
            fp8_margin=pc.fp8_margin, fp8_amax_history_len=pc.fp8_amax_history_len,
            fp8_amax_compute_algo=pc.fp8_amax_compute_algo, fp8_param_gather=pc.fp8_param_gather,
            requested_fp8=pc.fp8)
    if pc.fp8_fallback == "bf16":
        return ResolvedPrecision(
            params_dtype="bfloat16", requested_fp8=pc.fp8,
            fallback_reason=f"{prefix}.fp8={pc.fp8} cannot run: {reason}; training in bf16 "
                            f"({prefix}.fp8_fallback=bf16)")
    raise PrecisionError(f"{prefix}.fp8: {pc.fp8!r} cannot run here: {reason}. Choose another "
                         f"recipe, null, or set {prefix}.fp8_fallback=bf16 to train in bf16")


def resolve_here(pc: PrecisionConfig, *, distributed_optimizer: bool | None = None,
                 prefix: str = "precision") -> ResolvedPrecision:
    """`resolve` against this process's GPU and TE (`detect_environment`)."""
    env = detect_environment()
    return resolve(pc, env.cuda_capability, env.te_version, cuda_version=env.cuda_version,
                   te_error=env.te_error, distributed_optimizer=distributed_optimizer,
                   prefix=prefix)


def gpt_layer_spec(resolved: ResolvedPrecision, num_experts: int, moe_grouped_gemm: bool = False,
                   use_te: bool | None = None):
    """megatron's layer spec for the Qwen3-MoE layers (qk RMSNorm): TE's when FP8 runs (or
    `use_te`), else the local one (what `qwen3_moe.build_gpt_model` uses). The TE spec reads the
    norm type from TransformerConfig.normalization."""
    from megatron.core.models.gpt import gpt_layer_specs

    if resolved.needs_te_layer_spec if use_te is None else use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=True)
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=True,
        normalization="RMSNorm")
