"""Architecture of a MoE model, shared by the learner (megatron-core) and SGLang (HF format).

One dataclass describes the model; `to_hf_config` turns it into the Hugging Face config that
SGLang and `transformers` load, and the megatron builder reads the same fields, so the two sides
can never disagree on shapes.

Families (`family`):
- "qwen3_moe": Qwen3-MoE (per-head RMSNorm on queries and keys), HF `Qwen3MoeConfig`;
- "mixtral": Mixtral (no q/k norm, head_dim = hidden_size / num_attention_heads, untied
  embeddings), HF `MixtralConfig`.
Both: RMSNorm, RoPE, grouped-query attention, every layer MoE with SwiGLU experts and a softmax
router whose top-k probabilities are renormalised.

Router knobs beyond that (`router_score_function="sigmoid"`, `router_expert_bias`,
`shared_expert_ffn_hidden_size`) build and train in megatron, but neither HF family has the
tensors or the routing rule for them, so HF export/import refuses such a spec (`hf_unsupported`).
`router_aux_loss_coeff` is a training-only term and exports fine.

Vocabulary padding (megatron's make_vocab_size_divisible_by): megatron shards the vocabulary over
tensor parallelism, so the megatron model is built with `padded_vocab_size(spec, tp)` rows (the
next multiple of `make_vocab_size_divisible_by * tp`); `vocab_size` stays the true (HF) size.
The padding rows are megatron-only: HF <-> megatron mapping adds them (zeros) on load and strips
them on export, and the model's logits at padded ids are -inf (never sampled, no loss or
statistic sees them). Ids between a tokenizer's length and `vocab_size` are real model rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FAMILIES = ("qwen3_moe", "mixtral")
SCORE_FUNCTIONS = ("softmax", "sigmoid")


@dataclass
class MoEModelSpec:
    vocab_size: int = 32
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    moe_ffn_hidden_size: int = 64
    num_experts: int = 8
    moe_router_topk: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 64
    tie_word_embeddings: bool = False
    # Token ids the HF config needs (generation stops at eos).
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # Model family: "qwen3_moe" | "mixtral" (attention flavour and HF names / config class).
    family: str = "qwen3_moe"
    # Router score function: "softmax" (top-k logits, softmax over them) | "sigmoid" (sigmoid
    # scores, top-k, renormalised; megatron only, HF export refused).
    router_score_function: str = "softmax"
    # Switch-style load-balancing loss coefficient (megatron "aux_loss", per layer and
    # micro-batch); 0 = none.
    router_aux_loss_coeff: float = 0.0
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for expert
    # selection only, updated from token counts after each step. Needs sigmoid scoring.
    router_expert_bias: bool = False
    # Total FFN size of the shared expert(s) every token goes through; 0 = none.
    shared_expert_ffn_hidden_size: int = 0
    # megatron only: the embedding / output layer get padded_vocab_size(spec, tp) rows, a
    # multiple of this times TP (1 = pad only when TP does not divide vocab_size; megatron-LM
    # uses 128 for GEMM-friendly shapes). HF files never see the padding.
    make_vocab_size_divisible_by: int = 1

    @property
    def qk_layernorm(self) -> bool:
        """Per-head RMSNorm on queries and keys (Qwen3) or not (Mixtral)."""
        return self.family == "qwen3_moe"

    def validate(self, prefix: str = "model") -> None:
        def need(cond: bool, key: str, why: str) -> None:
            if not cond:
                raise ValueError(f"{prefix}.{key}: {why}")

        need(self.family in FAMILIES, "family", f"must be one of {list(FAMILIES)}, got "
             f"{self.family!r}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                    "num_kv_heads", "head_dim", "moe_ffn_hidden_size", "num_experts",
                    "moe_router_topk", "max_position_embeddings"):
            need(getattr(self, key) > 0, key, "must be positive")
        need(self.num_attention_heads % self.num_kv_heads == 0, "num_kv_heads",
             "must divide num_attention_heads (grouped-query attention)")
        need(self.moe_router_topk <= self.num_experts, "moe_router_topk",
             "must be <= num_experts")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            need(0 <= getattr(self, key) < self.vocab_size, key, "must be a token id < vocab_size")
        if self.family == "mixtral":
            need(self.head_dim * self.num_attention_heads == self.hidden_size, "head_dim",
                 f"must equal hidden_size / num_attention_heads = "
                 f"{self.hidden_size / self.num_attention_heads:g} for family mixtral "
                 f"(Mixtral derives head_dim from them)")
            need(not self.tie_word_embeddings, "tie_word_embeddings",
                 "must be false for family mixtral (Mixtral has its own lm_head)")
        need(self.router_score_function in SCORE_FUNCTIONS, "router_score_function",
             f"must be one of {list(SCORE_FUNCTIONS)}, got {self.router_score_function!r}")
        need(math.isfinite(self.router_aux_loss_coeff) and self.router_aux_loss_coeff >= 0,
             "router_aux_loss_coeff", f"must be a finite number >= 0 (0 = no load-balancing "
             f"loss), got {self.router_aux_loss_coeff!r}")
        need(not self.router_expert_bias or self.router_score_function == "sigmoid",
             "router_expert_bias", "needs router_score_function = sigmoid (megatron-core's "
             "aux-loss-free expert bias is defined for sigmoid scores only)")
        need(self.shared_expert_ffn_hidden_size >= 0, "shared_expert_ffn_hidden_size",
             "must be >= 0 (0 = no shared expert)")
        need(self.make_vocab_size_divisible_by >= 1, "make_vocab_size_divisible_by",
             "must be >= 1 (1 = pad the vocabulary only as far as tensor parallelism needs)")


def padded_vocab_size(spec: MoEModelSpec, tensor_parallel: int = 1) -> int:
    """Rows of megatron's embedding and output layer under `tensor_parallel`: vocab_size rounded
    up to a multiple of make_vocab_size_divisible_by * tensor_parallel (megatron-LM's rule)."""
    multiple = spec.make_vocab_size_divisible_by * tensor_parallel
    return -(-spec.vocab_size // multiple) * multiple


def hf_unsupported(spec: MoEModelSpec) -> list[str]:
    """Spec keys (with values) that the family's Hugging Face architecture cannot express."""
    out = []
    if spec.router_score_function != "softmax":
        out.append(f"router_score_function={spec.router_score_function!r}")
    if spec.router_expert_bias:
        out.append("router_expert_bias=True")
    if spec.shared_expert_ffn_hidden_size:
        out.append(f"shared_expert_ffn_hidden_size={spec.shared_expert_ffn_hidden_size}")
    return out


def check_hf_expressible(spec: MoEModelSpec, prefix: str = "model") -> None:
    """Raise if the spec has knobs its HF family has no tensors / routing rule for."""
    bad = hf_unsupported(spec)
    if bad:
        cls = hf_architecture(spec)
        raise ValueError(
            f"{', '.join(f'{prefix}.{b}' for b in bad)}: not expressible in Hugging Face "
            f"{cls} (softmax top-k router only, no shared expert, no expert bias), so this model "
            f"cannot be exported to / loaded from HF format (and so not served by SGLang); it "
            f"trains in megatron only")


def hf_architecture(spec: MoEModelSpec) -> str:
    """The HF `architectures` entry of the spec's family (what SGLang dispatches on)."""
    return "MixtralForCausalLM" if spec.family == "mixtral" else "Qwen3MoeForCausalLM"


def hf_causal_lm_class(spec: MoEModelSpec):
    """The `transformers` model class of the spec's family (e.g. for building a fresh HF model
    from `to_hf_config(spec)`)."""
    if spec.family == "mixtral":
        from transformers import MixtralForCausalLM

        return MixtralForCausalLM
    from transformers import Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM


def to_hf_config(spec: MoEModelSpec):
    """The `transformers` config with exactly this architecture (every layer MoE):
    `Qwen3MoeConfig` or `MixtralConfig` by `spec.family`."""
    check_hf_expressible(spec)
    # router_aux_loss_coef stays 0: the HF config describes the inference model, and HF's
    # load-balancing loss (over all layers' tokens at once, not divided by top-k) is not
    # megatron's per-layer one, so copying the coefficient would mislead.
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.moe_ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_experts_per_tok=spec.moe_router_topk,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
        torch_dtype="float32",
        # SGLang picks its model class from architectures[0] and refuses a config without it
        architectures=[hf_architecture(spec)],
    )
    if spec.family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(num_local_experts=spec.num_experts, hidden_act="silu",
                             router_jitter_noise=0.0, sliding_window=None, **common)
    if spec.family != "qwen3_moe":
        raise ValueError(f"model.family: unknown family {spec.family!r}")
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        moe_intermediate_size=spec.moe_ffn_hidden_size,
        num_experts=spec.num_experts,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        attention_bias=False,
        **common,
    )
