"""TIP token selection (ALGORITHMS.md §8, [secondary]: arXiv 2604.14084).

Score s_t = h + d - h*d (a soft OR) of the min-max normalised student entropy h and
teacher-student divergence d; the loss keeps the top `keep_ratio` of the trainable tokens by
score. Overconfident-and-wrong tokens (low entropy, high divergence) score high through d even
though entropy alone would drop them. Normalisation and selection run over the tokens one call
sees (the learner calls it per micro-batch). Which divergence is [design]: `sampled` is
|log pi(y_t) - log q(y_t)| (always available), `topk` the teacher-weighted forward KL on the
teacher's top-K, sum_v q(v) (log q(v) - log pi(v)).
"""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("sampled", "topk")


def _minmax(x: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    if not live.any():
        return torch.zeros_like(x)
    lo, hi = x[live].min(), x[live].max()
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(x))


@torch.no_grad()
def tip_scores(entropy: torch.Tensor, divergence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[..., T] soft-OR scores in [0, 1] on trainable tokens, -1 elsewhere."""
    live = mask > 0
    h, d = _minmax(entropy.double(), live), _minmax(divergence.double(), live)
    s = h + d - h * d
    return torch.where(live, s, torch.full_like(s, -1.0))


@torch.no_grad()
def tip_select(entropy: torch.Tensor, divergence: torch.Tensor, mask: torch.Tensor,
               keep_ratio: float) -> torch.Tensor:
    """The mask restricted to the ceil(keep_ratio * n) highest-scoring of its n trainable tokens
    (ties: lower flat index first, deterministic). Returns mask's dtype; 0 stays 0."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"objective.token_selection.keep_ratio must be in (0, 1], got {keep_ratio}")
    live = mask > 0
    n = int(live.sum())
    keep = math.ceil(keep_ratio * n)
    if keep >= n:
        return mask.clone()
    s = tip_scores(entropy, divergence, mask).reshape(-1)
    # stable descending order: sort by -score, index order breaks ties
    order = torch.sort(-s, stable=True).indices[:keep]
    chosen = torch.zeros_like(s, dtype=torch.bool)
    chosen[order] = True
    return torch.where(chosen.view(mask.shape), mask, torch.zeros_like(mask))
