"""From received samples to padded training tensors, with the staleness bound enforced."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [B, L] int64, prompt + response, right-padded
    response_index: torch.Tensor  # [B, T] int64: position whose logits predict response token t
    response_ids: torch.Tensor  # [B, T] int64
    loss_mask: torch.Tensor  # [B, T] float32 (0 on padding, env tokens and stale tokens)
    behaviour_logprobs: torch.Tensor  # [B, T] float32
    teacher_logprobs: torch.Tensor  # [B, T] float32
    token_versions: torch.Tensor  # [B, T] int64 (-1 on padding)
    # [B, L, layers, top_k] int64: the rollout engine's experts per input position (R3), or None
    routed_experts: torch.Tensor | None = None


@dataclass
class StalenessReport:
    tokens: int  # trainable response tokens that reached the learner, before the filter
    dropped_tokens: int  # trainable tokens over the bound (never trained)
    staleness_mean: float  # over the tokens kept
    staleness_max: int


def collate(samples, pad_id: int, step: int, max_staleness: int) -> tuple[TrainBatch, StalenessReport]:
    """Pad samples into a batch. A token made by version v has staleness `step - v` (the learner's
    current version is its step); tokens over `max_staleness` are masked out and counted."""
    B = len(samples)
    L = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    T = max(len(s.response_ids) for s in samples)
    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    index = np.zeros((B, T), dtype=np.int64)
    resp = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.float32)
    mu = np.zeros((B, T), dtype=np.float32)
    q = np.zeros((B, T), dtype=np.float32)
    versions = np.full((B, T), -1, dtype=np.int64)
    for b, s in enumerate(samples):
        P, n = len(s.prompt_ids), len(s.response_ids)
        input_ids[b, :P] = s.prompt_ids
        input_ids[b, P:P + n] = s.response_ids
        index[b, :n] = np.arange(P - 1, P - 1 + n)
        resp[b, :n] = s.response_ids
        mask[b, :n] = s.loss_mask
        mu[b, :n] = s.behaviour_logprobs
        q[b, :n] = s.teacher_logprobs
        versions[b, :n] = s.token_versions
    staleness = step - versions
    trainable = mask > 0
    stale = trainable & (staleness > max_staleness)
    kept = trainable & ~stale
    mask[stale] = 0.0
    report = StalenessReport(
        tokens=int(trainable.sum()),
        dropped_tokens=int(stale.sum()),
        staleness_mean=float(staleness[kept].mean()) if kept.any() else 0.0,
        staleness_max=int(staleness[kept].max()) if kept.any() else 0,
    )
    t = torch.from_numpy
    routed = None
    if all(s.routed_experts is not None for s in samples):
        from megatron_opd.learner.routing_replay import experts_from_rollout

        k = samples[0].routed_experts.shape[-1]
        routed = torch.stack([experts_from_rollout(torch.from_numpy(s.routed_experts.astype(np.int64)),
                                                   L, k) for s in samples])
    batch = TrainBatch(t(input_ids), t(index), t(resp), t(mask), t(mu), t(q), t(versions), routed)
    return batch, report


def response_logits(logits: torch.Tensor, response_index: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits -> [B, T, V]: the logits that predict each response token."""
    idx = response_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, idx)


def response_logprobs(logits: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
    """Log-probs of the sampled response tokens under `logits` ([B, T], float32)."""
    logp = torch.log_softmax(response_logits(logits, batch.response_index).float(), dim=-1)
    return torch.gather(logp, -1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
