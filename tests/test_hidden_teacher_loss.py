"""The hidden-state teacher (learner/hidden_teacher.py) against float64 references built from
full materialised logits of both models, `torch.autograd.gradcheck`, a two-process gloo TP=2 run
equal to one rank, and a tiny transformers checkpoint written here (its head rows, its log-probs
from `hidden_states[-1]`)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_opd.learner.hidden_teacher import (KINDS, TeacherHead, fused_hidden_kl,
                                                 hidden_teacher_kl, teacher_logprobs_from_hidden)
from megatron_opd.procs import free_port
from tests.alloc_probe import AllocationProbe
from tests.gloo import gloo_rank

N, V, D_T, D_S = 11, 13, 6, 5  # tokens, true vocabulary (odd: TP=2 pads it to 14), hidden sizes
V_PAD = 14


def _inputs(seed: int):
    """float64 student logits (wide spread), teacher hidden and head, student hidden and head,
    per-token weights; padded to V_PAD with junk in the padding column (must never count)."""
    g = torch.Generator().manual_seed(seed)
    wt = torch.randn(V_PAD, D_T, generator=g, dtype=torch.float64)
    ht = 1.5 * torch.randn(N, D_T, generator=g, dtype=torch.float64)
    ws = torch.randn(V_PAD, D_S, generator=g, dtype=torch.float64)
    hs = 1.5 * torch.randn(N, D_S, generator=g, dtype=torch.float64)
    z = 3 * torch.randn(N, V_PAD, generator=g, dtype=torch.float64)
    z[:, V:] = 50.0  # padding junk: a huge logit that would dominate if it were read
    wt[V:] = 7.0
    w = torch.randn(N, generator=g, dtype=torch.float64)
    temp = 0.5 + torch.rand(N, generator=g, dtype=torch.float64)
    return z, ht, wt, hs, ws, w, temp


def _reference(z, ht, wt, kind, temp):
    """Per-token divergence from the full [N, V] logits of both models (padding dropped), float64."""
    t = temp if torch.is_tensor(temp) else torch.tensor(float(temp), dtype=torch.float64)
    t = t.reshape(-1, 1) if t.dim() else t
    lp = torch.log_softmax(z[:, :V].double() / t, -1)
    lq = torch.log_softmax(ht.double() @ wt[:V].double().T / t, -1)
    p, q = lp.exp(), lq.exp()
    if kind == "reverse":
        return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
    if kind == "forward":
        return (q * (lq - lp)).sum(-1)
    lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    return 0.5 * torch.where(p > 0, p * (lp - lm), torch.zeros_like(p)).sum(-1) \
        + 0.5 * (q * (lq - lm)).sum(-1)


def _head(wt, rank=0, tp=1, dtype=torch.float32):
    vl = V_PAD // tp
    return TeacherHead(weight=wt[rank * vl:(rank + 1) * vl].to(dtype).clone(), vocab_size=V,
                       tp_rank=rank, tp_size=tp)


def _grads(fn, tensors, w):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*ts)
    gs = torch.autograd.grad((out * w.to(out.dtype)).sum(), ts)
    return out.detach(), [g.detach() for g in gs]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temp", ["one", "scalar", "per_token"])
def test_value_and_gradient_match_float64_reference(kind, temp):
    z, ht, wt, hs, ws, w, tt = _inputs(1)
    T = {"one": 1.0, "scalar": 0.7, "per_token": tt}[temp]
    Tf = T if not torch.is_tensor(T) else T.float()
    ref, (gref,) = _grads(lambda x: _reference(x, ht, wt, kind, T), [z], w)
    gref = torch.cat([gref[:, :V], torch.zeros(N, V_PAD - V, dtype=torch.float64)], 1)
    # fp32 student logits, fp32 head (chunked: 4 tokens) against the float64 reference
    got, (g,) = _grads(lambda x: hidden_teacher_kl(x, ht.float(), _head(wt), kind=kind,
                                                   temperature=Tf, chunk_tokens=4), [z.float()], w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), gref, atol=2e-5, rtol=1e-4)
    assert torch.equal(g[:, V:], torch.zeros_like(g[:, V:]))  # padding: exactly 0
    # fused: the student's logits are hs @ ws^T (never materialised by the function)
    reff, grf = _grads(lambda h, w_: _reference(h @ w_.T, ht, wt, kind, T), [hs, ws], w)
    gotf, gf = _grads(lambda h, w_: fused_hidden_kl(h, w_, ht.float(), _head(wt), kind=kind,
                                                    temperature=Tf, chunk_tokens=3),
                      [hs.float(), ws.float()], w)
    torch.testing.assert_close(gotf.double(), reff, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gf[0].double(), grf[0], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(gf[1][:V].double(), grf[1][:V], atol=5e-5, rtol=1e-4)
    assert torch.equal(gf[1][V:], torch.zeros_like(gf[1][V:]))


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    z, ht, wt, hs, ws, _, tt = _inputs(2)
    head = _head(wt, dtype=torch.float64)
    T = tt[:4]
    assert torch.autograd.gradcheck(
        lambda x: hidden_teacher_kl(x, ht[:4], head, kind=kind, temperature=T, chunk_tokens=3),
        (z[:4].clone().requires_grad_(),))
    assert torch.autograd.gradcheck(
        lambda h, w_: fused_hidden_kl(h, w_, ht[:4], head, kind=kind, temperature=T,
                                      chunk_tokens=3),
        (hs[:4].clone().requires_grad_(), ws.clone().requires_grad_()))


def test_masked_logits_rows_and_empty():
    z, ht, wt, *_ = _inputs(3)
    z = z.float()
    z[0, :5] = -torch.inf  # masked student logits: p = 0 there
    head = _head(wt)
    zz = z.clone().requires_grad_()
    rev = hidden_teacher_kl(zz, ht.float(), head)
    rev.sum().backward()
    torch.testing.assert_close(rev.double(), _reference(z.double(), ht, wt, "reverse", 1.0),
                               atol=2e-5, rtol=1e-5)
    assert torch.isfinite(zz.grad).all() and torch.equal(zz.grad[0, :5], torch.zeros(5))
    # forward KL puts teacher mass where the student has none: +inf, as the closed form
    fwd = hidden_teacher_kl(z, ht.float(), head, kind="forward")
    assert torch.isinf(fwd[0]) and torch.isfinite(fwd[1:]).all()
    # ... but 0 where the teacher's probability underflows to 0 there too (0 * inf is no nan)
    w = torch.zeros(4, 1, dtype=torch.float64)
    w[0, 0], w[1, 0] = -200.0, 1.0
    z1 = torch.tensor([[-torch.inf, 0.0, 0.0, 0.0]])
    got = hidden_teacher_kl(z1, torch.ones(1, 1), TeacherHead(w.float(), vocab_size=4), kind="forward")
    lq = torch.log_softmax(torch.tensor([-200.0, 1.0, 0.0, 0.0], dtype=torch.float64), -1)[1:]
    ref = (lq.exp() * (lq - torch.log(torch.tensor(1 / 3, dtype=torch.float64)))).sum()
    torch.testing.assert_close(got.double(), ref.view(1), atol=1e-6, rtol=1e-6)
    # rows: token i reads logits row rows[i]; unread rows get exactly 0 gradient, a row read
    # twice gets both contributions
    rows = torch.tensor([2, 5, 5, 9])
    zz = z.clone().requires_grad_()
    out = hidden_teacher_kl(zz, ht[:4].float(), head, rows=rows, chunk_tokens=3)
    (out * torch.tensor([1.0, 2.0, -1.0, 0.5])).sum().backward()
    ref_in = z.double()[rows].requires_grad_()
    r = _reference(ref_in, ht[:4], wt, "reverse", 1.0)
    (r * torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(out.double(), r.detach(), atol=2e-5, rtol=1e-5)
    expect = torch.zeros(N, V_PAD, dtype=torch.float64)
    expect[:, :V].index_add_(0, rows, ref_in.grad[:, :V])
    torch.testing.assert_close(zz.grad.double(), expect, atol=2e-5, rtol=1e-4)
    # no tokens: empty result, zero gradient
    ze = torch.randn(0, V_PAD, requires_grad=True)
    e = hidden_teacher_kl(ze, torch.zeros(0, D_T), head)
    assert e.shape == (0,)
    e.sum().backward()
    assert ze.grad.shape == (0, V_PAD)
    assert teacher_logprobs_from_hidden(head, torch.zeros(0, D_T), torch.zeros(0, 2, dtype=torch.long)).shape == (0, 2)


def test_teacher_logprobs_and_validation():
    _, ht, wt, *_ = _inputs(4)
    head = _head(wt)
    ids = torch.tensor([[0, V - 1, 3]] * N)
    ref = torch.log_softmax(ht @ wt[:V].T / 0.8, -1).gather(1, ids)
    got = teacher_logprobs_from_hidden(head, ht.bfloat16(), ids, temperature=0.8, chunk_tokens=4)
    ref_bf = torch.log_softmax(ht.bfloat16().double() @ wt[:V].float().double().T / 0.8, -1).gather(1, ids)
    torch.testing.assert_close(got.double(), ref_bf, atol=2e-5, rtol=1e-5)  # bf16 hidden: exact of its values
    assert (got.double() - ref).abs().max() > 0  # (and bf16 rounding is visible)
    one = teacher_logprobs_from_hidden(head, ht.float(), ids[:, 1])
    torch.testing.assert_close(one.double(), torch.log_softmax(ht @ wt[:V].T, -1)[:, V - 1],
                               atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        teacher_logprobs_from_hidden(head, ht.float(), torch.full((N, 1), V))
    with pytest.raises(ValueError, match="kind"):
        hidden_teacher_kl(torch.zeros(N, V_PAD), ht.float(), head, kind="tv")
    with pytest.raises(ValueError, match="vocab shard"):
        hidden_teacher_kl(torch.zeros(N, V_PAD + 2), ht.float(), head)
    with pytest.raises(ValueError, match="hidden size"):
        hidden_teacher_kl(torch.zeros(N, V_PAD), torch.zeros(N, D_T + 1), head)
    with pytest.raises(ValueError, match="temperature"):
        hidden_teacher_kl(torch.zeros(N, V_PAD), ht.float(), head, temperature=0.0)


# --- two processes, gloo, TP=2 -------------------------------------------------------------

def _tp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        group = dist.new_group([0, 1])
        z, ht, wt, hs, ws, w, tt = _inputs(5)
        vl = V_PAD // 2
        head = _head(wt, rank, 2)
        res = {}
        for kind in KINDS:
            res[kind] = _grads(lambda x: hidden_teacher_kl(
                x, ht.float(), head, group=group, kind=kind, temperature=tt.float(),
                chunk_tokens=4), [z.float()[:, rank * vl:(rank + 1) * vl]], w)
            res["fused_" + kind] = _grads(lambda h, w_: fused_hidden_kl(
                h, w_, ht.float(), head, group=group, kind=kind, temperature=tt.float(),
                chunk_tokens=5), [hs.float(), ws.float()[rank * vl:(rank + 1) * vl]], w)
        ids = torch.tensor([[0, V - 1, 6, 7]] * N)
        res["logprobs"] = teacher_logprobs_from_hidden(head, ht.float(), ids, group=group,
                                                       temperature=tt.float(), chunk_tokens=4)
        # the learner's loss on vocab-sharded logits with this rank's rows of the teacher head
        for terms in (["lsm"], ["aopd"], ["vopd", "sampled_token_opd"]):
            res["learner_" + "+".join(terms)] = _learner_loss(terms, rank, 2, group)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def test_tp2_gloo_equals_one_rank(tmp_path):
    mp.spawn(_tp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    z, ht, wt, hs, ws, w, tt = _inputs(5)
    head = _head(wt)
    for kind in KINDS:
        one, (g1,) = _grads(lambda x: hidden_teacher_kl(x, ht.float(), head, kind=kind,
                                                        temperature=tt.float(), chunk_tokens=4),
                            [z.float()], w)
        for r in range(2):
            torch.testing.assert_close(ranks[r][kind][0], one, atol=1e-5, rtol=1e-5)
        assert torch.equal(ranks[0][kind][0], ranks[1][kind][0])  # replicated
        full = torch.cat([ranks[0][kind][1][0], ranks[1][kind][1][0]], dim=1)
        torch.testing.assert_close(full, g1, atol=1e-5, rtol=1e-5)
        onef, gf = _grads(lambda h, w_: fused_hidden_kl(h, w_, ht.float(), head, kind=kind,
                                                        temperature=tt.float(), chunk_tokens=5),
                          [hs.float(), ws.float()], w)
        for r in range(2):
            torch.testing.assert_close(ranks[r]["fused_" + kind][0], onef, atol=1e-5, rtol=1e-5)
            # the hidden's gradient is all-reduced: the full one on every rank
            torch.testing.assert_close(ranks[r]["fused_" + kind][1][0], gf[0], atol=1e-5, rtol=1e-5)
        wfull = torch.cat([ranks[0]["fused_" + kind][1][1], ranks[1]["fused_" + kind][1][1]], 0)
        torch.testing.assert_close(wfull, gf[1], atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[0, V - 1, 6, 7]] * N)
    ref = torch.log_softmax(ht @ wt[:V].T / tt[:, None], -1).gather(1, ids)
    for r in range(2):
        torch.testing.assert_close(ranks[r]["logprobs"].double(), ref, atol=2e-5, rtol=1e-5)
    for terms in (["lsm"], ["aopd"], ["vopd", "sampled_token_opd"]):
        name = "learner_" + "+".join(terms)
        loss, grad = _learner_loss(terms, 0, 1, None)
        full = torch.cat([ranks[0][name][1], ranks[1][name][1]], dim=-1)
        for r in range(2):
            torch.testing.assert_close(ranks[r][name][0], loss, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(full, grad, rtol=1e-8, atol=1e-10)


# --- a tiny transformers checkpoint --------------------------------------------------------

@pytest.fixture(scope="module", params=["untied", "tied"])
def tiny_ckpt(request, tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(7)
    cfg = Qwen3Config(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                      tie_word_embeddings=request.param == "tied")
    model = Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # a head different from the embedding where untied
        if request.param == "untied":
            model.lm_head.weight.normal_(0, 0.5)
        model.model.embed_tokens.weight.normal_(0, 0.5)
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out, safe_serialization=True)
    return request.param, out, model


def test_from_hf_rows_and_logprobs_equal_transformers(tiny_ckpt):
    tied, path, model = tiny_ckpt
    w = model.get_output_embeddings().weight.detach()
    if tied == "tied":
        assert torch.equal(w, model.model.embed_tokens.weight)
    for tp, padded in ((1, None), (2, 40)):
        for rank in range(tp):
            head = TeacherHead.from_hf(str(path), tp_rank=rank, tp_size=tp,
                                       padded_vocab_size=padded)
            vl = head.v_local
            assert head.vocab_size == 37 and vl == (37 if padded is None else 40 // tp)
            lo, hi = rank * vl, min((rank + 1) * vl, 37)
            assert torch.equal(head.weight[:hi - lo], w[lo:hi])
            assert torch.equal(head.weight[hi - lo:], torch.zeros_like(head.weight[hi - lo:]))
    ids = torch.tensor([[3, 9, 1, 36, 20, 5]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    ref = torch.log_softmax(out.logits[0].float(), -1)
    h = out.hidden_states[-1][0]
    head = TeacherHead.from_hf(str(path))
    got = teacher_logprobs_from_hidden(head, h, torch.arange(37).expand(6, 37))
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_no_buffer_beyond_a_chunk(kind):
    """Forward + backward allocate nothing larger than one float32 [chunk, V] block, except the
    student logits' gradient; fused, not even that (its gradients are [N, d] and [V, d])."""
    n, vocab, d, chunk = 96, 80, 4, 8
    head = TeacherHead(torch.randn(vocab, d), vocab_size=vocab)
    ht, hs, ws = torch.randn(n, d), torch.randn(n, d, requires_grad=True), torch.randn(vocab, d, requires_grad=True)
    z = torch.randn(n, vocab, requires_grad=True)
    probe = AllocationProbe(chunk * vocab * 4, [z, ht, hs, ws, head.weight])
    with probe:
        hidden_teacher_kl(z, ht, head, kind=kind, chunk_tokens=chunk).sum().backward()
    assert {(a.data_ptr, a.nbytes) for a in probe.big} == {(z.grad.untyped_storage().data_ptr(), n * vocab * 4)}
    probe = AllocationProbe(chunk * vocab * 4, [z, ht, hs, ws, head.weight])
    with probe:
        fused_hidden_kl(hs, ws, ht, head, kind=kind, chunk_tokens=chunk).sum().backward()
    assert probe.big == []


# --- the learner's loss with teacher.signal=hidden -----------------------------------------

def _hidden_case(seed: int):
    """test_objective_library's micro-batch with its whole teacher distribution as "top-K"
    (K = V) and, for the hidden path, teacher hidden states whose head (the identity: D = V) gives
    the same teacher at each sample's teacher temperature (h = teacher logits x T_q)."""
    from test_objective_library import B as B_, T as T_, V as V_, _batch

    z, d = _batch(seed, full_teacher=True)
    lq = torch.full((B_, T_, V_), 0.0, dtype=torch.float64)
    lq.scatter_(-1, d["teacher_topk_ids"], d["teacher_topk_logprobs"].double())
    lq = torch.log_softmax(lq, -1)  # the fp32-rounded log-probs, normalised again in float64
    hidden = dict(d)
    hidden["teacher_hidden"] = lq * d["teacher_temperature"].double()[:, None, None]
    for name in ("teacher_topk_ids", "teacher_topk_logprobs"):
        hidden.pop(name)
    head = TeacherHead(weight=torch.eye(V_, dtype=torch.float64), vocab_size=V_)
    return z, d, hidden, head, lq


def _learner_loss(terms, rank: int, tp: int, group):
    """(loss, gradient w.r.t. this rank's logits shard) of the learner's loss fn with the hidden
    teacher, on rank `rank` of `tp` (vocabulary 20 split in halves, head rows alike)."""
    from test_objective_library import _cfg

    z, _, hidden, head, _ = _hidden_case(3)
    vl = z.shape[-1] // tp
    shard = TeacherHead(weight=head.weight[rank * vl:(rank + 1) * vl].clone(),
                        vocab_size=head.vocab_size, tp_rank=rank, tp_size=tp)
    loss, g, _ = _loss(_cfg(terms), z[..., rank * vl:(rank + 1) * vl].contiguous(), hidden, shard,
                       group=group)
    return loss, g


def _loss(cfg, z, d, head=None, group=None):
    from megatron_opd.learner.losses import objective_fields, objective_loss_fn
    from megatron_opd.learner.train_step import MicroBatch

    fields = objective_fields(cfg, hidden=head is not None)
    mb = MicroBatch(torch.zeros(z.shape[0], z.shape[1], dtype=torch.long),
                    {f: d[f] for f in fields if f in d})
    zt = z.clone().requires_grad_()
    s, n, metrics = objective_loss_fn(cfg, group, teacher_head=head)(zt, mb)
    loss = s / n
    (g,) = torch.autograd.grad(loss, zt)
    return loss.detach(), g, {k: (v / c).detach() for k, (v, c) in metrics.items()}


@pytest.mark.parametrize("terms", [["lsm"], ["vopd"], ["sampled_token_opd"]])
def test_learner_loss_with_hidden_equals_the_full_vocabulary_topk_path(terms):
    """lsm on the whole vocabulary is the exact reverse KL, vopd's KL the exact one, k_t takes
    log q(y_t) from the head: equal (value and gradient) to the top-K path given K = V, even when
    the fleet's sampled log-probs are off (the head's replace them)."""
    from test_objective_library import _cfg

    z, d, hidden, head, lq = _hidden_case(1)
    cfg = _cfg(terms, **({"vopd.support": "full"} if terms == ["vopd"] else {}))
    exact = lq.gather(-1, d["response_ids"][..., None])[..., 0]  # float64 (the batch's is fp32)
    d["teacher_logprobs"] = torch.where(d["loss_mask"] > 0, exact, d["teacher_logprobs"].double())
    ref, gref, mref = _loss(cfg, z, d)
    hidden["teacher_logprobs"] = d["teacher_logprobs"] + 0.5 * (d["loss_mask"] > 0)
    got, g, m = _loss(cfg, z, hidden, head)
    assert abs(ref.item()) > 1e-3 and gref.abs().max() > 1e-4
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g, gref, rtol=1e-8, atol=1e-10)
    # the exact reverse KL at the teacher temperatures, from the full logits
    tq = d["teacher_temperature"].double()[:, None, None]
    lp = torch.log_softmax(z[:, :-1] / tq, -1)
    lqt = torch.log_softmax(hidden["teacher_hidden"] / tq, -1)
    kl = (lp.exp() * (lp - lqt)).sum(-1)
    mask = d["loss_mask"].double()
    torch.testing.assert_close(m["kl_exact"], (kl * mask).sum() / mask.sum(), rtol=1e-9, atol=1e-10)


def test_learner_aopd_with_hidden_uses_the_exact_forward_kl():
    """AOPD's gated tokens train the forward KL(q || pi) over the whole vocabulary: the loss equals
    aopd_loss given that KL computed in float64 from the full logits (value and gradient)."""
    from test_objective_library import _cfg

    from megatron_opd.objectives.compose import ObjectiveInputs, objective_loss

    z, _, hidden, head, _ = _hidden_case(2)
    cfg = _cfg(["aopd"])
    got, g, m = _loss(cfg, z, hidden, head)
    zr = z.clone().requires_grad_()
    t_ratio = hidden["temperature"].double()[:, None]
    tq = hidden["teacher_temperature"].double()[:, None, None]
    lp_all = torch.log_softmax(zr[:, :-1] / tq, -1)
    lq = torch.log_softmax(hidden["teacher_hidden"] / tq, -1)
    ids = hidden["response_ids"][..., None]
    logprobs = torch.log_softmax(zr[:, :-1] / t_ratio[..., None], -1).gather(-1, ids)[..., 0]
    inp = ObjectiveInputs(
        mask=hidden["loss_mask"], response_ids=hidden["response_ids"], logprobs=logprobs,
        behaviour_logprobs=hidden["behaviour_logprobs"],
        teacher_logprobs=lq.gather(-1, ids)[..., 0], logsumexp=torch.zeros_like(logprobs),
        distill_logprobs=lp_all.gather(-1, ids)[..., 0].detach(),
        distill_logsumexp=torch.zeros_like(logprobs),
        hidden_forward_kl=(lq.exp() * (lq - lp_all)).sum(-1),
        hidden_reverse_kl=(lp_all.exp() * (lp_all - lq)).sum(-1))
    ref, n, mr = objective_loss(inp, cfg)
    (gref,) = torch.autograd.grad(ref, zr)
    assert 0 < m["aopd/aopd_gate_fraction"] < 1  # both branches train
    torch.testing.assert_close(got, ref.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g, gref, rtol=1e-8, atol=1e-10)


def test_config_accepts_full_distribution_terms_with_hidden_and_names_the_clamp():
    from pathlib import Path

    from megatron_opd.config import ConfigError, load_config

    qs = Path(__file__).resolve().parents[1] / "configs/quickstart.yaml"
    for term in ("lsm", "aopd", "vopd"):  # no top-K needed: the full distribution replaces it
        cfg = load_config(qs, ["teacher.signal=hidden", "teacher.top_k=0", f"objective.name={term}"])
        assert cfg.objective.terms == [term] and cfg.teacher.signal == "hidden"
    with pytest.raises(ConfigError, match=r"^objective.terms: lsm needs the teacher's top-K"):
        load_config(qs, ["teacher.signal=sampled", "objective.name=lsm"])
    with pytest.raises(ConfigError, match=r"^objective.lsm.log_ratio_clamp: must be 0 with"):
        load_config(qs, ["teacher.signal=hidden", "objective.name=lsm",
                         "objective.lsm.log_ratio_clamp=5"])
