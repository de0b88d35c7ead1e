"""Precision resolution: which FP8 recipe runs on which GPU / Transformer Engine, the fallback,
validation messages, and the megatron-core kwargs each result produces."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest
import torch

from megatron_opd.models.precision import (FP8_RECIPES, PrecisionConfig, PrecisionError,
                                           ResolvedPrecision, detect_environment, detect_te,
                                           gpt_layer_spec, resolve, resolve_here)

A100, L40S, H100, B200, B300, RTX5090 = (8, 0), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0)
OK = None

# (recipe, compute capability, TE version, CUDA version, None = runs / else a phrase of the reason)
CASES = [
    # no GPU / no TE: every recipe
    *[(r, None, "2.8.0", "12.9", "no CUDA GPU") for r in FP8_RECIPES],
    *[(r, None, None, None, "no CUDA GPU") for r in FP8_RECIPES],
    *[(r, H100, None, "12.9", "Transformer Engine is not installed") for r in FP8_RECIPES],
    *[(r, H100, "not-a-version", "12.9", "cannot parse the Transformer Engine version")
      for r in FP8_RECIPES],
    # delayed: sm_89+, TE >= 1.7.0 (megatron MoE FP8); Ada also CUDA >= 12.1
    ("delayed", H100, "1.6.0", "12.4", "Transformer Engine >= 1.7.0"),
    ("delayed", H100, "1.7.0", "12.4", OK),
    ("delayed", H100, "2.8.0+40c69e7", None, OK),
    ("delayed", A100, "2.8.0", "12.4", "compute capability >= 8.9"),
    ("delayed", L40S, "2.8.0", "12.0", "CUDA >= 12.1"),
    ("delayed", L40S, "2.8.0", "12.4", OK),
    ("delayed", B200, "2.8.0", "12.9", OK),
    ("delayed", RTX5090, "2.8.0", "12.9", OK),
    # tensorwise (Float8CurrentScaling): TE >= 2.2.0.dev0, same GPUs as delayed
    ("tensorwise", H100, "2.1.0", "12.9", "Transformer Engine >= 2.2.0.dev0"),
    ("tensorwise", H100, "2.2.0.dev0+abc", "12.9", OK),
    ("tensorwise", L40S, "2.8.0", None, OK),  # unknown CUDA version: not checked
    ("tensorwise", (8, 6), "2.8.0", "12.9", "compute capability >= 8.9"),
    ("tensorwise", B200, "2.8.0", "12.9", OK),
    # blockwise (Float8BlockScaling): TE >= 2.3.0.dev0, CUDA >= 12.9; Hopper only before TE 2.9
    ("blockwise", H100, "2.2.0", "12.9", "Transformer Engine >= 2.3.0.dev0"),
    ("blockwise", H100, "2.3.0", "12.9", OK),
    ("blockwise", H100, "2.3.0", "12.8", "CUDA >= 12.9"),
    ("blockwise", H100, "2.3.0", None, OK),
    ("blockwise", B200, "2.8.0", "12.9", "needs a Hopper GPU"),
    ("blockwise", B200, "2.9.0", "12.9", OK),
    ("blockwise", L40S, "2.9.0", "12.9", "compute capability >= 9.0"),
    ("blockwise", L40S, "2.8.0", "12.9", "needs a Hopper GPU"),
    # mxfp8 (MXFP8BlockScaling): Blackwell data-centre (10.x/11.x), TE >= 2.1.0
    ("mxfp8", B200, "2.0.0", "12.8", "Transformer Engine >= 2.1.0"),
    ("mxfp8", B200, "2.1.0", "12.8", OK),
    ("mxfp8", B300, "2.8.0", "12.9", OK),
    ("mxfp8", H100, "2.8.0", "12.9", "Blackwell"),
    ("mxfp8", L40S, "2.8.0", "12.9", "Blackwell"),
    ("mxfp8", RTX5090, "2.8.0", "12.9", "found 12.0"),
]


def fp8_config(recipe: str, fallback: str = "error", **kw) -> PrecisionConfig:
    return PrecisionConfig(params_dtype="bfloat16", fp8=recipe, fp8_fallback=fallback, **kw)


@pytest.mark.parametrize("recipe,cap,te,cuda,reason", CASES)
def test_resolve_table(recipe, cap, te, cuda, reason):
    for fallback in ("error", "bf16"):
        pc = fp8_config(recipe, fallback)
        if reason is OK:
            r = resolve(pc, cap, te, cuda_version=cuda)
            assert (r.fp8, r.params_dtype, r.fallback_reason) == (recipe, "bfloat16", None)
            assert r.needs_te_layer_spec and r.requested_fp8 == recipe
        elif fallback == "error":
            with pytest.raises(PrecisionError) as e:
                resolve(pc, cap, te, cuda_version=cuda)
            msg = str(e.value)
            assert msg.startswith(f"precision.fp8: '{recipe}' cannot run here: ")
            assert reason in msg and "precision.fp8_fallback=bf16" in msg
        else:
            r = resolve(pc, cap, te, cuda_version=cuda)
            assert (r.fp8, r.params_dtype, r.requested_fp8) == (None, "bfloat16", recipe)
            assert not r.needs_te_layer_spec and r.alignment == 1
            assert r.fallback_reason.startswith(f"precision.fp8={recipe} cannot run: ")
            assert reason in r.fallback_reason and "training in bf16" in r.fallback_reason
            assert r.transformer_config_kwargs()["fp8"] is None
            assert reason in r.describe()


def test_broken_te_is_reported_not_raised():
    pc = fp8_config("delayed", "error")
    err = "transformer_engine is installed but `import transformer_engine.pytorch` fails: RuntimeError: x"
    with pytest.raises(PrecisionError, match="Transformer Engine is not usable: transformer_engine is installed"):
        resolve(pc, H100, None, te_error=err)
    r = resolve(fp8_config("delayed", "bf16"), H100, None, te_error=err)
    assert "RuntimeError: x" in r.fallback_reason


def test_no_fp8_ignores_the_environment():
    for dtype in ("float32", "bfloat16"):
        r = resolve(PrecisionConfig(params_dtype=dtype), None, None)
        assert r == ResolvedPrecision(params_dtype=dtype)
        assert r.torch_dtype == getattr(torch, dtype) and not r.needs_te_layer_spec
        assert r.fallback_reason is None and r.describe() == dtype


def test_prefix_is_used_in_messages():
    with pytest.raises(PrecisionError, match=r"^learner\.precision\.fp8: 'mxfp8'"):
        resolve(fp8_config("mxfp8"), None, None, prefix="learner.precision")


@pytest.mark.parametrize("fields,key,phrase", [
    (dict(params_dtype="float16"), "precision.params_dtype", "must be one of"),
    (dict(fp8="fp8"), "precision.fp8", "must be one of"),
    (dict(params_dtype="bfloat16", fp8="delayed", fp8_format="e5m2"), "precision.fp8_format", "must be one of"),
    (dict(fp8_fallback="fp32"), "precision.fp8_fallback", "must be one of"),
    (dict(params_dtype="float32", fp8="delayed"), "precision.params_dtype", "must be 'bfloat16' when precision.fp8"),
    (dict(fp8_param_gather=True), "precision.fp8_param_gather", "needs precision.fp8"),
    (dict(params_dtype="bfloat16", fp8="delayed", fp8_amax_history_len=0), "precision.fp8_amax_history_len", ">= 1"),
    (dict(params_dtype="bfloat16", fp8="delayed", fp8_margin=-1), "precision.fp8_margin", ">= 0"),
    (dict(params_dtype="bfloat16", fp8="delayed", fp8_margin=1.5), "precision.fp8_margin", "integer"),
    (dict(params_dtype="bfloat16", fp8="delayed", fp8_amax_compute_algo="mean"), "precision.fp8_amax_compute_algo", "must be one of"),
    (dict(params_dtype="bfloat16", fp8="tensorwise", fp8_amax_history_len=1024), "precision.fp8_amax_history_len", "only used by precision.fp8=delayed"),
    (dict(params_dtype="bfloat16", fp8="mxfp8", fp8_amax_compute_algo="max"), "precision.fp8_amax_compute_algo", "only used by precision.fp8=delayed"),
    (dict(fp8_margin=2), "precision.fp8_margin", "only used by precision.fp8=delayed"),
])
def test_validate_names_the_key(fields, key, phrase):
    pc = PrecisionConfig(**fields)
    with pytest.raises(ValueError) as e:
        pc.validate()
    assert str(e.value).startswith(key + ":") and phrase in str(e.value)
    with pytest.raises(PrecisionError) as e2:  # resolve validates first, whatever the machine
        resolve(pc, H100, "2.8.0")
    assert str(e2.value) == str(e.value)


def test_validate_accepts_defaults_and_every_recipe():
    PrecisionConfig().validate()
    for recipe in FP8_RECIPES:
        fp8_config(recipe, fp8_param_gather=True, fp8_format="e4m3").validate()
    fp8_config("delayed", fp8_margin=2, fp8_amax_history_len=1024, fp8_amax_compute_algo="max").validate()


def test_fp8_param_gather_needs_distributed_optimizer():
    pc = fp8_config("delayed", fp8_param_gather=True)
    with pytest.raises(PrecisionError, match="^precision.fp8_param_gather: needs train.distributed_optimizer=true"):
        resolve(pc, H100, "2.8.0", distributed_optimizer=False)
    r = resolve(pc, H100, "2.8.0", distributed_optimizer=True)
    assert r.fp8_param_gather and r.ddp_config_kwargs() == {"fp8_param_gather": True}


# ------------------------------------------------------------------ kwargs for megatron-core
EXPECTED_KWARGS = {
    "delayed": dict(fp8="hybrid", fp8_recipe="delayed", fp8_param=False, fp8_margin=1,
                    fp8_amax_history_len=1024, fp8_amax_compute_algo="max"),
    "tensorwise": dict(fp8="hybrid", fp8_recipe="tensorwise", fp8_param=False),
    "blockwise": dict(fp8="hybrid", fp8_recipe="blockwise", fp8_param=False),
    "mxfp8": dict(fp8="hybrid", fp8_recipe="mxfp8", fp8_param=False),
}
GPU_FOR = {"delayed": H100, "tensorwise": H100, "blockwise": H100, "mxfp8": B200}


def resolved_on_gpu(recipe: str, **kw) -> ResolvedPrecision:
    extra = dict(fp8_margin=1, fp8_amax_history_len=1024, fp8_amax_compute_algo="max") \
        if recipe == "delayed" else {}
    return resolve(fp8_config(recipe, **extra, **kw), GPU_FOR[recipe], "2.8.0", cuda_version="12.9")


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_transformer_config_kwargs_per_recipe(recipe):
    r = resolved_on_gpu(recipe)
    assert r.transformer_config_kwargs() == dict(
        params_dtype=torch.bfloat16, bf16=True, fp16=False, **EXPECTED_KWARGS[recipe])
    assert r.ddp_config_kwargs() == {"fp8_param_gather": False}
    assert r.optimizer_config_kwargs() == {"fp8_recipe": recipe}
    assert r.alignment == (32 if recipe == "mxfp8" else 16)
    assert recipe in r.describe()
    gathered = resolved_on_gpu(recipe, fp8_param_gather=True, fp8_format="e4m3")
    kw = gathered.transformer_config_kwargs()
    assert kw["fp8_param"] is True and kw["fp8"] == "e4m3"


def test_no_fp8_kwargs():
    assert resolve(PrecisionConfig(), None, None).transformer_config_kwargs() == dict(
        params_dtype=torch.float32, bf16=False, fp16=False, fp8=None, fp8_param=False)
    r = resolve(PrecisionConfig(params_dtype="bfloat16"), None, None)
    assert r.transformer_config_kwargs()["bf16"] is True
    assert r.ddp_config_kwargs() == {"fp8_param_gather": False}
    assert r.optimizer_config_kwargs() == {"fp8_recipe": None}


TE_PRESENT = detect_te()[0] is not None


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_kwargs_are_megatron_transformer_config_fields(recipe):
    """Every key is a TransformerConfig field with the value megatron stores. A dense config takes
    them on CPU without TE (megatron only consults TE for MoE + FP8)."""
    from megatron.core.transformer import TransformerConfig

    kw = resolved_on_gpu(recipe, fp8_param_gather=True).transformer_config_kwargs()
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(kw) <= fields
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                            use_cpu_initialization=True, **kw)
    for key, value in kw.items():
        assert getattr(cfg, key) == value, key


@pytest.mark.skipif(TE_PRESENT, reason="with Transformer Engine megatron accepts MoE + FP8")
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_megatron_refuses_moe_fp8_without_te(recipe):
    """The learner's MoE TransformerConfig with FP8: megatron-core 0.16.1's __post_init__ checks
    the TE version for MoE FP8 (is_te_min_version("1.7.0.dev0")), which without TE compares None
    with a Version: a TypeError. This is why resolve() refuses FP8 without TE up front."""
    from megatron_opd.models.qwen3_moe import transformer_config
    from megatron_opd.models.spec import MoEModelSpec

    kw = resolved_on_gpu(recipe).transformer_config_kwargs()
    with pytest.raises(TypeError, match="NoneType"):
        transformer_config(MoEModelSpec(), **kw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_transformer_config_accepts_non_fp8_kwargs(dtype):
    from megatron_opd.models.qwen3_moe import transformer_config
    from megatron_opd.models.spec import MoEModelSpec

    r = resolve(PrecisionConfig(params_dtype=dtype), None, None)
    cfg = transformer_config(MoEModelSpec(), **r.transformer_config_kwargs())
    assert (cfg.params_dtype, cfg.bf16, cfg.fp8, cfg.fp8_param) == (r.torch_dtype, dtype == "bfloat16", None, False)


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_ddp_and_optimizer_kwargs_are_megatron_fields(recipe):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    r = resolved_on_gpu(recipe, fp8_param_gather=True)
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, **r.ddp_config_kwargs())
    assert ddp.fp8_param_gather is True
    opt = OptimizerConfig(optimizer="adam", lr=1e-4, bf16=True, params_dtype=torch.bfloat16,
                          **r.optimizer_config_kwargs())
    assert opt.fp8_recipe == recipe


def test_local_layer_spec_without_fp8():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    r = resolve(PrecisionConfig(params_dtype="bfloat16"), None, None)
    spec = gpt_layer_spec(r, num_experts=8)
    ref = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False, qk_layernorm=True,
                                   normalization="RMSNorm")
    assert spec.module is ref.module
    assert spec.submodules.self_attention.submodules.linear_qkv is \
        ref.submodules.self_attention.submodules.linear_qkv


# ------------------------------------------------------------------ the machine
def test_detect_environment_here_reports_no_cuda():
    env = detect_environment()
    cap, te = env  # unpacks as a pair
    assert cap is None and env.cuda_capability is None and env.cuda_version is None
    assert not torch.cuda.is_available()
    assert te is None and env.te_error is None  # TE must not be installed on CPU machines
    with pytest.raises(PrecisionError, match="no CUDA GPU"):
        resolve_here(fp8_config("delayed"))
    assert "no CUDA GPU" in resolve_here(fp8_config("mxfp8", "bf16")).fallback_reason


def _fake_te(tmp_path, monkeypatch, init: str, pytorch_init: str = "") -> None:
    pkg = tmp_path / "transformer_engine"
    (pkg / "pytorch").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(init))
    (pkg / "pytorch" / "__init__.py").write_text(textwrap.dedent(pytorch_init))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("transformer_engine", "transformer_engine.pytorch"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def _forget_fake_te():
    for name in ("transformer_engine.pytorch", "transformer_engine"):
        sys.modules.pop(name, None)


def test_detect_te_catches_a_broken_install(tmp_path, monkeypatch):
    # What `pip install transformer-engine` leaves on a CPU machine: an import that raises.
    _fake_te(tmp_path, monkeypatch, 'raise RuntimeError("no CUDA toolkit found")\n')
    try:
        version, error = detect_te()
    finally:
        _forget_fake_te()
    assert version is None
    assert "RuntimeError: no CUDA toolkit found" in error


def test_detect_te_catches_a_broken_pytorch_submodule(tmp_path, monkeypatch):
    _fake_te(tmp_path, monkeypatch, '__version__ = "2.8.0"\n',
             'raise OSError("libcuda.so.1: cannot open shared object file")\n')
    try:
        version, error = detect_te()
    finally:
        _forget_fake_te()
    assert version is None and "OSError: libcuda.so.1" in error


def test_resolve_here_on_a_fake_hopper_with_te(tmp_path, monkeypatch):
    _fake_te(tmp_path, monkeypatch, '__version__ = "2.8.0+40c69e7"\n')
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    try:
        env = detect_environment()
        assert (env.cuda_capability, env.te_version, env.cuda_version) == ((9, 0), "2.8.0+40c69e7", "12.8")
        assert resolve_here(fp8_config("delayed")).fp8 == "delayed"
        with pytest.raises(PrecisionError, match="CUDA >= 12.9"):
            resolve_here(fp8_config("blockwise"))
        with pytest.raises(PrecisionError, match="Blackwell"):
            resolve_here(fp8_config("mxfp8"))
    finally:
        _forget_fake_te()


def test_config_loader_builds_the_section():
    """The dataclass uses only types megatron_opd.config's loader coerces (YAML / dotlist)."""
    from megatron_opd.config import ConfigError, _build

    pc = _build(PrecisionConfig, {"params_dtype": "bfloat16", "fp8": "blockwise",
                                  "fp8_fallback": "bf16", "fp8_param_gather": True}, "precision")
    assert pc == PrecisionConfig("bfloat16", "blockwise", fp8_fallback="bf16", fp8_param_gather=True)
    assert _build(PrecisionConfig, {"fp8": None}, "precision").fp8 is None
    with pytest.raises(ConfigError, match="^precision.fp8: must be one of"):
        _build(PrecisionConfig, {"fp8": "fp4"}, "precision")
