"""Train-inference mismatch of an MoE student with and without routing replay (R3).

The rollout server (SGLang, CPU) serves the quickstart's prepared student in bfloat16 and returns,
per token, the experts its router chose. The learner (megatron-core, float32, the same weights)
recomputes the log-probs of the sampled tokens twice: routing freely, and with the rollout's
experts forced (R3). Baseline in the same run = free routing. Printed per mode:
- mean |log pi_learner - log mu_sglang| over response tokens,
- KL(mu || pi) estimated on mu's samples: k1 = mean(log mu - log pi), k3 = mean(r - 1 - log r),
  r = pi / mu (k3 >= 0, lower variance),
- the fraction of (token, layer) routings where the learner's free choice differs from SGLang's.
Last line: one JSON object with the figures and the with/without ratios.

    .venv/bin/python bench/routing_replay.py [--prompts 64] [--server-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--server-dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig, load_config
    from megatron_opd.learner.parallel import init_distributed
    from megatron_opd.learner.routing_replay import RoutingReplay, experts_from_rollout
    from megatron_opd.models.hf_mapping import load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_opd.envs import make_env, prepare_models
    from megatron_opd.procs import free_port
    from megatron_opd.serving.sglang_client import SGLangClient
    from megatron_opd.serving.sglang_server import SGLangServer

    cfg = load_config(args.config, [f"run.cache_dir={ROOT / '.cache/megatron-opd'}"])
    prepared = prepare_models(cfg, progress=False)
    env = make_env(cfg, prepared.student_dir)
    spec = cfg.model
    import dataclasses
    spec = dataclasses.replace(spec, bos_token_id=env.special.bos, eos_token_id=env.special.eos,
                               pad_token_id=env.special.pad)
    shape = (spec.num_layers, spec.moe_router_topk)
    log = Path(tempfile.mkdtemp()) / "rollout.log"
    server = SGLangServer("rollout", str(prepared.student_dir), free_port(), str(log),
                          dtype=args.server_dtype, max_total_tokens=4096,
                          enable_return_routed_experts=True, threads=1,
                          extra_args=("--weight-version", "0"))
    with server:
        server.wait_ready(timeout=300)
        client = SGLangClient(server.url, routed_experts_shape=shape)
        stream = env.train_prompts()  # the run's own training prompts
        prompts = [list(next(stream).token_ids) for _ in range(args.prompts)]
        results = client.generate(prompts, {"temperature": 1.0, "top_p": 1.0,
                                            "max_new_tokens": cfg.rollout.max_new_tokens,
                                            "stop_token_ids": list(env.special.stop_ids),
                                            "sampling_seed": args.seed},
                                  return_routed_experts=True)

    install_megatron_cpu_compat()
    groups = init_distributed(ParallelConfig(), seed=args.seed)
    config = transformer_config(spec, torch.float32, layout=ParallelConfig(),
                                moe_enable_routing_replay=True)
    chunks = build_model_chunks(spec, config)
    load_hf_checkpoint(chunks, prepared.student_dir, spec, groups)
    model = chunks[0].eval()
    replay = RoutingReplay(chunks, 1, 0, False)

    rows = []  # per response token: (log mu, log pi free, log pi R3)
    flips = [0, 0]
    for p, r in zip(prompts, results):
        ids = torch.tensor([p + r.output_ids])
        s = ids.shape[1]
        forced = experts_from_rollout(torch.as_tensor(r.routed_experts), s, spec.moe_router_topk)
        pos = torch.arange(s).unsqueeze(0)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
        with torch.no_grad():
            replay.record()
            free = torch.log_softmax(model(ids, pos, mask).float(), -1)
            own = replay.recorded()
            replay.force(forced.unsqueeze(0))
            r3 = torch.log_softmax(model(ids, pos, mask).float(), -1)
            replay.off()
        n_routed = r.routed_experts.shape[0]
        for layer, chosen in own.items():
            a = chosen[:n_routed].sort(-1).values
            b = forced[:n_routed, layer].sort(-1).values
            flips[0] += int((a != b).any(-1).sum())
            flips[1] += n_routed
        P = len(p)
        for t, tok in enumerate(r.output_ids):
            rows.append((float(r.output_logprobs[t]), float(free[0, P - 1 + t, tok]),
                         float(r3[0, P - 1 + t, tok])))
    a = np.array(rows)
    mu = a[:, 0]
    out = {"server_dtype": args.server_dtype, "learner_dtype": "float32",
           "prompts": args.prompts, "tokens": int(len(a)),
           "routing_flip_fraction": flips[0] / max(1, flips[1])}
    for name, col in (("free", 1), ("r3", 2)):
        pi = a[:, col]
        ratio = np.exp(pi - mu)
        out[name] = {"mean_abs_logratio": float(np.mean(np.abs(pi - mu))),
                     "kl_k1": float(np.mean(mu - pi)),
                     "kl_k3": float(np.mean(ratio - 1 - (pi - mu))),
                     "max_abs_logratio": float(np.max(np.abs(pi - mu)))}
    for key in ("mean_abs_logratio", "kl_k3"):
        out[f"ratio_{key}_r3_over_free"] = out["r3"][key] / max(out["free"][key], 1e-30)
    print(f"{out['tokens']} response tokens; learner's free routing differs from SGLang's in "
          f"{out['routing_flip_fraction']:.2%} of (token, layer) choices")
    for name in ("free", "r3"):
        m = out[name]
        print(f"{name:>4}: mean|dlogp| {m['mean_abs_logratio']:.3e}  KL k3 {m['kl_k3']:.3e}  "
              f"k1 {m['kl_k1']:.3e}  max|dlogp| {m['max_abs_logratio']:.3e}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
