"""Per-token statistics of vocab-sharded logits, without gathering the vocabulary on one rank.

Tensor-parallel rank r of a group of size tp holds the logit columns [r*V_l, (r+1)*V_l) of a
vocabulary of V = tp*V_l (megatron's output layer with `parallel_output=True`). For one token with
logits z over the full vocabulary, target id y and softmax p = exp(z - lse):

    lse      = m + log S,          m = max_v z_v (all_reduce MAX),  S = sum_v exp(z_v - m) (SUM)
    logprob  = z_y - lse           z_y comes from the rank owning y (others add 0; SUM)
    entropy  = -sum_v p_v log p_v = lse - sum_v p_v z_v = log S - sum_v exp(z_v - m)(z_v - m) / S
    topk_k   = z_{t_k}             raw logits at given global ids t_k (owner contributes; SUM)

The SUM reductions of a chunk of tokens travel in one stacked all_reduce, so a chunk costs two
collectives (MAX, then SUM) whatever statistics are asked for.

Gradients, with g_lp, g_H, g_k the incoming gradients of logprob, entropy and topk_k:

    d logprob / d z_v = [v = y] - p_v
    d entropy / d z_v = -p_v (log p_v + H)
    d topk_k  / d z_v = [v = t_k]

so  grad z_v = g_lp([v = y] - p_v) - g_H p_v (log p_v + H) + sum_k g_k [v = t_k].

Every output is replicated over the group and each rank's columns enter it only through its own
shard, so the backward needs no communication: each rank recomputes p on its shard from the saved
per-token lse (chunk by chunk, never storing the softmax) and writes its shard's gradient.

Precision: statistics are computed in float32 (float64 for float64 logits, which makes
`torch.autograd.gradcheck` meaningful); the gradient has the logits' dtype. Extra memory is a few
[chunk_tokens, V_l] float32 buffers on top of the logits and their gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["TokenStats", "vocab_parallel_token_stats"]

# log p below this is exp-underflow territory even in float64 (p == 0); clamping -inf log-probs
# (masked logits) to it keeps p * log p at 0 instead of 0 * -inf = nan in the entropy gradient.
_LOGP_FLOOR = -1.0e4


@dataclass
class TokenStats:
    logprobs: Tensor  # [...] log softmax(z)[ids]
    entropy: Tensor | None  # [...] -sum p log p, when requested
    topk_logits: Tensor | None  # [..., K] raw logits at topk_ids, when topk_ids were given
    logsumexp: Tensor  # [...] log sum exp z (not differentiable)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _local_index(ids: Tensor, offset: int, v_local: int) -> tuple[Tensor, Tensor]:
    """Column of each global id in this shard (clamped so gather/scatter stay in bounds) and
    whether this rank owns it: non-owned ids must contribute exactly 0."""
    local = ids - offset
    owned = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), owned


class _VocabParallelTokenStats(torch.autograd.Function):
    """Flattened core: logits [N, V_l], ids [N], topk_ids [N, K] or None."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, topk_ids: Tensor | None, group, tp: int,
                rank: int, want_entropy: bool, chunk_tokens: int):
        n, v_local = logits.shape
        offset = rank * v_local
        cdtype = _compute_dtype(logits.dtype)
        k = 0 if topk_ids is None else topk_ids.shape[1]
        distributed = tp > 1

        lse = torch.empty(n, dtype=cdtype, device=logits.device)
        logprobs = torch.empty(n, dtype=cdtype, device=logits.device)
        entropy = torch.empty(n, dtype=cdtype, device=logits.device) if want_entropy else None
        topk = None if topk_ids is None else torch.empty(n, k, dtype=cdtype, device=logits.device)

        for s in range(0, n, chunk_tokens):
            e_ = min(s + chunk_tokens, n)
            z = logits[s:e_]  # original dtype; casts happen inside the ops below, per chunk
            m = z.amax(dim=-1).to(cdtype)
            if distributed:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            zm = z - m[:, None]  # promotes to cdtype: the only full-width cast of this chunk
            ex = torch.exp(zm)
            # SUM payload, one all_reduce: [S, z_y, (sum e*(z-m)), (z_t1..z_tK)]
            cols = [ex.sum(dim=-1)]
            idx, owned = _local_index(ids[s:e_], offset, v_local)
            zy = z.gather(1, idx[:, None]).squeeze(1).to(cdtype)
            cols.append(torch.where(owned, zy, torch.zeros_like(zy)))
            if want_entropy:
                # exp(z-m)*(z-m) is nan only where z = -inf, whose true contribution is 0
                cols.append(torch.nan_to_num_(zm.mul_(ex), nan=0.0).sum(dim=-1))
            del zm, ex
            payload = torch.stack(cols, dim=1)
            if topk_ids is not None:
                tidx, towned = _local_index(topk_ids[s:e_], offset, v_local)
                zt = z.gather(1, tidx).to(cdtype)
                payload = torch.cat([payload, torch.where(towned, zt, torch.zeros_like(zt))], dim=1)
            if distributed:
                dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
            log_s = torch.log(payload[:, 0])
            lse[s:e_] = m + log_s
            logprobs[s:e_] = payload[:, 1] - lse[s:e_]
            j = 2
            if want_entropy:
                entropy[s:e_] = log_s - payload[:, j] / payload[:, 0]
                j += 1
            if topk_ids is not None:
                topk[s:e_] = payload[:, j:]

        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(logits, ids, topk_ids, lse, entropy)
        ctx.offset, ctx.chunk_tokens = offset, chunk_tokens
        return logprobs, entropy, topk, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: Tensor | None, g_h: Tensor | None, g_topk: Tensor | None, _g_lse):
        logits, ids, topk_ids, lse, entropy = ctx.saved_tensors
        n, v_local = logits.shape
        offset, chunk_tokens = ctx.offset, ctx.chunk_tokens
        none = (None,) * 7
        if g_lp is None and g_h is None and g_topk is None:
            return (None,) + none
        grad = torch.empty_like(logits)
        for s in range(0, n, chunk_tokens):
            e_ = min(s + chunk_tokens, n)
            if g_lp is None and g_h is None:  # only the top-K logits are used: no softmax term
                g = torch.zeros(e_ - s, v_local, dtype=lse.dtype, device=logits.device)
            else:
                logp = logits[s:e_] - lse[s:e_, None]  # promotes to the compute dtype (new buffer)
                g = torch.exp(logp)
                # softmax part: -p * coef with coef = g_lp + g_H (log p + H)
                if g_h is not None:
                    coef = logp.clamp_(min=_LOGP_FLOOR).add_(entropy[s:e_, None])
                    coef.mul_(g_h[s:e_, None])
                    if g_lp is not None:
                        coef.add_(g_lp[s:e_, None])
                    g.mul_(coef).neg_()
                else:
                    g.mul_(g_lp[s:e_, None].neg())
                del logp
            if g_lp is not None:
                idx, owned = _local_index(ids[s:e_], offset, v_local)
                src = torch.where(owned, g_lp[s:e_], torch.zeros_like(g_lp[s:e_]))
                g.scatter_add_(1, idx[:, None], src[:, None].to(g.dtype))
            if g_topk is not None:
                tidx, towned = _local_index(topk_ids[s:e_], offset, v_local)
                src = torch.where(towned, g_topk[s:e_], torch.zeros_like(g_topk[s:e_]))
                g.scatter_add_(1, tidx, src.to(g.dtype))
            grad[s:e_].copy_(g)
        return (grad,) + none


def _is_integer(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _group_coords(group) -> tuple[int, int]:
    """(world size, rank) of the tensor-parallel group; None means one unsharded rank."""
    if group is None:
        return 1, 0
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("a process group was given but torch.distributed is not initialised")
    return dist.get_world_size(group), dist.get_rank(group)


def vocab_parallel_token_stats(logits: Tensor, ids: Tensor, *, group=None, entropy: bool = False,
                               topk_ids: Tensor | None = None,
                               chunk_tokens: int = 4096) -> TokenStats:
    """Log-probs of `ids` (and optionally entropy and raw logits at `topk_ids`) from this rank's
    vocab shard `logits` [..., V_local]; every rank of `group` must call it with the same ids,
    topk_ids and chunk_tokens (the forward runs two collectives per chunk). Outputs are float32
    (float64 for float64 logits), identical on every rank, differentiable w.r.t. `logits`."""
    tp, rank = _group_coords(group)
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor [..., V_local], got {logits.dtype} "
                         f"of shape {tuple(logits.shape)}")
    v_local = logits.shape[-1]
    if v_local == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    lead = tuple(logits.shape[:-1])
    if tuple(ids.shape) != lead:
        raise ValueError(f"ids shape {tuple(ids.shape)} != logits leading shape {lead}")
    if not _is_integer(ids):
        raise ValueError(f"ids must be integer vocab ids, got {ids.dtype}")
    if topk_ids is not None:
        if topk_ids.dim() != len(lead) + 1 or tuple(topk_ids.shape[:-1]) != lead:
            raise ValueError(f"topk_ids shape {tuple(topk_ids.shape)} != {lead} + (K,)")
        if not _is_integer(topk_ids):
            raise ValueError(f"topk_ids must be integer vocab ids, got {topk_ids.dtype}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    vocab = v_local * tp
    for name, t in (("ids", ids), ("topk_ids", topk_ids)):
        if t is not None and t.numel() > 0:
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"{name} out of range [0, {vocab}) (V_local={v_local} x tp={tp}): "
                                 f"min {lo}, max {hi}")

    flat = logits.reshape(-1, v_local)
    flat_ids = ids.reshape(-1).long()
    flat_topk = None if topk_ids is None else topk_ids.reshape(-1, topk_ids.shape[-1]).long()
    lp, h, tk, lse = _VocabParallelTokenStats.apply(flat, flat_ids, flat_topk, group, tp, rank,
                                                    entropy, chunk_tokens)
    return TokenStats(
        logprobs=lp.view(lead),
        entropy=None if h is None else h.view(lead),
        topk_logits=None if tk is None else tk.view(*lead, tk.shape[-1]),
        logsumexp=lse.view(lead),
    )
