"""The one Megatron <-> Hugging Face parameter mapping for Qwen3-MoE.

Checkpoint tools and weight publishing to SGLang both use it. HF names are the on-disk
(per-expert) names that `save_pretrained` writes and SGLang loads.
Megatron packs attention as one `linear_qkv` whose rows are grouped by query group:
[q heads of group g (heads_per_group x head_dim) | k_g (head_dim) | v_g (head_dim)] for each g,
and each expert's `linear_fc1` as [gate; up].
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator, Mapping

import torch

from megatron_opd.models.spec import MoEModelSpec, to_hf_config

_LAYER_RENAMES = {  # megatron suffix -> HF suffix, both under their layer prefix
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.router.weight": "mlp.gate.weight",
}


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
    return dict(_iter_megatron_to_hf(state, spec))


def full_to_hf(name: str, t: torch.Tensor, spec: MoEModelSpec) -> list[tuple[str, torch.Tensor]]:
    """One full megatron tensor -> its Hugging Face tensor(s) (views, no copies)."""
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", t)]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", t)]
    if name == "output_layer.weight":
        return [] if spec.tie_word_embeddings else [("lm_head.weight", t)]
    _, _, i, suffix = name.split(".", 3)
    hp = f"model.layers.{i}."
    if suffix in _LAYER_RENAMES:
        return [(hp + _LAYER_RENAMES[suffix], t)]
    if suffix == "self_attention.linear_qkv.weight":
        q, k, v = _split_qkv(t, spec)
        return [(hp + "self_attn.q_proj.weight", q), (hp + "self_attn.k_proj.weight", k),
                (hp + "self_attn.v_proj.weight", v)]
    if suffix.startswith("mlp.experts.local_experts."):
        _, _, _, e, kind, _ = suffix.split(".")
        hep = f"{hp}mlp.experts.{e}."
        if kind == "linear_fc1":
            gate, up = t.chunk(2, dim=0)
            return [(hep + "gate_proj.weight", gate), (hep + "up_proj.weight", up)]
        return [(hep + "down_proj.weight", t)]
    raise KeyError(f"no Hugging Face name for megatron tensor {name}")


def _iter_megatron_to_hf(state: Mapping[str, torch.Tensor], spec: MoEModelSpec):
    from megatron_opd.models.sharding import full_shapes

    for name, _ in full_shapes(spec):
        if name in state:
            yield from full_to_hf(name, state[name], spec)


def hf_to_megatron(hf: Mapping[str, torch.Tensor], spec: MoEModelSpec) -> dict[str, torch.Tensor]:
    expected = set(hf_names(spec))
    missing, unexpected = expected - set(hf), set(hf) - expected
    if missing or unexpected:
        raise KeyError(f"HF checkpoint does not match the model spec: missing {sorted(missing)[:10]}"
                       f", unexpected {sorted(unexpected)[:10]}")
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not spec.tie_word_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(spec.num_layers):
        mp, hp = f"decoder.layers.{i}.", f"model.layers.{i}."
        for msuf, hsuf in _LAYER_RENAMES.items():
            out[mp + msuf] = hf[hp + hsuf]
        out[mp + "self_attention.linear_qkv.weight"] = _merge_qkv(
            hf[hp + "self_attn.q_proj.weight"], hf[hp + "self_attn.k_proj.weight"],
            hf[hp + "self_attn.v_proj.weight"], spec)
        for e in range(spec.num_experts):
            ep, hep = f"{mp}mlp.experts.local_experts.{e}.", f"{hp}mlp.experts.{e}."
            out[ep + "linear_fc1.weight"] = torch.cat(
                [hf[hep + "gate_proj.weight"], hf[hep + "up_proj.weight"]], dim=0)
            out[ep + "linear_fc2.weight"] = hf[hep + "down_proj.weight"]
    return out


def hf_names(spec: MoEModelSpec) -> list[str]:
    """Every HF tensor name of this architecture."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(spec.num_layers):
        hp = f"model.layers.{i}."
        names += [hp + h for h in _LAYER_RENAMES.values()]
        names += [hp + f"self_attn.{p}_proj.weight" for p in "qkv"]
        names += [f"{hp}mlp.experts.{e}.{p}_proj.weight" for e in range(spec.num_experts)
                  for p in ("gate", "up", "down")]
    return names


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def iter_hf_weights(model, spec: MoEModelSpec, groups=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) in a fixed order, for streaming to SGLang or saving. `model` is one
    GPTModel (world of one) or, with `groups`, this rank's list of model chunks under any layout:
    then every rank must drain the iterator (it gathers shards) and every rank gets every tensor.
    Tensors may be views of parameters: consume them before the next optimizer step."""
    from megatron_opd.models.sharding import iter_full_tensors

    with torch.no_grad():
        if groups is None:
            full = _iter_megatron_to_hf(_weights(model), spec)
        else:
            full = (hf for name, t in iter_full_tensors(model, groups, spec)
                    for hf in full_to_hf(name, t, spec))
        for name, t in full:
            yield name, t.detach().contiguous()


def load_hf_checkpoint(model, hf_dir: str | Path, spec: MoEModelSpec, groups=None) -> None:
    """Load an HF checkpoint into one GPTModel, or (with `groups`) into this rank's model chunks
    under any layout, each rank taking its shards."""
    from safetensors.torch import load_file

    hf = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        hf.update(load_file(str(f)))
    if not hf:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir}")
    state = hf_to_megatron(hf, spec)
    if groups is not None:
        from megatron_opd.models.sharding import load_full_state

        return load_full_state(model, groups, state.__getitem__)
    own = _weights(model)
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


def save_hf_checkpoint(model, spec: MoEModelSpec, out_dir: str | Path,
                       tokenizer_dir: str | Path | None = None, groups=None) -> Path:
    """config.json + generation_config.json + model.safetensors (+ tokenizer), written aside and
    renamed into place so a crash never leaves a half-written directory. With `groups` (model =
    this rank's chunks) every rank must call it: they gather, global rank 0 writes."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if groups is not None:
        import torch.distributed as dist

        tensors = {n: t.clone() for n, t in iter_hf_weights(model, spec, groups)}
        if dist.get_rank() != 0:
            return out
    else:
        tensors = {n: t.clone() for n, t in iter_hf_weights(model, spec)}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    to_hf_config(spec).save_pretrained(str(tmp))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id,
         "pad_token_id": spec.pad_token_id}))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "vocab.json":
                shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
