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

Vocabulary padding: megatron pads the vocabulary to a multiple of tp (models.spec.
padded_vocab_size). With `vocab_size` (the true size) given, the padding columns (global ids >=
vocab_size, the tail of the last shards) are excluded everywhere, as if their logits were -inf:
no share of the max, the sum, the entropy, and exactly zero gradient, so every statistic equals
the unpadded model's. (The model builder also masks them to -inf; this makes the statistics
exact for any logits.)

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
    return local.clamp(0, max(v_local - 1, 0)), owned


def _owned_logits(z: Tensor, ids: Tensor, offset: int, cdtype) -> Tensor:
    """z at global `ids` [n] or [n, K] where this shard (columns offset .. offset + width) owns
    them, 0 elsewhere; a shard of padding only (width 0) owns nothing."""
    if z.shape[1] == 0:
        return torch.zeros(ids.shape, dtype=cdtype, device=z.device)
    idx, owned = _local_index(ids, offset, z.shape[1])
    flat = ids.dim() == 1
    v = z.gather(1, idx[:, None] if flat else idx).to(cdtype)
    v = v.squeeze(1) if flat else v
    return torch.where(owned, v, torch.zeros_like(v))


def _valid_columns(vocab_size: int | None, offset: int, v_local: int) -> int:
    """How many of this shard's columns are real ids (the rest is megatron's padding)."""
    if vocab_size is None:
        return v_local
    return max(0, min(v_local, vocab_size - offset))


class _Piece:
    """Tokens processed together: `tok` (a slice of token order, or an index tensor), the logits
    rows they read: a contiguous run starting at `r0` (a view, no copy) or `rows` (an index tensor:
    a chunk-sized copy), and whether no other token reads those rows (`exclusive`: the backward
    writes the rows' gradient in place instead of accumulating it)."""

    __slots__ = ("tok", "r0", "rows", "n", "exclusive")

    def __init__(self, tok, n: int, r0: int | None = None, rows: Tensor | None = None,
                 exclusive: bool = False):
        self.tok, self.n, self.r0, self.rows, self.exclusive = tok, n, r0, rows, exclusive

    def read(self, logits: Tensor) -> Tensor:
        if self.rows is None:
            return logits[self.r0:self.r0 + self.n]
        return logits.index_select(0, self.rows)


# runs of consecutive rows shorter than this are read through an index (a copy) with other
# short runs: a run costs a few small ops per piece, a copied row one row-sized write
_MIN_RUN = 8


def _plan(rows: Tensor | None, n: int, n_rows: int, chunk_tokens: int) -> list[_Piece]:
    """Pieces of at most `chunk_tokens` tokens. rows None: token i reads row i (consecutive
    slices). Otherwise maximal runs of tokens reading consecutive rows (the learner's response
    positions: one run per sequence) become views, the rest is gathered chunk by chunk. The plan
    depends only on `rows`, identical on every rank (same number of collectives)."""
    if rows is None:
        return [_Piece(slice(s, min(s + chunk_tokens, n)), min(s + chunk_tokens, n) - s, r0=s,
                       exclusive=True) for s in range(0, n, chunk_tokens)]
    pieces: list[_Piece] = []
    if n == 0:
        return pieces
    rows_cpu = rows.detach().cpu()
    count = torch.bincount(rows_cpu, minlength=n_rows)
    shared = (count[rows_cpu] > 1).tolist()
    brk = torch.ones(n, dtype=torch.bool)
    brk[1:] = rows_cpu[1:] != rows_cpu[:-1] + 1
    starts = torch.nonzero(brk).view(-1).tolist() + [n]
    rows_list = rows_cpu.tolist()
    rest: list[int] = []
    for a, b in zip(starts[:-1], starts[1:]):
        if b - a < _MIN_RUN:
            rest.extend(range(a, b))
            continue
        # split a run where its rows switch between exclusive and shared, and at chunk size
        s = a
        while s < b:
            e = s + 1
            while e < b and e - s < chunk_tokens and shared[e] == shared[s]:
                e += 1
            pieces.append(_Piece(slice(s, e), e - s, r0=rows_list[s], exclusive=not shared[s]))
            s = e
    for s in range(0, len(rest), chunk_tokens):
        tok = torch.tensor(rest[s:s + chunk_tokens], dtype=torch.long, device=rows.device)
        pieces.append(_Piece(tok, tok.numel(), rows=rows[tok]))
    return pieces


def _scratch(bufs: dict, name: str, n: int, v: int, dtype, device) -> Tensor:
    """A [n, v] buffer reused across pieces (allocated once, for the largest piece)."""
    b = bufs.get(name)
    if b is None or b.shape[0] < n:
        b = bufs[name] = torch.empty(n, v, dtype=dtype, device=device)
    return b[:n]


# rows per block of the entropy's elementwise pass (a small scratch that stays in cache)
_ENTROPY_BLOCK_ELEMS = 1 << 17


def _entropy_sums(z: Tensor, m: Tensor, ex: Tensor, bufs: dict) -> Tensor:
    """sum_v exp(z_v - m)(z_v - m) per row, block of rows by block of rows through a small
    scratch (no [rows, V] buffer); nan (z = -inf: 0 * -inf) counts as its true value 0."""
    n, v = ex.shape
    rb = max(1, min(n, _ENTROPY_BLOCK_ELEMS // max(v, 1)))
    out = torch.empty(n, dtype=ex.dtype, device=ex.device)
    sc = _scratch(bufs, "ent", rb, v, ex.dtype, ex.device)
    for a in range(0, n, rb):
        b = min(a + rb, n)
        t = sc[:b - a]
        torch.sub(z[a:b], m[a:b, None], out=t)
        t.mul_(ex[a:b])
        torch.nan_to_num_(t, nan=0.0)
        torch.sum(t, dim=-1, out=out[a:b])
    return out


class _VocabParallelTokenStats(torch.autograd.Function):
    """Flattened core: logits [R, V_l]; token i reads row rows[i] (rows None: row i, R = N);
    ids [N], topk_ids [N, K] or None, scale [N] or None; only the first `nv` columns of the
    shard are real ids (the rest is vocabulary padding: read by nothing, gradient 0)."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor | None, ids: Tensor, topk_ids: Tensor | None,
                scale: Tensor | None, group, tp: int, rank: int, want_entropy: bool,
                chunk_tokens: int, nv: int):
        n, v_local = ids.shape[0], logits.shape[1]
        offset = rank * v_local
        cdtype = _compute_dtype(logits.dtype)
        k = 0 if topk_ids is None else topk_ids.shape[1]
        distributed = tp > 1
        dev = logits.device

        lse = torch.empty(n, dtype=cdtype, device=dev)
        logprobs = torch.empty(n, dtype=cdtype, device=dev)
        entropy = torch.empty(n, dtype=cdtype, device=dev) if want_entropy else None
        topk = None if topk_ids is None else torch.empty(n, k, dtype=cdtype, device=dev)

        plan = _plan(rows, n, logits.shape[0], chunk_tokens)
        bufs: dict = {}
        for pc in plan:
            t, c = pc.tok, pc.n
            z = pc.read(logits)[:, :nv]  # padding columns never enter
            sc = None if scale is None else scale[t].to(cdtype)
            m = z.amax(dim=-1).to(cdtype) if nv else \
                torch.full((c,), float("-inf"), dtype=cdtype, device=dev)
            if sc is not None:  # max(z * s) = max(z) * s for s > 0 (rounding is monotonic)
                m = m * sc
            if distributed:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            if sc is None:
                zs = z
                ex = torch.sub(z, m[:, None], out=_scratch(bufs, "ex", c, nv, cdtype, dev))
            else:
                zs = torch.mul(z, sc[:, None], out=_scratch(bufs, "zs", c, nv, cdtype, dev))
                if want_entropy:  # zs is needed again below
                    ex = torch.sub(zs, m[:, None],
                                   out=_scratch(bufs, "ex", c, nv, cdtype, dev))
                else:
                    ex = zs.sub_(m[:, None])
            ex.exp_()
            # SUM payload, one all_reduce: [S, z_y, (sum e*(z-m)), (z_t1..z_tK)]
            cols = [ex.sum(dim=-1)]
            zy = _owned_logits(z, ids[t], offset, cdtype)
            if sc is not None:
                zy = zy * sc
            cols.append(zy)
            if want_entropy:
                cols.append(_entropy_sums(zs, m, ex, bufs))
            payload = torch.stack(cols, dim=1)
            if topk_ids is not None:
                zt = _owned_logits(z, topk_ids[t], offset, cdtype)
                if sc is not None:
                    zt = zt * sc[:, None]
                payload = torch.cat([payload, zt], dim=1)
            if distributed:
                dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
            log_s = torch.log(payload[:, 0])
            lse_c = m + log_s
            lse[t] = lse_c
            logprobs[t] = payload[:, 1] - lse_c
            j = 2
            if want_entropy:
                entropy[t] = log_s - payload[:, j] / payload[:, 0]
                j += 1
            if topk_ids is not None:
                topk[t] = payload[:, j:]
        del bufs

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, rows, ids, topk_ids, scale, lse, entropy)
        ctx.offset, ctx.chunk_tokens, ctx.plan, ctx.nv = offset, chunk_tokens, plan, nv
        return logprobs, entropy, topk, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: Tensor | None, g_h: Tensor | None, g_topk: Tensor | None,
                 g_lse: Tensor | None):
        logits, rows, ids, topk_ids, scale, lse, entropy = ctx.saved_tensors
        v_local = logits.shape[1]
        offset, plan = ctx.offset, ctx.plan
        cdtype, dev = lse.dtype, logits.device
        none = (None,) * 10
        nv = ctx.nv
        if g_lp is None and g_h is None and g_topk is None and g_lse is None:
            return (None,) + none
        grad = torch.empty_like(logits)
        if rows is not None:
            # rows no exclusive run writes (unread ones, gathered or shared ones) start at 0
            covered = torch.zeros(logits.shape[0], dtype=torch.bool, device=dev)
            for pc in plan:
                if pc.exclusive:
                    covered[pc.r0:pc.r0 + pc.n] = True
            zero_rows = torch.nonzero(~covered).view(-1)
            if zero_rows.numel():
                grad.index_fill_(0, zero_rows, 0)
        softmax = g_lp is not None or g_h is not None or g_lse is not None
        bufs: dict = {}
        for pc in plan:
            t, c = pc.tok, pc.n
            direct = pc.exclusive and grad.dtype == cdtype
            g = grad[pc.r0:pc.r0 + c] if direct else _scratch(bufs, "g", c, v_local, cdtype, dev)
            gv = g[:, :nv]  # the softmax part: real ids only, the padding's gradient is 0
            if softmax and nv < v_local:
                g[:, nv:].zero_()
            sc = None if scale is None else scale[t].to(cdtype)
            if not softmax:  # only top-K logits: no softmax term
                g.zero_()
            elif g_h is None:
                # p * (g_lse - g_lp), times the scale (d/d logits = scale * d/dz), written once
                z = pc.read(logits)[:, :nv]
                if g_lp is None:
                    coef = g_lse[t]
                elif g_lse is None:
                    coef = -g_lp[t]
                else:
                    coef = g_lse[t] - g_lp[t]
                if sc is None:
                    torch.sub(z, lse[t][:, None], out=gv)
                else:
                    torch.mul(z, sc[:, None], out=gv).sub_(lse[t][:, None])
                    coef = coef * sc
                gv.exp_().mul_(coef[:, None])
            else:
                z = pc.read(logits)[:, :nv]
                logp = _scratch(bufs, "logp", c, nv, cdtype, dev)
                if sc is None:
                    torch.sub(z, lse[t][:, None], out=logp)
                else:
                    torch.mul(z, sc[:, None], out=logp).sub_(lse[t][:, None])
                torch.exp(logp, out=gv)
                # softmax part: p * (g_lse - coef), coef = g_lp + g_H (log p + H)
                coef = logp.clamp_(min=_LOGP_FLOOR).add_(entropy[t][:, None])
                coef.mul_(g_h[t][:, None])
                if g_lp is not None:
                    coef.add_(g_lp[t][:, None])
                if g_lse is not None:
                    coef.sub_(g_lse[t][:, None])
                gv.mul_(coef).neg_()
                if sc is not None:
                    gv.mul_(sc[:, None])
            if g_lp is not None:
                idx, owned = _local_index(ids[t], offset, v_local)
                src = g_lp[t]
                if sc is not None:
                    src = src * sc
                src = torch.where(owned, src, torch.zeros_like(src))
                g.scatter_add_(1, idx[:, None], src[:, None].to(g.dtype))
            if g_topk is not None:
                tidx, towned = _local_index(topk_ids[t], offset, v_local)
                src = g_topk[t]
                if sc is not None:
                    src = src * sc[:, None]
                src = torch.where(towned, src, torch.zeros_like(src))
                g.scatter_add_(1, tidx, src.to(g.dtype))
            if direct:
                continue
            if pc.exclusive:
                grad[pc.r0:pc.r0 + c].copy_(g)
            else:  # index_add: a row read by two tokens gets both contributions
                grad.index_add_(0, pc.rows if pc.rows is not None
                                else torch.arange(pc.r0, pc.r0 + c, device=dev), g.to(grad.dtype))
        return (grad,) + none


def _true_vocab(vocab_size: int | None, v_local: int, tp: int) -> int:
    """The number of real ids: `vocab_size`, or every column of every shard when None."""
    if vocab_size is None:
        return v_local * tp
    if not 0 < vocab_size <= v_local * tp:
        raise ValueError(f"vocab_size {vocab_size} must be in (0, V_local x tp = {v_local * tp}]")
    return vocab_size


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
                               positions: Tensor | None = None, chunk_tokens: int = 4096,
                               vocab_size: int | None = None) -> TokenStats:
    """Log-probs of `ids` (and optionally entropy and raw logits at `topk_ids`) from this rank's
    vocab shard `logits` [..., V_local]; every rank of `group` must call it with the same ids,
    topk_ids and chunk_tokens (the forward runs two collectives per chunk). Outputs are float32
    (float64 for float64 logits), identical on every rank, differentiable w.r.t. `logits`
    (`logsumexp` too: its gradient is the softmax). `temperature` [...] (per token, > 0) makes
    every statistic that of logits / temperature, scaled chunk by chunk (no scaled copy).
    `positions` [b, T] (with logits [b, s, V_local], ids [b, T]): token (i, t) reads the logits
    at sequence position positions[i, t] (the position predicting a response token), chunk by
    chunk, without a gathered copy of the logits; the gradient is 0 at unread positions.
    `vocab_size`: the true vocabulary when the shards include megatron's padding (global ids >=
    vocab_size): those columns are excluded from every statistic and get zero gradient."""
    if positions is not None:
        return _stats_at_positions(logits, ids, positions, group=group, entropy=entropy,
                                   topk_ids=topk_ids, temperature=temperature,
                                   chunk_tokens=chunk_tokens, vocab_size=vocab_size)
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
    vocab = _true_vocab(vocab_size, v_local, tp)
    for name, t in (("ids", ids), ("topk_ids", topk_ids)):
        if t is not None and t.numel() > 0:
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"{name} out of range [0, {vocab}) (V_local={v_local} x tp={tp}"
                                 f"{'' if vocab_size is None else ', vocab_size'}): "
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
    lp, h, tk, lse = _VocabParallelTokenStats.apply(
        flat, None, flat_ids, flat_topk, scale, group, tp, rank, entropy, chunk_tokens,
        _valid_columns(vocab, rank * v_local, v_local))
    return TokenStats(
        logprobs=lp.view(lead),
        entropy=None if h is None else h.view(lead),
        topk_logits=None if tk is None else tk.view(*lead, tk.shape[-1]),
        logsumexp=lse.view(lead),
    )


@torch.no_grad()
def vocab_parallel_reverse_kl(logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                              logsumexp: Tensor, *, group=None, temperature: Tensor | None = None,
                              positions: Tensor | None = None, chunk_tokens: int = 4096,
                              vocab_size: int | None = None) -> Tensor:
    """sum_{v in S} p_v (log p_v - log q_v) per token, S = the teacher's ids [..., K] (global vocab
    ids, distinct) with log q there [..., K]: the exact KL(pi || q) when S is the whole
    vocabulary. From this rank's shard of the student logits [..., V_local] and the student's
    log-normaliser (from `vocab_parallel_token_stats`); each rank adds the ids it owns, one SUM
    all-reduce per call, chunked; nothing vocabulary-wide is built beyond a chunk. No gradient (it
    enters losses as a constant). `positions` as in `vocab_parallel_token_stats` (logits
    [b, s, V_local], the rest [b, T, ...]). p_v = 0 contributes 0 even where q_v = 0.
    `vocab_size` as in `vocab_parallel_token_stats` (teacher ids must be real ids)."""
    tp, rank = _group_coords(group)
    v_local = logits.shape[-1]
    lead = tuple(teacher_ids.shape[:-1])
    vocab = _true_vocab(vocab_size, v_local, tp)
    if teacher_ids.numel() and (int(teacher_ids.min()) < 0 or int(teacher_ids.max()) >= vocab):
        raise ValueError(f"teacher_ids out of range [0, {vocab})")
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
        # the K logits of each token, read where they are (no copy of the rows)
        zk = flat[s:e].gather(1, idx) if rows is None else flat[rows[s:e, None], idx]
        zk = zk.to(cdtype)
        if scale is not None:
            zk = zk * scale[s:e, None]
        logp = zk - flat_lse[s:e, None]
        p = torch.exp(logp)
        term = p * (logp - flat_q[s:e].to(cdtype))
        out[s:e] = torch.where(owned & (p > 0), term, torch.zeros_like(term)).sum(dim=-1)
    if tp > 1:
        dist.all_reduce(out, group=group)
    return out.view(lead)


def _stats_at_positions(logits: Tensor, ids: Tensor, positions: Tensor, *, group, entropy: bool,
                        topk_ids: Tensor | None, temperature: Tensor | None,
                        chunk_tokens: int, vocab_size: int | None) -> TokenStats:
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
    vocab = _true_vocab(vocab_size, v_local, tp)
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
        rank, entropy, chunk_tokens, _valid_columns(vocab, rank * v_local, v_local))
    return TokenStats(logprobs=lp.view(lead), entropy=None if h is None else h.view(lead),
                      topk_logits=None if tk is None else tk.view(*lead, tk.shape[-1]),
                      logsumexp=lse.view(lead))
