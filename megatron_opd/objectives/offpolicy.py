"""Off-policy correction by ratio decomposition (ALGORITHMS.md §6).

The total importance ratio of a sampled token is split

    pi_theta / mu = r_d * r_s,   r_d = pi_old / mu (constant),   r_s = pi_theta / pi_old

r_d is the train-inference discrepancy at one policy version (kernels, precision, routing);
r_s the staleness the learner's updates added since. They get different treatments: r_s the
PPO asymmetric clip, r_d one of (config `correction.discrepancy`, band [1/c, c])

    none    w = 1,            M = 1
    tis     w = min(R, c),    M = 1              (truncated IS weight, nothing dropped)
    mis     w = 1,            M = 1[1/c <= R <= c]
    icepop  w = R inside,     M = 1[1/c <= R <= c]

with R the token's r_d (`token`), the product of its sequence's token ratios (`sequence`) or
their geometric mean (`geometric`), the sequence value shared by all of its tokens. With any
treatment but `none`, a sequence holding a trainable token with r_d < `catastrophic_ratio` is
dropped whole. The per-token loss is

    -M * w * min(r_s A, clip(r_s, 1 - eps_low, 1 + eps_high) A)

optionally dual-clipped: for A < 0 it is also bounded by dual_clip * |A| (a token whose r_s
ran far above 1 under a negative advantage cannot dominate the batch). Everything runs in log
space: a sequence's product of ratios never overflows, and w is finite wherever M = 1.
"""

from __future__ import annotations

import math

import torch

TREATMENTS = ("none", "tis", "mis", "icepop")
LEVELS = ("token", "sequence", "geometric")


def _where(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # x on the mask, exactly 0 elsewhere (value and gradient), whatever x holds there
    return torch.where(mask > 0, x, torch.zeros_like(x))


def discrepancy_log_ratio(old_logprobs: torch.Tensor | None, behaviour_logprobs: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """Token log r_d = log pi_old - log mu on the mask, 0 elsewhere; exactly 0 when
    old_logprobs is None (pi_old = mu). A constant."""
    if old_logprobs is None:
        return torch.zeros_like(behaviour_logprobs)
    return _where(mask, (old_logprobs - behaviour_logprobs).detach())


def discrepancy_weights(old_logprobs: torch.Tensor | None, behaviour_logprobs: torch.Tensor,
                        mask: torch.Tensor, cfg=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_d, kept mask) per token, [..., T], mask's layout; the last dimension is the sequence.

    `mask` holds the sequence's trainable tokens (sequence products, geometric means and the
    catastrophic check run over them); `cfg` is the `correction` section (None: its defaults).
    The kept mask is mask * M_d (0/1, mask's dtype); w_d is 0 off it. Both are constants."""
    if cfg is None:
        from megatron_opd.config import CorrectionConfig
        cfg = CorrectionConfig()
    mode, level, c = cfg.discrepancy, cfg.discrepancy_level, float(cfg.discrepancy_c)
    if mode not in TREATMENTS:
        raise ValueError(f"correction.discrepancy: unknown {mode!r}; known: {list(TREATMENTS)}")
    if level not in LEVELS:
        raise ValueError(f"correction.discrepancy_level: unknown {level!r}; known: {list(LEVELS)}")
    if mode != "none" and not c > 1:
        raise ValueError(f"correction.discrepancy_c must be > 1 (band [1/c, c]), got {c}")
    live = (mask > 0).to(behaviour_logprobs.dtype)
    log_r = discrepancy_log_ratio(old_logprobs, behaviour_logprobs, live)
    if mode == "none" or old_logprobs is None:  # r_d = 1 or untreated: w = 1, nothing dropped
        return live.clone(), live.clone()
    if level == "token":
        log_rr = log_r
    else:
        total = log_r.sum(dim=-1, keepdim=True)
        if level == "geometric":
            total = total / live.sum(dim=-1, keepdim=True).clamp_min(1.0)
        log_rr = total.expand_as(log_r)
    log_c = math.log(c)
    if mode == "tis":
        keep = live.clone()
        weight = torch.exp(log_rr.clamp(max=log_c))
    else:
        keep = live * ((log_rr >= -log_c) & (log_rr <= log_c)).to(live.dtype)
        # icepop: r_d itself inside the band (finite there: |log R| <= log c)
        weight = torch.exp(_where(keep, log_rr)) if mode == "icepop" else torch.ones_like(live)
    if cfg.catastrophic_ratio > 0:
        bad = ((log_r < math.log(cfg.catastrophic_ratio)) & (live > 0)).any(dim=-1, keepdim=True)
        keep = torch.where(bad, torch.zeros_like(keep), keep)
    return _where(keep, weight), keep


def decomposed_pg_per_token(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                            advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float,
                            eps_high: float, weight: torch.Tensor | None = None,
                            keep: torch.Tensor | None = None, dual_clip: float = 0.0,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss, r_s, clip active) on [..., T]: -M w min(r_s A, clip(r_s) A) (dual-clipped
    for A < 0 when dual_clip > 0). `mask`: the trainable tokens (r_s is defined there, 1
    elsewhere); `keep`: the tokens M_d keeps (None: all of mask); `weight`: w_d (None: 1).
    The loss is exactly 0, with 0 gradient, off mask * keep. `clip active` (a 0/1 constant) marks
    kept tokens whose r_s gets no gradient because a clip bound won."""
    if dual_clip and not dual_clip > 1:
        raise ValueError(f"correction.dual_clip must be 0 (off) or > 1, got {dual_clip}")
    live = (mask > 0).to(logprobs.dtype)
    eff = live if keep is None else live * (keep > 0).to(live.dtype)
    # masked positions may hold junk (padding): keep them out of exp() so they stay finite
    ratio = torch.exp(_where(live, logprobs - old_logprobs.detach()))
    adv = _where(eff, advantages.detach())
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    active = clipped < unclipped
    if dual_clip:
        bound = -dual_clip * adv  # c |A| where A < 0
        dual = (adv < 0) & (bound < loss)
        loss = torch.where(dual, bound, loss)
        active = active | dual
    if weight is not None:
        loss = loss * _where(eff, weight.detach())
    return _where(eff, loss), ratio, (active & (eff > 0)).to(logprobs.dtype)


def k3(log_r: torch.Tensor) -> torch.Tensor:
    """(r - 1) - log r per token: the non-negative k3 estimator of a KL from log-ratios."""
    return torch.expm1(log_r) - log_r


@torch.no_grad()
def quantiles(x: torch.Tensor, mask: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """p10 / p50 / p90 of x over mask (0 when the mask is empty)."""
    vals = x[mask > 0].double()
    qs = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    got = torch.quantile(vals, qs) if vals.numel() else torch.zeros(3, dtype=torch.float64)
    return {f"{prefix}_p{int(round(q * 100))}": v.to(x.dtype) for q, v in zip(qs.tolist(), got)}


@torch.no_grad()
def offpolicy_metrics(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None,
                      behaviour_logprobs: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor,
                      ) -> dict[str, torch.Tensor]:
    """The ratio decomposition's term-independent metrics over the trainable tokens `mask`:
    k3 of r_d (mismatch) and of r_s (staleness), the fraction M_d removed, r_d and r_s
    quantiles (token level). Keys without the `offpolicy/` prefix."""
    live = (mask > 0).to(logprobs.dtype)
    n = live.sum().clamp_min(1.0)
    old = behaviour_logprobs if old_logprobs is None else old_logprobs
    log_rd = discrepancy_log_ratio(old_logprobs, behaviour_logprobs, live)
    log_rs = _where(live, logprobs.detach() - old)
    out = {"mismatch_kl": (_where(live, k3(log_rd))).sum() / n,
           "staleness_kl": (_where(live, k3(log_rs))).sum() / n,
           "masked_fraction": (live - live * (keep > 0).to(live.dtype)).sum() / n}
    out |= quantiles(log_rd.exp(), live, "r_d")
    out |= quantiles(log_rs.exp(), live, "r_s")
    return out
