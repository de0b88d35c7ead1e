"""`megatron-opd plan`: check a run's layout against its cluster and size it, without GPUs.

Pure functions of the config (no torch, no process group): parameter counts of the student and
the teacher, the learner's parallel layout placed on nodes, a per-GPU memory estimate for a
learner rank and for one GPU of each SGLang fleet, and a verdict against
`cluster.gpu_memory_gib`. The formulas and their assumptions are written out in docs/plan.md;
the numbers are estimates (they ignore allocator behaviour beyond a fixed reserve), meant to
refuse layouts that cannot fit and to show where the memory goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from megatron_opd.config import Config, ConfigError, run_teacher_spec, validate_cluster_fit
from megatron_opd.models.spec import MoEModelSpec, padded_vocab_size

GIB = 2 ** 30
# CUDA context, NCCL communicators and buffers, allocator fragmentation: a fixed allowance per
# learner GPU (an assumption, not a measurement).
LEARNER_RESERVE_GIB = 5.0
# SGLang keeps this fraction of a GPU for weights + KV cache (its --mem-fraction-static; the
# rest is its room for activations, CUDA graphs and logits). 0.85 is about what it picks for
# 80 GB GPUs at these tensor-parallel sizes; the plan does not pass it to SGLang.
SGLANG_MEM_FRACTION = 0.85
# learner/vocab_parallel.py: tokens per chunk and the float32 [chunk, V/tp] buffers it keeps.
VOCAB_CHUNK_TOKENS = 4096
VOCAB_CHUNK_BUFFERS = 3
TIGHT_HEADROOM = 0.10  # a fit with less headroom than this fraction is flagged "tight"


# ---------------------------------------------------------------- parameter counts
@dataclass(frozen=True)
class ParamCounts:
    """Parameters of one MoE model, by kind (every layer MoE, no biases: both HF families)."""
    num_layers: int
    num_experts: int
    topk: int
    embedding: int  # V x h
    lm_head: int  # V x h, 0 when tied to the embedding
    final_norm: int
    attention: int  # per layer: q, k, v, o projections
    norms: int  # per layer: input and pre-MLP RMSNorm, plus q/k RMSNorm (Qwen3)
    router: int  # per layer
    shared_expert: int  # per layer (megatron-only knob)
    expert: int  # one expert of one layer: gate, up and down projections

    @property
    def dense_per_layer(self) -> int:
        return self.attention + self.norms + self.router + self.shared_expert

    @property
    def outside_layers(self) -> int:
        return self.embedding + self.lm_head + self.final_norm

    @property
    def total(self) -> int:
        return self.outside_layers + self.num_layers * (
            self.dense_per_layer + self.num_experts * self.expert)

    @property
    def active(self) -> int:
        """Parameters one token goes through (top-k experts; embeddings counted, as published
        "active" figures do)."""
        return self.outside_layers + self.num_layers * (
            self.dense_per_layer + self.topk * self.expert)


def param_counts(spec: MoEModelSpec) -> ParamCounts:
    h, d = spec.hidden_size, spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_kv_heads * d
    return ParamCounts(
        num_layers=spec.num_layers, num_experts=spec.num_experts, topk=spec.moe_router_topk,
        embedding=spec.vocab_size * h,
        lm_head=0 if spec.tie_word_embeddings else spec.vocab_size * h,
        final_norm=h,
        attention=h * q + 2 * h * kv + q * h,
        norms=2 * h + (2 * d if spec.qk_layernorm else 0),
        router=h * spec.num_experts,
        shared_expert=3 * h * spec.shared_expert_ffn_hidden_size,
        expert=3 * h * spec.moe_ffn_hidden_size,
    )


# ---------------------------------------------------------------- layout on nodes
def ranks_per_node(cfg: Config) -> int:
    c = cfg.cluster
    return c.gpus_per_node if c.gpus_per_node else cfg.parallel.world_size // c.learner_nodes


def layout(cfg: Config) -> dict:
    """Group sizes and where megatron's groups fall on the nodes. megatron-core orders ranks
    tp-cp-ep-dp-pp: a TP group is `tensor_parallel` consecutive ranks, an expert-parallel group
    is `expert_parallel` ranks `expert_tensor_parallel` apart, pipeline stages are world/PP
    apart. Raises ConfigError when a TP group would span nodes."""
    p, world = cfg.parallel, cfg.parallel.world_size
    tp, cp, pp, ep, etp = (p.tensor_parallel, p.context_parallel, p.pipeline_parallel,
                           p.expert_parallel, p.expert_tensor_parallel)
    per_node = ranks_per_node(cfg)
    # TP all-reduces / all-gathers run inside every layer: they need NVLink, never the network.
    if tp > per_node or per_node % tp:
        raise ConfigError(
            f"parallel.tensor_parallel: a TP group of {tp} consecutive ranks must stay inside one "
            f"node of {per_node} ranks (cluster.gpus_per_node); choose a divisor of {per_node}")
    if etp > per_node or per_node % etp:
        raise ConfigError(
            f"parallel.expert_tensor_parallel: {etp} must divide the {per_node} ranks of a node")
    dp = world // (tp * cp * pp)
    edp = world // (etp * ep * pp)
    micro_batches = cfg.train.batch_size // (p.micro_batch_size * dp)
    ep_span = etp * ep  # consecutive ranks one expert-parallel group covers
    notes = []
    if ep_span > per_node:
        notes.append(f"expert-parallel groups span {math.ceil(ep_span / per_node)} nodes: the "
                     f"token all-to-all of every MoE layer crosses the network")
    stage_stride = world // pp
    if pp > 1 and stage_stride < per_node:
        notes.append("pipeline stages share nodes (fine; their sends stay on NVLink)")
    tp_groups = [f"{i}-{i + tp - 1}" if tp > 1 else str(i) for i in range(0, min(per_node, world), tp)]
    return dict(
        world_size=world, ranks_per_node=per_node, nodes=cfg.cluster.learner_nodes,
        tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline_parallel=p.virtual_pipeline_parallel,
        context_parallel=cp, expert_parallel=ep, expert_tensor_parallel=etp,
        data_parallel=dp, expert_data_parallel=edp,
        sequence_parallel=p.sequence_parallel and tp > 1,
        micro_batch_size=p.micro_batch_size, micro_batches_per_step=micro_batches,
        tp_groups_node0=tp_groups, ep_group_nodes=math.ceil(ep_span / per_node),
        pipeline_stage_stride=stage_stride, notes=notes)


# ---------------------------------------------------------------- learner memory
def uses_te_layer_spec(cfg: Config) -> bool:
    """The learner builds Transformer Engine layers (fused attention) only for FP8
    (learner/main.py: `precision.needs_te_layer_spec`); otherwise megatron's local layers with
    unfused attention, which keep the [s, s] scores of every head."""
    return cfg.precision.fp8 is not None


def weight_bytes(cfg: Config) -> float:
    """Bytes per parameter of the model weights on a learner GPU."""
    pc = cfg.precision
    if pc.params_dtype == "float32":
        return 4.0
    if pc.fp8 is None:
        return 2.0
    # TE caches an FP8 copy of every weight (and its transpose on Hopper) for the micro-batches
    # of a step: +2 bytes over bf16; with fp8_param_gather those replace the bf16 weights.
    return 2.0 if pc.fp8_param_gather else 4.0


def optimizer_bytes(cfg: Config) -> float:
    """Adam state bytes per parameter before sharding: m and v in fp32, plus an fp32 master copy
    when the weights are bf16 (fp32 weights are their own master)."""
    return 8.0 if cfg.precision.params_dtype == "float32" else 12.0


def activation_bytes_per_layer(spec: MoEModelSpec, *, micro_batch: int, seq: int, tp: int,
                               etp: int, sp: bool, cp: int = 1, act_bytes: int = 2,
                               fused_attention: bool = True) -> float:
    """Bytes one transformer layer keeps for its backward, for one micro-batch on one rank
    (no recompute). Formulas in docs/plan.md; balanced routing assumed."""
    h, d, a = spec.hidden_size, spec.head_dim, act_bytes
    nh, nkv, e, k, f = (spec.num_attention_heads, spec.num_kv_heads, spec.num_experts,
                        spec.moe_router_topk, spec.moe_ffn_hidden_size)
    tokens = micro_batch * seq / cp
    hs = tp if sp else 1  # hidden-sized tensors are sharded over TP only with sequence parallel
    attn = a * (2 * h / hs  # input RMSNorm input, QKV GEMM input
                + (nh + 2 * nkv) * d / tp  # q, k, v projections
                + (nh + nkv) * d / tp  # q, k after (norm and) RoPE, what attention keeps
                + nh * d / tp)  # attention output (o_proj input)
    per_sample = 0.0
    if fused_attention:
        attn += 4 * nh / tp  # fp32 log-sum-exp per head
    else:  # unfused: fp32 softmax output + bf16 probabilities per head, [s, s] each
        per_sample = (nh / tp) * (seq / cp) * seq * (4 + a if a < 4 else 4)
    fs = spec.shared_expert_ffn_hidden_size
    moe = (a * 2 * h / hs  # pre-MLP RMSNorm input and output
           + (a + 4) * e / hs  # router logits and fp32 probabilities
           # expert tokens per rank: k copies of this rank's tokens, gathered over ETP
           + k * etp / hs * a * (2 * h + 3 * f / etp)  # fc1 input, gate+up, SwiGLU out, fc2 out
           + (a * 3 * fs / tp if fs else 0))
    return tokens * (attn + moe) + micro_batch * per_sample


def held_layer_microbatches(pp: int, vpp: int, micro_batches: int, num_layers: int,
                            stage: int) -> float:
    """Layer x micro-batch activations pipeline stage `stage` holds at its peak under megatron's
    1F1B schedule (interleaved when vpp > 1): in-flight micro-batches x layers per chunk."""
    if pp == 1:
        return num_layers  # one micro-batch at a time through every layer
    if vpp == 1:
        return min(pp - stage, micro_batches) * num_layers / pp
    chunks = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, micro_batches * vpp)
    return chunks * num_layers / (pp * vpp)


def stage_params(pc: ParamCounts, cfg: Config, first: bool, last: bool) -> tuple[float, float]:
    """(dense, expert) parameters on one rank of a pipeline stage."""
    p = cfg.parallel
    tp, layers = p.tensor_parallel, pc.num_layers / p.pipeline_parallel
    dense = layers * ((pc.attention + pc.shared_expert) / tp + pc.norms + pc.router)
    if first:
        dense += pc.embedding / tp
    if last:
        dense += pc.final_norm
        # tied embeddings: the last stage keeps its own copy of the embedding when PP > 1
        dense += (pc.lm_head or (pc.embedding if p.pipeline_parallel > 1 else 0)) / tp
    experts = layers * (pc.num_experts / p.expert_parallel) * pc.expert / p.expert_tensor_parallel
    return dense, experts


def learner_memory(cfg: Config, seq: int) -> dict:
    """Per-GPU memory of a learner rank (bytes), for the first and the last pipeline stage (the
    heaviest ones); `worst` is the larger."""
    spec, p, tr = cfg.model, cfg.parallel, cfg.train
    lay = layout(cfg)
    pc = param_counts(spec)
    w, g, o = weight_bytes(cfg), 4.0, optimizer_bytes(cfg)  # grads: grad_reduce_in_fp32
    a = 4 if cfg.precision.params_dtype == "float32" else 2
    dp, edp = lay["data_parallel"] * p.context_parallel, lay["expert_data_parallel"]
    fused = uses_te_layer_spec(cfg)
    per_layer = activation_bytes_per_layer(
        spec, micro_batch=p.micro_batch_size, seq=seq, tp=p.tensor_parallel,
        etp=p.expert_tensor_parallel, sp=lay["sequence_parallel"], cp=p.context_parallel,
        act_bytes=a, fused_attention=fused)
    tokens = p.micro_batch_size * seq / p.context_parallel
    hs = p.tensor_parallel if lay["sequence_parallel"] else 1
    # megatron pads the vocabulary so TP divides it (models.spec.padded_vocab_size)
    v_local = padded_vocab_size(spec, p.tensor_parallel) / p.tensor_parallel
    logits = (2 * a * tokens * v_local  # logits and their gradient
              + VOCAB_CHUNK_BUFFERS * 4 * min(VOCAB_CHUNK_TOKENS, tokens) * v_local
              + a * 2 * tokens * spec.hidden_size / hs)  # final norm input and output
    # Weight publishing gathers one full tensor at a time on every rank (plus its HF copy) and
    # rank 0 fills one bucket.
    largest = max(pc.embedding, spec.num_attention_heads * spec.head_dim * spec.hidden_size,
                  spec.moe_ffn_hidden_size * spec.hidden_size)
    sync = 2 * (4 if a == 4 else 2) * largest + cfg.weight_sync.bucket_mb * 2 ** 20
    reserve = LEARNER_RESERVE_GIB * GIB
    stages = {}
    names = [("first", 0, True, p.pipeline_parallel == 1)]
    if p.pipeline_parallel > 1:
        names.append(("last", p.pipeline_parallel - 1, False, True))
    for name, index, first, last in names:
        dense, experts = stage_params(pc, cfg, first, last)
        held = held_layer_microbatches(p.pipeline_parallel, p.virtual_pipeline_parallel,
                                       lay["micro_batches_per_step"], spec.num_layers, index)
        opt_dist = dense * o / dp + experts * o / edp
        opt_full = (dense + experts) * o
        acts = held * per_layer
        recompute = (held * tokens * a * spec.hidden_size / hs  # layer inputs only
                     + per_layer)  # plus one layer rebuilt during its backward
        parts = dict(
            weights=(dense + experts) * w,
            # correction.proximal=replica: a second model on the learner GPUs
            replica=(dense + experts) * w if cfg.correction.proximal == "replica" else 0.0,
            gradients=(dense + experts) * g,
            optimizer=opt_dist if tr.distributed_optimizer else opt_full,
            activations=acts,
            logits=logits if last else 0.0,
            weight_sync=sync,
            reserve=reserve)
        stages[name] = dict(
            stage=index, params_dense=dense, params_experts=experts, parts=parts,
            host=proximal_host_bytes(cfg, dense + experts, w),
            total=sum(parts.values()),
            optimizer_distributed=opt_dist, optimizer_replicated=opt_full,
            activations_full_recompute=recompute,
            layer_microbatches_held=held, activation_per_layer=per_layer)
    worst = max(stages, key=lambda n: stages[n]["total"])
    return dict(stages=stages, worst=worst, total=stages[worst]["total"],
                fused_attention=fused, weight_bytes=w, grad_bytes=g, optimizer_bytes=o,
                activation_bytes=a, tokens_per_micro_batch=tokens)


def proximal_host_bytes(cfg: Config, params: float, w: float) -> dict:
    """CPU memory a learner rank holds for pi_old (learner/proximal.py), from the rank's
    parameter count: snapshots of versions [v - S, v] (or of the publish_lag + 1 newest for a
    lagged fleet) in the weights' dtype, the EWMA's float32 copy (plus a transient copy of the
    live weights during its forward)."""
    corr, a = cfg.correction, cfg.async_
    keep = a.max_staleness + 1 if corr.proximal == "snapshot" else \
        (a.publish_lag + 1 if a.publish_lag else 0)
    snapshots = keep * params * w
    ewma = params * 4.0 if corr.proximal == "ewma" else 0.0
    transient = params * w if corr.proximal == "ewma" else 0.0
    return dict(snapshots=snapshots, snapshot_versions=keep, ewma=ewma, transient=transient,
                total=snapshots + ewma + transient)


# ---------------------------------------------------------------- SGLang fleets
def server_memory(spec: MoEModelSpec, gpus: int, dtype: str, max_total_tokens: int,
                  seq: int, gpu_bytes: float, key: str) -> dict:
    """Per-GPU memory of one SGLang server with tensor parallel `gpus` (experts, attention heads
    and the vocabulary sharded; KV heads replicated when gpus > num_kv_heads)."""
    nh, nkv = spec.num_attention_heads, spec.num_kv_heads
    if nh % gpus:
        raise ConfigError(f"{key}: {gpus} GPUs per server must divide the served model's "
                          f"num_attention_heads = {nh} (SGLang shards heads over --tp-size)")
    if nkv % gpus and gpus % nkv:
        raise ConfigError(f"{key}: {gpus} GPUs per server must divide or be a multiple of the "
                          f"served model's num_kv_heads = {nkv}")
    s = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    pc = param_counts(spec)
    h, d = spec.hidden_size, spec.head_dim
    kv_heads = max(1, nkv // gpus)
    per_layer = (2 * h * nh * d / gpus + 2 * h * kv_heads * d + pc.norms + pc.router
                 + (pc.num_experts * pc.expert + pc.shared_expert) / gpus)
    params = (pc.embedding + pc.lm_head) / gpus + pc.final_norm + spec.num_layers * per_layer
    weights = params * s
    kv_per_token = 2 * spec.num_layers * kv_heads * d * s
    kv = max_total_tokens * kv_per_token
    budget = SGLANG_MEM_FRACTION * gpu_bytes
    room_tokens = max(0, int((budget - weights) // kv_per_token))
    fits = weights + kv <= budget and max_total_tokens >= seq
    why = ""
    if weights > budget:
        why = "weights alone exceed SGLang's static memory"
    elif weights + kv > budget:
        why = (f"server.max_total_tokens = {max_total_tokens} KV tokens do not fit; at most "
               f"{room_tokens} do")
    elif max_total_tokens < seq:
        why = (f"server.max_total_tokens = {max_total_tokens} holds less than one sequence of "
               f"{seq} tokens")
    return dict(gpus_per_server=gpus, dtype=dtype, params_per_gpu=params, weights=weights,
                kv_per_token=kv_per_token, kv_cache=kv, max_total_tokens=max_total_tokens,
                static_budget=budget, room_tokens=room_tokens,
                sequences_in_kv=max_total_tokens // seq, total=weights + kv, fits=fits, why=why)


# ---------------------------------------------------------------- checkpoints named by init.*
# spec field -> the HF config.json keys that hold it (the first one present is compared)
_HF_KEYS = {
    "vocab_size": ("vocab_size",), "hidden_size": ("hidden_size",),
    "num_layers": ("num_hidden_layers",), "num_attention_heads": ("num_attention_heads",),
    "num_kv_heads": ("num_key_value_heads",), "head_dim": ("head_dim",),
    "moe_ffn_hidden_size": ("moe_intermediate_size", "intermediate_size"),
    "num_experts": ("num_experts", "num_local_experts"),
    "moe_router_topk": ("num_experts_per_tok",),
    "tie_word_embeddings": ("tie_word_embeddings",),
}


def check_init_dir(spec: MoEModelSpec, path: str, spec_key: str, init_key: str) -> bool:
    """Compare the config.json of a checkpoint directory with the spec that describes it; raise
    ConfigError naming the spec key on a mismatch. False when there is no config.json here."""
    import json

    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    hf = json.loads(file.read_text())
    for field, keys in _HF_KEYS.items():
        key = next((k for k in keys if hf.get(k) is not None), None)
        if key is None:
            continue
        if field == "head_dim" and spec.family == "mixtral":
            continue  # Mixtral derives it (validated against hidden_size / heads)
        if hf[key] != getattr(spec, field):
            raise ConfigError(f"{spec_key}.{field}: {getattr(spec, field)!r} but {init_key} = "
                              f"{path} has {key} = {hf[key]!r} in config.json")
    return True


# ---------------------------------------------------------------- the plan
def sequence_length(cfg: Config, prompt_tokens: int | None) -> tuple[int, int]:
    """(prompt tokens, sequence length the learner pads to: prompt + rollout.max_new_tokens,
    capped by model.max_position_embeddings)."""
    from megatron_opd.envs import max_prompt_tokens

    prompt = max_prompt_tokens(cfg) if prompt_tokens is None else prompt_tokens
    return prompt, min(prompt + cfg.rollout.max_new_tokens, cfg.model.max_position_embeddings)


def make_plan(cfg: Config, prompt_tokens: int | None = None) -> dict:
    """Everything `megatron-opd plan` prints. Raises ConfigError on a layout that cannot run
    (on top of `load_config`'s checks: the cluster fit and the node placement)."""
    if prompt_tokens is not None and prompt_tokens < 1:
        raise ConfigError(f"--prompt-tokens: must be >= 1, got {prompt_tokens}")
    validate_cluster_fit(cfg)
    lay = layout(cfg)
    prompt, seq = sequence_length(cfg, prompt_tokens)
    c = cfg.cluster
    gpu_bytes = c.gpu_memory_gib * GIB
    teacher_spec = run_teacher_spec(cfg)
    models = {}
    for role, spec in (("student", cfg.model), ("teacher", teacher_spec)):
        pc = param_counts(spec)
        models[role] = dict(family=spec.family, total=pc.total, active=pc.active,
                            layers=spec.num_layers, experts=spec.num_experts,
                            topk=spec.moe_router_topk, vocab_size=spec.vocab_size)
    nodes = {"learner": c.learner_nodes, "rollout": c.rollout.nodes, "teacher": c.teacher.nodes}
    per_node = c.gpus_per_node
    fleets = {}
    for role, spec in (("rollout", cfg.model), ("teacher", teacher_spec)):
        fleet = getattr(c, role)
        mem = server_memory(spec, fleet.gpus_per_server, cfg.server.dtype,
                            cfg.server.max_total_tokens, seq, gpu_bytes,
                            f"cluster.{role}.gpus_per_server")
        servers = fleet.nodes * (per_node // fleet.gpus_per_server if per_node else 1)
        fleets[role] = dict(nodes=fleet.nodes, servers=servers, memory=mem)
    learner = learner_memory(cfg, seq)
    warnings = list(lay["notes"])
    for key, spec, spec_key in (("student", cfg.model, "model"),
                                ("teacher", teacher_spec, "teacher.model")):
        path = getattr(cfg.init, key)
        if path and not check_init_dir(spec, path, spec_key, f"init.{key}"):
            warnings.append(f"init.{key} = {path} has no config.json here, not compared with "
                            f"{spec_key} (fine if it lives on the cluster's filesystem)")
    if not cfg.init.student and cfg.model.num_layers * cfg.model.hidden_size > 4096:
        warnings.append("init.student is empty: `megatron-opd prepare` would train this student "
                        "from scratch on the digits environment; point init.student at a "
                        "checkpoint")
    if prompt + cfg.rollout.max_new_tokens > seq:
        warnings.append(f"prompt + rollout.max_new_tokens exceeds model.max_position_embeddings "
                        f"= {cfg.model.max_position_embeddings}: sequences capped at {seq}")
    if not learner["fused_attention"] and seq >= 2048:
        warnings.append("bf16 without precision.fp8 builds megatron's local layers: unfused "
                        "attention keeps [seq, seq] scores per head (see activations)")
    verdict = {}
    learner_fits = learner["total"] <= gpu_bytes
    verdict["learner"] = dict(total=learner["total"], fits=learner_fits,
                              headroom=gpu_bytes - learner["total"])
    for role, fl in fleets.items():
        m = fl["memory"]
        # a server's headroom is what is left of SGLang's static share (weights + KV cache)
        verdict[role] = dict(total=m["total"], fits=m["fits"], limit=m["static_budget"],
                             headroom=m["static_budget"] - m["total"], why=m["why"])
    verdict["learner"]["limit"] = gpu_bytes
    fits = all(v["fits"] for v in verdict.values())
    tight = [r for r, v in verdict.items() if v["fits"] and v["headroom"] < TIGHT_HEADROOM * v["limit"]]
    gpus = {r: n * per_node for r, n in nodes.items()}
    return dict(
        models=models, layout=lay, nodes=nodes, gpus=gpus, total_nodes=sum(nodes.values()),
        total_gpus=sum(gpus.values()), gpus_per_node=per_node, gpu_memory_gib=c.gpu_memory_gib,
        prompt_tokens=prompt, sequence_length=seq,
        precision=dict(params_dtype=cfg.precision.params_dtype, fp8=cfg.precision.fp8,
                       fp8_param_gather=cfg.precision.fp8_param_gather),
        distributed_optimizer=cfg.train.distributed_optimizer,
        learner=learner, fleets=fleets, warnings=warnings,
        verdict=dict(fits=fits, tight=tight, parts=verdict))


# ---------------------------------------------------------------- text output
def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _g(n: float) -> str:
    return f"{n / GIB:6.1f}"


def format_plan(plan: dict, source: str = "") -> str:
    lay, lm, v = plan["layout"], plan["learner"], plan["verdict"]
    gib = plan["gpu_memory_gib"]
    out = [f"megatron-opd plan{': ' + source if source else ''}", "", "models"]
    for role, m in plan["models"].items():
        out.append(f"  {role:8s} {m['family']:10s} {_b(m['total']):>9s} params, "
                   f"{_b(m['active'])} active per token ({m['layers']} layers, "
                   f"{m['experts']} experts, top-{m['topk']}, vocab {m['vocab_size']})")
    per_node = plan["gpus_per_node"]
    unit = f"{per_node} GPUs x {gib:g} GiB per node" if per_node else "CPU nodes"
    out += ["", f"cluster: {plan['total_nodes']} nodes, {plan['total_gpus']} GPUs ({unit})"]
    out.append(f"  learner  {plan['nodes']['learner']:3d} nodes {plan['gpus']['learner']:4d} GPUs"
               f"  torchrun, {lay['ranks_per_node']} ranks per node, world {lay['world_size']}")
    for role, fl in plan["fleets"].items():
        out.append(f"  {role:8s} {fl['nodes']:3d} nodes {plan['gpus'][role]:4d} GPUs"
                   f"  {fl['servers']} SGLang servers x {fl['memory']['gpus_per_server']} GPUs")
    out += ["", "learner layout",
            f"  TP {lay['tensor_parallel']}  PP {lay['pipeline_parallel']}  "
            f"VPP {lay['virtual_pipeline_parallel']}  CP {lay['context_parallel']}  "
            f"EP {lay['expert_parallel']}  ETP {lay['expert_tensor_parallel']}  "
            f"DP {lay['data_parallel']}  expert-DP {lay['expert_data_parallel']}",
            f"  node 0 ranks 0-{lay['ranks_per_node'] - 1}: TP groups "
            + " ".join("{" + g + "}" for g in lay["tp_groups_node0"])
            + " (every TP group inside a node)",
            f"  expert-parallel groups span {lay['ep_group_nodes']} node(s); pipeline stages "
            f"{lay['pipeline_stage_stride']} ranks apart",
            f"  micro-batch {lay['micro_batch_size']} x {plan['sequence_length']} tokens "
            f"(prompt {plan['prompt_tokens']} + new), {lay['micro_batches_per_step']} "
            f"micro-batches per step per DP rank, sequence parallel "
            f"{'on' if lay['sequence_parallel'] else 'off'}, no recompute, "
            f"{'fused (TE)' if lm['fused_attention'] else 'unfused (local layers)'} attention"]
    pr = plan["precision"]
    prec = pr["params_dtype"] + (f" + FP8 {pr['fp8']}" if pr["fp8"] else "")
    for name, st in lm["stages"].items():
        p = st["parts"]
        label = "the only stage" if name == "first" and len(lm["stages"]) == 1 else \
            f"{name} stage ({st['stage']})"
        dist = "distributed over DP" if plan["distributed_optimizer"] else "replicated"
        out += ["", f"learner memory per GPU, {label}: {_b(st['params_dense'])} dense + "
                    f"{_b(st['params_experts'])} expert params  [GiB]",
                f"  weights      {_g(p['weights'])}  {lm['weight_bytes']:g} B/param ({prec})",
                *([f"  replica      {_g(p['replica'])}  correction.proximal=replica: a second "
                   f"model at the fleet's version"] if p["replica"] else []),
                f"  gradients    {_g(p['gradients'])}  {lm['grad_bytes']:g} B/param (fp32 buffer)",
                f"  optimizer    {_g(p['optimizer'])}  Adam {lm['optimizer_bytes']:g} B/param, "
                f"{dist} (distributed {_g(st['optimizer_distributed']).strip()}, "
                f"replicated {_g(st['optimizer_replicated']).strip()})",
                f"  activations  {_g(p['activations'])}  {st['layer_microbatches_held']:g} "
                f"layer x micro-batches held, {_g(st['activation_per_layer']).strip()} per "
                f"layer (full recompute would need {_g(st['activations_full_recompute']).strip()})",
                f"  logits       {_g(p['logits'])}  {'fp32' if lm['activation_bytes'] == 4 else 'bf16'} "
                f"logits + gradient + fp32 chunks (last stage)",
                f"  weight sync  {_g(p['weight_sync'])}  largest gathered tensor x2 + bucket",
                f"  reserve      {_g(p['reserve'])}  CUDA context, NCCL, fragmentation",
                f"  total        {_g(st['total'])}  of {gib:g}"]
        h = st["host"]
        if h["total"]:
            out.append(f"  host (CPU) memory for pi_old: {_g(h['total']).strip()} GiB per rank, "
                       f"{_g(h['total'] * lay['ranks_per_node']).strip()} GiB per node "
                       f"({h['snapshot_versions']} snapshot versions {_g(h['snapshots']).strip()}"
                       f", EWMA {_g(h['ewma']).strip()} + transient "
                       f"{_g(h['transient']).strip()})")
    for role, fl in plan["fleets"].items():
        m = fl["memory"]
        out += ["", f"{role} server per GPU ({m['gpus_per_server']} GPUs per server, {m['dtype']})"
                    f"  [GiB]",
                f"  weights      {_g(m['weights'])}  {_b(m['params_per_gpu'])} params per GPU",
                f"  KV cache     {_g(m['kv_cache'])}  server.max_total_tokens = "
                f"{m['max_total_tokens']} x {m['kv_per_token'] / 1024:.1f} KiB "
                f"({m['sequences_in_kv']} sequences of {plan['sequence_length']})",
                f"  total        {_g(m['total'])}  of {SGLANG_MEM_FRACTION:g} x {gib:g} = "
                f"{_g(m['static_budget']).strip()} static; room for {m['room_tokens']} KV tokens"]
    out += [""] + [f"warning: {w}" for w in plan["warnings"]]
    parts = []
    for role, pv in v["parts"].items():
        state = "fits" if pv["fits"] else "DOES NOT FIT"
        parts.append(f"{role} {_g(pv['total']).strip()}/{_g(pv['limit']).strip()} GiB {state}"
                     + (f" (headroom {_g(pv['headroom']).strip()} GiB)" if pv["fits"] else
                        f" ({pv.get('why') or 'over the GPU memory'})"))
    head = "FITS" if v["fits"] else "DOES NOT FIT"
    if v["fits"] and v["tight"]:
        head += f" (tight: {', '.join(v['tight'])} under {TIGHT_HEADROOM:.0%} headroom)"
    out.append(f"verdict: {head} in {gib:g} GiB per GPU: " + "; ".join(parts))
    return "\n".join(line for i, line in enumerate(out) if line or out[i - 1])
