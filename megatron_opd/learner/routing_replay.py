"""MoE routing replay (ALGORITHMS.md "MoE routing replay"): force the learner's routers to pick
given experts per token, keeping the gate weights from the learner's own router scores.

- R3: the experts come from the rollout engine (SGLang `routed_experts`), so train-side and
  inference-side log-probs use the same experts.
- R2: the learner records its own choices in one pass and replays them in later passes.

Built on megatron-core's RouterReplay (`TransformerConfig(moe_enable_routing_replay=True)`), one
instance per MoE layer, reached through the model (this module never uses RouterReplay's
process-wide instance list). Token order inside a router: the [s, b] activations flattened
sequence-major (row = position * b + sample); with sequence parallelism each TP rank routes
only its contiguous share of positions.
"""

from __future__ import annotations

import torch


class RoutingReplay:
    """Per-layer replay control for this rank's model chunks. Experts tensors are
    [b, s, num_layers (global), top_k] int64, for one micro-batch."""

    def __init__(self, chunks: list, tp_size: int, tp_rank: int, sequence_parallel: bool):
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self._actions = RouterReplayAction
        self.layers = []  # (global layer index, RouterReplay)
        for chunk in chunks:
            for layer in getattr(chunk, "decoder", chunk).layers:
                replay = getattr(getattr(layer.mlp, "router", None), "router_replay", None)
                if replay is None:
                    raise ValueError("routing replay needs moe_enable_routing_replay=True in the "
                                     "TransformerConfig of every MoE layer")
                self.layers.append((layer.layer_number - 1, replay))
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.sequence_parallel = sequence_parallel and tp_size > 1

    def _rows(self, per_layer: torch.Tensor) -> torch.Tensor:
        """[b, s, k] -> the [tokens, k] rows this rank's router sees."""
        b, s, k = per_layer.shape
        rows = per_layer.transpose(0, 1).reshape(s * b, k)
        if self.sequence_parallel:
            share = s // self.tp_size * b
            rows = rows[self.tp_rank * share:(self.tp_rank + 1) * share]
        return rows.contiguous()

    def force(self, experts: torch.Tensor) -> None:
        """Next forward of each local MoE layer uses `experts[:, :, layer]`."""
        for layer, replay in self.layers:
            replay.clear_indices()
            replay.set_target_indices(self._rows(experts[:, :, layer].long()))
            replay.set_router_replay_action(self._actions.REPLAY_FORWARD)

    def record(self) -> None:
        """Next forwards record each layer's own top-k choice (read it with `recorded`)."""
        for _, replay in self.layers:
            replay.clear_indices()
            replay.set_router_replay_action(self._actions.RECORD)

    def recorded(self) -> dict[int, torch.Tensor]:
        """{global layer: [tokens of this rank, k]} from the last recorded forward."""
        return {layer: replay.get_recorded_indices() for layer, replay in self.layers}

    def off(self) -> None:
        """Routers choose freely again; replay buffers are dropped."""
        for _, replay in self.layers:
            replay.clear_indices()
            replay.clear_router_replay_action()


def experts_from_rollout(routed: torch.Tensor, seq_len: int, top_k: int) -> torch.Tensor:
    """SGLang's per-sample `routed_experts` [n <= seq_len, layers, k] (positions 0..n-1; the last
    generated token has none) -> [seq_len, layers, k], rows without data filled with experts
    0..k-1. Exact for training: only positions >= n (the final token, right padding) get the
    filler, and with causal attention they influence no position before them."""
    n, layers, k = routed.shape
    if k != top_k:
        raise ValueError(f"routed_experts has top_k {k}, the model routes top {top_k}")
    out = torch.arange(top_k, dtype=torch.long).expand(seq_len, layers, top_k).clone()
    out[:min(n, seq_len)] = routed[:seq_len].long()
    return out
