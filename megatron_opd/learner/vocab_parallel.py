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

    d lse     / d z_v = p_v

so  grad z_v = g_lp([v = y] - p_v) - g_H p_v (log p_v + H) + g_lse p_v + sum_k g_k [v = t_k]
(full-softmax log-probs at the top-K ids are topk_k - lse, differentiable through both).

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

__all__ = ["TokenStats", "vocab_parallel_reverse_kl", "vocab_parallel_token_stats"]

# log p below this is exp-underflow territory even in float64 (p == 0); clamping -inf log-probs
# (masked logits) to it keeps p * log p at 0 instead of 0 * -inf = nan in the entropy gradient.
_LOGP_FLOOR = -1.0e4


@dataclass
class TokenStats:
    logprobs: Tensor  # [...] log softmax(z)[ids]
    entropy: Tensor | None  # [...] -sum p log p, when requested
    topk_logits: Tensor | None  # [..., K] raw logits at topk_ids, when topk_ids were given
    logsumexp: Tensor  # [...] log sum exp z (differentiable: gradient = softmax)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _local_index(ids: Tensor, offset: int, v_local: int) -> tuple[Tensor, Tensor]:
    """Column of each global id in this shard (clamped so gather/scatter stay in bounds) and
    whether this rank owns it: non-owned ids must contribute exactly 0."""
    local = ids - offset
    owned = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), owned


class _VocabParallelTokenStats(torch.autograd.Function):
    """Flattened core: logits [R, V_l]; token i reads row rows[i] (rows None: row i, R = N);
    ids [N], topk_ids [N, K] or None, scale [N] or None."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor | None, ids: Tensor, topk_ids: Tensor | None,
                scale: Tensor | None, group, tp: int, rank: int, want_entropy: bool,
                chunk_tokens: int):
        n, v_local = ids.shape[0], logits.shape[1]
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
            z = _scaled(logits, rows, scale, s, e_, cdtype)
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
        ctx.save_for_backward(logits, rows, ids, topk_ids, scale, lse, entropy)
        ctx.offset, ctx.chunk_tokens = offset, chunk_tokens
        return logprobs, entropy, topk, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: Tensor | None, g_h: Tensor | None, g_topk: Tensor | None,
                 g_lse: Tensor | None):
        logits, rows, ids, topk_ids, scale, lse, entropy = ctx.saved_tensors
        n, v_local = ids.shape[0], logits.shape[1]
        offset, chunk_tokens = ctx.offset, ctx.chunk_tokens
        none = (None,) * 9
        if g_lp is None and g_h is None and g_topk is None and g_lse is None:
            return (None,) + none
        # rows not read by any token (prompt positions) get exactly 0
        grad = torch.empty_like(logits) if rows is None else torch.zeros_like(logits)
        for s in range(0, n, chunk_tokens):
            e_ = min(s + chunk_tokens, n)
            if g_lp is None and g_h is None and g_lse is None:  # only top-K logits: no softmax term
                g = torch.zeros(e_ - s, v_local, dtype=lse.dtype, device=logits.device)
            else:
                z = _scaled(logits, rows, scale, s, e_, lse.dtype)
                logp = z - lse[s:e_, None]  # promotes to the compute dtype (new buffer)
                del z
                g = torch.exp(logp)
                # softmax part: p * (g_lse - coef), coef = g_lp + g_H (log p + H)
                coef = None
                if g_h is not None:
                    coef = logp.clamp_(min=_LOGP_FLOOR).add_(entropy[s:e_, None])
                    coef.mul_(g_h[s:e_, None])
                    if g_lp is not None:
                        coef.add_(g_lp[s:e_, None])
                elif g_lp is not None:
                    coef = g_lp[s:e_, None]
                if g_lse is not None:
                    coef = (-g_lse[s:e_, None]) if coef is None else coef - g_lse[s:e_, None]
                g.mul_(coef).neg_()
                del logp, coef
            if g_lp is not None:
                idx, owned = _local_index(ids[s:e_], offset, v_local)
                src = torch.where(owned, g_lp[s:e_], torch.zeros_like(g_lp[s:e_]))
                g.scatter_add_(1, idx[:, None], src[:, None].to(g.dtype))
            if g_topk is not None:
                tidx, towned = _local_index(topk_ids[s:e_], offset, v_local)
                src = torch.where(towned, g_topk[s:e_], torch.zeros_like(g_topk[s:e_]))
                g.scatter_add_(1, tidx, src.to(g.dtype))
            if scale is not None:  # d/d logits = scale * d/dz
                g.mul_(scale[s:e_, None].to(g.dtype))
            if rows is None:
                grad[s:e_].copy_(g)
            else:  # index_add: a row read by two tokens gets both contributions
                grad.index_add_(0, rows[s:e_], g.to(grad.dtype))
        return (grad,) + none


def _scaled(logits: Tensor, rows: Tensor | None, scale: Tensor | None, s: int, e: int,
            cdtype: torch.dtype) -> Tensor:
    """The logits of tokens s:e (their rows: a chunk-sized copy when `rows` selects them), times
    the per-token scale (1/temperature) when one is given. Without a scale the chunk stays in its
    dtype (casts happen inside the ops that use it)."""
    z = logits[s:e] if rows is None else logits.index_select(0, rows[s:e])
    if scale is None:
        return z
    return z.to(cdtype) * scale[s:e, None].to(cdtype)


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
                               topk_ids: Tensor | None = None, temperature: Tensor | None = None,
                               positions: Tensor | None = None,
                               chunk_tokens: int = 4096) -> TokenStats:
    """Log-probs of `ids` (and optionally entropy and raw logits at `topk_ids`) from this rank's
    vocab shard `logits` [..., V_local]; every rank of `group` must call it with the same ids,
    topk_ids and chunk_tokens (the forward runs two collectives per chunk). Outputs are float32
    (float64 for float64 logits), identical on every rank, differentiable w.r.t. `logits`
    (`logsumexp` too: its gradient is the softmax). `temperature` [...] (per token, > 0) makes
    every statistic that of logits / temperature, scaled chunk by chunk (no scaled copy).
    `positions` [b, T] (with logits [b, s, V_local], ids [b, T]): token (i, t) reads the logits
    at sequence position positions[i, t] (the position predicting a response token), chunk by
    chunk, without a gathered copy of the logits; the gradient is 0 at unread positions."""
    if positions is not None:
        return _stats_at_positions(logits, ids, positions, group=group, entropy=entropy,
                                   topk_ids=topk_ids, temperature=temperature,
                                   chunk_tokens=chunk_tokens)
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

    scale = None
    if temperature is not None:
        if tuple(temperature.shape) != lead:
            raise ValueError(f"temperature shape {tuple(temperature.shape)} != {lead}")
        if not bool((temperature > 0).all()):
            raise ValueError("temperature must be > 0")
        scale = (1.0 / temperature.to(_compute_dtype(logits.dtype))).reshape(-1).detach()
    flat = logits.reshape(-1, v_local)
    flat_ids = ids.reshape(-1).long()
    flat_topk = None if topk_ids is None else topk_ids.reshape(-1, topk_ids.shape[-1]).long()
    lp, h, tk, lse = _VocabParallelTokenStats.apply(flat, None, flat_ids, flat_topk, scale, group,
                                                    tp, rank, entropy, chunk_tokens)
    return TokenStats(
        logprobs=lp.view(lead),
        entropy=None if h is None else h.view(lead),
        topk_logits=None if tk is None else tk.view(*lead, tk.shape[-1]),
        logsumexp=lse.view(lead),
    )


@torch.no_grad()
def vocab_parallel_reverse_kl(logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                              logsumexp: Tensor, *, group=None, temperature: Tensor | None = None,
                              positions: Tensor | None = None,
                              chunk_tokens: int = 4096) -> Tensor:
    """sum_{v in S} p_v (log p_v - log q_v) per token, S = the teacher's ids [..., K] (global vocab
    ids, distinct) with log q there [..., K]: the exact KL(pi || q) when S is the whole
    vocabulary. From this rank's shard of the student logits [..., V_local] and the student's
    log-normaliser (from `vocab_parallel_token_stats`); each rank adds the ids it owns, one SUM
    all-reduce per call, chunked; nothing vocabulary-wide is built beyond a chunk. No gradient (it
    enters losses as a constant). `positions` as in `vocab_parallel_token_stats` (logits
    [b, s, V_local], the rest [b, T, ...]). p_v = 0 contributes 0 even where q_v = 0."""
    tp, rank = _group_coords(group)
    v_local = logits.shape[-1]
    lead = tuple(teacher_ids.shape[:-1])
    if tuple(teacher_logprobs.shape) != tuple(teacher_ids.shape):
        raise ValueError(f"teacher_logprobs {tuple(teacher_logprobs.shape)} != teacher_ids "
                         f"{tuple(teacher_ids.shape)}")
    rows = None
    if positions is not None:
        b, s_len = logits.shape[:2]
        rows = (positions.long() + torch.arange(b, device=positions.device)[:, None] * s_len).reshape(-1)
    elif tuple(logits.shape[:-1]) != lead:
        raise ValueError(f"logits leading shape {tuple(logits.shape[:-1])} != {lead}")
    cdtype = _compute_dtype(logits.dtype)
    flat = logits.reshape(-1, v_local)
    k = teacher_ids.shape[-1]
    flat_ids = teacher_ids.reshape(-1, k).long()
    flat_q = teacher_logprobs.reshape(-1, k)
    flat_lse = logsumexp.reshape(-1).to(cdtype)
    n = flat_ids.shape[0]
    scale = None if temperature is None else (1.0 / temperature.to(cdtype)).reshape(-1)
    out = torch.empty(n, dtype=cdtype, device=logits.device)
    for s in range(0, n, chunk_tokens):
        e = min(s + chunk_tokens, n)
        idx, owned = _local_index(flat_ids[s:e], rank * v_local, v_local)
        logp = _scaled(flat, rows, scale, s, e, cdtype).gather(1, idx).to(cdtype) \
            - flat_lse[s:e, None]
        p = torch.exp(logp)
        term = p * (logp - flat_q[s:e].to(cdtype))
        out[s:e] = torch.where(owned & (p > 0), term, torch.zeros_like(term)).sum(dim=-1)
    if tp > 1:
        dist.all_reduce(out, group=group)
    return out.view(lead)


def _stats_at_positions(logits: Tensor, ids: Tensor, positions: Tensor, *, group, entropy: bool,
                        topk_ids: Tensor | None, temperature: Tensor | None,
                        chunk_tokens: int) -> TokenStats:
    if logits.dim() != 3 or positions.dim() != 2 or tuple(ids.shape) != tuple(positions.shape) \
            or positions.shape[0] != logits.shape[0]:
        raise ValueError(f"positions: expected logits [b, s, V_local] and ids/positions [b, T], got "
                         f"{tuple(logits.shape)}, {tuple(ids.shape)}, {tuple(positions.shape)}")
    if not _is_integer(positions):
        raise ValueError(f"positions must be integer, got {positions.dtype}")
    b, s_len, v_local = logits.shape
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= s_len):
        raise ValueError(f"positions out of range [0, {s_len})")
    tp, rank = _group_coords(group)
    lead = tuple(ids.shape)
    rows = (positions.long() + torch.arange(b, device=positions.device)[:, None] * s_len).reshape(-1)
    # the same validation as the flat path, on a [b, T, 1]-shaped stand-in (no copy of logits)
    vocab = v_local * tp
    for name, t in (("ids", ids), ("topk_ids", topk_ids)):
        if t is not None and t.numel() > 0 and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ValueError(f"{name} out of range [0, {vocab})")
    scale = None
    if temperature is not None:
        if tuple(temperature.shape) != lead or not bool((temperature > 0).all()):
            raise ValueError(f"temperature must be > 0 with shape {lead}")
        scale = (1.0 / temperature.to(_compute_dtype(logits.dtype))).reshape(-1).detach()
    flat_topk = None if topk_ids is None else topk_ids.reshape(-1, topk_ids.shape[-1]).long()
    lp, h, tk, lse = _VocabParallelTokenStats.apply(
        logits.reshape(-1, v_local), rows, ids.reshape(-1).long(), flat_topk, scale, group, tp,
        rank, entropy, chunk_tokens)
    return TokenStats(logprobs=lp.view(lead), entropy=None if h is None else h.view(lead),
                      topk_logits=None if tk is None else tk.view(*lead, tk.shape[-1]),
                      logsumexp=lse.view(lead))
