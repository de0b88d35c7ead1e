"""A Hugging Face config.json -> the MoEModelSpec with exactly that architecture, or a refusal
naming the config key the spec (and so the learner's megatron model) cannot express."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_opd.models.spec import MoEModelSpec

_FAMILY_OF = {"qwen3_moe": "qwen3_moe", "mixtral": "mixtral"}


class UnsupportedConfig(ValueError):
    pass


def read_config_json(path: str | Path) -> dict:
    """config.json of an HF model directory (or the file itself)."""
    path = Path(path)
    f = path / "config.json" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"--hf: no config.json at {f}")
    return json.loads(f.read_text())


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def spec_from_hf_config(cfg: dict, where: str = "config.json") -> MoEModelSpec:
    mt = cfg.get("model_type")
    if mt not in _FAMILY_OF:
        raise UnsupportedConfig(f"{where}: model_type={mt!r} is not supported (known: "
                                f"{sorted(_FAMILY_OF)}; DeepSeek-V3's MLA has no megatron_opd "
                                f"spec)")
    family = _FAMILY_OF[mt]

    def refuse(key: str, why: str):
        raise UnsupportedConfig(f"{where}: {key}={cfg.get(key)!r} cannot be expressed by the "
                                f"learner's model ({why})")

    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "experts are SwiGLU")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    if (rope.get("rope_type") or "default") != "default" or scaling:
        refuse("rope_scaling" if scaling else "rope_parameters", "plain RoPE only")
    if cfg.get("sliding_window") is not None and cfg.get("use_sliding_window", True):
        refuse("sliding_window", "full causal attention only")
    if family == "qwen3_moe":
        if cfg.get("norm_topk_prob") is not True:
            refuse("norm_topk_prob", "top-k router probabilities are renormalised")
        if cfg.get("decoder_sparse_step", 1) != 1:
            refuse("decoder_sparse_step", "every layer is MoE")
        if cfg.get("mlp_only_layers"):
            refuse("mlp_only_layers", "every layer is MoE")
        if cfg.get("attention_bias"):
            refuse("attention_bias", "no linear biases")
        ffn = _first(cfg, "moe_intermediate_size")
    else:
        ffn = _first(cfg, "intermediate_size")
    heads = cfg["num_attention_heads"]
    head_dim = _first(cfg, "head_dim", default=cfg["hidden_size"] // heads)
    tok = {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if isinstance(tok["eos_token_id"], list):  # several stop ids: the spec keeps the first
        tok["eos_token_id"] = tok["eos_token_id"][0]
    spec = MoEModelSpec(
        family=family, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
        num_kv_heads=_first(cfg, "num_key_value_heads", default=heads), head_dim=head_dim,
        moe_ffn_hidden_size=ffn, num_experts=_first(cfg, "num_experts", "num_local_experts"),
        moe_router_topk=cfg["num_experts_per_tok"],
        rope_theta=float(_first(cfg, "rope_theta", default=rope.get("rope_theta", 10000.0))),
        rms_norm_eps=cfg["rms_norm_eps"],
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **{k: (v if v is not None else getattr(MoEModelSpec, k)) for k, v in tok.items()})
    try:
        spec.validate(prefix=where)
    except ValueError as e:
        raise UnsupportedConfig(str(e)) from None
    if spec.moe_router_topk == 1:
        raise UnsupportedConfig(f"{where}: num_experts_per_tok=1 is not supported (megatron-core "
                                f"and HF renormalised top-1 routing differ)")
    return spec
