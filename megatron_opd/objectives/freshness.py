"""f-OPD freshness control (ALGORITHMS.md §7): score each buffered sample by how stale it is,
then accept, down-weight or drop it, and bound the rollout drift a step may train on.

Invariants (what the learner may rely on):
- Everything here is detached: freshness decides *which* tokens train and with what weight; it
  never carries gradient.
- A sample's trainable tokens are its positions with mask > 0. A sample without any has drift 0,
  freshness exp(0) = 1 from its drifts, is never counted as dropped and gets an all-zero row.
- `apply_freshness` never turns a 0 in the mask into a non-zero. Kept rows are the input rows
  under "accept" and "drop"; under "downweight" row i is scaled by w_i, and for a 0/1 mask (the
  learner's loss_mask) the new mask sums to the number of trainable tokens kept, so the
  learner's token mean (dividing by `mask.sum()`) is sum_i w_i sum_t x_it / sum_i w_i n_i.
- Empty input (no samples, or no trainable token) gives finite outputs: metrics 0, mask zeros.

API (tensors [b] unless noted; b samples of T tokens):
    rollout_drift(logprobs, behaviour_logprobs, mask) -> D_roll [b]
        token mean over the sample's trainable tokens of |log pi_theta(y_t) - log mu(y_t)|.
    supervision_drift(context_lag) -> D_sup [b]
        the teacher-context staleness proxy; `context_lag(...)` computes its input.
    context_lag(token_versions, mask, learner_version, revision_changed) -> [b]
        token-mean version lag of the response tokens, +1 where the teacher revision changed.
    freshness_scores(d_roll, d_sup, alpha, beta) -> f [b] = exp(-alpha D_roll - beta D_sup).
    apply_freshness(mask [b, T], f, d_roll, policy, f_min, drift_budget, *, d_sup=None)
        -> (mask [b, T] float, metrics {name: 0-dim tensor}).

Policies: "accept" trains every sample as it is; "drop" zeros the rows with f_i < f_min;
"downweight" scales sample i by w_i = f_i / mean_j f_j and renormalises so the weighted mask sums
to the token count (so the effective per-token weight is f_i * N / sum_j n_j f_j, with n_j the
sample's kept tokens and N their sum: the 1/mean f of §7 cancels in the renormalisation). If every
kept f is 0 (exp underflow) there is nothing to tell the samples apart: the weights are all 1.

Drift budget (`drift_budget` > 0; any policy): after the policy's drops, while the token-weighted
mean D_roll of the kept samples, sum_i n_i D_i / sum_i n_i, exceeds the budget, the kept sample
with the largest D_roll leaves the step (ties: the lower index first). Removing the largest
never raises the mean, so the loop ends (at the latest with nothing left: mean 0). The
down-weighting (if any) is then computed over the samples that remain.

Metrics: `offpolicy/freshness_mean` (mean f over the samples with trainable tokens),
`offpolicy/freshness_dropped_fraction` (trainable tokens dropped by the drop policy and the
budget, over all trainable tokens), `offpolicy/rollout_drift_mean` (token-weighted mean D_roll
over the trainable tokens: the batch's token mean of |log pi_theta - log mu|),
`offpolicy/supervision_drift_mean` (mean D_sup over the samples with trainable tokens; only when
`d_sup` is given).
"""

from __future__ import annotations

import torch

POLICIES = ("accept", "downweight", "drop")


def _float_dtype(*ts: torch.Tensor) -> torch.dtype:
    dt = torch.float32
    for t in ts:
        if t.is_floating_point():
            dt = torch.promote_types(dt, t.dtype)
    return dt


@torch.no_grad()
def rollout_drift(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """D_roll,i [b] = mean over trainable t of |log pi_theta(y_t) - log mu(y_t)| (0 without any).
    Junk (inf, nan, padding) at masked positions never reaches the result."""
    dt = _float_dtype(logprobs, behaviour_logprobs)
    live = mask > 0
    diff = (logprobs.detach().to(dt) - behaviour_logprobs.detach().to(dt)).abs()
    total = torch.where(live, diff, torch.zeros_like(diff)).sum(-1)
    return total / live.sum(-1).clamp_min(1).to(dt)


@torch.no_grad()
def context_lag(token_versions: torch.Tensor, mask: torch.Tensor, learner_version: int,
                revision_changed: torch.Tensor | None = None) -> torch.Tensor:
    """[b] token mean over the positions with mask > 0 of (learner_version - token_versions),
    plus 1 where `revision_changed` [b] (the teacher revision that scored the sample is not the
    configured one). Pass the mask of the response tokens whose context the teacher scored (for
    multi-turn agents: every turn the student produced). 0 for a row without such tokens."""
    live = mask > 0
    lag = (learner_version - token_versions).to(torch.float64).clamp_min(0)
    out = torch.where(live, lag, torch.zeros_like(lag)).sum(-1) / live.sum(-1).clamp_min(1)
    if revision_changed is not None:
        out = out + revision_changed.to(torch.float64)
    return out


@torch.no_grad()
def supervision_drift(context_lag: torch.Tensor) -> torch.Tensor:
    """D_sup,i [b]: the supervision-drift proxy of §7, in one place. Today it is the context lag
    itself (versions between the policy that wrote the context the teacher scored and the learner,
    token-mean, +1 for a teacher revision change): the abstract gives no formula, so the proxy is
    linear in the lag and `beta` prices one version. Negative lags (clock skew) count as 0."""
    lag = context_lag.detach()
    return (lag if lag.is_floating_point() else lag.to(torch.float32)).clamp_min(0)


@torch.no_grad()
def freshness_scores(d_roll: torch.Tensor, d_sup: torch.Tensor, alpha: float,
                     beta: float) -> torch.Tensor:
    """f_i = exp(-alpha D_roll,i - beta D_sup,i) in (0, 1] for non-negative drifts."""
    if alpha < 0 or beta < 0:
        raise ValueError(f"freshness: alpha and beta must be >= 0, got {alpha}, {beta}")
    dt = _float_dtype(d_roll, d_sup)
    return torch.exp(-alpha * d_roll.to(dt) - beta * d_sup.to(dt))


def _budget_drops(n: list[float], d: list[float], kept: list[bool], budget: float) -> list[int]:
    """Indices the drift budget removes, in removal order (see the module docstring)."""
    order = sorted((i for i in range(len(n)) if kept[i] and n[i] > 0), key=lambda i: (-d[i], i))
    # suffix sums over the order: what remains after dropping the first k (summed afresh, not
    # by subtraction, so a mean exactly at the budget is not pushed over it by rounding)
    tok, mass = [0.0] * (len(order) + 1), [0.0] * (len(order) + 1)
    for k in range(len(order) - 1, -1, -1):
        tok[k] = tok[k + 1] + n[order[k]]
        mass[k] = mass[k + 1] + n[order[k]] * d[order[k]]
    k = 0
    while k < len(order) and mass[k] / tok[k] > budget:
        k += 1
    return order[:k]


@torch.no_grad()
def apply_freshness(mask: torch.Tensor, f: torch.Tensor, d_roll: torch.Tensor, policy: str,
                    f_min: float, drift_budget: float, *, d_sup: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(new mask [b, T] float, metrics). `mask` [b, T] is the loss mask (> 0: trainable; its
    values are kept as they are on the rows that stay, times w_i under "downweight"); `f`,
    `d_roll` (and `d_sup`) are [b]. `drift_budget` 0 turns the budget off."""
    if policy not in POLICIES:
        raise ValueError(f"freshness policy {policy!r}; known: {list(POLICIES)}")
    if drift_budget < 0:
        raise ValueError(f"drift_budget must be >= 0, got {drift_budget}")
    dt = _float_dtype(mask, f, d_roll)
    live = mask > 0
    base = torch.where(live, mask.detach().to(dt), torch.zeros((), dtype=dt, device=mask.device))
    n_tok = live.sum(-1).to(dt)  # trainable tokens per sample
    has = n_tok > 0
    zero = torch.zeros((), dtype=dt, device=mask.device)
    # rows without trainable tokens may hold anything (nan included): they enter no sum
    f = torch.where(has, f.detach().to(dt), zero)
    d_roll = torch.where(has, d_roll.detach().to(dt), zero)
    total_tok = n_tok.sum()
    n_has = has.sum()

    kept = has.clone()
    if policy == "drop":
        kept &= f >= f_min
    if drift_budget > 0:
        drops = _budget_drops(n_tok.tolist(), d_roll.tolist(), kept.tolist(), drift_budget)
        if drops:
            kept[torch.tensor(drops, dtype=torch.long, device=mask.device)] = False

    row = kept.to(dt)
    if policy == "downweight":
        kept_tok = (n_tok * row).sum()
        denom = (n_tok * f * row).sum()
        if denom > 0:
            row = row * f * (kept_tok / denom)
    new_mask = base * row[:, None]

    metrics = {
        "offpolicy/freshness_mean": f.sum() / n_has.clamp_min(1),
        "offpolicy/freshness_dropped_fraction":
            (n_tok * (has & ~kept).to(dt)).sum() / total_tok.clamp_min(1),
        "offpolicy/rollout_drift_mean": (n_tok * d_roll).sum() / total_tok.clamp_min(1),
    }
    if d_sup is not None:
        ds = d_sup.detach().to(dt)
        metrics["offpolicy/supervision_drift_mean"] = \
            torch.where(has, ds, zero).sum() / n_has.clamp_min(1)
    return new_mask, metrics


__all__ = ["POLICIES", "apply_freshness", "context_lag", "freshness_scores", "rollout_drift",
           "supervision_drift"]
