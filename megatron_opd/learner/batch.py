"""From received samples to padded training tensors, with the staleness bound enforced.

Everything here is built on global rank 0 from the *whole* batch, before the data-parallel /
micro-batch split: per-sample quantities that need other samples (GRPO group statistics) are
final when the batch is cut. Every field is batch-first, so `split_microbatches` slices dim 0.

The fields, their dtypes, shapes and padding are declared in `megatron_opd/sample_fields.py`;
`collate` allocates and pads from that table, and `TrainBatch` lists exactly its batch fields,
in its order (tests/test_sample_fields.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_opd import sample_fields


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [B, L] int64, prompt + response, right-padded
    response_index: torch.Tensor  # [B, T] int64: position whose logits predict response token t
    response_ids: torch.Tensor  # [B, T] int64
    loss_mask: torch.Tensor  # [B, T] float32 (0 on padding, env tokens and stale tokens)
    behaviour_logprobs: torch.Tensor  # [B, T] float32
    token_versions: torch.Tensor  # [B, T] int64 (-1 on padding)
    teacher_logprobs: torch.Tensor  # [B, T] float32
    # Teacher top-K support per response token (K = the samples' K, may be 0 -> [B, T, 0]);
    # padding positions hold id 0 and log-prob 0.0 (masked by loss_mask).
    teacher_topk_ids: torch.Tensor  # [B, T, K] int64
    teacher_topk_logprobs: torch.Tensor  # [B, T, K] float32
    rewards: torch.Tensor  # [B] float32: Sample.reward (task verifier)
    # [B] float32: group-normalised rewards over the samples of the batch sharing a group_id
    # (objectives.grpo.group_normalized_advantages; a lone sample gets 0)
    sample_advantages: torch.Tensor
    revision_changed: torch.Tensor  # [B] float32: 1 where a stale teacher revision scored it
    temperature: torch.Tensor  # [B] float32: sampling temperature that produced the sample
    top_p: torch.Tensor  # [B] float32: its top-p (behaviour_logprobs are not renormalised for it)
    teacher_temperature: torch.Tensor  # [B] float32: temperature of the teacher's log-probs
    # [B, T] float32: log pi_old from interrupt sync (learner/interrupt.py), NaN where none
    interrupt_logprobs: torch.Tensor
    # [B, L, layers, top_k] int64: the rollout engine's experts per input position (R3), or None
    routed_experts: torch.Tensor | None = None
    # [B, T, D] float32: the teacher's final hidden states (teacher.signal=hidden; bfloat16 on
    # the wire, widened exactly), 0 on padding; None when the samples carry none
    teacher_hidden: torch.Tensor | None = None


@dataclass
class StalenessReport:
    tokens: int  # trainable response tokens that reached the learner, before the filter
    dropped_tokens: int  # trainable tokens over the bound (never trained)
    staleness_mean: float  # over the tokens kept
    staleness_max: int


_BATCH = sample_fields.batch_fields()
_COPIED = sample_fields.ragged_copied()  # Sample [T, ...] -> [B, T, ...], right-padded
_PER_SAMPLE = tuple(f for f in _BATCH if f.source == sample_fields.SCALAR)  # numbers -> [B]


def group_indices(group_ids: list[str]) -> np.ndarray:
    """[B] int64: samples with the same group id get the same index (0, 1, ... by first
    appearance)."""
    first: dict[str, int] = {}
    return np.asarray([first.setdefault(g, len(first)) for g in group_ids], dtype=np.int64)


def collate(samples, pad_id: int, step: int, max_staleness: int | None,
            teacher_revision: str | frozenset[str] | None = None
            ) -> tuple[TrainBatch, StalenessReport]:
    """Pad samples into a batch. A token made by version v has staleness `step - v` (the learner's
    current version is its step); tokens over `max_staleness` are masked out and counted.
    `max_staleness=None` applies no bound (offline OPD: stored data is fixed off-policy data by
    design, never dropped for its age; staleness is still reported). `teacher_revision`: the
    run's (one per teacher with several: serving/teachers.current_revisions); a sample scored
    under another revision gets `revision_changed` 1 (None: all 0)."""
    from megatron_opd.objectives.grpo import group_normalized_advantages

    B = len(samples)
    Ks = {s.teacher_topk_ids.shape[1] for s in samples}
    if len(Ks) != 1:
        raise ValueError(f"samples disagree on the teacher top-K width: {sorted(Ks)}")
    (K,) = Ks
    L = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    T = max(len(s.response_ids) for s in samples)
    sizes = {"B": B, "L": L, "T": T, "K": K}
    # every padded field ([B, L] / [B, T, ...]) filled with its padding value
    arrays = {f.batch_attr: np.full([sizes[c] for c in f.batch_shape],
                                    sample_fields.pad_value(f, pad_id), dtype=f.batch)
              for f in _BATCH if not f.optional and f.batch_shape[1:2] in ("L", "T")}
    input_ids, index = arrays["input_ids"], arrays["response_index"]
    for b, s in enumerate(samples):
        P, n = len(s.prompt_ids), len(s.response_ids)
        input_ids[b, :P] = s.prompt_ids
        input_ids[b, P:P + n] = s.response_ids
        index[b, :n] = np.arange(P - 1, P - 1 + n)
        for f in _COPIED:
            arrays[f.batch_attr][b, :n] = getattr(s, f.name)
    mask, versions = arrays["loss_mask"], arrays["token_versions"]
    staleness = step - versions
    trainable = mask > 0
    stale = trainable & (staleness > max_staleness) if max_staleness is not None \
        else np.zeros_like(trainable)
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
    out = {name: t(a) for name, a in arrays.items()}
    out["teacher_hidden"] = _teacher_hidden(samples, T)
    for f in _PER_SAMPLE:
        out[f.batch_attr] = torch.tensor([float(getattr(s, f.name)) for s in samples],
                                         dtype=getattr(torch, f.batch))
    groups = torch.from_numpy(group_indices([s.group_id for s in samples]))
    out["sample_advantages"] = group_normalized_advantages(out["rewards"], groups).to(torch.float32)
    current = {teacher_revision} if isinstance(teacher_revision, str) else teacher_revision
    out["revision_changed"] = torch.tensor(
        [float(current is not None and s.teacher_revision not in current) for s in samples],
        dtype=torch.float32)
    return TrainBatch(**out, routed_experts=routed), report


def _teacher_hidden(samples, T: int) -> torch.Tensor | None:
    """[B, T, D] from the samples' teacher_hidden, right-padded with 0; None when no sample has
    one. bfloat16 when every sample carries bfloat16 bits (teacher.hidden_dtype=bfloat16: half
    the memory and broadcast bytes of float32; the loss widens only the rows it uses, per
    micro-batch), else float32 (exact for both). All or none: a batch mixing signals is a bug
    upstream."""
    have = [s.teacher_hidden is not None for s in samples]
    if not any(have):
        return None
    if not all(have):
        raise ValueError(f"{sum(have)} of {len(samples)} samples carry teacher_hidden: a batch "
                         "needs all or none (teacher.signal=hidden for every sample)")
    dims = {s.teacher_hidden.shape[1] for s in samples}
    if len(dims) != 1:
        raise ValueError(f"samples disagree on the teacher's hidden size: {sorted(dims)}")
    d = dims.pop()
    if all(s.teacher_hidden.dtype == np.uint16 for s in samples):
        bits = np.zeros((len(samples), T, d), dtype=np.uint16)  # 0 bits = +0.0
        for b, s in enumerate(samples):
            bits[b, :s.teacher_hidden.shape[0]] = s.teacher_hidden
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    out = np.zeros((len(samples), T, d), dtype=np.float32)
    for b, s in enumerate(samples):
        h = s.teacher_hidden
        out[b, :h.shape[0]] = sample_fields.bf16_bits_to_float32(h) if h.dtype == np.uint16 else h
    return torch.from_numpy(out)


def response_logits(logits: torch.Tensor, response_index: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits -> [B, T, V]: the logits that predict each response token."""
    idx = response_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, idx)


def response_logprobs(logits: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
    """Log-probs of the sampled response tokens under `logits` ([B, T], float32)."""
    logp = torch.log_softmax(response_logits(logits, batch.response_index).float(), dim=-1)
    return torch.gather(logp, -1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
