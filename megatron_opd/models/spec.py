"""Architecture of a Qwen3-MoE model, shared by the learner (megatron-core) and SGLang (HF format).

One dataclass describes the model; `to_hf_config` turns it into the Hugging Face config that
SGLang and `transformers` load, and the megatron builder reads the same fields, so the two sides
can never disagree on shapes.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def validate(self, prefix: str = "model") -> None:
        def need(cond: bool, key: str, why: str) -> None:
            if not cond:
                raise ValueError(f"{prefix}.{key}: {why}")

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


def to_hf_config(spec: MoEModelSpec):
    """The `transformers.Qwen3MoeConfig` with exactly this architecture (every layer MoE)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.moe_ffn_hidden_size,
        moe_intermediate_size=spec.moe_ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.moe_router_topk,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        attention_bias=False,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
        torch_dtype="float32",
    )
