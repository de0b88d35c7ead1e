"""The Megatron<->HF mapping against `transformers`: same logits, bit-identical round trip, and
for every family exactly the tensor names and shapes `save_pretrained` writes (Mixtral's own
tests: tests/test_model_families.py)."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from megatron_opd.models.hf_mapping import (hf_names, hf_to_megatron, load_hf_checkpoint,
                                            megatron_to_hf, save_hf_checkpoint)
from megatron_opd.models.qwen3_moe import build_gpt_model, forward_logits
from megatron_opd.models.sharding import full_shapes
from megatron_opd.models.spec import MoEModelSpec, to_hf_config

SPECS = {
    "gqa": MoEModelSpec(),
    "mha-tied": MoEModelSpec(num_kv_heads=4, tie_word_embeddings=True, num_experts=4,
                             moe_router_topk=3),
}


@pytest.fixture(scope="module", autouse=True)
def megatron_world():
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed

    install_megatron_cpu_compat()
    init_distributed(ParallelConfig(), seed=0)
    yield
    destroy_distributed()


def hf_logits(model_dir, ids):
    from transformers import Qwen3MoeForCausalLM

    hf = Qwen3MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=ids).logits


@pytest.mark.parametrize("name", SPECS)
def test_megatron_to_hf_logits_match_transformers(name, tmp_path):
    spec = SPECS[name]
    torch.manual_seed(0)
    model = build_gpt_model(spec).eval()
    with torch.no_grad():  # random non-trivial norms too, so a swapped norm shows
        for n, p in model.named_parameters():
            if "layernorm" in n:
                p.add_(0.3 * torch.randn_like(p))
    save_hf_checkpoint(model, spec, tmp_path / "hf")
    ids = torch.randint(0, spec.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = forward_logits(model, ids)
    ref = hf_logits(tmp_path / "hf", ids)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_hf_to_megatron_logits_and_round_trip(tmp_path):
    from transformers import Qwen3MoeForCausalLM

    spec = SPECS["gqa"]
    torch.manual_seed(3)
    Qwen3MoeForCausalLM(to_hf_config(spec)).save_pretrained(tmp_path / "ref")
    model = build_gpt_model(spec).eval()
    load_hf_checkpoint(model, tmp_path / "ref", spec)
    ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (forward_logits(model, ids) - hf_logits(tmp_path / "ref", ids)).abs().max() <= 1e-5
    hf = load_file(str(tmp_path / "ref" / "model.safetensors"))
    back = megatron_to_hf(hf_to_megatron(hf, spec), spec)
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_right_padding_leaves_valid_logits_unchanged():
    spec = SPECS["gqa"]
    model = build_gpt_model(spec).eval()
    ids = torch.randint(3, spec.vocab_size, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a, b = forward_logits(model, ids), forward_logits(model, padded)[:, :6]
    assert torch.allclose(a, b, atol=1e-6)


def test_missing_key_is_named(tmp_path):
    spec = SPECS["gqa"]
    hf = megatron_to_hf({k: v for k, v in build_gpt_model(spec).state_dict().items()
                         if not k.endswith("_extra_state")}, spec)
    del hf["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.experts.3.up_proj.weight"):
        hf_to_megatron(hf, spec)
    wrong = dataclasses.replace(spec, num_experts=4)
    with pytest.raises(KeyError, match="unexpected"):
        hf_to_megatron(megatron_to_hf({k: v for k, v in build_gpt_model(spec).state_dict().items()
                                       if not k.endswith("_extra_state")}, spec), wrong)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_names_and_shapes_are_what_save_pretrained_writes(family, tmp_path):
    from transformers import MixtralForCausalLM, Qwen3MoeForCausalLM

    from megatron_opd.models.spec import hf_causal_lm_class

    spec = MoEModelSpec(family=family, num_experts=4, moe_ffn_hidden_size=24)
    cls = hf_causal_lm_class(spec)
    assert cls is {"mixtral": MixtralForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM}[family]
    torch.manual_seed(0)
    cls(to_hf_config(spec)).save_pretrained(tmp_path / "hf")
    disk = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(disk) == sorted(hf_names(spec))
    full = {n: torch.zeros(shape) for n, shape in full_shapes(spec)}
    mapped = megatron_to_hf(full, spec)
    assert {n: tuple(t.shape) for n, t in mapped.items()} == \
        {n: tuple(t.shape) for n, t in disk.items()}
