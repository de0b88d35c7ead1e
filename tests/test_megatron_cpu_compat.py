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


def test_a_gpu_without_transformer_engine_gets_only_the_router_gemm_name():
    """megatron-core 0.16.1's router reads `te_general_gemm`, bound only when Transformer Engine
    imports: on a GPU without TE the learner's install_megatron_compat applies that one patch
    (no CPU stand-in); with CUDA and TE it applies nothing (TE is faked importable here)."""
    gpu_without_te = """
import torch
torch.cuda.is_available = lambda: True
orig = torch.cuda.current_device
from megatron_opd.compat.megatron_cpu import install_megatron_compat
from megatron.core.transformer.moe import moe_utils
print(install_megatron_compat(), install_megatron_compat(), moe_utils.te_general_gemm,
      torch.cuda.current_device is orig)
"""
    assert run_fresh(gpu_without_te) == "['patch_moe_te_general_gemm_name'] [] None True"
    gpu_with_te = """
import sys, types, torch
torch.cuda.is_available = lambda: True
te = types.ModuleType("transformer_engine"); te.pytorch = types.ModuleType("transformer_engine.pytorch")
sys.modules.update({"transformer_engine": te, "transformer_engine.pytorch": te.pytorch})
from megatron_opd.compat.megatron_cpu import install_megatron_compat
print(install_megatron_compat())
"""
    assert run_fresh(gpu_with_te) == "[]"


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


def test_each_multirank_patch_does_exactly_its_job():
    """One assertion per patch, in a fresh process: what it fixes now works, and what it must
    not touch is untouched. (End to end, tests/test_layouts.py fails without any of them.)"""
    code = """
import torch
from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
install_megatron_cpu_compat()
out = []
# patch_cuda_device_factories: only inside the listed megatron modules
from megatron.core.pipeline_parallel import schedules
from megatron.core import utils as mutils
out.append(schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type)
out.append(float(mutils.local_multi_tensor_l2_norm(0, None, [[torch.ones(4)]], False)[0]))
try:
    torch.zeros(1, device="cuda"); out.append("global-changed")
except (RuntimeError, AssertionError):
    out.append("global-untouched")
# patch_tensor_type_strings: the no-argument form only
out.append(torch.zeros(2).type())
out.append(torch.zeros(2).type(torch.float64).dtype == torch.float64)
# patch_torch_norm_sequence_parallel: SP accepted, weight tagged, config restored
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.torch_norm import WrappedTorchNorm
cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                        tensor_model_parallel_size=2, sequence_parallel=True)
norm = WrappedTorchNorm(cfg, 8, eps=1e-6)
out.append(type(norm).__name__)
out.append(norm.weight.sequence_parallel)
out.append(cfg.sequence_parallel)
print(out)
"""
    assert run_fresh(code) == str(["cpu", 2.0, "global-untouched", "torch.cuda.FloatTensor", True,
                                   "RMSNorm", True, True])


def _alltoall_rank(rank: int, port: int, results) -> None:
    import os

    import numpy as np
    import torch.distributed as dist

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat

    install_megatron_cpu_compat()
    from megatron.core.transformer.moe import token_dispatcher

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # uneven splits as numpy arrays, as MoEAlltoAllTokenDispatcher passes them
        send = np.array([1, 2]) if rank == 0 else np.array([3, 1])
        recv = np.array([1, 3]) if rank == 0 else np.array([2, 1])
        x = torch.arange(int(send.sum()), dtype=torch.float32).unsqueeze(1) + 10 * rank
        y = token_dispatcher.all_to_all(dist.group.WORLD, x, recv, send)
        results[rank] = y.squeeze(1).tolist()
    finally:
        dist.destroy_process_group()
    os.environ.pop("MASTER_PORT", None)


def test_alltoall_patch_accepts_numpy_split_sizes():
    import torch.multiprocessing as mp

    from megatron_opd.procs import free_port

    results = mp.Manager().dict()
    mp.spawn(_alltoall_rank, args=(free_port(), results), nprocs=2)
    # rank 0 keeps its row 0 and gets rank 1's rows 0..2; rank 1 gets rank 0's rows 1..2 + its row 3
    assert results[0] == [0.0, 10.0, 11.0, 12.0]
    assert results[1] == [1.0, 2.0, 13.0]
