"""One rank of a routing-replay check (started by torchrun from tests/test_routing_replay.py).

1. R2 record: a forward pass records every MoE layer's own top-k choice per token.
2. The router weights are perturbed strongly, so free routing now picks other experts.
3. Replay forward with the recorded experts (R2), and with externally given experts (R3,
   `--forced`): a hook on every router reads the experts it actually used.
Writes from rank 0: the experts used per (layer, token) in each pass, gathered over ranks.
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
    ap.add_argument("--hf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig, TrainConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.learner.routing_replay import RoutingReplay
    from megatron_opd.learner.train_step import MicroBatch, forward_backward, wrap_for_training
    from megatron_opd.models.hf_mapping import load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_opd.models.spec import MoEModelSpec

    install_megatron_cpu_compat()
    layout = ParallelConfig(**json.loads(args.layout))
    spec = MoEModelSpec(**json.loads(args.spec))
    groups = init_distributed(layout, seed=0)
    config = transformer_config(spec, layout=layout, moe_enable_routing_replay=True)
    chunks = build_model_chunks(spec, config)
    load_hf_checkpoint(chunks, args.hf, spec, groups)
    ddp, _, _ = wrap_for_training(chunks, TrainConfig(steps=10, distributed_optimizer=False), groups)
    replay = RoutingReplay(chunks, layout.tensor_parallel, groups.tp_rank,
                           config.sequence_parallel)

    used: dict[int, torch.Tensor] = {}  # global layer -> experts the router used [tokens, k]
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            def hook(module, inputs, output, g=layer.layer_number - 1):
                probs, routing_map = output
                used[g] = routing_map.nonzero()[:, 1].view(routing_map.shape[0], -1)
            layer.mlp.router.register_forward_hook(hook)

    data = torch.load(args.data)
    mb = [MicroBatch(data["input_ids"], {"routed_experts": data["forced"]})]

    def loss_fn(logits, mb):
        return logits.float().sum() * 0, torch.tensor(1), {}

    def run(pre=None):
        used.clear()
        forward_backward(ddp, mb, loss_fn, groups, forward_only=True, pre_forward=pre)
        return {g: _gather_rows(t, groups, config.sequence_parallel) for g, t in used.items()}

    replay.record()
    free_before = run()
    recorded = {g: _gather_rows(t, groups, config.sequence_parallel)
                for g, t in replay.recorded().items()}
    replay.off()
    with torch.no_grad():  # a 5-sigma perturbation of every router
        g = torch.Generator().manual_seed(7)
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                w = layer.mlp.router.weight
                w.add_(torch.randn(w.shape, generator=g) * 5 * w.std())
    free_after = run()
    # R2: replay the recorded choice, rebuilt into [b, s, layers, k] form.
    b, s = data["input_ids"].shape
    rec = torch.zeros(b, s, spec.num_layers, spec.moe_router_topk, dtype=torch.long)
    for layer, rows in recorded.items():
        rec[:, :, layer] = rows.view(s, b, -1).transpose(0, 1)
    replay_r2 = run(lambda m, model: replay.force(rec))
    replay_r3 = run(lambda m, model: replay.force(m.data["routed_experts"]))
    replay.off()
    # Merge pipeline stages: every layer's rows from the rank that holds it.
    out = {}
    for name, res in (("free_before", free_before), ("recorded", recorded),
                      ("free_after", free_after), ("replay_r2", replay_r2),
                      ("replay_r3", replay_r3)):
        out[name] = _gather_layers(res, spec.num_layers, groups)
    if dist.get_rank() == 0:
        torch.save(out, args.out)
    destroy_distributed()


def _gather_rows(t: torch.Tensor, groups, sequence_parallel: bool) -> torch.Tensor:
    """Rows of all TP ranks (each routed its sequence shard) in sequence order; sorted experts."""
    t = t.sort(dim=-1).values
    if sequence_parallel and dist.get_world_size(groups.tp) > 1:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(groups.tp))]
        dist.all_gather(parts, t.contiguous(), group=groups.tp)
        t = torch.cat(parts)
    return t


def _gather_layers(res: dict, num_layers: int, groups) -> torch.Tensor:
    """[num_layers, tokens, k] on every rank (pipeline stages hold disjoint layers)."""
    some = next(iter(res.values()))
    full = torch.full((num_layers, *some.shape), -1, dtype=torch.long)
    for layer, t in res.items():
        full[layer] = t
    if groups.layout.pipeline_parallel > 1:
        dist.all_reduce(full, op=dist.ReduceOp.MAX, group=groups.pp)
    return full


if __name__ == "__main__":
    main()
