"""A learner training loop on deterministic synthetic data (started by torchrun from tests).

Uses the production pieces end to end: layout, HF load, megatron DDP + optimizer + LR schedule,
pipeline schedule, vocab-parallel log-probs, skip on non-finite loss, checkpoints with resume.
The batch of step k depends only on (seed, data cursor), and the cursor is saved in the
checkpoint, so a resumed run sees exactly the batches the uninterrupted run saw.
Rank 0 appends one JSON line per step to --log: {step, loss, stepped, grad_norm, param_sum}.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist


def batch_at(cursor: int, vocab: int, batch: int = 8, seq: int = 10) -> dict:
    g = torch.Generator().manual_seed(1000 + cursor)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
            "targets": torch.randint(0, vocab, (batch, seq), generator=g),
            "weights": (torch.rand(batch, seq, generator=g) > 0.2).float()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--steps-log", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--nan-at-step", type=int, default=-1)
    ap.add_argument("--kill-after-step", type=int, default=-1)  # SIGKILL itself (a crash)
    args = ap.parse_args()

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig, TrainConfig
    from megatron_opd.learner.checkpoint import (TrainerState, latest_checkpoint,
                                                 load_checkpoint, save_checkpoint)
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.learner.train_step import (forward_backward, optimizer_step,
                                                 split_microbatches,
                                                 wrap_for_training)
    from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats
    from megatron_opd.models.hf_mapping import load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_opd.models.spec import MoEModelSpec

    # Tests kill this process group after a crash (dist_checkpointing's helper processes live in
    # it and outlive a SIGKILLed rank otherwise).
    with open(f"{args.steps_log}.pgid.{os.environ.get('RANK', '0')}", "w") as f:
        f.write(str(os.getpgid(0)))
    install_megatron_cpu_compat()
    layout = ParallelConfig(**json.loads(args.layout))
    spec = MoEModelSpec(**json.loads(args.spec))
    groups = init_distributed(layout, seed=0)
    chunks = build_model_chunks(spec, transformer_config(spec, layout=layout))
    load_hf_checkpoint(chunks, args.hf, spec, groups)
    train = TrainConfig(steps=args.steps, lr=3e-3, warmup_steps=2, lr_decay_style="cosine",
                        min_lr=3e-4, grad_clip=1.0, weight_decay=0.01)
    ddp, optimizer, scheduler = wrap_for_training(chunks, train, groups)
    state = TrainerState(counters={"skipped_steps": 0}, data_cursor={"next": 0})
    ckpt = Path(args.ckpt)
    if args.resume and latest_checkpoint(ckpt) is not None:
        state = load_checkpoint(latest_checkpoint(ckpt), chunks, optimizer, scheduler)

    def loss_fn(logits, mb):
        lp = vocab_parallel_token_stats(logits, mb.data["targets"], group=groups.tp).logprobs
        w = mb.data["weights"]
        return -(lp * w).sum(), (w != 0).sum(), {}

    log = open(args.steps_log, "a") if dist.get_rank() == 0 else None
    while state.step < args.steps:
        data = batch_at(state.data_cursor["next"], spec.vocab_size)
        state.data_cursor["next"] += 1
        if state.step == args.nan_at_step:
            data["weights"][0, 0] = float("nan")
        micro = split_microbatches(SimpleNamespace(**data), ("targets", "weights"), groups,
                                  layout.micro_batch_size)
        loss, _, _ = forward_backward(ddp, micro, loss_fn, groups)
        stepped, grad_norm = optimizer_step(optimizer, scheduler, loss)
        state.step += 1
        if stepped:
            state.version += 1
        else:
            state.counters["skipped_steps"] += 1
        param_sum = sum(float(p.detach().double().sum()) for c in chunks for p in c.parameters())
        if log:
            log.write(json.dumps({"step": state.step, "loss": loss, "stepped": stepped,
                                  "grad_norm": grad_norm, "version": state.version,
                                  "skipped": state.counters["skipped_steps"],
                                  "lr": optimizer.param_groups[0]["lr"],
                                  "param_sum_rank0": param_sum}) + "\n")
            log.flush()
        if args.save_every and state.step % args.save_every == 0:
            save_checkpoint(ckpt, chunks, optimizer, scheduler, state)
        if state.step == args.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)
    destroy_distributed()


if __name__ == "__main__":
    main()
