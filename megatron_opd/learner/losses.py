"""Loss functions in the form the training step runs them: vocab-sharded logits of one
micro-batch in, (sum over tokens, token count, {metric: (sum, count)}) out."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.learner.train_step import LossFn, MicroBatch
from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats
from megatron_opd.sample_fields import micro_batch_fields

# Tensors every OPD training micro-batch carries in `MicroBatch.data` (the field table's
# reads="always": response_index, response_ids, loss_mask, behaviour/teacher log-probs [b, T],
# temperature and teacher_temperature [b]).
OPD_FIELDS = micro_batch_fields({"always"})


def response_logits(logits: torch.Tensor, response_index: torch.Tensor) -> torch.Tensor:
    """[b, s, V_local] -> [b, T, V_local]: the logits that predict each response token."""
    idx = response_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, idx)


def objective_fields(objective, hidden: bool = False) -> tuple[str, ...]:
    """The `TrainBatch` fields the configured objective reads (what micro-batches must carry):
    the field table's (megatron_opd/sample_fields.py) fields whose `reads` condition holds.
    `hidden`: teacher.signal=hidden (the teacher's hidden states replace its top-K)."""
    conditions = {"always"}
    if _wants_topk(objective, hidden):
        conditions.add("topk")
    if hidden:
        conditions.add("hidden")
    if "grpo_opd" in objective.terms:
        conditions.add("grpo_opd")
    return micro_batch_fields(conditions)


def _wants_topk(objective, hidden: bool = False) -> bool:
    """With the hidden signal, lsm / aopd / vopd use the full distribution (only TIP's top-K
    divergence still reads the top-K)."""
    from megatron_opd.objectives import NEEDS_TOPK

    sel = objective.token_selection
    terms = not hidden and (any(t in NEEDS_TOPK for t in objective.terms)
                            or "vopd" in objective.terms)
    return terms or (sel.method == "tip" and sel.divergence == "topk")


def objective_loss_fn(objective, tp_group, masked_ids: tuple[int, ...] = (),
                      correction=None, teacher_head=None) -> LossFn:
    """The configured objective (megatron_opd/objectives/compose.py) on vocab-sharded logits: the
    per-token statistics come from `vocab_parallel_token_stats` (log-prob of y_t, log-normaliser,
    entropy, logits at the teacher's top-K ids: two collectives per chunk), never the gathered
    vocabulary; vOPD's full-vocab KL is one more chunked pass over this rank's shard.
    `correction`: the `correction` section (None: its defaults). pi_old is the micro-batch's
    `old_logprobs` when it carries one (else mu stands in: r_d = 1).

    Temperatures (ALGORITHMS.md "Conventions", docs/temperatures.md): the ratio side (log pi(y_t)
    against mu and pi_old, the clip, the PG log-prob, the entropy) is at the sampler's T when
    `objective.use_sampler_temperature` (else 1); every distillation quantity (k_t, LSM, AOPD's
    gate and local KL, vOPD's KL, TIP's divergence, kl_sample) is at the sample's
    `teacher_temperature`. Where the two agree on every sample, one statistics pass serves both
    (bit-identical to a single-temperature loss); otherwise a second pass at the teacher's.

    `teacher_head` (teacher.signal=hidden: this TP rank's `TeacherHead`): the micro-batch's
    `teacher_hidden` [b, T, D] gives the teacher's exact distribution (`hidden_teacher_inputs`):
    log q(y_t) of the sampled tokens replaces the fleet's, lsm / aopd / vopd use the full
    vocabulary instead of the top-K, and `kl_exact` (the exact reverse KL) is logged."""
    from megatron_opd.learner.vocab_parallel import vocab_parallel_reverse_kl
    from megatron_opd.objectives.compose import ObjectiveInputs, objective_loss

    tip = objective.token_selection.method == "tip"
    want_entropy = objective.log_entropy or tip
    hidden = teacher_head is not None
    want_topk = _wants_topk(objective, hidden)
    full_kl = "vopd" in objective.terms and objective.vopd.support == "full" and not hidden
    reverse_grad = hidden and "lsm" in objective.terms
    forward_kl = hidden and "aopd" in objective.terms
    proximal = getattr(correction, "proximal", "behaviour")

    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        d = mb.data
        pos = d["response_index"]  # the rows predicting each response token: read in place
        t_dist = d["teacher_temperature"].to(torch.float32)
        t_ratio = ratio_temperatures(objective, d)
        same = torch.equal(t_ratio, t_dist)  # one pass serves both sides
        temp = per_token_temperature(t_ratio, pos)
        topk_ids = d["teacher_topk_ids"] if want_topk else None
        # the top-K logits are a distillation quantity: the ratio pass computes them only when
        # it is also the distillation pass
        stats = vocab_parallel_token_stats(logits, d["response_ids"], group=tp_group,
                                           entropy=want_entropy,
                                           topk_ids=topk_ids if same else None,
                                           temperature=temp, positions=pos)
        dstats, dtemp = stats, temp
        if not same:
            dtemp = per_token_temperature(t_dist, pos)
            dstats = vocab_parallel_token_stats(logits, d["response_ids"], group=tp_group,
                                                topk_ids=topk_ids, temperature=dtemp,
                                                positions=pos)
        full = None
        if full_kl:
            # teacher.top_k == vocab (validated): the sum over its ids is the exact KL
            full = vocab_parallel_reverse_kl(
                logits, d["teacher_topk_ids"], d["teacher_topk_logprobs"], dstats.logsumexp,
                group=tp_group, temperature=dtemp, positions=pos)
        teacher_lp, rev, fwd = d["teacher_logprobs"], None, None
        if hidden:
            teacher_lp, rev, fwd = hidden_teacher_inputs(
                logits, d, dtemp, teacher_head, tp_group, reverse_grad=reverse_grad,
                forward=forward_kl)
        old = d.get("old_logprobs")
        if "proximal_alpha" in d:  # correction.proximal = loglinear / linear: mu <-> pi_theta
            from megatron_opd.learner.proximal import interpolated_logprobs

            old = interpolated_logprobs(proximal, d["behaviour_logprobs"], stats.logprobs,
                                        d["proximal_alpha"])
        inp = ObjectiveInputs(
            mask=d["loss_mask"], response_ids=d["response_ids"], logprobs=stats.logprobs,
            behaviour_logprobs=d["behaviour_logprobs"], teacher_logprobs=teacher_lp,
            logsumexp=stats.logsumexp,
            entropy=None if stats.entropy is None else stats.entropy.detach(),
            topk_logits=stats.topk_logits,
            teacher_topk_logprobs=d["teacher_topk_logprobs"] if want_topk else None,
            full_reverse_kl=full, sample_advantages=d.get("sample_advantages"),
            old_logprobs=old, context_lag=d.get("context_lag"),
            # None: the ratio side's statistics are also the distillation side's
            distill_logprobs=None if same else dstats.logprobs,
            distill_logsumexp=None if same else dstats.logsumexp,
            distill_topk_logits=None if same else dstats.topk_logits,
            hidden_reverse_kl=rev, hidden_forward_kl=fwd)
        loss, n, terms = objective_loss(inp, objective, masked_ids, correction)
        # token-weighted means over the step (ratio maxima do not average: left out)
        metrics = {k: (v * n, n) for k, v in terms.items()
                   if k != "tokens" and not k.endswith("ratio_max")}
        return loss * n, n, metrics
    return loss_fn


def hidden_teacher_inputs(logits: torch.Tensor, d: dict, temperature: torch.Tensor | None,
                          head, tp_group, *, reverse_grad: bool, forward: bool):
    """From the teacher's hidden states `d["teacher_hidden"]` [b, T, D] and this rank's teacher
    head: (log q(y_t) [b, T] (exact, from the head: the fleet's value on tokens outside the loss
    mask), exact reverse KL(pi || q) [b, T] (with grad when `reverse_grad`), forward KL(q || pi)
    [b, T] with grad or None), the student at `temperature` [b, T] (None: 1), both vocab-parallel
    and chunked (learner/hidden_teacher.py). Only tokens of the loss mask are computed (0
    elsewhere); the logits rows are read in place at `response_index`."""
    from megatron_opd.learner.hidden_teacher import (hidden_teacher_kl,
                                                     teacher_logprobs_from_hidden)

    b, s, v = logits.shape
    pos = d["response_index"]
    t_len = pos.shape[1]
    if head.weight.device != logits.device:  # loaded on the CPU; moved once
        head.weight = head.weight.to(logits.device)
    keep = torch.nonzero((d["loss_mask"] > 0).reshape(-1)).view(-1)
    rows = (pos.long() + torch.arange(b, device=pos.device)[:, None] * s).reshape(-1)[keep]
    # only the rows in the loss are widened (the batch may hold bfloat16)
    ht = d["teacher_hidden"].to(logits.device).reshape(b * t_len, -1)[keep]
    ht = ht.to(torch.promote_types(ht.dtype, torch.float32))
    temp = 1.0 if temperature is None else temperature.reshape(-1)[keep]
    flat = logits.reshape(b * s, v)
    lq = teacher_logprobs_from_hidden(head, ht, d["response_ids"].reshape(-1)[keep],
                                      group=tp_group, temperature=temp)
    teacher_lp = d["teacher_logprobs"].to(lq.dtype).reshape(-1).index_put((keep,), lq)

    def per_token(kind):
        kl = hidden_teacher_kl(flat, ht, head, group=tp_group, kind=kind, temperature=temp,
                               rows=rows)
        return torch.zeros(b * t_len, dtype=kl.dtype, device=kl.device).index_put(
            (keep,), kl).view(b, t_len)

    with torch.set_grad_enabled(reverse_grad and torch.is_grad_enabled()):
        rev = per_token("reverse")
    fwd = per_token("forward") if forward else None
    return teacher_lp.view(b, t_len), rev, fwd


def ratio_temperatures(objective, data: dict) -> torch.Tensor:
    """[b] temperature of the ratio side (pi against mu): the sampler's T when
    `objective.use_sampler_temperature`, else 1 (docs/temperatures.md)."""
    t = data["temperature"].to(torch.float32)
    return t if objective.use_sampler_temperature else torch.ones_like(t)


def per_token_temperature(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
    """[b] temperatures -> [b, T] per token, or None when all are 1 (no scaling at all, so a
    T = 1 loss is bit-identical to an unscaled one)."""
    return t[:, None].expand(pos.shape) if bool((t != 1).any()) else None


def mask_padded_vocab_(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """In place (no-grad use only): this rank's logits columns at global ids >= `vocab_size` set
    to -inf, so a vocabulary megatron padded to a multiple of TP has probability 0 there and
    stays out of every normaliser. Rank r holds ids [r*V_local, (r+1)*V_local)."""
    v_local = logits.shape[-1]
    keep = max(0, min(v_local, vocab_size - tp_rank * v_local))
    if keep < v_local:
        logits[..., keep:] = -torch.inf
    return logits


def sampled_kl_terms(logprobs: torch.Tensor, teacher_logprobs: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token unbiased estimators of KL(pi || q) from y ~ pi (ALGORITHMS.md §1), float64:
    k1 = log pi(y) - log q(y);  k3 = (r - 1) - log r with r = q(y) / pi(y) (>= 0 per token,
    E[k3] = KL when q's support lies in pi's, as for any softmax). log q(y) = -inf gives +inf."""
    log_r = teacher_logprobs.double() - logprobs.double()
    return -log_r, torch.expm1(log_r) - log_r


def _exact_reverse_kl(logits: torch.Tensor, d: dict, logsumexp: torch.Tensor, tp_group,
                      tp_rank: int, vocab_size: int) -> torch.Tensor:
    """[b, T] sum_v p_v (log p_v - log q_v) over the true vocabulary from this rank's shard
    (logits already masked beyond `vocab_size`) and full-vocab teacher log-probs
    `teacher_full_logprobs` [b, T, vocab_size]; one SUM all-reduce completes it. Builds
    [b, T, V_local] tensors: small vocabularies only."""
    cdtype = torch.promote_types(logits.dtype, torch.float32)
    z = response_logits(logits, d["response_index"]).to(cdtype)
    logp = z - logsumexp.to(cdtype).unsqueeze(-1)
    v_local = z.shape[-1]
    v0 = tp_rank * v_local
    logq = torch.full_like(z, -torch.inf)
    own = max(0, min(v_local, vocab_size - v0))  # teacher columns this shard holds
    if own:
        logq[..., :own] = d["teacher_full_logprobs"][..., v0:v0 + own].to(cdtype)
    p = logp.exp()
    # p == 0 (padded or underflowed ids) contributes 0 even where q == 0; p > 0, q == 0 is +inf.
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(kl, group=tp_group)
    return kl


# Columns of the per-response table `eval_kl_fn` fills (float64, one row per micro-batch row).
EVAL_KL_COLUMNS = ("k1_sum", "k3_sum", "tokens", "exact_kl_sum")


def eval_kl_fn(tp_group, tp_rank: int, vocab_size: int, *, exact: bool,
               rows_out: dict[int, torch.Tensor], chunk_tokens: int = 4096) -> LossFn:
    """Forward-only held-out KL(pi || q) on student-sampled responses. Reads `response_index`,
    `response_ids`, `loss_mask` and `teacher_logprobs` (log q(y_t) of the sampled tokens) [b, T];
    with `exact`, also `teacher_full_logprobs` [b, T, vocab_size]. Logits columns at ids >=
    `vocab_size` (megatron's TP padding) are treated as absent (masked in place: call under
    no_grad). log pi(y_t) comes from `vocab_parallel_token_stats` (chunked, vocab-sharded: the
    sampled path builds nothing vocabulary-wide beyond a [chunk_tokens, V_local] scratch).
    Fills `rows_out[mb.index]` with a CPU float64 [b, 4] table (EVAL_KL_COLUMNS: per-response
    sums of k1, k3 and the exact KL (0 unless `exact`) over masked tokens, and token counts)."""
    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        d = mb.data
        mask_padded_vocab_(logits, vocab_size, tp_rank)
        stats = vocab_parallel_token_stats(logits, d["response_ids"], group=tp_group,
                                           positions=d["response_index"],
                                           chunk_tokens=chunk_tokens)
        keep = d["loss_mask"] > 0
        k1, k3 = sampled_kl_terms(stats.logprobs, d["teacher_logprobs"])
        zero = torch.zeros((), dtype=torch.float64, device=k1.device)
        cols = [torch.where(keep, k1, zero).sum(1), torch.where(keep, k3, zero).sum(1),
                keep.sum(1).double()]
        if exact:
            kl = _exact_reverse_kl(logits, d, stats.logsumexp, tp_group, tp_rank, vocab_size)
            cols.append(torch.where(keep, kl.double(), zero).sum(1))
        else:
            cols.append(torch.zeros_like(cols[0]))
        table = torch.stack(cols, dim=1)
        rows_out[mb.index] = table.cpu()
        n = keep.sum()
        return table[:, 1].sum().float(), n, {}
    return loss_fn
