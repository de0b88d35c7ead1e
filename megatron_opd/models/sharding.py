"""Where each parameter of a parallel megatron model lives, and full tensors from any layout.

A "full" name is the parameter's name in a one-process model (`decoder.layers.{global layer}.`,
`local_experts.{global expert}.`); `models.hf_mapping` converts full names to Hugging Face.
Shard kinds (megatron 0.16.1 conventions):
- tensor-parallel `partition_dim` 0 (column-parallel, vocab-parallel embedding) or 1 (row-parallel):
  the full tensor is the concatenation of the TP ranks' shards along that dim; linear_qkv rows
  are grouped by query group, so a rank's rows are whole groups and plain concatenation is right;
- gated fc1 ([gate; up]) under TP: each rank holds [gate shard; up shard], so the halves are
  gathered separately;
- experts: EP rank r holds global experts r*E_local .. r*E_local+E_local-1, sharded over the
  expert-tensor-parallel group;
- pipeline: a layer lives on exactly one (stage, virtual chunk); embedding on the first stage,
  final norm and output layer on the last;
- vocabulary: the embedding and output layer have `padded_vocab_size(spec, tp)` rows (megatron
  pads the vocabulary for TP); full tensors here keep those rows, `hf_mapping` adds / strips them.
Every collective here is called by all ranks in the same order (derived from spec + layout only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_opd.models.spec import MoEModelSpec, padded_vocab_size

# full names of the tensors with one row per (padded) vocabulary id
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# Transformer Engine layer spec (FP8) names -> the local spec's names used as full names: TE
# fuses the input RMSNorm into the QKV projection.
_TE_RENAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight"}
_EXPERT = re.compile(r"^(.*mlp\.experts\.local_experts\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class Placement:
    local_name: str  # name inside its model chunk
    chunk: int  # virtual pipeline chunk index on this rank
    full_name: str
    partition_dim: int | None  # None: whole on every rank of its TP group
    glu: bool  # gated fc1 sharded as [gate shard; up shard]
    expert: bool  # sharded over the expert-tensor-parallel group instead of TP


def _layer_offsets(chunk) -> list[int]:
    return [layer.layer_number - 1 for layer in chunk.decoder.layers] if hasattr(chunk, "decoder") else []


def placements(chunks: list, groups) -> dict[torch.nn.Parameter, Placement]:
    """Placement of every parameter of this rank's model chunks."""
    out = {}
    for c, chunk in enumerate(chunks):
        offsets = _layer_offsets(chunk)
        gated = chunk.config.gated_linear_unit
        for name, param in chunk.named_parameters():
            full = name
            m = _LAYER.match(name)
            if m:
                suffix = _TE_RENAMES.get(m.group(2), m.group(2))
                full = f"decoder.layers.{offsets[int(m.group(1))]}.{suffix}"
            e = _EXPERT.match(full)
            is_expert = e is not None
            if e:
                local = len(_local_experts(chunk, full))
                full = f"{e.group(1)}{groups.ep_rank * local + int(e.group(2))}{e.group(3)}"
            sharded = getattr(param, "tensor_model_parallel", False)
            dim = param.partition_dim if sharded else None
            out[param] = Placement(name, c, full, dim,
                                   glu=sharded and gated and name.endswith("linear_fc1.weight"),
                                   expert=is_expert)
    return out


def _local_experts(chunk, full_name: str):
    layer = int(_LAYER.match(full_name).group(1))
    local = [m for m in chunk.decoder.layers if m.layer_number - 1 == layer][0]
    return local.mlp.experts.local_experts


# ----------------------------------------------------------------------------- full names + order
def layer_stage(layer: int, spec: MoEModelSpec, layout) -> int:
    """Pipeline stage holding global layer `layer` (virtual chunks interleave round-robin)."""
    per_block = spec.num_layers // (layout.pipeline_parallel * layout.virtual_pipeline_parallel)
    return (layer // per_block) % layout.pipeline_parallel


def full_shapes(spec: MoEModelSpec, vocab_rows: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Every full parameter name of the one-process megatron model with its shape, in the order
    weights are streamed (embedding, layer by layer, final norm, output layer). Parameters only:
    the router's expert bias (`router_expert_bias`) is a buffer, not listed. Family-dependent:
    q/k layernorm (qwen3_moe only); shared expert when `shared_expert_ffn_hidden_size` > 0.
    `vocab_rows`: rows of the vocabulary tensors (default the true vocab_size; a TP model's are
    `padded_vocab_size(spec, tp)`)."""
    H, d, F = spec.hidden_size, spec.head_dim, spec.moe_ffn_hidden_size
    S = spec.shared_expert_ffn_hidden_size
    V = spec.vocab_size if vocab_rows is None else vocab_rows
    qkv = (spec.num_attention_heads + 2 * spec.num_kv_heads) * d
    out = [("embedding.word_embeddings.weight", (V, H))]
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,)),
                (p + "self_attention.linear_qkv.weight", (qkv, H))]
        if spec.qk_layernorm:
            out += [(p + "self_attention.q_layernorm.weight", (d,)),
                    (p + "self_attention.k_layernorm.weight", (d,))]
        out += [(p + "self_attention.linear_proj.weight", (H, spec.num_attention_heads * d)),
                (p + "pre_mlp_layernorm.weight", (H,)),
                (p + "mlp.router.weight", (spec.num_experts, H))]
        if S:
            out += [(p + "mlp.shared_experts.linear_fc1.weight", (2 * S, H)),
                    (p + "mlp.shared_experts.linear_fc2.weight", (H, S))]
        for e in range(spec.num_experts):
            out += [(f"{p}mlp.experts.local_experts.{e}.linear_fc1.weight", (2 * F, H)),
                    (f"{p}mlp.experts.local_experts.{e}.linear_fc2.weight", (H, F))]
    out.append(("decoder.final_layernorm.weight", (H,)))
    if not spec.tie_word_embeddings:
        out.append(("output_layer.weight", (V, H)))
    return out


def _owner_stage(full_name: str, spec: MoEModelSpec, layout) -> int:
    m = _LAYER.match(full_name)
    if m:
        return layer_stage(int(m.group(1)), spec, layout)
    return 0 if full_name.startswith("embedding.") else layout.pipeline_parallel - 1


# ----------------------------------------------------------------------------- gather
def _all_gather_cat(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _unshard(t: torch.Tensor, pl: Placement, groups) -> torch.Tensor:
    """Undo tensor (or expert-tensor) parallelism of one local tensor."""
    if pl.partition_dim is None:
        return t
    group = groups.etp if pl.expert else groups.tp
    if pl.glu:
        gate, up = t.chunk(2, dim=0)
        return torch.cat([_all_gather_cat(gate, group, 0), _all_gather_cat(up, group, 0)], dim=0)
    return _all_gather_cat(t, group, pl.partition_dim)


def iter_full_tensors(chunks: list, groups, spec: MoEModelSpec, *,
                      tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = lambda p: p,
                      dtype: torch.dtype | None = None,
                      only: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(full name, full tensor) for every parameter, on every rank. The order is `full_shapes`
    order except under expert parallelism, where each layer's experts come grouped by local slot
    (slot s of every EP rank together, one gather per slot). Vocabulary tensors come with the
    layout's padding rows (`hf_mapping.full_to_hf` strips them).
    `tensor_of` picks what to gather (the parameter, or e.g. its gradient `main_grad`); `only`
    restricts it to the full names it accepts (decided from the name alone, so identically on
    every rank; checkpoint conversion gathers a few layers at a time). All ranks must drain the
    iterator together (it runs collectives)."""
    layout = groups.layout
    by_full = {pl.full_name: (p, pl) for p, pl in placements(chunks, groups).items()}
    experts_per_rank = spec.num_experts // layout.expert_parallel
    order = full_shapes(spec, padded_vocab_size(spec, layout.tensor_parallel))
    shapes = dict(order)
    done: set[str] = set()
    with torch.no_grad():
        for name, shape in order:
            if name in done or (only is not None and not only(name)):
                continue
            e = _EXPERT.match(name)
            if e:  # gather this local slot from every EP rank at once
                local = int(e.group(2)) % experts_per_rank
                names = [f"{e.group(1)}{r * experts_per_rank + local}{e.group(3)}"
                         for r in range(layout.expert_parallel)]
            else:
                names = [name]
            stage = _owner_stage(name, spec, layout)
            tensors = None
            if groups.pp_rank == stage:
                mine = [n for n in names if n in by_full]
                assert len(mine) == 1, f"{name}: expected one local owner, found {mine}"
                p, pl = by_full[mine[0]]
                t = _unshard(tensor_of(p).detach(), pl, groups)
                t = t.to(dtype) if dtype is not None else t
                tensors = [t] if not e else [
                    x for x in _gather_list(t, groups.ep)]
            for i, n in enumerate(names):
                full = tensors[i] if tensors is not None else None
                yield n, _from_stage(full, shapes[n], stage, groups, dtype or _param_dtype(chunks),
                                     _param_device(chunks))
                done.add(n)


def _gather_list(t: torch.Tensor, group) -> list[torch.Tensor]:
    size = dist.get_world_size(group)
    if size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _param_dtype(chunks) -> torch.dtype:
    return next(chunks[0].parameters()).dtype


def _param_device(chunks) -> torch.device:
    # the first real one: checkpoint conversion keeps not-yet-loaded parameters on "meta"
    return next((p.device for c in chunks for p in c.parameters() if p.device.type != "meta"),
                torch.device("cpu"))


def _from_stage(t: torch.Tensor | None, shape, stage: int, groups, dtype,
                device) -> torch.Tensor:
    """Broadcast a full tensor from pipeline stage `stage` to all stages."""
    if groups.layout.pipeline_parallel == 1:
        return t
    if t is None:
        t = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(t, src=dist.get_global_rank(groups.pp, stage), group=groups.pp)
    return t


# ----------------------------------------------------------------------------- scatter
def _shard_of(full: torch.Tensor, pl: Placement, groups) -> torch.Tensor:
    if pl.partition_dim is None:
        return full
    group = groups.etp if pl.expert else groups.tp
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if pl.glu:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0)
    return full.chunk(size, dim=pl.partition_dim)[rank]


def load_full_state(chunks: list, groups, full: Callable[[str], torch.Tensor],
                    only: Callable[[str], bool] | None = None) -> None:
    """Copy into every local parameter its shard of `full(full_name)` (no communication: every
    rank reads the full tensors it needs); `only` restricts it to the full names it accepts."""
    with torch.no_grad():
        for p, pl in placements(chunks, groups).items():
            if only is not None and not only(pl.full_name):
                continue
            shard = _shard_of(full(pl.full_name), pl, groups)
            if shard.shape != p.shape:
                raise ValueError(f"{pl.full_name}: shard {tuple(shard.shape)} != local "
                                 f"{pl.local_name} {tuple(p.shape)}")
            p.copy_(shard)
