"""Loss functions in the form the training step runs them: vocab-sharded logits of one
micro-batch in, (sum over tokens, token count, {metric: (sum, count)}) out."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.learner.train_step import LossFn, MicroBatch
from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats

# Tensors a micro-batch of OPD training data carries in `MicroBatch.data` ([b, T] each).
OPD_FIELDS = ("response_index", "response_ids", "loss_mask", "behaviour_logprobs",
              "teacher_logprobs")


def response_logits(logits: torch.Tensor, response_index: torch.Tensor) -> torch.Tensor:
    """[b, s, V_local] -> [b, T, V_local]: the logits that predict each response token."""
    idx = response_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, idx)


def objective_fields(objective) -> tuple[str, ...]:
    """The `TrainBatch` fields the configured objective reads (what micro-batches must carry)."""
    terms = set(objective.terms)
    fields = OPD_FIELDS + ("temperature",)
    if _wants_topk(objective):
        fields += ("teacher_topk_ids", "teacher_topk_logprobs")
    if "grpo_opd" in terms:
        fields += ("sample_advantages",)
    return fields


def _wants_topk(objective) -> bool:
    from megatron_opd.objectives import NEEDS_TOPK

    sel = objective.token_selection
    return (any(t in NEEDS_TOPK for t in objective.terms) or "vopd" in objective.terms
            or (sel.method == "tip" and sel.divergence == "topk"))


def objective_loss_fn(objective, tp_group, masked_ids: tuple[int, ...] = ()) -> LossFn:
    """The configured objective (megatron_opd/objectives/compose.py) on vocab-sharded logits: the
    per-token statistics come from `vocab_parallel_token_stats` (log-prob of y_t, log-normaliser,
    entropy, logits at the teacher's top-K ids: two collectives per chunk), never the gathered
    vocabulary; vOPD's full-vocab KL is one more chunked pass over this rank's shard."""
    from megatron_opd.learner.vocab_parallel import vocab_parallel_reverse_kl
    from megatron_opd.objectives.compose import ObjectiveInputs, objective_loss

    tip = objective.token_selection.method == "tip"
    want_entropy = objective.log_entropy or tip
    want_topk = _wants_topk(objective)
    full_kl = "vopd" in objective.terms and objective.vopd.support == "full"

    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        d = mb.data
        pos = d["response_index"]  # the rows predicting each response token: read in place
        temp = None
        if objective.use_sampler_temperature:
            t = d["temperature"].to(torch.float32)
            if bool((t != 1).any()):
                temp = t[:, None].expand(pos.shape)
        topk_ids = d["teacher_topk_ids"] if want_topk else None
        stats = vocab_parallel_token_stats(logits, d["response_ids"], group=tp_group,
                                           entropy=want_entropy, topk_ids=topk_ids,
                                           temperature=temp, positions=pos)
        full = None
        if full_kl:
            # teacher.top_k == vocab (validated): the sum over its ids is the exact KL
            full = vocab_parallel_reverse_kl(
                logits, d["teacher_topk_ids"], d["teacher_topk_logprobs"], stats.logsumexp,
                group=tp_group, temperature=temp, positions=pos)
        inp = ObjectiveInputs(
            mask=d["loss_mask"], response_ids=d["response_ids"], logprobs=stats.logprobs,
            behaviour_logprobs=d["behaviour_logprobs"], teacher_logprobs=d["teacher_logprobs"],
            logsumexp=stats.logsumexp,
            entropy=None if stats.entropy is None else stats.entropy.detach(),
            topk_logits=stats.topk_logits,
            teacher_topk_logprobs=d["teacher_topk_logprobs"] if want_topk else None,
            full_reverse_kl=full, sample_advantages=d.get("sample_advantages"))
        loss, n, terms = objective_loss(inp, objective, masked_ids)
        # token-weighted means over the step (ratio maxima do not average: left out)
        metrics = {k: (v * n, n) for k, v in terms.items()
                   if k != "tokens" and not k.endswith("ratio_max")}
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
