"""Extra memory and time of each pi_old strategy (`correction.proximal`) per learner step.

One real megatron learner (world of one, float32 on CPU; the production `ProximalPolicy`,
`make_scorer`, `forward_backward`, `optimizer_step`) trains sampled-token OPD on synthetic
batches whose tokens carry versions spread over the whole staleness window [v - S, v] (the
worst case for snapshots: S + 1 distinct versions per batch). Per strategy, median over
`--steps` timed steps after `--warmup`:

- `proximal_s`: the strategy's own work in a step (scoring passes, snapshot capture, EWMA
  update), `step_s`: the whole step, `extra_bytes`: the memory it holds beyond the live model.

Baseline, same run: `behaviour` (no pi_old: mu stands in), measured first and again last (the
load of a shared machine drifts; the median of both is used). Ratios: `time_ratio` =
step_s / baseline step_s; `memory_vs_model` = extra_bytes / live parameter bytes; and
`ewma_vs_snapshot_memory`, `ewma_vs_snapshot_time` (ratio of `proximal_s`), the paper's
claim being about 1/5 and 1/4 on Qwen3-30B-A3B.

    OMP_NUM_THREADS=1 .venv/bin/python bench/offpolicy.py [--staleness 4] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = ("behaviour", "snapshot", "replica", "ewma", "loglinear")


def samples(n: int, vocab: int, seed: int, versions: list[int], prompt: int, response: int):
    from megatron_opd.transport import Sample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tv = np.asarray(sorted(versions[(i + t) % len(versions)] for t in range(response)))
        out.append(Sample(
            sample_id=f"s{i}", group_id=f"s{i}",
            prompt_ids=rng.integers(1, vocab, prompt).astype(np.int32),
            response_ids=rng.integers(1, vocab, response).astype(np.int32),
            loss_mask=np.ones(response, dtype=np.uint8),
            behaviour_logprobs=-rng.random(response).astype(np.float32) * 3,
            token_versions=tv.astype(np.int64),
            teacher_logprobs=-rng.random(response).astype(np.float32) * 3,
            teacher_topk_ids=np.zeros((response, 0), dtype=np.int32),
            teacher_topk_logprobs=np.zeros((response, 0), dtype=np.float32),
            reward=0.0, temperature=1.0, top_p=1.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--staleness", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=5)  # >= staleness: the window fills first
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=32)
    args = ap.parse_args()

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import (CorrectionConfig, ObjectiveConfig, ParallelConfig,
                                     TrainConfig)
    from megatron_opd.learner.batch import collate
    from megatron_opd.learner.losses import objective_fields, objective_loss_fn
    from megatron_opd.learner.parallel import init_distributed
    from megatron_opd.learner.proximal import ProximalPolicy, local_params, make_scorer, nbytes
    from megatron_opd.learner.train_step import (forward_backward, optimizer_step,
                                                 split_microbatches, wrap_for_training)
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_opd.models.spec import MoEModelSpec

    install_megatron_cpu_compat()
    layout = ParallelConfig(micro_batch_size=args.micro_batch_size)
    groups = init_distributed(layout, seed=0)
    spec = MoEModelSpec(vocab_size=1024, hidden_size=128, num_layers=4, num_attention_heads=4,
                        num_kv_heads=2, head_dim=32, moe_ffn_hidden_size=128, num_experts=8,
                        moe_router_topk=2, max_position_embeddings=256)
    config = transformer_config(spec, layout=layout)
    objective = ObjectiveConfig()
    fields = objective_fields(objective) + ("token_versions",)
    S = args.staleness
    results = {}

    def run(kind: str) -> dict:
        torch.manual_seed(0)
        chunks = build_model_chunks(spec, config)
        ddp, optimizer, scheduler = wrap_for_training(
            chunks, TrainConfig(steps=1000, lr=1e-4, warmup_steps=0), groups)
        replica = build_model_chunks(spec, config) if kind == "replica" else None
        policy = ProximalPolicy(kind, chunks, ddp, max_staleness=S, publish_lag=0,
                                replica_chunks=replica)
        policy.start(0)
        policy.on_publish(0)
        score = make_scorer(objective, groups)
        loss_fn = objective_loss_fn(objective, groups.tp, (), CorrectionConfig(proximal=kind))
        step_s, prox_s = [], []
        for step in range(args.warmup + args.steps):
            window = list(range(max(0, step - S), step + 1))
            batch, _ = collate(samples(args.batch_size, spec.vocab_size, step, window,
                                       args.prompt_len, args.response_len),
                               0, step=step, max_staleness=S)
            t0 = time.perf_counter()
            micro = split_microbatches(batch, fields, groups, layout.micro_batch_size)
            before = policy.stats["time_s"]
            policy.fill_old_logprobs(micro, batch.token_versions, batch.loss_mask, score,
                                     version=step)
            loss, _, terms = forward_backward(ddp, micro, loss_fn, groups)
            optimizer_step(optimizer, scheduler, loss)
            policy.after_step(step + 1, terms.get("offpolicy/active_fraction"))
            policy.on_publish(step + 1)
            if step >= args.warmup:
                step_s.append(time.perf_counter() - t0)
                prox_s.append(policy.stats["time_s"] - before)
        out = {"step_s": statistics.median(step_s), "proximal_s": statistics.median(prox_s),
               "extra_bytes": policy.extra_bytes, "model_bytes": nbytes(local_params(chunks))}
        print(f"{kind:>10}: step {out['step_s']:.3f} s, of which pi_old {out['proximal_s']:.3f} s;"
              f" extra {out['extra_bytes'] / 2**20:.1f} MiB", flush=True)
        return out

    base = [run("behaviour")]
    for kind in STRATEGIES[1:]:
        results[kind] = run(kind)
    base.append(run("behaviour"))
    b_step = statistics.median([b["step_s"] for b in base])
    results["behaviour"] = {"step_s": b_step, "proximal_s": 0.0, "extra_bytes": 0,
                            "model_bytes": base[0]["model_bytes"],
                            "baseline_step_s_first_last": [b["step_s"] for b in base]}
    for r in results.values():
        r["time_ratio"] = r["step_s"] / b_step
        r["memory_vs_model"] = r["extra_bytes"] / r["model_bytes"]
    ew, sn = results["ewma"], results["snapshot"]
    summary = {
        "staleness": S, "batch": [args.batch_size, args.prompt_len + args.response_len],
        "model_params_mib": base[0]["model_bytes"] / 2**20, "strategies": results,
        "ewma_vs_snapshot_memory": ew["extra_bytes"] / sn["extra_bytes"],
        # the strategies' own seconds (the step-time deltas drown in a shared machine's noise)
        "ewma_vs_snapshot_time": ew["proximal_s"] / sn["proximal_s"],
    }
    print(f"EWMA vs snapshot: memory x{summary['ewma_vs_snapshot_memory']:.2f}, "
          f"extra time x{summary['ewma_vs_snapshot_time']:.2f}", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
