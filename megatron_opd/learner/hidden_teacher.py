"""The teacher's exact full-vocabulary distribution from its final hidden states (issue 16,
ALGORITHMS.md §10), vocab-parallel and chunked: no [tokens x vocabulary] tensor is ever built.

The teacher fleet sends, per response token t, the teacher's final hidden state h_t (after the
final norm: SGLang's `return_hidden_states` rows equal transformers' `hidden_states[-1]`,
/work/shared/notes/sglang-on-cpu.md). The learner holds the teacher's output head W_q sharded over
the vocabulary exactly like the student's vocab-parallel logits (rank r: global ids
[r*V_l, (r+1)*V_l) of the padded vocabulary) and forms, one chunk of c tokens at a time, the
teacher's logits block a = h W_q^T / T  [c, V_l] next to the student's block z / T (the student at
the teacher's temperature: ALGORITHMS.md "Conventions"). Per token, with p = softmax(z/T),
q = softmax(a):

    lse_p = m_p + log S_p,  lse_q = m_q + log S_q     (MAX, then SUM all-reduce, as vocab_parallel)
    reverse  KL(p || q) = sum_v p_v (z_v - a_v) - lse_p + lse_q
    forward  KL(q || p) = sum_v q_v (a_v - z_v) - lse_q + lse_p
    js       JS(p, q)   = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (p + q) / 2   (a third collective:
                          log m needs both normalisers first)

Gradients w.r.t. the (temperature-scaled) student logits, no communication (each rank its shard):

    reverse  p_v (log p_v - log q_v - KL)
    forward  p_v - q_v
    js       1/2 p_v (log p_v - log m_v - KL(p || m))

The backward recomputes each chunk's blocks from the saved per-token normalisers (never storing a
softmax). `fused_hidden_kl` also fuses the student's own output head: its logits block is
h_s W_s^T, and the backward returns d/dh_s (all-reduced over the group: h_s is replicated, each
rank's shard contributes its share, as megatron's column-parallel output layer does) and d/dW_s
(this rank's rows). Extra memory: three [c, V_l] blocks (four for JS), in the compute dtype,
besides the gradients.

Vocabulary padding: columns at global ids >= vocab_size (megatron pads to a multiple of TP) are
excluded from every sum and get exactly zero gradient, for the student and the teacher, whatever
they hold (the teacher head's padding rows are zeros). Student logits of -inf (masked) give p = 0
and contribute exactly 0 (0 log 0 = 0); forward KL and JS treat them as the closed forms do
(forward KL = +inf where q > 0).

Precision: float32 arithmetic (float64 when the student side is float64, which makes gradcheck
meaningful); the teacher's hidden states may be bfloat16 (cast per chunk).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from megatron_opd.learner.vocab_parallel import _group_coords

__all__ = ["KINDS", "TeacherHead", "fused_hidden_kl", "hidden_teacher_kl",
           "teacher_logprobs_from_hidden"]

KINDS = ("reverse", "forward", "js")

# Default block: about 2**24 fp32 elements (64 MiB) per [c, V_local] buffer, at least 16 tokens.
_BLOCK_ELEMS = 1 << 24


@dataclass
class TeacherHead:
    """This TP rank's rows of the teacher's output head: `weight` [V_local, d] holds the global ids
    [tp_rank*V_local, (tp_rank+1)*V_local) of the padded vocabulary; rows at ids >= `vocab_size`
    (padding) are zero and never read."""

    weight: Tensor
    vocab_size: int
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def v_local(self) -> int:
        return self.weight.shape[0]

    @property
    def valid_rows(self) -> int:
        """How many of this shard's rows are real ids."""
        return max(0, min(self.v_local, self.vocab_size - self.tp_rank * self.v_local))

    @classmethod
    def from_hf(cls, hf_dir: str, *, tp_rank: int = 0, tp_size: int = 1,
                padded_vocab_size: int | None = None, dtype: torch.dtype = torch.float32
                ) -> "TeacherHead":
        """Reads only this rank's rows of `lm_head.weight` (the input embedding when the config
        ties them, or when the checkpoint has no separate head) from the safetensors of a
        Hugging Face directory, once. `padded_vocab_size` (default: the head's rows) must be a
        multiple of tp_size and at least the head's rows."""
        from safetensors import safe_open

        cfg_path = os.path.join(hf_dir, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        tied = bool(cfg.get("tie_word_embeddings", False))
        files = _safetensors_files(hf_dir)
        names = ["model.embed_tokens.weight"] if tied else ["lm_head.weight"]
        found = None
        for path in files:
            with safe_open(path, framework="pt") as st:
                keys = set(st.keys())
                name = next((n for n in names if n in keys), None)
                if name is None:
                    continue
                sl = st.get_slice(name)
                rows, d = sl.get_shape()
                padded = rows if padded_vocab_size is None else int(padded_vocab_size)
                if padded < rows or padded % tp_size:
                    raise ValueError(f"padded_vocab_size {padded} must be >= the head's {rows} "
                                     f"rows and a multiple of tp_size {tp_size}")
                v_local = padded // tp_size
                lo = tp_rank * v_local
                hi = min(lo + v_local, rows)
                w = torch.zeros(v_local, d, dtype=dtype)
                if hi > lo:
                    w[:hi - lo] = sl[lo:hi].to(dtype)
                found = cls(weight=w, vocab_size=rows, tp_rank=tp_rank, tp_size=tp_size)
                break
        if found is None:
            raise ValueError(f"{hf_dir}: no {names[0]} in its safetensors "
                             f"(tie_word_embeddings={tied})")
        return found


def _safetensors_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(hf_dir, s) for s in shards]
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{hf_dir}: no safetensors files")
    return [os.path.join(hf_dir, f) for f in files]


def _cdtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _default_chunk(v_local: int) -> int:
    return max(16, _BLOCK_ELEMS // max(v_local, 1))


def _scale(temperature, n: int, cdtype, device) -> Tensor | None:
    """1/T per token [n], or None when T is 1 everywhere (no scaling pass at all)."""
    if temperature is None:
        return None
    if not isinstance(temperature, Tensor):
        if float(temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return None if float(temperature) == 1.0 else \
            torch.full((n,), 1.0 / float(temperature), dtype=cdtype, device=device)
    t = temperature.reshape(-1).to(cdtype).detach()
    if t.numel() != n or not bool((t > 0).all()):
        raise ValueError(f"temperature must be > 0 with {n} entries (one per token)")
    return None if bool((t == 1).all()) else 1.0 / t


def _check_head(head: TeacherHead, group, d: int) -> tuple[int, int]:
    tp, rank = _group_coords(group)
    if (tp, rank) != (head.tp_size, head.tp_rank):
        raise ValueError(f"teacher head is shard {head.tp_rank}/{head.tp_size} but the group "
                         f"gives rank {rank}/{tp}")
    if head.weight.shape[1] != d:
        raise ValueError(f"teacher hidden size {d} != teacher head's {head.weight.shape[1]}")
    return tp, rank


@torch.no_grad()
def teacher_logprobs_from_hidden(head: TeacherHead, hidden: Tensor, ids: Tensor, *, group=None,
                                 temperature=1.0, chunk_tokens: int | None = None) -> Tensor:
    """log_softmax(hidden @ W^T / T)[ids] over the true vocabulary: hidden [N, d] (any float
    dtype), ids [N, k] (or [N]) global ids; float32 [N, k] (float64 for a float64 head), identical
    on every rank of `group` (two collectives per chunk). No gradient."""
    squeeze = ids.dim() == 1
    ids2 = ids[:, None] if squeeze else ids
    n, k = ids2.shape
    tp, rank = _check_head(head, group, hidden.shape[-1])
    if hidden.shape[0] != n:
        raise ValueError(f"hidden has {hidden.shape[0]} rows, ids {n}")
    if ids2.numel() and (int(ids2.min()) < 0 or int(ids2.max()) >= head.vocab_size):
        raise ValueError(f"ids out of range [0, {head.vocab_size})")
    cd = _cdtype(head.weight)
    dev = hidden.device
    nv, v_local = head.valid_rows, head.v_local
    w = head.weight[:nv].to(cd)
    sc = _scale(temperature, n, cd, dev)
    c = chunk_tokens or _default_chunk(v_local)
    out = torch.empty(n, k, dtype=cd, device=dev)
    off = rank * v_local
    for s in range(0, n, c):
        e = min(s + c, n)
        a = hidden[s:e].to(cd) @ w.T
        if sc is not None:
            a.mul_(sc[s:e, None])
        m = a.amax(-1) if nv else torch.full((e - s,), -math.inf, dtype=cd, device=dev)
        if tp > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        local = ids2[s:e].long() - off
        owned = (local >= 0) & (local < nv)
        at = a.gather(1, local.clamp(0, max(nv - 1, 0))) if nv else \
            torch.zeros(e - s, k, dtype=cd, device=dev)
        at = torch.where(owned, at, torch.zeros_like(at))
        a.sub_(m[:, None]).exp_()
        payload = torch.cat([a.sum(-1, keepdim=True), at], dim=1)
        if tp > 1:
            dist.all_reduce(payload, group=group)
        out[s:e] = payload[:, 1:] - (m + payload[:, 0].log())[:, None]
    return out[:, 0] if squeeze else out


class _Blocks:
    """Reusable [c, V] buffers (allocated once, for the largest chunk)."""

    def __init__(self):
        self.b: dict = {}

    def get(self, name, c, v, dtype, device) -> Tensor:
        t = self.b.get(name)
        if t is None or t.shape[0] < c:
            t = self.b[name] = torch.empty(c, v, dtype=dtype, device=device)
        return t[:c]


def _student_block(x: Tensor, ws: Tensor | None, rows: Tensor | None, s: int, e: int, nv: int,
                   cd, out: Tensor) -> Tensor:
    """The student's logits of tokens s..e over the real columns, into `out` [c, nv]."""
    if ws is not None:  # fused: h_s W_s^T
        return torch.matmul(x[s:e].to(cd), ws[:nv].to(cd).T, out=out)
    z = x[s:e] if rows is None else x.index_select(0, rows[s:e])
    return out.copy_(z[:, :nv])


def _teacher_block(ht: Tensor, wt: Tensor, s: int, e: int, out: Tensor) -> Tensor:
    return torch.matmul(ht[s:e].to(wt.dtype), wt.T, out=out)


class _HiddenKL(torch.autograd.Function):
    """x: student logits [R, V_l] (ws None; token i reads row rows[i], or row i) or student hidden
    [N, d_s] with its head shard ws [V_l, d_s]; ht [N, d_t] teacher hidden, wt [nv, d_t] the
    teacher head's real rows in the compute dtype; sc [N] 1/T or None."""

    @staticmethod
    def forward(ctx, x, ws, rows, ht, wt, sc, group, tp, kind, chunk, nv, reduce_hidden_grad):
        n = ht.shape[0]
        cd, dev = wt.dtype, ht.device
        lse_p = torch.empty(n, dtype=cd, device=dev)
        lse_q = torch.empty(n, dtype=cd, device=dev)
        kl_aux = torch.empty(n, dtype=cd, device=dev)  # reverse: KL; js: KL(p || m)
        out = torch.empty(n, dtype=cd, device=dev)
        bl = _Blocks()
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            c = e - s
            z = _student_block(x, ws, rows, s, e, nv, cd, bl.get("z", c, nv, cd, dev))
            a = _teacher_block(ht, wt, s, e, bl.get("a", c, nv, cd, dev))
            if sc is not None:
                z.mul_(sc[s:e, None])
                a.mul_(sc[s:e, None])
            if nv:
                m = torch.stack([z.amax(-1), a.amax(-1)], dim=1)
            else:
                m = torch.full((c, 2), -math.inf, dtype=cd, device=dev)
            if tp > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            tmp = bl.get("t", c, nv, cd, dev)
            s_q = torch.sub(a, m[:, 1:], out=tmp).exp_().sum(-1)
            if kind == "forward":
                # sum_v e^(a-m_q) (a - z) (z = -inf: +inf, q > 0), then e^(z-m_p) = e^(a-(a-z)-m_p)
                diff = z.neg_().add_(a)
                cross = tmp.mul_(diff)
                if ws is None:  # q = 0 (underflow) where z = -inf: 0 * inf, a 0 term
                    cross.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
                cross = cross.sum(-1)
                s_p = torch.sub(a, diff, out=tmp).sub_(m[:, :1]).exp_().sum(-1)
            else:
                s_p = torch.sub(z, m[:, :1], out=tmp).exp_().sum(-1)
                if kind == "reverse":  # sum_v e^(z-m_p) (z - a); p = 0 terms are exactly 0
                    cross = torch.sub(z, a, out=z).mul_(tmp)
                    if ws is None:  # given logits may hold -inf (0 * -inf); h_s W_s^T cannot
                        cross.nan_to_num_(nan=0.0)
                    cross = cross.sum(-1)
            payload = torch.stack([s_p, s_q] + ([] if kind == "js" else [cross]), dim=1)
            if tp > 1:
                dist.all_reduce(payload, group=group)
            lp_ = m[:, 0] + payload[:, 0].log()
            lq_ = m[:, 1] + payload[:, 1].log()
            lse_p[s:e], lse_q[s:e] = lp_, lq_
            if kind == "reverse":
                out[s:e] = payload[:, 2] / payload[:, 0] - lp_ + lq_
                kl_aux[s:e] = out[s:e]
            elif kind == "forward":
                out[s:e] = payload[:, 2] / payload[:, 1] - lq_ + lp_
            else:  # z, a intact: log p, log q, log m, then sum p (log p - log m), q (...)
                z.sub_(lp_[:, None])
                a.sub_(lq_[:, None])
                logm = torch.logaddexp(z, a, out=tmp).sub_(math.log(2.0))
                u = bl.get("u", c, nv, cd, dev)
                z.sub_(logm)
                pm = torch.add(z, logm, out=u).exp_().mul_(z).nan_to_num_(nan=0.0).sum(-1)
                a.sub_(logm)
                qm = torch.add(a, logm, out=u).exp_().mul_(a).nan_to_num_(nan=0.0).sum(-1)
                pair = torch.stack([pm, qm], dim=1)
                if tp > 1:
                    dist.all_reduce(pair, group=group)
                kl_aux[s:e] = pair[:, 0]
                out[s:e] = 0.5 * (pair[:, 0] + pair[:, 1])
        del bl
        ctx.save_for_backward(x, ws, rows, ht, wt, sc, lse_p, lse_q, kl_aux)
        ctx.cfg = (group, tp, kind, chunk, nv, reduce_hidden_grad)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, ws, rows, ht, wt, sc, lse_p, lse_q, kl_aux = ctx.saved_tensors
        group, tp, kind, chunk, nv, reduce_hidden_grad = ctx.cfg
        n = ht.shape[0]
        cd, dev = wt.dtype, ht.device
        fused = ws is not None
        want_x = ctx.needs_input_grad[0]
        want_w = fused and ctx.needs_input_grad[1]
        gx = torch.zeros_like(x) if want_x else None
        gw = torch.zeros(ws.shape, dtype=cd, device=dev) if want_w else None
        bl = _Blocks()
        g = g.to(cd)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            c = e - s
            z = _student_block(x, ws, rows, s, e, nv, cd, bl.get("z", c, nv, cd, dev))
            a = _teacher_block(ht, wt, s, e, bl.get("a", c, nv, cd, dev))
            coef = g[s:e] if sc is None else g[s:e] * sc[s:e]
            if sc is not None:
                z.mul_(sc[s:e, None])
                a.mul_(sc[s:e, None])
            z.sub_(lse_p[s:e, None])  # log p
            a.sub_(lse_q[s:e, None])  # log q
            gz = bl.get("g", c, nv, cd, dev)
            if kind == "reverse":  # p (log p - log q - KL)
                torch.exp(z, out=gz)
                z.sub_(a).sub_(kl_aux[s:e, None])
                gz.mul_(z)
                if ws is None:
                    gz.nan_to_num_(nan=0.0)
            elif kind == "forward":  # p - q
                torch.exp(z, out=gz).sub_(a.exp_())
            else:  # 1/2 p (log p - log m - KL(p || m))
                logm = torch.logaddexp(z, a, out=bl.get("u", c, nv, cd, dev)).sub_(math.log(2.0))
                torch.exp(z, out=gz)
                z.sub_(logm).sub_(kl_aux[s:e, None])
                gz.mul_(z).nan_to_num_(nan=0.0).mul_(0.5)
            gz.mul_(coef[:, None])
            if fused:
                if want_x:
                    gx[s:e] = (gz @ ws[:nv].to(cd)).to(gx.dtype)
                if want_w:
                    gw[:nv].addmm_(gz.T, x[s:e].to(cd))
            elif want_x:
                if rows is None:
                    gx[s:e, :nv] = gz.to(gx.dtype)
                else:
                    full = gz if nv == x.shape[1] else \
                        torch.cat([gz, gz.new_zeros(c, x.shape[1] - nv)], dim=1)
                    gx.index_add_(0, rows[s:e], full.to(gx.dtype))
        if fused and want_x and tp > 1 and reduce_hidden_grad:
            dist.all_reduce(gx, group=group)
        if gw is not None:
            gw = gw.to(ws.dtype)
        return (gx, gw) + (None,) * 10


def _prepare(head: TeacherHead, teacher_hidden: Tensor, group, kind, vocab_size, chunk_tokens,
             student_dtype, temperature, v_local_student):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tp, rank = _check_head(head, group, teacher_hidden.shape[-1])
    if v_local_student != head.v_local:
        raise ValueError(f"student vocab shard {v_local_student} != teacher head shard "
                         f"{head.v_local} (the two must be padded and split alike)")
    vocab = head.vocab_size if vocab_size is None else int(vocab_size)
    if vocab != head.vocab_size:
        raise ValueError(f"vocab_size {vocab} != the teacher head's {head.vocab_size}")
    nv = head.valid_rows
    cd = torch.float64 if torch.float64 in (student_dtype, head.weight.dtype) else torch.float32
    wt = head.weight[:nv].to(cd)
    n = teacher_hidden.shape[0]
    sc = _scale(temperature, n, cd, teacher_hidden.device)
    chunk = chunk_tokens or _default_chunk(head.v_local)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk}")
    return tp, nv, wt, sc, chunk


def hidden_teacher_kl(student_logits: Tensor, teacher_hidden: Tensor, head: TeacherHead, *,
                      group=None, kind: str = "reverse", temperature=1.0,
                      vocab_size: int | None = None, chunk_tokens: int | None = None,
                      rows: Tensor | None = None) -> Tensor:
    """[N] per-token divergence between softmax(student_logits / T) and the teacher's exact
    softmax(teacher_hidden @ W^T / T) (`kind`: "reverse" KL(student || teacher), "forward"
    KL(teacher || student), "js"); student_logits [N, V_local] (this rank's shard), or [R, V_local]
    with `rows` [N] (token i reads row rows[i]: the learner's response positions, or only the
    tokens of a loss mask). Differentiable w.r.t. student_logits (custom backward, recomputed per
    chunk); the teacher side is a constant. `temperature`: a number or [N] per token. Result in
    float32 (float64 for float64 logits), identical on every rank of `group`."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V_local], got {tuple(student_logits.shape)}")
    n = teacher_hidden.shape[0]
    if rows is None and student_logits.shape[0] != n:
        raise ValueError(f"student_logits has {student_logits.shape[0]} rows, teacher_hidden {n}")
    if rows is not None:
        rows = rows.reshape(-1).long()
        if rows.numel() != n:
            raise ValueError(f"rows has {rows.numel()} entries, teacher_hidden {n}")
    tp, nv, wt, sc, chunk = _prepare(head, teacher_hidden, group, kind, vocab_size, chunk_tokens,
                                     student_logits.dtype, temperature, student_logits.shape[1])
    return _HiddenKL.apply(student_logits, None, rows, teacher_hidden.detach(), wt, sc, group,
                           tp, kind, chunk, nv, False)


def fused_hidden_kl(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                    head: TeacherHead, *, group=None, kind: str = "reverse", temperature=1.0,
                    vocab_size: int | None = None, chunk_tokens: int | None = None,
                    reduce_hidden_grad: bool = True) -> Tensor:
    """`hidden_teacher_kl` with the student's output head fused: the student's logits are
    student_hidden [N, d_s] @ student_weight[V_local, d_s]^T, one [chunk, V_local] block at a time
    (neither model's logits exist beyond a block). Gradients w.r.t. student_hidden (summed over
    the group's shards when `reduce_hidden_grad`, the hidden being replicated) and
    student_weight (this rank's rows; padding rows get 0)."""
    if student_hidden.dim() != 2 or student_weight.dim() != 2 \
            or student_hidden.shape[1] != student_weight.shape[1]:
        raise ValueError(f"student_hidden [N, d] and student_weight [V_local, d] expected, got "
                         f"{tuple(student_hidden.shape)}, {tuple(student_weight.shape)}")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError("student_hidden and teacher_hidden must have the same rows")
    tp, nv, wt, sc, chunk = _prepare(head, teacher_hidden, group, kind, vocab_size, chunk_tokens,
                                     student_hidden.dtype, temperature, student_weight.shape[0])
    return _HiddenKL.apply(student_hidden, student_weight, None, teacher_hidden.detach(), wt, sc,
                           group, tp, kind, chunk, nv, reduce_hidden_grad)
