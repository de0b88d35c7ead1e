"""The one Megatron <-> Hugging Face parameter mapping for the MoE families (Qwen3-MoE, Mixtral).

Checkpoint tools and weight publishing to SGLang both use it. HF names are the on-disk
(per-expert) names that `save_pretrained` writes and SGLang loads (transformers 5 fuses experts
in memory, `mlp.experts.gate_up_proj` / `down_proj`, and converts back to these on save):
- qwen3_moe: `model.layers.i.mlp.gate.weight`, `mlp.experts.e.{gate,up,down}_proj.weight`,
  `self_attn.{q,k}_norm.weight`;
- mixtral: `model.layers.i.block_sparse_moe.gate.weight`,
  `block_sparse_moe.experts.e.{w1 (gate), w3 (up), w2 (down)}.weight`, no q/k norm.
Both: `self_attn.{q,k,v,o}_proj.weight`, `input_layernorm`, `post_attention_layernorm`,
`model.embed_tokens`, `model.norm`, `lm_head` (absent when tied).
Megatron packs attention as one `linear_qkv` whose rows are grouped by query group:
[q heads of group g (heads_per_group x head_dim) | k_g (head_dim) | v_g (head_dim)] for each g,
and each expert's `linear_fc1` as [gate; up].
Specs with knobs HF cannot express (models.spec.hf_unsupported) are refused here.
Vocabulary: megatron's embedding / output layer may have padding rows beyond `spec.vocab_size`
(models.spec.padded_vocab_size); HF -> megatron appends zero rows, megatron -> HF drops them, so
HF files and SGLang always see the true vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from megatron_opd.models.spec import MoEModelSpec, check_hf_expressible, padded_vocab_size

_VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def pad_vocab_rows(t: torch.Tensor, rows: int | None) -> torch.Tensor:
    """`t` [V, ...] with zero rows appended up to `rows` (megatron's vocabulary padding)."""
    if rows is None or rows == t.shape[0]:
        return t
    if rows < t.shape[0]:
        raise ValueError(f"cannot pad a vocabulary of {t.shape[0]} rows to {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


@dataclass(frozen=True)
class _FamilyNames:
    moe: str  # HF module holding router + experts, under the layer prefix
    gate: str  # per-expert HF names of the SwiGLU gate, up and down projections
    up: str
    down: str
    qk_norm: bool


_FAMILY_NAMES = {
    "qwen3_moe": _FamilyNames("mlp", "gate_proj", "up_proj", "down_proj", qk_norm=True),
    "mixtral": _FamilyNames("block_sparse_moe", "w1", "w3", "w2", qk_norm=False),
}


def _names(spec: MoEModelSpec) -> _FamilyNames:
    if spec.family not in _FAMILY_NAMES:
        raise ValueError(f"model.family: no Hugging Face mapping for family {spec.family!r} "
                         f"(known: {sorted(_FAMILY_NAMES)})")
    return _FAMILY_NAMES[spec.family]


def _layer_renames(spec: MoEModelSpec) -> dict[str, str]:
    """megatron suffix -> HF suffix, both under their layer prefix (non-expert, non-qkv)."""
    fam = _names(spec)
    out = {
        "input_layernorm.weight": "input_layernorm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    }
    if fam.qk_norm:
        out["self_attention.q_layernorm.weight"] = "self_attn.q_norm.weight"
        out["self_attention.k_layernorm.weight"] = "self_attn.k_norm.weight"
    out["mlp.router.weight"] = f"{fam.moe}.gate.weight"
    return out


def _expert_prefix(spec: MoEModelSpec, layer, e) -> str:
    return f"model.layers.{layer}.{_names(spec).moe}.experts.{e}."


def _split_qkv(qkv: torch.Tensor, spec: MoEModelSpec):
    g, d = spec.num_kv_heads, spec.head_dim
    per_group = spec.num_attention_heads // g
    w = qkv.view(g, per_group + 2, d, -1)
    q = w[:, :per_group].reshape(g * per_group * d, -1)
    k = w[:, per_group].reshape(g * d, -1)
    v = w[:, per_group + 1].reshape(g * d, -1)
    return q, k, v


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MoEModelSpec):
    g, d = spec.num_kv_heads, spec.head_dim
    per_group = spec.num_attention_heads // g
    hidden = q.shape[-1]
    w = torch.cat([q.view(g, per_group, d, hidden), k.view(g, 1, d, hidden),
                   v.view(g, 1, d, hidden)], dim=1)
    return w.reshape(-1, hidden)


def megatron_to_hf(state: Mapping[str, torch.Tensor], spec: MoEModelSpec) -> dict[str, torch.Tensor]:
    check_hf_expressible(spec)
    return dict(_iter_megatron_to_hf(state, spec))


def full_to_hf(name: str, t: torch.Tensor, spec: MoEModelSpec) -> list[tuple[str, torch.Tensor]]:
    """One full megatron tensor -> its Hugging Face tensor(s) (views, no copies). Callers check
    `check_hf_expressible(spec)` once (shared-expert tensors have no HF name: KeyError here)."""
    if name in _VOCAB_TENSORS:
        t = t[:spec.vocab_size]  # megatron's padding rows never leave megatron
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", t)]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", t)]
    if name == "output_layer.weight":
        return [] if spec.tie_word_embeddings else [("lm_head.weight", t)]
    if not name.startswith("decoder.layers."):
        raise KeyError(f"no Hugging Face name for megatron tensor {name}")
    _, _, i, suffix = name.split(".", 3)
    hp = f"model.layers.{i}."
    renames = _layer_renames(spec)
    if suffix in renames:
        return [(hp + renames[suffix], t)]
    if suffix == "self_attention.linear_qkv.weight":
        q, k, v = _split_qkv(t, spec)
        return [(hp + "self_attn.q_proj.weight", q), (hp + "self_attn.k_proj.weight", k),
                (hp + "self_attn.v_proj.weight", v)]
    if suffix.startswith("mlp.experts.local_experts."):
        _, _, _, e, kind, _ = suffix.split(".")
        fam, hep = _names(spec), _expert_prefix(spec, i, e)
        if kind == "linear_fc1":
            gate, up = t.chunk(2, dim=0)
            return [(f"{hep}{fam.gate}.weight", gate), (f"{hep}{fam.up}.weight", up)]
        return [(f"{hep}{fam.down}.weight", t)]
    raise KeyError(f"no Hugging Face name for megatron tensor {name}")


def full_from_hf(name: str, get: Callable[[str], torch.Tensor],
                 spec: MoEModelSpec, vocab_rows: int | None = None) -> torch.Tensor:
    """The inverse of `full_to_hf` for one full megatron tensor: `get(hf_name)` supplies the HF
    tensors it is made of (read lazily by the caller, e.g. one safetensors slice at a time).
    `vocab_rows`: the megatron model's (padded) vocabulary rows; zero rows are appended."""
    if name == "embedding.word_embeddings.weight":
        return pad_vocab_rows(get("model.embed_tokens.weight"), vocab_rows)
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    if name == "output_layer.weight":  # tied: the (PP last-stage) copy of the embedding
        return pad_vocab_rows(get("model.embed_tokens.weight" if spec.tie_word_embeddings
                                  else "lm_head.weight"), vocab_rows)
    m = name.split(".", 3)
    if m[:2] != ["decoder", "layers"] or len(m) < 4:
        raise KeyError(f"no Hugging Face name for megatron tensor {name}")
    i, suffix = m[2], m[3]
    hp = f"model.layers.{i}."
    renames = _layer_renames(spec)
    if suffix in renames:
        return get(hp + renames[suffix])
    if suffix == "self_attention.linear_qkv.weight":
        return _merge_qkv(get(hp + "self_attn.q_proj.weight"), get(hp + "self_attn.k_proj.weight"),
                          get(hp + "self_attn.v_proj.weight"), spec)
    if suffix.startswith("mlp.experts.local_experts."):
        _, _, _, e, kind, _ = suffix.split(".")
        fam, hep = _names(spec), _expert_prefix(spec, i, e)
        if kind == "linear_fc1":
            return torch.cat([get(f"{hep}{fam.gate}.weight"), get(f"{hep}{fam.up}.weight")], dim=0)
        return get(f"{hep}{fam.down}.weight")
    raise KeyError(f"no Hugging Face name for megatron tensor {name}")


def _iter_megatron_to_hf(state: Mapping[str, torch.Tensor], spec: MoEModelSpec):
    from megatron_opd.models.sharding import full_shapes

    for name, _ in full_shapes(spec):
        if name in state:
            yield from full_to_hf(name, state[name], spec)


def hf_to_megatron(hf: Mapping[str, torch.Tensor], spec: MoEModelSpec,
                   vocab_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Full megatron tensors of an HF state dict; `vocab_rows` pads the vocabulary tensors."""
    fam = _names(spec)
    expected = set(hf_names(spec))
    missing, unexpected = expected - set(hf), set(hf) - expected
    if missing or unexpected:
        raise KeyError(f"HF checkpoint does not match the model spec: missing {sorted(missing)[:10]}"
                       f", unexpected {sorted(unexpected)[:10]}")
    out = {"embedding.word_embeddings.weight": pad_vocab_rows(hf["model.embed_tokens.weight"],
                                                              vocab_rows),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not spec.tie_word_embeddings:
        out["output_layer.weight"] = pad_vocab_rows(hf["lm_head.weight"], vocab_rows)
    for i in range(spec.num_layers):
        mp, hp = f"decoder.layers.{i}.", f"model.layers.{i}."
        for msuf, hsuf in _layer_renames(spec).items():
            out[mp + msuf] = hf[hp + hsuf]
        out[mp + "self_attention.linear_qkv.weight"] = _merge_qkv(
            hf[hp + "self_attn.q_proj.weight"], hf[hp + "self_attn.k_proj.weight"],
            hf[hp + "self_attn.v_proj.weight"], spec)
        for e in range(spec.num_experts):
            ep, hep = f"{mp}mlp.experts.local_experts.{e}.", _expert_prefix(spec, i, e)
            out[ep + "linear_fc1.weight"] = torch.cat(
                [hf[f"{hep}{fam.gate}.weight"], hf[f"{hep}{fam.up}.weight"]], dim=0)
            out[ep + "linear_fc2.weight"] = hf[f"{hep}{fam.down}.weight"]
    return out


def hf_names(spec: MoEModelSpec) -> list[str]:
    """Every HF tensor name of this architecture (on-disk, per-expert names)."""
    check_hf_expressible(spec)
    fam = _names(spec)
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(spec.num_layers):
        hp = f"model.layers.{i}."
        names += [hp + h for h in _layer_renames(spec).values()]
        names += [hp + f"self_attn.{p}_proj.weight" for p in "qkv"]
        names += [f"{_expert_prefix(spec, i, e)}{p}.weight" for e in range(spec.num_experts)
                  for p in (fam.gate, fam.up, fam.down)]
    return names


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def iter_hf_weights(model, spec: MoEModelSpec, groups=None,
                    dst: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) in a fixed order, for streaming to SGLang or saving. `model` is one
    GPTModel (world of one) or, with `groups`, this rank's list of model chunks under any layout:
    then every rank must drain the iterator (it gathers shards) and every rank gets every tensor;
    with `dst` (a global rank) only that rank gets them, in the world-of-one order, and the
    others yield nothing (publishing: see `_iter_gathered_to`).
    Tensors may be views of parameters: consume them before the next optimizer step.
    Raises at once (before any collective) if HF cannot express the spec."""
    check_hf_expressible(spec)
    if groups is not None and dst is not None:
        return _iter_gathered_to(model, spec, groups, dst)
    return _iter_hf_weights(model, spec, groups)


def _iter_hf_weights(model, spec: MoEModelSpec, groups) -> Iterator[tuple[str, torch.Tensor]]:
    from megatron_opd.models.sharding import iter_full_tensors

    with torch.no_grad():
        if groups is None:
            full = _iter_megatron_to_hf(_weights(model), spec)
        else:
            full = (hf for name, t in iter_full_tensors(model, groups, spec)
                    for hf in full_to_hf(name, t, spec))
        for name, t in full:
            yield name, t.detach().contiguous()


_ALIGN = 8  # bytes: every piece of a packed buffer starts aligned for any dtype


def _unit_of(full_name: str, spec: MoEModelSpec) -> int:
    """Embedding 0, layer i: i + 1, final norm and output layer: num_layers + 1."""
    if full_name.startswith("decoder.layers."):
        return int(full_name.split(".", 3)[2]) + 1
    return 0 if full_name.startswith("embedding.") else spec.num_layers + 1


def _my_pieces(chunks, groups, spec: MoEModelSpec, wanted: set[str]):
    """This rank's share of the full tensors: [(unit, full name, shard, shards, dim, glu,
    tensor)]. Each shard is sent by one rank only: data-parallel replica 0 (the experts': their
    own data-parallel group's 0), and for a tensor whole on every rank of its tensor-parallel
    group, that group's rank 0."""
    import torch.distributed as dist

    from megatron_opd.models.sharding import placements

    lay = groups.layout
    edp_rank = dist.get_rank(groups.edp) if groups.edp is not None else 0
    out = []
    for p, pl in placements(chunks, groups).items():
        if pl.full_name not in wanted:
            continue  # e.g. a tied output layer's copy on the last stage
        shards, shard = (lay.expert_tensor_parallel, groups.etp_rank) if pl.expert else \
            (lay.tensor_parallel, groups.tp_rank)
        if pl.partition_dim is None:
            shards, shard = 1, 0
        replica0 = edp_rank == 0 if pl.expert else groups.dp_rank == 0
        if replica0 and (shards > 1 or shard == 0):
            out.append((_unit_of(pl.full_name, spec), pl.full_name, shard, shards,
                        -1 if pl.partition_dim is None else pl.partition_dim, pl.glu, p.detach()))
    out.sort(key=lambda x: (x[0], x[1], x[2]))
    return out


def _exchange_metadata(pieces, dst: int, world: int):
    """Global rank dst learns every rank's pieces (JSON in a byte tensor; no pickle)."""
    import json

    import torch.distributed as dist

    meta = json.dumps([[u, n, k, m, d, g, list(t.shape), str(t.dtype).removeprefix("torch.")]
                       for u, n, k, m, d, g, t in pieces]).encode()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(meta)], dtype=torch.int64))
    longest = int(max(x.item() for x in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[:len(meta)] = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)] \
        if dist.get_rank() == dst else None
    dist.gather(buf, parts, dst=dst)
    if parts is None:
        return None
    return [json.loads(bytes(p[:int(n.item())].numpy()).decode()) for p, n in zip(parts, sizes)]


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _pack(pieces) -> torch.Tensor:
    """One byte buffer of the pieces (each flattened, padded to _ALIGN)."""
    out = torch.empty(sum(_padded(t.numel() * t.element_size()) for *_, t in pieces),
                      dtype=torch.uint8)
    off = 0
    for *_, t in pieces:
        n = t.numel() * t.element_size()
        out[off:off + n].view(t.dtype).view(t.shape).copy_(t)
        off += _padded(n)
    return out


def _assemble(shards: dict[int, torch.Tensor], n: int, dim: int, glu: bool) -> torch.Tensor:
    parts = [shards[k] for k in range(n)]
    if n == 1:
        return parts[0]
    if glu:  # each shard is [gate shard; up shard]
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


def _iter_gathered_to(chunks, spec: MoEModelSpec, groups, dst: int):
    """Full tensors on global rank `dst` only, layer by layer: each rank packs its share of a
    layer into one buffer and sends it point to point (one message per rank and layer instead
    of a collective per tensor on every rank; the others receive nothing). A sending rank keeps
    at most two layers in flight; `dst` yields a layer's tensors as soon as it has them (a
    publisher broadcasts them meanwhile), whole tensors as views of the received bytes."""
    import torch.distributed as dist

    from megatron_opd.models.sharding import full_shapes

    order = full_shapes(spec, padded_vocab_size(spec, groups.layout.tensor_parallel))
    wanted = {n for n, _ in order}
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        pieces = _my_pieces(chunks, groups, spec, wanted)
        meta = _exchange_metadata(pieces, dst, world)
        units = range(spec.num_layers + 2)
        if rank != dst:
            inflight = []
            for u in units:
                mine = [x for x in pieces if x[0] == u]
                if mine:
                    buf = _pack(mine)
                    inflight.append((dist.isend(buf, dst), buf))
                while len(inflight) > 2:
                    inflight.pop(0)[0].wait()
            for work, _ in inflight:
                work.wait()
            return
        by_unit: dict[int, list[str]] = {}
        for name, _ in order:
            by_unit.setdefault(_unit_of(name, spec), []).append(name)

        def post(u):
            """Start receiving unit u: (receives, shards by name, (shards, dim, glu) by name)."""
            got: dict[str, dict[int, torch.Tensor]] = {}
            kinds: dict[str, tuple[int, int, bool]] = {}
            recvs = []
            for (_, n, k, m, d, g, t) in (x for x in pieces if x[0] == u):
                got.setdefault(n, {})[k] = t  # our own shards: the parameters themselves
                kinds[n] = (m, d, g)
            for r in range(world):
                theirs = [x for x in meta[r] if x[0] == u] if r != rank else []
                if not theirs:
                    continue
                nbytes = [int(torch.Size(sh).numel()) * getattr(torch, dt).itemsize
                          for *_, sh, dt in theirs]
                buf = torch.empty(sum(_padded(b) for b in nbytes), dtype=torch.uint8)
                recvs.append(dist.irecv(buf, src=r))
                off = 0
                for (_, n, k, m, d, g, sh, dt), b in zip(theirs, nbytes):
                    got.setdefault(n, {})[k] = buf[off:off + b].view(getattr(torch, dt)).view(sh)
                    kinds[n] = (m, d, g)
                    off += _padded(b)
            return recvs, got, kinds

        nxt = post(0)
        for u in units:
            recvs, got, kinds = nxt
            for w in recvs:
                w.wait()
            if u + 1 < len(units):  # the next layer arrives while this one is consumed
                nxt = post(u + 1)
            for name in by_unit.get(u, []):
                if name not in kinds or len(got[name]) != kinds[name][0]:
                    raise RuntimeError(f"gathering {name}: shards {sorted(got.get(name, {}))} "
                                       f"arrived, expected {kinds.get(name, (1,))[0]}")
                m, d, g = kinds[name]
                for hf, t in full_to_hf(name, _assemble(got[name], m, d, g), spec):
                    yield hf, t.contiguous()


def load_hf_checkpoint(model, hf_dir: str | Path, spec: MoEModelSpec, groups=None) -> None:
    """Load an HF checkpoint into one GPTModel, or (with `groups`) into this rank's model chunks
    under any layout, each rank taking its shards. The vocabulary tensors get the model's
    padding rows (zeros). A truncated or corrupt safetensors file is a BadCheckpoint naming it."""
    from megatron_opd.convert.errors import BadCheckpoint, load_safetensors

    check_hf_expressible(spec)
    if groups is not None:
        return _load_streamed(model, hf_dir, spec, groups)
    hf = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        hf.update(load_safetensors(f))
    if not hf:
        raise BadCheckpoint(f"{hf_dir}: no *.safetensors files, point at a Hugging Face model "
                            f"directory")
    own = _weights(model)
    rows = own["embedding.word_embeddings.weight"].shape[0] \
        if "embedding.word_embeddings.weight" in own else None
    state = hf_to_megatron(hf, spec, rows)
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        raise KeyError(f"megatron model does not match: missing {sorted(missing)[:10]}, "
                       f"unexpected {sorted(unexpected)[:10]}")
    with torch.no_grad():
        for name, param in own.items():
            if param.shape != state[name].shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(state[name].shape)} != model "
                                 f"{tuple(param.shape)}")
            param.copy_(state[name])


def _load_streamed(chunks, hf_dir, spec: MoEModelSpec, groups) -> None:
    """Each rank reads only the HF tensors its shards are cut from, one megatron tensor at a
    time, through memory maps released after each: peak memory is one full tensor (an expert
    or the embedding), not the checkpoint. Headers and tensor shapes are checked first, so a
    truncated file or a checkpoint of another architecture fails before any weight is copied."""
    from megatron_opd.convert.hf_io import LazyHFReader
    from megatron_opd.models.sharding import load_full_state

    reader = LazyHFReader(hf_dir)
    reader.check(spec)
    rows = padded_vocab_size(spec, groups.layout.tensor_parallel)

    def full(name: str) -> torch.Tensor:
        t = full_from_hf(name, reader.get, spec, rows)
        reader.release()  # pages a map touched stay in RSS until it is closed
        return t

    load_full_state(chunks, groups, full)


def save_hf_checkpoint(model, spec: MoEModelSpec, out_dir: str | Path,
                       tokenizer_dir: str | Path | None = None, groups=None,
                       source=None) -> Path:
    """model.safetensors + config.json + generation_config.json (+ tokenizer), written aside and
    renamed into place so a crash never leaves a half-written directory. `source`: the HF model
    directory (or `convert.hf_export.HFSource`) the weights descend from; its config.json is
    carried through (only dtype / a missing `architectures` change), its generation config and
    tokenizer files copied; None: config generated from the spec. With `groups` (model = this
    rank's chunks) every rank must call it: they gather, global rank 0 writes."""
    from safetensors.torch import save_file

    from megatron_opd.convert.hf_export import HFSource, atomic_dir, write_metadata

    check_hf_expressible(spec)
    if source is not None and not isinstance(source, HFSource):
        source = HFSource.from_path(source)
    out = Path(out_dir)
    if groups is not None:
        import torch.distributed as dist

        tensors = {n: t.clone() for n, t in iter_hf_weights(model, spec, groups)}
        if dist.get_rank() != 0:
            return out
    else:
        tensors = {n: t.clone() for n, t in iter_hf_weights(model, spec)}
    dtype = next(iter(tensors.values())).dtype
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_metadata(tmp, spec, dtype, source, tokenizer_dir, tokenizer_required=False)
    return out
