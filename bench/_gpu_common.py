"""What the GPU suite's workers share (bench/gpu_suite.py): the Qwen3-30B-A3B slice, how many of
its layers fit a GPU (`megatron-opd plan`'s memory model), model FLOPs from plan's parameter
counts, and a checksum that both ends of a weight broadcast compute on their own device.

No torch at import time except inside the functions that need it: gpu_suite.py imports this
before deciding where its workers run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
A3B_CONFIG = ROOT / "configs" / "qwen3-30b-a3b-from-qwen3-235b-a22b.yaml"

# The real config's layout collapsed to one GPU: world of one, no FP8 (Transformer Engine is not
# on the lent machines: megatron's local layers, unfused attention, which plan accounts for).
ONE_GPU = ["parallel.world_size=1", "parallel.tensor_parallel=1", "parallel.expert_parallel=1",
           "parallel.sequence_parallel=false", "parallel.micro_batch_size=1",
           "precision.fp8=null", "cluster.learner_nodes=1",
           "rollout.prompts_per_request=1", "rollout.max_inflight_requests=1"]

# --dry-run: CPU-sized shapes (same code path, seconds on two cores).
DRY_SPEC = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                head_dim=16, moe_ffn_hidden_size=32, num_experts=8, moe_router_topk=2,
                max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
DRY_BUCKET_MB = 1 / 16
# A pretend device for the dry run: plan's fixed 5 GiB reserve plus 5 MiB, room for two layers of
# the dry spec (4.4 MiB with the outside layers; three need 5.7), so the search decides something.
DRY_MEMORY_GIB = 5.0 + 5 / 1024


# Of the GPU's memory, what the layer search may plan for.
GPU_MEMORY_FRACTION = 0.92


@dataclasses.dataclass(frozen=True)
class Shapes:
    seq_len: int
    batch_size: int
    micro_batch_size: int
    max_layers: int  # search cap (wall time)
    memory_gib: float | None  # None: the GPU's own size


GPU_SHAPES = Shapes(seq_len=2048, batch_size=8, micro_batch_size=1, max_layers=48, memory_gib=None)
DRY_SHAPES = Shapes(seq_len=64, batch_size=4, micro_batch_size=2, max_layers=3,
                    memory_gib=DRY_MEMORY_GIB)


def slice_config(dry_run: bool, shapes: Shapes):
    """The A3B config on one GPU (config.Config); in the dry run its model shrunk to DRY_SPEC."""
    from megatron_opd.config import load_config

    cfg = load_config(str(A3B_CONFIG), ONE_GPU + [f"train.batch_size={shapes.batch_size}"])
    if dry_run:  # (64 KiB buckets: the dry run's weights still fill several)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **DRY_SPEC),
                                  weight_sync=dataclasses.replace(cfg.weight_sync,
                                                                  bucket_mb=DRY_BUCKET_MB))
    return cfg


def with_layers(cfg, num_layers: int):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=num_layers))


def layers_that_fit(cfg, seq_len: int, memory_bytes: float, cap: int) -> tuple[int, list[dict]]:
    """Most layers (1..cap) whose plan estimate (plan.learner_memory: weights, fp32 grads, Adam,
    activations without recompute, logits, reserve) fits `memory_bytes`; 0 if none does.
    Also every estimate tried, for the report."""
    from megatron_opd.plan import learner_memory

    tried, best = [], 0
    for n in range(1, cap + 1):
        total = learner_memory(with_layers(cfg, n), seq_len)["total"]
        tried.append({"layers": n, "estimate_gib": round(total / 2 ** 30, 3)})
        if total > memory_bytes:
            break
        best = n
    return best, tried


def model_flops(spec, seq_len: int) -> dict:
    """Model FLOPs per token from plan's parameter counts: 6 x the parameters a token multiplies
    (plan's active count less the embedding lookup, a gather, and the norms, elementwise) plus
    causal attention, QK^T and AV over s/2 positions on average: 2 matmuls x 2 x n_q*d*s/2,
    x3 for forward + backward = 6*L*n_q*d*s."""
    from megatron_opd.plan import param_counts

    pc = param_counts(spec)
    lookup = pc.embedding if pc.lm_head else 0  # tied: the embedding is also the output layer
    matmul = pc.active - lookup - pc.final_norm - pc.num_layers * pc.norms
    attention = 6 * spec.num_layers * spec.num_attention_heads * spec.head_dim * seq_len
    return {"active_params": pc.active, "total_params": pc.total, "matmul_params": matmul,
            "flops_per_token": 6 * matmul + attention}


def checksum(t) -> list[int]:
    """Two integer sums over the tensor's bytes read as int32 words (bytes when the size is not a
    multiple of 4): sum(w) and sum(w * (i mod 65521 + 1)), wrapping at 2^64. Integer sums are
    exact in any order, so sender and receiver agree bit for bit on any device; chunked so a big
    tensor needs no int64 copy of itself."""
    import torch

    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if flat.storage_offset() % 4:  # an int32 view needs 4-byte alignment
        flat = flat.clone()
    words = flat.view(torch.int32) if flat.numel() % 4 == 0 else flat
    s1 = torch.zeros((), dtype=torch.int64, device=t.device)
    s2 = torch.zeros((), dtype=torch.int64, device=t.device)
    step = 1 << 24
    for start in range(0, words.numel(), step):
        w = words[start:start + step].to(torch.int64)
        pos = torch.arange(start, start + w.numel(), device=t.device, dtype=torch.int64)
        s1 += w.sum()
        s2 += (w * (pos % 65521 + 1)).sum()
    return [int(s1.item()), int(s2.item())]
