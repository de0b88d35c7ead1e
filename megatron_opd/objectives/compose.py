"""One selectable, composable objective: a weighted sum of terms over one micro-batch.

`objective_loss(inputs, cfg, masked_ids, correction)` is a pure function of tensors, the
`objective` config section and the `correction` one. Order of work: special-token masking (tokens
the two tokenizers disagree on leave every term), optional TIP token selection, then each term's
token mean over the surviving mask, summed with its weight. All terms share the mask, so the
caller's token count (for the token mean across micro-batches and data-parallel ranks) is the one
returned here.

Policy-gradient terms split their ratio r_d * r_s (objectives/offpolicy.py): the r_d treatment
(w_d, M_d) is computed once per micro-batch over the loss mask as it arrives (sequence products
and the catastrophic check see every trainable token of a sequence, whatever the selection keeps)
and every PG term applies it; tokens M_d drops stay in the token count with 0 loss. Discounted
returns run over the mask before TIP selection: selection picks which tokens get a gradient, not
what their returns are.

Temperatures (ALGORITHMS.md "Conventions", docs/temperatures.md): `logprobs` is the ratio side
(pi against mu and pi_old: the sampler's temperature); the distillation quantities (k_t through
`kl_logprobs`, LSM's and AOPD's top-K log-probs, vOPD's KL, TIP's divergence, `kl_sample`) read the
`distill_*` inputs, the student at the temperature the teacher was scored at. Left None they are
the ratio side's tensors themselves (both temperatures equal), so nothing changes then.

Terms (ALGORITHMS.md): sampled_token_opd (§1 + §6), lsm (§2), aopd (§3), vopd (§4), grpo_opd (§5),
offline_opd (§9: the §1 loss on samples whose teacher log-probs were precomputed; the data source
is `teacher.mode=offline`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opd.objectives.aopd import aopd_loss
from megatron_opd.objectives.grpo import grpo_opd_loss
from megatron_opd.objectives.lsm import (first_occurrence_mask, full_lsm_loss, lsm_loss,
                                         renormalised_topk_reverse_kl)
from megatron_opd.objectives.offpolicy import discrepancy_weights, offpolicy_metrics, quantiles
from megatron_opd.objectives.policy_gradient import masked_mean, masked_where
from megatron_opd.objectives.sampled_token_opd import (opd_advantages, pick_kl_logprobs,
                                                       sampled_token_opd_loss)
from megatron_opd.objectives.token_selection import tip_select
from megatron_opd.objectives.names import NEEDS_TOPK, PG_TERMS, TERMS  # noqa: F401 (re-export)
from megatron_opd.objectives.vopd import vopd_loss


@dataclass
class ObjectiveInputs:
    """One micro-batch, [b, T] unless noted. Tensors marked (grad) carry the student's graph; the
    rest are constants. Optional ones are None when no selected term or metric needs them."""

    mask: torch.Tensor  # loss mask (0: padding, prompt/tool tokens, stale tokens)
    response_ids: torch.Tensor  # int64: sampled tokens y_t
    logprobs: torch.Tensor  # (grad) log pi_theta(y_t) at the ratio side's (sampler's) temperature
    behaviour_logprobs: torch.Tensor  # log mu(y_t) as SGLang reported it
    teacher_logprobs: torch.Tensor  # log q(y_t)
    old_logprobs: torch.Tensor | None = None  # pi_old (§6); None: mu stands in (r_d = 1)
    logsumexp: torch.Tensor | None = None  # (grad) the student's full-vocab log-normaliser
    entropy: torch.Tensor | None = None  # student entropy (constant)
    topk_logits: torch.Tensor | None = None  # (grad) [b, T, K] student logits at teacher top-K ids
    teacher_topk_logprobs: torch.Tensor | None = None  # [b, T, K] log q at its top-K ids
    full_reverse_kl: torch.Tensor | None = None  # exact KL(pi || q) per token (vopd support=full)
    sample_advantages: torch.Tensor | None = None  # [b] group-normalised rewards (grpo_opd)
    # [b] version lag of the context the teacher scored (+1 for a stale teacher revision):
    # the supervision drift of freshness control (§7); None: no freshness scores
    context_lag: torch.Tensor | None = None
    # The student at the teacher's scoring temperature (the distillation side); None: the same
    # as logprobs / logsumexp / topk_logits (the two temperatures agree on every sample).
    # full_reverse_kl is always at the teacher's temperature.
    distill_logprobs: torch.Tensor | None = None  # log pi_{T_q}(y_t) (constant where used)
    distill_logsumexp: torch.Tensor | None = None  # (grad) log-normaliser of z / T_q
    distill_topk_logits: torch.Tensor | None = None  # (grad) [b, T, K] z / T_q at top-K ids
    # teacher.signal=hidden (ALGORITHMS.md §10; learner/hidden_teacher.py): the exact divergences
    # against the teacher's whole distribution, the student at the teacher's temperature; given,
    # lsm, aopd and vopd use them instead of the teacher's top-K (docs/teacher-signals.md)
    hidden_reverse_kl: torch.Tensor | None = None  # (grad) KL(pi || q) per token
    hidden_forward_kl: torch.Tensor | None = None  # (grad) KL(q || pi) per token (aopd)


# The inputs that are training-batch fields as they are (input -> TrainBatch attribute, declared
# with dtype, shape and padding in megatron_opd/sample_fields.py); the other inputs are the
# student's statistics of its logits (learner/losses.py:objective_loss_fn computes them).
FROM_BATCH = {"mask": "loss_mask", "response_ids": "response_ids",
              "behaviour_logprobs": "behaviour_logprobs", "teacher_logprobs": "teacher_logprobs",
              "teacher_topk_logprobs": "teacher_topk_logprobs",
              "sample_advantages": "sample_advantages"}


def masked_token_ids_mask(inp: ObjectiveInputs, masked_ids) -> torch.Tensor:
    return first_occurrence_mask(inp.response_ids, inp.mask, list(masked_ids))


def objective_loss(inp: ObjectiveInputs, cfg, masked_ids=(), correction=None) -> tuple[
        torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss: token mean over the final mask, tokens in that mask, metrics). `cfg` is the
    `objective` section; `masked_ids` the resolved ids of `objective.masked_tokens`;
    `correction` the `correction` section (None: CorrectionConfig's defaults: r_d untreated,
    no dual clip). Metrics `offpolicy/*` (only with a PG term) describe the ratio split."""
    if correction is None:
        from megatron_opd.config import CorrectionConfig
        correction = CorrectionConfig()
    inp = _with_distill_side(_in_compute_dtype(inp))
    base = (inp.mask > 0).to(inp.logprobs.dtype)
    mask = first_occurrence_mask(inp.response_ids, base, list(masked_ids)) if masked_ids else base
    special_masked = base.sum() - mask.sum()
    fresh_w, fresh_metrics = _freshness(inp, mask, correction)
    if fresh_w is not None:  # dropped samples leave every term; weights act below (PG terms)
        mask = mask * (fresh_w > 0).to(mask.dtype)
    return_mask = mask  # returns are computed before selection (TIP only picks gradients)
    sel = cfg.token_selection
    if sel.method == "tip":
        mask = tip_select(inp.entropy, _tip_divergence(inp, sel.divergence), mask, sel.keep_ratio)
    old = inp.behaviour_logprobs if inp.old_logprobs is None else inp.old_logprobs
    # k_t's pi ("current": the student at the teacher's temperature; "behaviour" / "old" are
    # what was recorded at the sampler's)
    kl_lp = pick_kl_logprobs(cfg.kl_logprobs, inp.distill_logprobs, inp.behaviour_logprobs,
                             inp.old_logprobs)
    has_pg = any(t in PG_TERMS for t in cfg.terms)
    d_weight, d_keep = (discrepancy_weights(inp.old_logprobs, inp.behaviour_logprobs, base,
                                            correction) if has_pg else (None, None))
    if fresh_w is not None and correction.freshness == "downweight" and d_weight is not None:
        d_weight = d_weight * fresh_w  # per-sample f_i / mean f, as one more per-token weight
    off = dict(discrepancy_weight=d_weight, discrepancy_mask=d_keep,
               dual_clip=float(correction.dual_clip))
    weights = list(cfg.weights) or [1.0] * len(cfg.terms)
    total = inp.logprobs.new_zeros(())
    metrics: dict[str, torch.Tensor] = {}
    first_pg = None
    for name, w in zip(cfg.terms, weights):
        loss, m = _term(name, inp, cfg, mask, old, kl_lp, return_mask, off)
        total = total + w * loss
        metrics[f"{name}/loss"] = loss.detach()
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
        if first_pg is None and name in PG_TERMS:
            first_pg = m
    with torch.no_grad():
        n = mask.sum()
        metrics["tokens"] = n
        metrics["masked_fraction"] = 1 - n / base.sum().clamp_min(1.0)
        metrics["special_masked_fraction"] = special_masked / base.sum().clamp_min(1.0)
        if inp.entropy is not None:
            metrics["entropy"] = masked_mean(inp.entropy, mask)
        k = masked_where(inp.distill_logprobs - inp.teacher_logprobs, mask)
        metrics["kl_sample"] = masked_mean(k, mask)
        if inp.hidden_reverse_kl is not None:  # the exact reverse KL, not a one-sample estimate
            metrics["kl_exact"] = masked_mean(inp.hidden_reverse_kl.detach(), mask)
        metrics["mismatch_abs"] = masked_mean((inp.logprobs - inp.behaviour_logprobs).abs(), mask)
        if first_pg is not None:
            # over the final mask (the caller's token weights); clip and active fractions are
            # the first PG term's (they depend on its advantages' signs)
            om = offpolicy_metrics(inp.logprobs, inp.old_logprobs, inp.behaviour_logprobs, mask,
                                   d_keep)
            om["clip_fraction"] = first_pg["clip_fraction"]
            om["active_fraction"] = first_pg["active_fraction"]
            metrics.update({f"offpolicy/{k}": v for k, v in om.items()})
        metrics.update(fresh_metrics)
    return total, n, metrics


def _freshness(inp: ObjectiveInputs, mask: torch.Tensor, correction):
    """f-OPD freshness control (objectives/freshness.py) when the micro-batch carries the
    context lag: (per-token weights [b, T] of the samples kept, 0 on dropped ones; metrics).
    Down-weighting acts on the policy-gradient terms through their per-token weight (the r_d
    channel), dropping (policy "drop", the drift budget) on every term through the mask."""
    from megatron_opd.objectives.freshness import (apply_freshness, freshness_scores,
                                                   rollout_drift, supervision_drift)

    if inp.context_lag is None:
        return None, {}
    with torch.no_grad():
        d_roll = rollout_drift(inp.logprobs.detach(), inp.behaviour_logprobs, mask)
        d_sup = supervision_drift(inp.context_lag.to(d_roll.dtype))
        f = freshness_scores(d_roll, d_sup, correction.freshness_alpha, correction.freshness_beta)
        w, m = apply_freshness(mask, f, d_roll, correction.freshness, correction.freshness_min,
                               correction.drift_budget, d_sup=d_sup)
    active = correction.freshness != "accept" or correction.drift_budget > 0
    return (w.to(mask.dtype) if active else None), m


def _term(name: str, inp: ObjectiveInputs, cfg, mask, old, kl_lp, return_mask, off):
    pg = dict(clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, **off)
    if name in ("sampled_token_opd", "offline_opd"):
        loss, m = sampled_token_opd_loss(inp.logprobs, inp.behaviour_logprobs, inp.teacher_logprobs,
                                         mask, kl_coef=cfg.kl_coef, kl_logprobs=cfg.kl_logprobs,
                                         discount=cfg.discount, old_logprobs=inp.old_logprobs,
                                         return_mask=return_mask,
                                         distill_logprobs=inp.distill_logprobs, **pg)
        adv = masked_where(opd_advantages(kl_lp, inp.teacher_logprobs, return_mask, cfg.kl_coef,
                                          cfg.discount), mask)
        m.pop("tokens"), m.pop("kl_sample"), m.pop("mismatch_abs")
        return loss, m | _quantiles("advantage", adv, mask)
    if name == "lsm" and inp.hidden_reverse_kl is not None:  # support = the whole vocabulary
        return full_lsm_loss(inp.hidden_reverse_kl, mask)
    if name == "lsm":
        return lsm_loss(inp.distill_topk_logits, inp.teacher_topk_logprobs, mask,
                        log_ratio_clamp=cfg.lsm.log_ratio_clamp, logsumexp=inp.distill_logsumexp)
    if name == "aopd":
        if inp.hidden_forward_kl is not None:  # the local KL over the whole vocabulary
            return aopd_loss(inp.logprobs, kl_lp, old, inp.teacher_logprobs, None, None, mask,
                             tau=cfg.aopd.tau, pg_form=cfg.aopd.pg_form,
                             local_kl=inp.hidden_forward_kl, **pg)
        student_topk_logprobs = inp.distill_topk_logits - inp.distill_logsumexp.unsqueeze(-1)
        return aopd_loss(inp.logprobs, kl_lp, old, inp.teacher_logprobs, student_topk_logprobs,
                         inp.teacher_topk_logprobs, mask, tau=cfg.aopd.tau,
                         pg_form=cfg.aopd.pg_form, **pg)
    if name == "vopd":
        if inp.hidden_reverse_kl is not None:  # exact, whatever vopd.support says
            kl = inp.hidden_reverse_kl.detach()
        elif cfg.vopd.support == "full":
            kl = inp.full_reverse_kl
        else:
            m3 = mask[..., None] > 0
            kl = masked_where(renormalised_topk_reverse_kl(
                torch.where(m3, inp.distill_topk_logits.detach(),
                            torch.zeros_like(inp.distill_topk_logits)),
                torch.where(m3, inp.teacher_topk_logprobs, torch.zeros_like(inp.teacher_topk_logprobs))),
                mask)
        loss, m = vopd_loss(inp.logprobs, kl_lp, old, inp.teacher_logprobs, masked_where(kl, mask),
                            mask, kl_coef=cfg.kl_coef, **pg)
        adv = cfg.kl_coef * masked_where(inp.teacher_logprobs - kl_lp + kl, mask)
        return loss, m | _quantiles("advantage", adv, mask)
    if name == "grpo_opd":
        loss, m = grpo_opd_loss(inp.logprobs, old, kl_lp, inp.teacher_logprobs,
                                inp.sample_advantages, mask, kl_coef=cfg.kl_coef, **pg)
        adv = inp.sample_advantages.to(mask.dtype)[..., None] + cfg.kl_coef * (inp.teacher_logprobs - kl_lp)
        return loss, m | _quantiles("advantage", masked_where(adv, mask), mask)
    raise ValueError(f"objective.terms: unknown term {name!r}; known: {list(TERMS)}")


def _in_compute_dtype(inp: ObjectiveInputs) -> ObjectiveInputs:
    """Constants (log-probs from the fleets arrive in float32) in the dtype of the student's
    statistics, so every term is computed at one precision (float64 in the reference tests)."""
    dt = inp.logprobs.dtype
    out = ObjectiveInputs(**vars(inp))
    for name in ("behaviour_logprobs", "teacher_logprobs", "old_logprobs", "teacher_topk_logprobs",
                 "full_reverse_kl", "sample_advantages", "entropy", "hidden_reverse_kl",
                 "hidden_forward_kl"):
        t = getattr(out, name)
        if t is not None and t.is_floating_point() and t.dtype != dt:
            setattr(out, name, t.to(dt))
    return out


def _with_distill_side(inp: ObjectiveInputs) -> ObjectiveInputs:
    """The distillation-side inputs left None filled with the ratio side's tensors (the same
    objects: one temperature costs nothing and changes no bit)."""
    pairs = (("distill_logprobs", "logprobs"), ("distill_logsumexp", "logsumexp"),
             ("distill_topk_logits", "topk_logits"))
    if all(getattr(inp, d) is not None for d, _ in pairs):
        return inp
    out = ObjectiveInputs(**vars(inp))
    for d, r in pairs:
        if getattr(out, d) is None:
            setattr(out, d, getattr(out, r))
    return out


def _tip_divergence(inp: ObjectiveInputs, kind: str) -> torch.Tensor:
    """At the teacher's temperature (a distillation quantity)."""
    if kind == "sampled":
        return (inp.distill_logprobs.detach() - inp.teacher_logprobs).abs()
    lq = inp.teacher_topk_logprobs
    lp = (inp.distill_topk_logits - inp.distill_logsumexp.unsqueeze(-1)).detach()
    return (lq.exp() * (lq - lp)).sum(-1)


def _quantiles(prefix: str, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """p10 / p50 / p90 of x over the trainable tokens of this micro-batch (0 when there are none)."""
    return quantiles(x, mask, prefix)
