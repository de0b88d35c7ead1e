"""One rank of a padded-vocabulary run (started by torchrun from tests/test_vocab_padding.py).

Loads an HF checkpoint whose vocab_size the layout's TP may not divide (megatron pads it), runs
one forward and backward of a token-weighted log-likelihood through the training path, with the
statistics' explicit `vocab_size` exclusion (--explicit) or relying on the model's own masking
of the padded logits (what the learner's loss does); then gathers every gradient and parameter
(full names, padded rows included), the full logits, the HF stream (`iter_hf_weights`) and
writes an HF export (`save_hf_checkpoint`). Rank 0 writes the results.
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
    ap.add_argument("--export", required=True)
    ap.add_argument("--explicit", action="store_true")
    args = ap.parse_args()

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig, TrainConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.learner.train_step import (forward_backward, split_microbatches,
                                                 wrap_for_training)
    from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats
    from megatron_opd.models.hf_mapping import (iter_hf_weights, load_hf_checkpoint,
                                                save_hf_checkpoint)
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
    captured = {"logits": [], "logprobs": [], "entropy": []}
    vocab = spec.vocab_size if args.explicit else None

    def loss_fn(logits, mb):
        stats = vocab_parallel_token_stats(logits, mb.data["targets"], group=groups.tp,
                                           entropy=True, vocab_size=vocab)
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(groups.tp))]
        dist.all_gather(parts, logits.detach().contiguous(), group=groups.tp)
        captured["logits"].append(torch.cat(parts, dim=-1))
        captured["logprobs"].append(stats.logprobs.detach())
        captured["entropy"].append(stats.entropy.detach())
        w = mb.data["weights"]
        loss = -(stats.logprobs * w).sum() + 0.1 * (stats.entropy * w).sum()
        return loss, (w != 0).sum(), {}

    loss, tokens, _ = forward_backward(ddp, micro, loss_fn, groups)
    grads = {n: t.clone() for n, t in iter_full_tensors(chunks, groups, spec,
                                                       tensor_of=lambda p: p.main_grad,
                                                       dtype=torch.float32)}
    params = {n: t.clone() for n, t in iter_full_tensors(chunks, groups, spec)}
    streamed = {n: t.clone() for n, t in iter_hf_weights(chunks, spec, groups)}
    save_hf_checkpoint(chunks, spec, args.export, groups=groups)
    if dist.get_rank() == 0:  # world = TP here (DP 1): rank 0 saw every micro-batch
        torch.save({"loss": loss, "tokens": tokens, "grads": grads, "params": params,
                    "streamed": streamed, **{k: torch.cat(v) for k, v in captured.items()}},
                   args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
