"""Teacher top-K local support matching, LSM (ALGORITHMS.md §2, arXiv 2603.25562).

On the teacher's top-K support S_t both models are renormalised, pi^ = softmax(student logits at
S_t), q^ = softmax(teacher log-probs at S_t), and the loss is the truncated reverse KL

    L_LSM = mean_t sum_{v in S_t} pi^(v) (log pi^(v) - log q^(v))

a direct differentiable loss: no ratio, no advantage; gradient reaches only the K gathered
student logits. Optional clamp of the log-ratio to [-c, c]. With a tensor-parallel vocabulary the
K student logits come from `vocab_parallel_token_stats(topk_ids=...)` (one all-reduce per chunk);
everything here is [..., T, K], never the vocabulary.
"""

from __future__ import annotations

import torch

from megatron_opd.objectives.policy_gradient import masked_mean, masked_where


def renormalised_topk_reverse_kl(student_topk_logits: torch.Tensor,
                                 teacher_topk_logprobs: torch.Tensor,
                                 log_ratio_clamp: float = 0.0) -> torch.Tensor:
    """[..., K] -> [...]: sum_v pi^(v) (log pi^(v) - log q^(v)) on the support, both renormalised;
    log-ratios clamped to +-log_ratio_clamp when it is > 0."""
    log_pi = torch.log_softmax(student_topk_logits, dim=-1)
    log_q = torch.log_softmax(teacher_topk_logprobs.to(log_pi.dtype), dim=-1)
    ratio = log_pi - log_q
    if log_ratio_clamp > 0:
        ratio = ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    return (log_pi.exp() * ratio).sum(dim=-1)


def lsm_loss(student_topk_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
             mask: torch.Tensor, *, log_ratio_clamp: float = 0.0,
             logsumexp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """student_topk_logits [..., T, K] (with grad; the student's logits at the teacher's top-K ids),
    teacher_topk_logprobs [..., T, K], mask [..., T]. Masked tokens never enter the arithmetic
    (junk there cannot leak a nan into the gradient). `logsumexp` (the student's full-vocab
    log-normaliser), when given, adds the student's probability mass on the support as a metric."""
    m = mask[..., None] > 0
    z = torch.where(m, student_topk_logits, torch.zeros_like(student_topk_logits))
    lq = torch.where(m, teacher_topk_logprobs.to(z.dtype), torch.zeros_like(z))
    per_token = masked_where(renormalised_topk_reverse_kl(z, lq, log_ratio_clamp), mask)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        metrics = {"lsm_kl": loss.detach(),
                   "lsm_teacher_mass": masked_mean(lq.exp().sum(-1), mask)}
        if logsumexp is not None:
            mass = torch.exp(torch.logsumexp(z, dim=-1) - masked_where(logsumexp, mask))
            metrics["lsm_student_mass"] = masked_mean(mass, mask)
    return loss, metrics


def full_lsm_loss(reverse_kl: torch.Tensor, mask: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LSM with the support S_t = the whole vocabulary (teacher.signal=hidden): renormalising
    inside S_t changes nothing, so the loss is the exact reverse KL(pi || q) per token
    (`reverse_kl` [..., T], with grad: learner/hidden_teacher.py), token mean over the mask. The
    teacher's and student's masses on the support are 1 by construction (no metric for them)."""
    loss = masked_mean(masked_where(reverse_kl, mask), mask)
    return loss, {"lsm_kl": loss.detach()}


def first_occurrence_mask(response_ids: torch.Tensor, mask: torch.Tensor,
                          special_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
    """The loss mask with the first occurrence, in each assistant turn, of each of `special_ids`
    removed (tokens the student's and teacher's tokenizers disagree on; the paper masks the first
    `<`, `think`, `<|im_end|>`, which every turn of a multi-turn trajectory repeats). An assistant
    turn is a maximal run of trainable (mask > 0) positions: environment/tool tokens (mask 0)
    separate turns; a single-turn response is one run, so it loses the first occurrence per row.
    Only trainable positions count as occurrences. response_ids, mask: [..., T]; returns a new
    mask of mask's dtype."""
    out = mask.clone()
    if not special_ids:
        return out
    live = mask > 0
    prev = torch.zeros_like(live)
    prev[..., 1:] = live[..., :-1]
    turn_start = live & ~prev
    for sid in special_ids:
        hit = (response_ids == sid) & live
        # hits before each position (exclusive count), and that count where its turn started:
        # the count never decreases along T, so a running max of it at turn starts is the latest
        before = torch.cumsum(hit.to(torch.int64), dim=-1) - hit.to(torch.int64)
        at_start = torch.where(turn_start, before, torch.zeros_like(before))
        base = torch.cummax(at_start, dim=-1).values
        first = hit & (before == base)
        out = torch.where(first, torch.zeros_like(out), out)
    return out
