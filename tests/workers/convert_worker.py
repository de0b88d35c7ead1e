"""One rank of a converted-checkpoint load (started by torchrun from tests/test_convert_checkpoint.py).

Builds the learner's model and optimizer under --layout, loads --ckpt through the learner's own
`load_checkpoint` (or, with --from-hf, the HF checkpoint through `load_hf_checkpoint`), runs the
inputs forward through megatron's pipeline schedule (the training path) collecting the full
logits, then one training step; rank 0 writes {logits, loss, grad_norm, step, version}.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--ckpt")
    ap.add_argument("--from-hf")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig, TrainConfig
    from megatron_opd.learner.checkpoint import latest_checkpoint, load_checkpoint
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.learner.train_step import (MicroBatch, forward_backward, optimizer_step,
                                                 wrap_for_training)
    from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats
    from megatron_opd.models.hf_mapping import load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_opd.models.spec import MoEModelSpec

    install_megatron_cpu_compat()
    layout = ParallelConfig(**json.loads(args.layout))
    spec = MoEModelSpec(**json.loads(args.spec))
    groups = init_distributed(layout, seed=123)  # a seed unlike the reference's: loads must win
    chunks = build_model_chunks(spec, transformer_config(spec, layout=layout))
    ddp, optimizer, scheduler = wrap_for_training(
        chunks, TrainConfig(steps=10, lr=1e-3, warmup_steps=0), groups)
    state = None
    if args.from_hf:
        load_hf_checkpoint(chunks, args.from_hf, spec, groups)
    else:
        state = load_checkpoint(latest_checkpoint(args.ckpt), chunks, optimizer, scheduler)

    data = torch.load(args.data)
    B = data["input_ids"].shape[0]
    per_dp = B // groups.dp_size
    mine = slice(groups.dp_rank * per_dp, (groups.dp_rank + 1) * per_dp)
    mbs = layout.micro_batch_size
    micro = [MicroBatch(data["input_ids"][mine][i:i + mbs],
                        {"targets": data["targets"][mine][i:i + mbs]})
             for i in range(0, per_dp, mbs)]
    captured = []

    def capture(logits, mb):  # vocab-sharded [b, s, V/tp]: gather the vocabulary to compare
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(groups.tp))]
        dist.all_gather(parts, logits.detach().contiguous(), group=groups.tp)
        captured.append(torch.cat(parts, dim=-1))
        return logits.sum() * 0, torch.tensor(mb.input_ids.numel()), {}

    forward_backward(ddp, micro, capture, groups, forward_only=True)

    def loss_fn(logits, mb):
        lp = vocab_parallel_token_stats(logits, mb.data["targets"], group=groups.tp).logprobs
        return -lp.sum(), torch.tensor(lp.numel()), {}

    loss, _, _ = forward_backward(ddp, micro, loss_fn, groups)
    stepped, grad_norm = optimizer_step(optimizer, scheduler, loss)
    # logits of this DP rank's samples live on the last stage; collect them on rank 0
    logits = torch.cat(captured) if captured else None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (groups.dp_rank, groups.is_last_stage and groups.tp_rank == 0,
                                      logits))
    if dist.get_rank() == 0:
        per_dp_rank = {r: t for r, owner, t in everyone if owner}
        full = torch.cat([per_dp_rank[r] for r in sorted(per_dp_rank)])
        torch.save({"logits": full, "loss": loss, "grad_norm": grad_norm, "stepped": stepped,
                    "step": state.step if state else None,
                    "version": state.version if state else None}, args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
