"""megatron-core CPU compat: each patch, install semantics, and gradients equal transformers'."""

import subprocess
import sys

import torch

from megatron_opd.models.spec import MoEModelSpec, to_hf_config


def run_fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_install_applies_each_patch_once_and_nothing_with_cuda():
    code = """
import torch
from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat, _PATCHES
first = install_megatron_cpu_compat(); second = install_megatron_cpu_compat()
assert first == [p.__name__ for p in _PATCHES], first
from megatron.core.transformer.moe import moe_utils
from megatron.core.tensor_parallel import random as r
torch.manual_seed(5); a = r._get_cuda_rng_state(); x = torch.rand(3)
r._set_cuda_rng_state(a); y = torch.rand(3)
s = torch.cuda.Stream(); s.wait_stream(s); torch.cuda.synchronize()
print(len(first) > 4, second, torch.cuda.current_device(), moe_utils.te_general_gemm, bool(torch.equal(x, y)))
"""
    assert run_fresh(code) == "True [] cpu None True"
    with_cuda = """
import torch
torch.cuda.is_available = lambda: True
orig = torch.cuda.current_device
from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
print(install_megatron_cpu_compat(), torch.cuda.current_device is orig)
"""
    assert run_fresh(with_cuda) == "[] True"


def test_loss_and_gradients_equal_transformers():
    from transformers import Qwen3MoeForCausalLM

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.models.hf_mapping import megatron_to_hf
    from megatron_opd.models.qwen3_moe import build_gpt_model, forward_logits

    install_megatron_cpu_compat()
    init_distributed(ParallelConfig(), seed=0)
    try:
        spec = MoEModelSpec()
        torch.manual_seed(0)
        model = build_gpt_model(spec)
        hf = Qwen3MoeForCausalLM(to_hf_config(spec)).float()
        hf.load_state_dict(_fused_hf(megatron_to_hf({k: v for k, v in model.state_dict().items()
                                                     if not k.endswith("_extra_state")}, spec), spec))
        ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
        target = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
        ours = torch.nn.functional.cross_entropy(forward_logits(model, ids).flatten(0, 1), target.flatten())
        ref = torch.nn.functional.cross_entropy(hf(input_ids=ids).logits.flatten(0, 1), target.flatten())
        ours.backward()
        ref.backward()
        assert abs(ours.item() - ref.item()) < 1e-5
        params = dict(model.named_parameters())
        pairs = {"embedding.word_embeddings.weight": hf.model.embed_tokens.weight,
                 "decoder.layers.1.mlp.router.weight": hf.model.layers[1].mlp.gate.weight,
                 "decoder.layers.0.self_attention.linear_proj.weight": hf.model.layers[0].self_attn.o_proj.weight,
                 "output_layer.weight": hf.lm_head.weight}
        for name, ref_param in pairs.items():
            ours_g, ref_g = params[name].grad, ref_param.grad
            if name.startswith("embedding"):  # HF's nn.Embedding(padding_idx) never updates the pad row
                keep = torch.arange(spec.vocab_size) != spec.pad_token_id
                ours_g, ref_g = ours_g[keep], ref_g[keep]
            assert torch.allclose(ours_g, ref_g, atol=1e-5, rtol=1e-4), name
    finally:
        destroy_distributed()


def _fused_hf(per_expert: dict, spec: MoEModelSpec) -> dict:
    """transformers 5 holds experts fused in memory; build that layout from on-disk names."""
    out = {k: v for k, v in per_expert.items() if ".experts." not in k}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}.mlp.experts."
        out[p + "gate_up_proj"] = torch.stack([torch.cat([per_expert[f"{p}{e}.gate_proj.weight"],
                                                          per_expert[f"{p}{e}.up_proj.weight"]])
                                               for e in range(spec.num_experts)])
        out[p + "down_proj"] = torch.stack([per_expert[f"{p}{e}.down_proj.weight"]
                                            for e in range(spec.num_experts)])
    return out
