"""Qwen3-MoE and Mixtral as a megatron-core GPTModel, built from the same MoEModelSpec as the HF
config (the module keeps its historical name; `spec.family` picks the flavour).

Shared semantics: RMSNorm, SwiGLU experts without biases, RoPE, grouped-query attention, every
layer MoE with a softmax router whose top-k probabilities are renormalised (HF
`norm_topk_prob=True` / Mixtral's router == megatron top-k then softmax), no token dropping.
Qwen3-MoE adds per-head RMSNorm on queries and keys; Mixtral has none (and untied embeddings).
Router knobs (megatron only where HF cannot express them, see models.spec): sigmoid scoring,
switch load-balancing aux loss, aux-loss-free expert bias, shared experts.
"""

from __future__ import annotations

import torch

from megatron_opd.models.spec import MoEModelSpec, padded_vocab_size


def transformer_config(spec: MoEModelSpec, params_dtype: torch.dtype = torch.float32,
                       layout=None, **overrides):
    """megatron's TransformerConfig for `spec` under `layout` (a config.ParallelConfig; None = one
    process). `overrides` are TransformerConfig fields (e.g. moe_enable_routing_replay)."""
    from megatron.core.transformer import TransformerConfig

    params_dtype = overrides.pop("params_dtype", params_dtype)  # e.g. from precision.resolve

    spec.validate()
    if spec.moe_router_topk == 1 and spec.router_score_function == "softmax":
        # megatron 0.16.1 forces pre-softmax scores for top-1 (weight p_max) while HF's
        # renormalised top-1 weight is 1: no setting makes the two agree.
        raise ValueError("model.moe_router_topk: 1 is not supported (megatron-core and HF "
                         "renormalised top-1 routing differ)")
    parallel = {}
    if layout is not None:
        tp = layout.tensor_parallel
        parallel = dict(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=layout.pipeline_parallel,
            virtual_pipeline_model_parallel_size=(layout.virtual_pipeline_parallel
                                                  if layout.virtual_pipeline_parallel > 1 else None),
            context_parallel_size=layout.context_parallel,
            expert_model_parallel_size=layout.expert_parallel,
            expert_tensor_parallel_size=layout.expert_tensor_parallel,
            sequence_parallel=layout.sequence_parallel and tp > 1,
            pipeline_dtype=params_dtype,
            # gloo runs batched isend/irecv out of order under the interleaved schedule
            # (measured: wrong losses with virtual stages); NCCL batches correctly.
            batch_p2p_comm=torch.cuda.is_available(),
        )
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        num_moe_experts=spec.num_experts,
        moe_router_topk=spec.moe_router_topk,
        moe_router_pre_softmax=False,  # top-k logits, then softmax over them (= renormalised)
        moe_router_score_function=spec.router_score_function,
        moe_router_load_balancing_type="aux_loss" if spec.router_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=spec.router_aux_loss_coeff,
        moe_router_enable_expert_bias=spec.router_expert_bias,
        moe_shared_expert_intermediate_size=spec.shared_expert_ffn_hidden_size or None,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,  # grouped_gemm is GPU-only; SequentialMLP experts
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        qk_layernorm=spec.qk_layernorm,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        init_method_std=0.02,
        # Losses return (sum over tokens, token count): gradients are divided by the global
        # token count once, so any DP/PP/micro-batch split gives the same token-mean loss.
        calculate_per_token_loss=True,
        **parallel,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(spec: MoEModelSpec, params_dtype: torch.dtype = torch.float32,
                    pre_process: bool = True, post_process: bool = True, config=None,
                    vp_stage: int | None = None, parallel_output: bool = False,
                    te_layer_spec: bool = False):
    """One megatron GPTModel (one pipeline chunk). parallel_output=True keeps the logits
    vocab-sharded over TP ([b, s, V/tp]); False gathers them (evaluation, world-1 tools).
    te_layer_spec: Transformer Engine layers (GPU; what FP8 needs) instead of the local ones."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs

    config = config or transformer_config(spec, params_dtype)
    if te_layer_spec:
        layer_spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=spec.num_experts, moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=spec.qk_layernorm)
    else:
        layer_spec = gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=spec.num_experts, moe_grouped_gemm=False,
            qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")
    padded = padded_vocab_size(spec, config.tensor_model_parallel_size)
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec, vocab_size=padded,
        max_sequence_length=spec.max_position_embeddings, pre_process=pre_process,
        post_process=post_process, parallel_output=parallel_output, vp_stage=vp_stage,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope", rotary_base=int(spec.rope_theta), rotary_percent=1.0)
    model.true_vocab_size = spec.vocab_size
    if padded != spec.vocab_size and post_process:
        model.output_layer.register_forward_hook(_padded_logits_masker(spec.vocab_size, padded))
    return model


def _padded_logits_masker(vocab_size: int, padded: int):
    """Forward hook of the output layer: logits of megatron's padding ids (>= vocab_size) become
    -inf, so every softmax, log-prob, entropy and sample equals the unpadded model's and the
    padding rows get zero gradient. In place (no logits-sized copy); the output is the local TP
    shard (columns from tp_rank * width) or, gathered, all `padded` columns."""
    import torch.distributed as dist

    def hook(module, inputs, output):
        logits = output[0]
        width = logits.shape[-1]
        rank = 0
        if width != padded and dist.is_initialized():
            rank = dist.get_rank(module.tp_group)
        start = max(0, vocab_size - rank * width)
        if start < width:
            logits[..., start:].fill_(float("-inf"))

    return hook


def build_model_chunks(spec: MoEModelSpec, config, te_layer_spec: bool = False) -> list:
    """This rank's model chunks (one per virtual pipeline stage), with embedding / output layer
    only where the pipeline starts / ends. Logits stay vocab-sharded (parallel_output)."""
    from megatron.core import parallel_state as ps

    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for stage in range(vpp):
        vp = stage if vpp > 1 else None
        chunks.append(build_gpt_model(
            spec, config.params_dtype, config=config, vp_stage=vp, parallel_output=True,
            te_layer_spec=te_layer_spec,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)))
    return chunks


def causal_attention_mask(seq_len: int, device=None) -> torch.Tensor:
    """[1, 1, s, s] bool, True where attention is *masked* (megatron's convention)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), 1)[None, None]


def forward_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[b, s] ids → [b, s, V] logits over the true vocabulary (megatron's padding columns are
    dropped). Right padding does not change logits at valid positions (causal attention), so
    batches are right-padded."""
    b, s = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
    logits = model(input_ids, position_ids, causal_attention_mask(s, input_ids.device))
    vocab = getattr(model, "true_vocab_size", logits.shape[-1])
    return logits if logits.shape[-1] == vocab else logits[..., :vocab]
