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


def _iter_megatron_to_hf(state: Mapping[str, torch.Tensor], spec: MoEModelSpec):
    yield "model.embed_tokens.weight", state["embedding.word_embeddings.weight"]
    for i in range(spec.num_layers):
        mp, hp = f"decoder.layers.{i}.", f"model.layers.{i}."
        for msuf, hsuf in _LAYER_RENAMES.items():
            yield hp + hsuf, state[mp + msuf]
        q, k, v = _split_qkv(state[mp + "self_attention.linear_qkv.weight"], spec)
        yield hp + "self_attn.q_proj.weight", q
        yield hp + "self_attn.k_proj.weight", k
        yield hp + "self_attn.v_proj.weight", v
        for e in range(spec.num_experts):
            ep = f"{mp}mlp.experts.local_experts.{e}."
            gate, up = state[ep + "linear_fc1.weight"].chunk(2, dim=0)
            hep = f"{hp}mlp.experts.{e}."
            yield hep + "gate_proj.weight", gate
            yield hep + "up_proj.weight", up
            yield hep + "down_proj.weight", state[ep + "linear_fc2.weight"]
    yield "model.norm.weight", state["decoder.final_layernorm.weight"]
    if not spec.tie_word_embeddings:
        yield "lm_head.weight", state["output_layer.weight"]


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


def iter_hf_weights(model, spec: MoEModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) in a fixed order, for streaming to SGLang (views where possible)."""
    with torch.no_grad():
        for name, t in _iter_megatron_to_hf(_weights(model), spec):
            yield name, t.detach().contiguous()


def load_hf_checkpoint(model, hf_dir: str | Path, spec: MoEModelSpec) -> None:
    from safetensors.torch import load_file

    hf = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        hf.update(load_file(str(f)))
    if not hf:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir}")
    state = hf_to_megatron(hf, spec)
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
                       tokenizer_dir: str | Path | None = None) -> Path:
    """config.json + generation_config.json + model.safetensors (+ tokenizer), written aside and
    renamed into place so a crash never leaves a half-written directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    to_hf_config(spec).save_pretrained(str(tmp))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id,
         "pad_token_id": spec.pad_token_id}))
    tensors = {n: t.clone() for n, t in iter_hf_weights(model, spec)}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "vocab.json":
                shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
