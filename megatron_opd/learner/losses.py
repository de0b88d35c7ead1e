"""Loss functions in the form the training step runs them: vocab-sharded logits of one
micro-batch in, (sum over tokens, token count, {metric: (sum, count)}) out."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.learner.train_step import LossFn, MicroBatch
from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats
from megatron_opd.objectives import sampled_token_opd_loss

# Tensors a micro-batch of OPD training data carries in `MicroBatch.data` ([b, T] each).
OPD_FIELDS = ("response_index", "response_ids", "loss_mask", "behaviour_logprobs",
              "teacher_logprobs")


def response_logits(logits: torch.Tensor, response_index: torch.Tensor) -> torch.Tensor:
    """[b, s, V_local] -> [b, T, V_local]: the logits that predict each response token."""
    idx = response_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, idx)


def opd_loss_fn(objective, tp_group) -> LossFn:
    """Sampled-token OPD (ALGORITHMS.md §1 with the §6 clipped IS loss)."""
    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        d = mb.data
        z = response_logits(logits, d["response_index"])
        logprobs = vocab_parallel_token_stats(z, d["response_ids"], group=tp_group).logprobs
        loss, terms = sampled_token_opd_loss(
            logprobs, d["behaviour_logprobs"], d["teacher_logprobs"], d["loss_mask"],
            kl_coef=objective.kl_coef, kl_logprobs=objective.kl_logprobs,
            discount=objective.discount, clip_eps_low=objective.clip_eps_low,
            clip_eps_high=objective.clip_eps_high)
        n = d["loss_mask"].sum()
        metrics = {k: (v * n, n) for k, v in terms.items() if k not in ("tokens", "ratio_max")}
        return loss * n, n, metrics
    return loss_fn


def reverse_kl_fn(tp_group, tp_rank: int) -> LossFn:
    """Forward-only metric: exact KL(pi || q) over the whole vocabulary at every response token,
    with q given as full-vocab teacher log-probs `teacher_full_logprobs` [b, T, V]; each TP rank
    sums its vocab shard, one all-reduce completes it."""
    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        d = mb.data
        z = response_logits(logits, d["response_index"]).float()
        # Only the log-normaliser is needed; id 0 is a valid global id on every rank.
        stats = vocab_parallel_token_stats(z, torch.zeros_like(d["response_index"]), group=tp_group)
        logp = z - stats.logsumexp.unsqueeze(-1)
        v0 = tp_rank * z.shape[-1]
        logq = d["teacher_full_logprobs"][..., v0:v0 + z.shape[-1]]
        p = logp.exp()
        # p == 0 contributes 0 even where q == 0; p > 0 with q == 0 is an infinite KL.
        kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(kl, group=tp_group)
        mask = d["loss_mask"]
        n = mask.sum()
        total = (kl * mask).sum()
        return total.detach(), n, {"reverse_kl": (total, n)}
    return loss_fn
