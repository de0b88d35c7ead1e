"""One rank of a layout-equivalence run (started by torchrun from tests/test_layouts.py).

Loads the same HF checkpoint under the layout given on the command line, runs one forward and
backward of a token-weighted log-likelihood loss through the real training path (megatron
pipeline schedule, DDP, vocab-parallel log-probs), gathers every gradient back into full
(one-process) names and writes {loss, tokens, grads, params} from rank 0.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", required=True)  # JSON of config.ParallelConfig fields
    ap.add_argument("--spec", required=True)  # JSON of MoEModelSpec fields
    ap.add_argument("--hf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig, TrainConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.learner.train_step import (forward_backward, split_microbatches,
                                                 wrap_for_training)
    from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats
    from megatron_opd.models.hf_mapping import load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_opd.models.sharding import iter_full_tensors
    from megatron_opd.models.spec import MoEModelSpec

    install_megatron_cpu_compat()
    layout = ParallelConfig(**json.loads(args.layout))
    spec = MoEModelSpec(**json.loads(args.spec))
    groups = init_distributed(layout, seed=0)
    chunks = build_model_chunks(spec, transformer_config(spec, layout=layout))
    load_hf_checkpoint(chunks, args.hf, spec, groups)
    ddp, _, _ = wrap_for_training(chunks, TrainConfig(steps=10, distributed_optimizer=False), groups)

    data = torch.load(args.data)
    micro = split_microbatches(SimpleNamespace(**data), ("targets", "weights"), groups,
                              layout.micro_batch_size)

    def loss_fn(logits, mb):
        stats = vocab_parallel_token_stats(logits, mb.data["targets"], group=groups.tp)
        w = mb.data["weights"]
        return -(stats.logprobs * w).sum(), (w != 0).sum(), {"weight": (w.sum(), (w != 0).sum())}

    loss, tokens, metrics = forward_backward(ddp, micro, loss_fn, groups)
    grads = {n: t.clone() for n, t in iter_full_tensors(chunks, groups, spec,
                                                       tensor_of=lambda p: p.main_grad,
                                                       dtype=torch.float32)}
    params = {n: t.clone() for n, t in iter_full_tensors(chunks, groups, spec)}
    if dist.get_rank() == 0:
        torch.save({"loss": loss, "tokens": tokens, "grads": grads, "params": params,
                    "metrics": metrics}, args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
