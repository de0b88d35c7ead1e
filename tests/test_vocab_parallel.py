"""Vocab-parallel token statistics against float64 `torch.log_softmax` references.

Unsharded cases cover chunking, dtypes, partial use of the outputs and masked (-inf) logits;
gradcheck covers the hand-written backward; a two-process gloo run checks that the sharded
forward equals the unsharded reference on every rank and that the ranks' gradient shards
concatenate to the full reference gradient; a dispatch-mode probe checks the memory bound.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats
from megatron_opd.procs import free_port
from tests.alloc_probe import AllocationProbe
from tests.gloo import gloo_rank

LEAD = (2, 7)  # leading token shape; N = 14
V = 38  # full vocabulary, split in two halves for TP=2
K = 5


def _inputs(seed: int, lead=LEAD, vocab=V, k=K):
    """Logits with a wide spread (so softmax is far from uniform), target ids and top-K ids that
    include the first and last vocab id (one on each TP=2 shard) and a duplicate id."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*lead, vocab, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, vocab, lead, generator=g)
    ids.view(-1)[0], ids.view(-1)[1] = 0, vocab - 1
    topk = torch.randint(0, vocab, (*lead, k), generator=g)
    topk[..., 0], topk[..., 1] = 0, vocab - 1
    topk[..., 2] = topk[..., 3]  # duplicate: both outputs depend on the same logit
    w = {"lp": torch.randn(lead, generator=g, dtype=torch.float64),
         "h": torch.randn(lead, generator=g, dtype=torch.float64),
         "tk": torch.randn(*lead, k, generator=g, dtype=torch.float64)}
    return z, ids, topk, w


def _reference(z: torch.Tensor, ids, topk, w, use=("lp", "h", "tk")) -> dict:
    """Float64 autograd through log_softmax; p log p taken as 0 where p == 0."""
    z = z.detach().double().requires_grad_(True)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    out = {"lp": logp.gather(-1, ids[..., None]).squeeze(-1),
           "h": -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1),
           "tk": z.gather(-1, topk),
           "lse": torch.logsumexp(z, dim=-1)}
    loss = sum((out[name] * w[name]).sum() for name in use)
    (grad,) = torch.autograd.grad(loss, z)
    return {k_: v.detach() for k_, v in out.items()} | {"grad": grad}


def _run(z: torch.Tensor, ids, topk, w, use=("lp", "h", "tk"), **kw) -> dict:
    """The function under test with the same weighted loss; returns outputs and logits.grad."""
    z = z.detach().clone().requires_grad_(True)
    st = vocab_parallel_token_stats(z, ids, entropy=True, topk_ids=topk, **kw)
    outs = {"lp": st.logprobs, "h": st.entropy, "tk": st.topk_logits}
    loss = sum((outs[name] * w[name].to(outs[name].dtype)).sum() for name in use)
    loss.backward()
    return {k_: v.detach() for k_, v in outs.items()} | {"lse": st.logsumexp, "grad": z.grad}


def _assert_close(got: dict, ref: dict, atol=1e-5, rtol=1e-5, grad_atol=1e-5, grad_rtol=1e-5):
    for name in ("lp", "h", "tk", "lse"):
        assert got[name].dtype in (torch.float32, torch.float64), name
        torch.testing.assert_close(got[name].double(), ref[name], atol=atol, rtol=rtol, msg=name)
    torch.testing.assert_close(got["grad"].double(), ref["grad"], atol=grad_atol, rtol=grad_rtol)


@pytest.mark.parametrize("chunk", [1, 3, 7, 14, 1000])
def test_unsharded_fp32_matches_float64_reference(chunk):
    z, ids, topk, w = _inputs(0)
    got = _run(z.float(), ids, topk, w, chunk_tokens=chunk)
    assert got["lp"].shape == LEAD and got["tk"].shape == (*LEAD, K)
    assert got["lp"].dtype == torch.float32 and got["grad"].dtype == torch.float32
    _assert_close(got, _reference(z.float(), ids, topk, w))


def test_unsharded_bf16_matches_float64_of_bf16_values():
    z, ids, topk, w = _inputs(1)
    zb = z.bfloat16()
    got = _run(zb, ids, topk, w, chunk_tokens=4)
    assert got["lp"].dtype == torch.float32 and got["grad"].dtype == torch.bfloat16
    # statistics are exact float32 math on the bf16 values; only the gradient is rounded to bf16
    _assert_close(got, _reference(zb, ids, topk, w), grad_atol=2e-3, grad_rtol=1e-2)


@pytest.mark.parametrize("use", [("lp",), ("h",), ("tk",), ("lp", "tk"), ("h", "tk")])
def test_gradient_of_each_output_alone(use):
    """Unused outputs reach backward as None grads; each term of the gradient is checked alone."""
    z, ids, topk, w = _inputs(2)
    _assert_close(_run(z.float(), ids, topk, w, use=use, chunk_tokens=5),
                  _reference(z.float(), ids, topk, w, use=use))


def test_optional_outputs_absent_and_leading_shapes_kept():
    z, ids, _, _ = _inputs(3, lead=(3, 2, 4))
    st = vocab_parallel_token_stats(z.float().requires_grad_(), ids)
    assert st.entropy is None and st.topk_logits is None
    assert st.logprobs.shape == (3, 2, 4) and st.logsumexp.shape == (3, 2, 4)
    assert st.logsumexp.requires_grad  # its gradient is the softmax (tests/test_objective_inputs.py)
    st.logprobs.sum().backward()


def test_masked_logits_stay_finite():
    """-inf logits (masked vocab entries) have p = 0: no nan in entropy or its gradient."""
    z, ids, topk, w = _inputs(4)
    z[..., 5:12] = float("-inf")
    ids[ids.ge(5) & ids.lt(12)] = 0
    topk[topk.ge(5) & topk.lt(12)] = 1
    got = _run(z.float(), ids, topk, w, chunk_tokens=3)
    assert torch.isfinite(got["h"]).all() and torch.isfinite(got["grad"]).all()
    _assert_close(got, _reference(z.float(), ids, topk, w))


def test_chunked_equals_unchunked_bitwise():
    z, ids, topk, w = _inputs(5, lead=(40,), vocab=64)
    a = _run(z.float(), ids, topk, w, chunk_tokens=1)
    b = _run(z.float(), ids, topk, w, chunk_tokens=7)
    c = _run(z.float(), ids, topk, w, chunk_tokens=4096)
    for name in a:
        assert torch.equal(a[name], c[name]) and torch.equal(b[name], c[name]), name


def test_gradcheck_float64():
    z, ids, topk, _ = _inputs(6, lead=(3,), vocab=6, k=4)
    z = (z / 3).requires_grad_(True)

    def f(x):
        st = vocab_parallel_token_stats(x, ids, entropy=True, topk_ids=topk, chunk_tokens=2)
        return st.logprobs, st.entropy, st.topk_logits

    assert f(z)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_extra_memory_is_per_chunk(dtype):
    """Forward + backward create no storage larger than a float32 [chunk, V] buffer except the
    one gradient buffer, which has the logits' dtype (so no full-size float32 copy of bf16)."""
    n, vocab, chunk = 96, 80, 8
    z = torch.randn(n, vocab, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, vocab, (n,))
    topk = torch.randint(0, vocab, (n, 4))
    probe = AllocationProbe(bound=chunk * vocab * 4, inputs=[z, ids, topk])
    with probe:
        st = vocab_parallel_token_stats(z, ids, entropy=True, topk_ids=topk, chunk_tokens=chunk)
        (st.logprobs.sum() + st.entropy.sum() + st.topk_logits.sum()).backward()
    grad = z.grad.untyped_storage()
    assert {(a.data_ptr, a.nbytes, a.dtype) for a in probe.big} == \
        {(grad.data_ptr(), n * vocab * z.element_size(), dtype)}


def test_input_validation():
    z = torch.randn(4, 10)
    ids = torch.tensor([0, 1, 2, 9])
    with pytest.raises(ValueError, match="out of range"):
        vocab_parallel_token_stats(z, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="out of range"):
        vocab_parallel_token_stats(z, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="topk_ids out of range"):
        vocab_parallel_token_stats(z, ids, topk_ids=torch.full((4, 2), 10))
    with pytest.raises(ValueError, match="ids shape"):
        vocab_parallel_token_stats(z, ids[:3])
    with pytest.raises(ValueError, match="topk_ids shape"):
        vocab_parallel_token_stats(z, ids, topk_ids=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        vocab_parallel_token_stats(z, ids.float())
    with pytest.raises(ValueError, match="chunk_tokens"):
        vocab_parallel_token_stats(z, ids, chunk_tokens=0)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="not initialised"):
            vocab_parallel_token_stats(z, ids, group=object())


# --- two processes, gloo, TP=2 -------------------------------------------------------------

_CASES = {  # name -> (dtype, chunk_tokens, outputs in the loss)
    "fp32_chunk3": (torch.float32, 3, ("lp", "h", "tk")),
    "fp32_one_chunk": (torch.float32, 1000, ("lp", "h", "tk")),
    "fp32_lp_only": (torch.float32, 4, ("lp",)),
    "bf16_chunk4": (torch.bfloat16, 4, ("lp", "h", "tk")),
}


def _tp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        tp_group = dist.new_group([0, 1])
        singles = [dist.new_group([r]) for r in range(world)]  # every rank must create every group
        v_local = V // world
        z, ids, topk, w = _inputs(10)
        results = {}
        for name, (dtype, chunk, use) in _CASES.items():
            shard = z.to(dtype)[..., rank * v_local:(rank + 1) * v_local]
            results[name] = _run(shard, ids, topk, w, use=use, group=tp_group, chunk_tokens=chunk)
        # a group of one in which this process has rank 0 (global rank 1 too): the vocab offset
        # must come from the rank in the group, not the global rank
        results["single"] = _run(z.float(), ids, topk, w, group=singles[rank], chunk_tokens=5)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_tp2_gloo_matches_unsharded_reference(tmp_path):
    mp.spawn(_tp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    z, ids, topk, w = _inputs(10)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, (dtype, _, use) in _CASES.items():
        ref = _reference(z.to(dtype), ids, topk, w, use=use)
        grad_tol = dict(grad_atol=2e-3, grad_rtol=1e-2) if dtype == torch.bfloat16 else {}
        full_grad = torch.cat([ranks[0][name]["grad"], ranks[1][name]["grad"]], dim=-1)
        assert full_grad.dtype == dtype
        for r in range(2):
            assert ranks[r][name]["grad"].shape == (*LEAD, V // 2)
            _assert_close(ranks[r][name] | {"grad": full_grad}, ref, **grad_tol)
        for out in ("lp", "h", "tk", "lse"):  # replicated: the same bits on both ranks
            assert torch.equal(ranks[0][name][out], ranks[1][name][out]), (name, out)
    ref = _reference(z.float(), ids, topk, w)
    for r in range(2):
        _assert_close(ranks[r]["single"], ref)


def test_temperature_and_logsumexp_gradient_match_reference():
    """Statistics of logits / T per token (no scaled copy made by the caller), with the
    log-normaliser differentiable: d lse / dz = softmax."""
    z, ids, topk, w = _inputs(11)
    temp = torch.rand(LEAD, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    w_lse = torch.randn(LEAD, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    zt = z.clone().requires_grad_(True)
    st = vocab_parallel_token_stats(zt, ids, entropy=True, topk_ids=topk, temperature=temp,
                                    chunk_tokens=4)
    loss = ((st.logprobs * w["lp"]).sum() + (st.entropy * w["h"]).sum()
            + (st.topk_logits * w["tk"]).sum() + (st.logsumexp * w_lse).sum())
    (g,) = torch.autograd.grad(loss, zt)
    zr = z.clone().requires_grad_(True)
    zs = zr / temp[..., None]
    logp = torch.log_softmax(zs, -1)
    ref = ((logp.gather(-1, ids[..., None]).squeeze(-1) * w["lp"]).sum()
           + (-(logp.exp() * logp).sum(-1) * w["h"]).sum()
           + (zs.gather(-1, topk) * w["tk"]).sum() + (torch.logsumexp(zs, -1) * w_lse).sum())
    (g_ref,) = torch.autograd.grad(ref, zr)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_gradcheck_with_temperature_and_logsumexp():
    z, ids, topk, _ = _inputs(12, lead=(4,), vocab=7, k=5)
    z = (z / 3).requires_grad_(True)
    temp = torch.tensor([0.5, 1.0, 1.7, 0.9], dtype=torch.float64)

    def f(x):
        st = vocab_parallel_token_stats(x, ids, entropy=True, topk_ids=topk, temperature=temp,
                                        chunk_tokens=3)
        return st.logprobs, st.entropy, st.topk_logits, st.logsumexp

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_reverse_kl_matches_reference_and_handles_zero_probabilities():
    from megatron_opd.learner.vocab_parallel import vocab_parallel_reverse_kl

    z, ids, _, _ = _inputs(13)
    g = torch.Generator().manual_seed(3)
    logq = torch.log_softmax(torch.randn(*LEAD, V, generator=g, dtype=torch.float64), -1)
    temp = torch.full(LEAD, 0.8, dtype=torch.float64)
    z = z.clone()
    z[0, 0, 3] = -torch.inf  # p = 0 where the teacher also has q = 0: contributes 0, not nan
    logq[0, 0, 3] = -torch.inf
    lse = vocab_parallel_token_stats(z, ids, temperature=temp).logsumexp
    # the teacher's ids in a shuffled order per token: the sum must not depend on it
    perm = torch.argsort(torch.rand(*LEAD, V, generator=g), dim=-1)
    got = vocab_parallel_reverse_kl(z, perm, logq.gather(-1, perm), lse, temperature=temp,
                                    chunk_tokens=5)
    logp = torch.log_softmax(z / 0.8, -1)
    p = logp.exp()
    ref = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_positions_read_rows_in_place_equal_a_gathered_copy():
    """positions [b, T] pick the logits row of each token (a row may be read twice, others not at
    all): same statistics and gradient as gathering the rows first; unread rows get exactly 0."""
    g = torch.Generator().manual_seed(14)
    z = torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 2
    pos = torch.tensor([[0, 1, 1, 3], [4, 2, 0, 0]])
    ids = torch.randint(0, V, (2, 4), generator=g)
    topk = torch.randint(0, V, (2, 4, 3), generator=g)
    temp = torch.full((2, 4), 0.9, dtype=torch.float64)
    w = torch.randn(4, 2, 4, generator=g, dtype=torch.float64)

    def weighted(st):
        return ((st.logprobs * w[0]).sum() + (st.entropy * w[1]).sum()
                + (st.topk_logits.sum(-1) * w[2]).sum() + (st.logsumexp * w[3]).sum())

    za = z.clone().requires_grad_(True)
    got = weighted(vocab_parallel_token_stats(za, ids, entropy=True, topk_ids=topk,
                                              temperature=temp, positions=pos, chunk_tokens=3))
    (ga,) = torch.autograd.grad(got, za)
    zb = z.clone().requires_grad_(True)
    copy = torch.gather(zb, 1, pos[..., None].expand(-1, -1, V))
    ref = weighted(vocab_parallel_token_stats(copy, ids, entropy=True, topk_ids=topk,
                                              temperature=temp))
    (gb,) = torch.autograd.grad(ref, zb)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    assert (ga[0, 2] == 0).all() and (ga[0, 4] == 0).all() and (ga[1, 1] == 0).all()


@pytest.mark.parametrize("temperature", [None, 0.7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_positions_contiguous_runs_equal_a_gathered_copy(temperature, dtype):
    """The learner's layout: each sequence's positions are one contiguous run (read as views, the
    gradient written in place), then padding reading position 0, which one run also reads (shared
    row: accumulated); a run longer than the chunk is split. Same statistics and gradient as a
    gathered copy; unread rows get exactly 0; -inf logits stay harmless."""
    g = torch.Generator().manual_seed(21)
    b, s_len, t_len, vocab = 3, 50, 30, 40
    z = (torch.randn(b, s_len, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    z[1, :, 3:9] = float("-inf")
    pos = torch.zeros(b, t_len, dtype=torch.long)
    for i, (p0, n_i) in enumerate([(0, 28), (7, 21), (19, 12)]):
        pos[i, :n_i] = torch.arange(p0, p0 + n_i)
    ids = torch.randint(9, vocab, (b, t_len), generator=g)
    topk = torch.randint(9, vocab, (b, t_len, 4), generator=g)
    temp = None if temperature is None else torch.full((b, t_len), temperature, dtype=dtype)
    w = torch.randn(4, b, t_len, generator=g, dtype=torch.float64)

    def weighted(st, use_h):
        out = ((st.logprobs * w[0]).sum() + (st.topk_logits.sum(-1) * w[2]).sum()
               + (st.logsumexp * w[3]).sum())
        return out + (st.entropy * w[1]).sum() if use_h else out

    for use_h in (False, True):
        za = z.clone().requires_grad_(True)
        sa = vocab_parallel_token_stats(za, ids, entropy=True, topk_ids=topk, temperature=temp,
                                        positions=pos, chunk_tokens=16)
        (ga,) = torch.autograd.grad(weighted(sa, use_h), za)
        zb = z.clone().requires_grad_(True)
        copy = torch.gather(zb, 1, pos[..., None].expand(-1, -1, vocab))
        sb = vocab_parallel_token_stats(copy, ids, entropy=True, topk_ids=topk, temperature=temp,
                                        chunk_tokens=16)
        (gb,) = torch.autograd.grad(weighted(sb, use_h), zb)
        for x, y in ((sa.logprobs, sb.logprobs), (sa.entropy, sb.entropy),
                     (sa.topk_logits, sb.topk_logits), (sa.logsumexp, sb.logsumexp), (ga, gb)):
            assert torch.isfinite(x).all()
            torch.testing.assert_close(x, y, rtol=1e-12 if dtype == torch.float64 else 1e-6,
                                       atol=1e-12 if dtype == torch.float64 else 1e-6)
        # unread: past each run, and before it except position 0 (read by the padding)
        assert (ga[0, 28:] == 0).all() and (ga[1, 1:7] == 0).all() and (ga[1, 28:] == 0).all()
        assert (ga[2, 1:19] == 0).all() and (ga[2, 31:] == 0).all()
