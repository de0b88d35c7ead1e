"""Which temperature each side of the loss is at (ALGORITHMS.md "Conventions";
docs/temperatures.md), against float64 references written from the formulas:
- ratios against mu (r_s, r_d, the clip, the PG log-prob) use the student at the sample's sampler
  temperature T (`objective.use_sampler_temperature`, default on; off: 1), like mu itself;
- every distillation quantity (k_t, LSM's / AOPD's top-K log-probs and log-normaliser, vOPD's KL,
  TIP's divergence, kl_sample) uses the student at the sample's `teacher_temperature` T_q, the
  temperature the teacher was scored at (teacher.temperature, carried on the sample);
- hence the sampled-token OPD expected gradient is (lambda / T) pi_T (k_Tq - E_{pi_T} k_Tq), zero
  exactly at pi_Tq = q; with T = T_q it is lambda * grad KL(pi_T || q);
- with both temperatures equal on every sample one statistics pass serves both sides, and the
  loss is bit-identical to the single-temperature loss.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_opd.config import ObjectiveConfig
from megatron_opd.learner.losses import objective_fields, objective_loss_fn
from megatron_opd.learner.train_step import MicroBatch
import megatron_opd.objectives.compose as compose

B, T, V, K = 3, 4, 7, 3
# a mixed batch (each sample is scaled by its own T); exact in float32, as the batch carries T
TEMPS = [1.0, 0.625, 1.75]


def _cfg(terms=("sampled_token_opd",), **kw) -> ObjectiveConfig:
    cfg = ObjectiveConfig(terms=list(terms))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _batch(seed: int = 0, temps=TEMPS, teacher_temps=(1.0, 1.0, 1.0)):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 2
    lq = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, V, (B, T), generator=g)
    top = lq.topk(K, dim=-1)
    t = torch.tensor(temps, dtype=torch.float64)[:, None, None]
    mu = torch.log_softmax(z[:, :T] / t, -1).gather(-1, y[..., None]).squeeze(-1)  # SGLang's
    d = {"response_index": torch.arange(T).expand(B, T).clone(), "response_ids": y,
         "loss_mask": torch.ones(B, T), "behaviour_logprobs": mu.float(),
         "teacher_logprobs": lq.gather(-1, y[..., None]).squeeze(-1).float(),
         "teacher_topk_ids": top.indices, "teacher_topk_logprobs": top.values.float(),
         "temperature": torch.tensor(temps, dtype=torch.float32),
         "teacher_temperature": torch.tensor(teacher_temps, dtype=torch.float32)}
    return z, d


def _inputs_seen_by_objective(monkeypatch, cfg, z, d):
    """Run the learner's loss fn and return the ObjectiveInputs it handed to the objective."""
    seen = {}
    real = compose.objective_loss

    def spy(inp, *args, **kwargs):
        seen["inp"] = inp
        return real(inp, *args, **kwargs)
    monkeypatch.setattr(compose, "objective_loss", spy)
    fields = objective_fields(cfg)
    mb = MicroBatch(torch.zeros(z.shape[0], z.shape[1], dtype=torch.long),
                    {f: d[f] for f in fields})
    out = objective_loss_fn(cfg, None)(z, mb)
    return seen["inp"], out


def _logsoftmax_at(z, temps, ids):
    t = torch.tensor(temps, dtype=torch.float64)[:, None, None]
    return torch.log_softmax(z[:, :T] / t, -1).gather(-1, ids[..., None]).squeeze(-1)


TEACHER_TEMPS = [1.25, 0.75, 1.0]  # exact in float32


@pytest.mark.parametrize("use_t", [True, False])
@pytest.mark.parametrize("temps, teacher_temps", [
    (TEMPS, [1.0] * B), ([1.0] * B, [1.0] * B), (TEMPS, TEACHER_TEMPS), (TEMPS, TEMPS)])
def test_ratio_side_at_the_sampler_temperature_distillation_at_the_teachers(
        monkeypatch, use_t, temps, teacher_temps):
    """log pi(y_t) (ratio side) is that of z / T with the sample's T (switch on), of z (off); the
    distillation inputs (log pi(y_t), the log-normaliser, the logits at the teacher's top-K ids)
    are those of z / T_q with the sample's teacher_temperature. Where the two agree on every
    sample there is no second set (None: the objective reads the ratio side's); the teacher's
    values pass unchanged."""
    z, d = _batch(1, temps, teacher_temps)
    cfg = _cfg(["lsm", "sampled_token_opd"], use_sampler_temperature=use_t)
    inp, _ = _inputs_seen_by_objective(monkeypatch, cfg, z, d)
    ratio_t = temps if use_t else [1.0] * B
    y = d["response_ids"]
    torch.testing.assert_close(inp.logprobs, _logsoftmax_at(z, ratio_t, y), rtol=1e-12,
                               atol=1e-12)
    tq = torch.tensor(teacher_temps, dtype=torch.float64)[:, None, None]
    zq = z[:, :T] / tq
    same = ratio_t == teacher_temps
    lp = inp.logprobs if same else inp.distill_logprobs
    lse = inp.logsumexp if same else inp.distill_logsumexp
    top = inp.topk_logits if same else inp.distill_topk_logits
    if same:
        assert inp.distill_logprobs is inp.distill_logsumexp is inp.distill_topk_logits is None
    torch.testing.assert_close(lp, _logsoftmax_at(z, teacher_temps, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(zq, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(top, zq.gather(-1, d["teacher_topk_ids"]), rtol=1e-12,
                               atol=1e-12)
    if not same:  # the other temperature would be measurably different
        assert (inp.distill_logprobs - inp.logprobs).abs().max() > 1e-2
    assert inp.teacher_logprobs is d["teacher_logprobs"]  # no temperature applied to q
    assert inp.teacher_topk_logprobs is d["teacher_topk_logprobs"]


def test_on_policy_ratio_is_one_only_with_the_sampler_temperature(monkeypatch):
    """mu is what SGLang reports: log_softmax(z / T). With the switch on, r = pi_T / mu_T = 1 on
    fresh samples (whatever the teacher's temperature); off, r = pi_1 / mu_T != 1 although
    nothing is stale."""
    z, d = _batch(2, teacher_temps=TEACHER_TEMPS)
    _, (_, _, m_on) = _inputs_seen_by_objective(monkeypatch, _cfg(), z, d)
    s, c = m_on["sampled_token_opd/ratio_mean"]
    assert (s / c).item() == pytest.approx(1.0, abs=1e-6)  # mu travels as float32
    inp_off, _ = _inputs_seen_by_objective(monkeypatch, _cfg(use_sampler_temperature=False), z, d)
    r = torch.exp(inp_off.logprobs - d["behaviour_logprobs"].double())
    assert (r[1:] - 1).abs().max() > 0.05  # the T = 0.625, 1.75 samples
    torch.testing.assert_close(r[0], torch.ones(T, dtype=torch.float64), atol=1e-6, rtol=0)


def test_kl_sample_metric_is_at_the_teachers_temperature(monkeypatch):
    z, d = _batch(3, teacher_temps=TEACHER_TEMPS)
    _, (_, n, m) = _inputs_seen_by_objective(monkeypatch, _cfg(), z, d)
    k = _logsoftmax_at(z, TEACHER_TEMPS, d["response_ids"]) - d["teacher_logprobs"].double()
    s, c = m["kl_sample"]
    torch.testing.assert_close(s / c, k.mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("terms", [["lsm"], ["aopd"], ["vopd"], ["sampled_token_opd"]])
def test_distillation_reads_only_the_teachers_temperature(monkeypatch, terms):
    """Change the sampler temperature but not the teacher's (and mu so that every sample stays
    fresh: r = 1): the distillation quantities do not move. LSM is a pure distillation loss, so
    its value and gradient are those of the same batch sampled at T_q."""
    z, d = _batch(4, TEMPS, TEACHER_TEMPS)
    z2, d2 = _batch(4, TEACHER_TEMPS, TEACHER_TEMPS)
    assert torch.equal(z, z2)
    cfg = _cfg(terms, aopd=dataclasses.replace(_cfg().aopd, tau=-0.05))
    a, (_, _, ma) = _inputs_seen_by_objective(monkeypatch, cfg, z, d)
    b, (_, _, mb) = _inputs_seen_by_objective(monkeypatch, cfg, z2, d2)
    torch.testing.assert_close(a.distill_logprobs, b.logprobs, rtol=1e-12, atol=1e-12)
    if terms != ["sampled_token_opd"]:
        torch.testing.assert_close(a.distill_topk_logits, b.topk_logits, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.distill_logsumexp, b.logsumexp, rtol=1e-12, atol=1e-12)
    own = {"lsm": ["lsm/lsm_kl"], "aopd": ["aopd/aopd_gate_fraction", "aopd/aopd_local_kl"],
           "vopd": ["vopd/vopd_closed_form_kl"],
           "sampled_token_opd": ["sampled_token_opd/advantage_p50"]}[terms[0]]
    for key in ["kl_sample", *own]:
        torch.testing.assert_close(ma[key][0], mb[key][0], rtol=1e-9, atol=1e-12)
    if terms == ["aopd"]:
        assert 0 < ma["aopd/aopd_gate_fraction"][0] / ma["aopd/aopd_gate_fraction"][1] < 1
    if terms == ["lsm"]:
        ga = torch.autograd.grad(_loss(cfg, z, d), z)[0]
        gb = torch.autograd.grad(_loss(cfg, z2, d2), z2)[0]
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


def _loss(cfg, z, d):
    mb = MicroBatch(torch.zeros(z.shape[0], z.shape[1], dtype=torch.long),
                    {f: d[f] for f in objective_fields(cfg)})
    z.requires_grad_(True)
    loss_sum, n, _ = objective_loss_fn(cfg, None)(z, mb)
    return loss_sum / n


@pytest.mark.parametrize("terms", [["sampled_token_opd"], ["lsm", "sampled_token_opd"],
                                   ["aopd"], ["vopd"], ["grpo_opd"]])
@pytest.mark.parametrize("temp", [1.0, 0.625])
def test_equal_temperatures_take_one_pass_and_are_bit_identical(monkeypatch, terms, temp):
    """T = T_q on every sample (the default: both 1): one statistics pass, and loss and gradient
    bit-identical to the single-temperature loss (ObjectiveInputs built from that one pass, no
    distillation inputs: what the loss computed before the split)."""
    import megatron_opd.learner.losses as losses
    from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats

    z, d = _batch(5, [temp] * B, [temp] * B)
    d["sample_advantages"] = torch.tensor([0.5, -1.0, 0.25])
    cfg = _cfg(terms, log_entropy=True)
    calls = []

    def counting(*a, **kw):
        calls.append(kw.get("temperature"))
        return vocab_parallel_token_stats(*a, **kw)
    monkeypatch.setattr(losses, "vocab_parallel_token_stats", counting)
    zt = z.clone().requires_grad_(True)
    got = _loss(cfg, zt, d)
    (g_got,) = torch.autograd.grad(got, zt)
    assert len(calls) == 1 and (calls[0] is None) == (temp == 1.0)

    # the single-temperature reference: one pass, the objective on its statistics alone
    zr = z.clone().requires_grad_(True)
    pos = d["response_index"]
    tt = None if temp == 1.0 else d["temperature"][:, None].expand(pos.shape)
    st = vocab_parallel_token_stats(zr, d["response_ids"], entropy=True,
                                    topk_ids=d["teacher_topk_ids"], temperature=tt,
                                    positions=pos)
    inp = compose.ObjectiveInputs(
        mask=d["loss_mask"], response_ids=d["response_ids"], logprobs=st.logprobs,
        behaviour_logprobs=d["behaviour_logprobs"], teacher_logprobs=d["teacher_logprobs"],
        logsumexp=st.logsumexp, entropy=st.entropy.detach(), topk_logits=st.topk_logits,
        teacher_topk_logprobs=d["teacher_topk_logprobs"],
        sample_advantages=d["sample_advantages"])
    ref, _, _ = compose.objective_loss(inp, cfg)
    (g_ref,) = torch.autograd.grad(ref, zr)
    assert torch.equal(got.detach(), ref.detach())
    assert torch.equal(g_got, g_ref)


def test_unequal_temperatures_take_a_second_pass_at_the_teachers(monkeypatch):
    import megatron_opd.learner.losses as losses
    from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats

    z, d = _batch(6, TEMPS, TEACHER_TEMPS)
    calls = []

    def counting(*a, **kw):
        calls.append(kw)
        return vocab_parallel_token_stats(*a, **kw)
    monkeypatch.setattr(losses, "vocab_parallel_token_stats", counting)
    _loss(_cfg(["lsm", "sampled_token_opd"]), z, d)
    assert len(calls) == 2
    assert calls[0]["topk_ids"] is None  # the top-K logits are a distillation quantity
    assert calls[1]["topk_ids"] is d["teacher_topk_ids"] and not calls[1].get("entropy")
    assert calls[1]["temperature"][:, 0].tolist() == TEACHER_TEMPS


def test_teacher_is_scored_at_the_requested_temperature():
    """SGLangClient.score asks SGLang for the temperature it is given (the orchestrator passes
    teacher.temperature; our servers apply it to prompt tokens, tests/test_teacher_fleet.py) and
    returns the log-probs unchanged; a temperature that is not positive is refused."""
    from megatron_opd.serving.sglang_client import SGLangClient

    sent = {}
    lp = [-0.25, -1.5, -3.0]

    def fake_post(path, payload, check=None):
        sent["path"], sent["payload"] = path, payload
        ids = payload["input_ids"][0]
        entries = [[None, ids[0], None]] + [[v, t, None] for v, t in zip(lp, ids[1:])]
        return {"meta_info": {"input_token_logprobs": entries}}, "http://fake"

    client = SGLangClient("http://fake")
    client._post_retrying = fake_post
    for t in (1.0, 0.7):
        (res,) = client.score([[5, 6, 7, 8]], start=[1], temperature=t)
        assert sent["payload"]["sampling_params"] == {"max_new_tokens": 0, "temperature": t}
        np.testing.assert_array_equal(res.logprobs, np.asarray(lp, dtype=np.float32))
    sent.clear()
    with pytest.raises(ValueError, match="temperature"):
        client.score([[5, 6, 7, 8]], start=[1], temperature=0.0)
    assert not sent  # nothing asked


def test_teacher_temperature_is_a_validated_config_value():
    """Any positive temperature: our servers score at the request's temperature (the compat
    patch; checked against transformers in tests/test_teacher_fleet.py)."""
    from megatron_opd.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[1]
    assert load_config(root / "configs/quickstart.yaml", []).teacher.temperature == 1.0
    assert load_config(root / "configs/quickstart.yaml",
                       ["teacher.temperature=0.7"]).teacher.temperature == 0.7
    for bad in ("0", "-1", ".nan"):
        with pytest.raises(ConfigError, match="^teacher.temperature: "):
            load_config(root / "configs/quickstart.yaml", [f"teacher.temperature={bad}"])


def test_teacher_temperature_travels_with_the_sample():
    """A per-sample number of the field table, in every objective's micro-batch."""
    from megatron_opd import sample_fields

    (f,) = [f for f in sample_fields.FIELDS if f.name == "teacher_temperature"]
    assert f.source == sample_fields.SCALAR and f.reads == "always" and f.store == "float64"
    assert "teacher_temperature" in objective_fields(_cfg())


# --- the fixed point of sampled-token OPD -------------------------------------------------------
#
# A one-step bandit: one context, logits z over V tokens, sampler temperature T, teacher scored at
# T_q. The learner's loss is evaluated on one fresh sample y at a time (mu = pi_T, as SGLang
# reports it) and its gradient averaged with y's sampling probability pi_T(y): the exact
# expected gradient.

def _expected_gradient(z: torch.Tensor, lq: torch.Tensor, temp: float, cfg,
                       t_teacher: float = 1.0) -> torch.Tensor:
    pi_t = torch.softmax(z / temp, -1)
    total = torch.zeros_like(z)
    for y in range(V):
        # mu and q in float64 (the fleets send float32): fixed points are checked to 1e-12
        d = {"response_index": torch.zeros(1, 1, dtype=torch.long),
             "response_ids": torch.tensor([[y]]), "loss_mask": torch.ones(1, 1),
             "behaviour_logprobs": torch.log(pi_t[y]).reshape(1, 1),
             "teacher_logprobs": lq[y].reshape(1, 1),
             "temperature": torch.tensor([temp], dtype=torch.float32),
             "teacher_temperature": torch.tensor([t_teacher], dtype=torch.float32)}
        zt = z.detach().reshape(1, 1, V).clone().requires_grad_(True)
        mb = MicroBatch(torch.zeros(1, 1, dtype=torch.long),
                        {f: d[f] for f in objective_fields(cfg)})
        loss_sum, n, _ = objective_loss_fn(cfg, None)(zt, mb)
        (g,) = torch.autograd.grad(loss_sum / n, zt)
        total += pi_t[y] * g.reshape(V)
    return total


def _grad_reverse_kl(z, lq, temp, lam):
    """lambda * d/dz KL(softmax(z / T) || q), written out:
    (lambda / T) p_v (log p_v - log q_v - KL)."""
    logp = torch.log_softmax(z / temp, -1)
    p = logp.exp()
    kl = (p * (logp - lq)).sum()
    return lam / temp * p * (logp - lq - kl)


def _pinned_gradient(z, lq, temp, lam, t_teacher=1.0):
    """ALGORITHMS.md's split, written out: samples y ~ pi_T, ratio against mu_T (=1 when fresh,
    gradient grad log pi_T(y) = (e_y - pi_T) / T), advantage from the student at the teacher's
    scoring temperature: A = -lambda (log pi_Tq(y) - log q(y)) = -lambda k(y).
    E[-A grad log pi_T] = (lambda / T) pi_T (k - E_{pi_T} k): the score-function form of
    lambda grad KL(pi_Tq || q) = (lambda / T_q) sum_y pi_Tq(y) k(y) (e_y - pi_Tq), with the
    sampling measure pi_Tq reweighted to pi_T (what mu = pi_T provides, ratio 1) and the score
    taken at T. Zero exactly where k is constant over the vocabulary: pi_Tq = q."""
    logp_t = torch.log_softmax(z / temp, -1)
    p_t = logp_t.exp()
    k = torch.log_softmax(z / t_teacher, -1) - lq
    return lam / temp * p_t * (k - (p_t * k).sum())


def _bandit(seed=5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(V, generator=g, dtype=torch.float64)
    lq = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, -1)
    return z, lq


@pytest.mark.parametrize("temp, t_teacher", [(0.75, 1.0), (1.5, 1.0), (0.625, 1.25),
                                             (1.25, 0.75), (1.0, 1.0)])
def test_expected_gradient_is_the_pinned_split(temp, t_teacher):
    z, lq = _bandit()
    got = _expected_gradient(z, lq, temp, _cfg(kl_coef=0.5), t_teacher)
    want = _pinned_gradient(z, lq, temp, 0.5, t_teacher)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    if temp != t_teacher:  # not the gradient of KL(pi_T || q), nor of KL(pi_Tq || q) as such
        assert (got - _grad_reverse_kl(z, lq, temp, 0.5)).abs().max() > 1e-3
        assert (got - _grad_reverse_kl(z, lq, t_teacher, 0.5)).abs().max() > 1e-3


def test_pinned_reference_is_the_reweighted_kl_gradient():
    """The reference above, checked against lambda grad KL(pi_Tq || q) written as the sum over
    y (score-function form) with pi_Tq(y) grad log pi_Tq(y) replaced by pi_T(y) grad log pi_T(y);
    with T = T_q it is that gradient itself."""
    z, lq = _bandit(7)
    for temp, tq in ((0.75, 1.0), (1.25, 0.75), (0.9, 0.9)):
        p_t, p_q = torch.softmax(z / temp, -1), torch.softmax(z / tq, -1)
        k = torch.log(p_q) - lq
        eye = torch.eye(V, dtype=torch.float64)
        reweighted = sum(p_t[y] * k[y] * (eye[y] - p_t) / temp for y in range(V))
        torch.testing.assert_close(_pinned_gradient(z, lq, temp, 1.0, tq), reweighted,
                                   rtol=1e-12, atol=1e-15)
        kl_form = sum(p_q[y] * k[y] * (eye[y] - p_q) / tq for y in range(V))
        torch.testing.assert_close(kl_form, _grad_reverse_kl(z, lq, tq, 1.0), rtol=1e-12,
                                   atol=1e-15)
        if temp == tq:
            torch.testing.assert_close(reweighted, kl_form, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("temp, t_teacher", [(0.75, 1.0), (1.5, 1.0), (0.625, 1.25)])
def test_fixed_point_is_pi_at_the_teachers_temperature_equal_q(temp, t_teacher):
    """z* = T_q log q zeros the expected gradient (every sample's k_t is 0): pi_Tq = q, whatever
    the sampler's T. At pi_T = q instead (z = T log q, the fixed point when the student was
    scored at the sampler's T in the distillation terms too) the gradient is not 0."""
    _, lq = _bandit()
    cfg = _cfg()
    z_star = t_teacher * lq + 0.3  # any shift: softmax is shift-invariant
    assert _expected_gradient(z_star, lq, temp, cfg, t_teacher).abs().max() < 1e-12
    assert _expected_gradient(temp * lq, lq, temp, cfg, t_teacher).abs().max() > 1e-3


def test_switch_off_fixed_point_is_pi_1_equal_q():
    """use_sampler_temperature=false: the ratio side is at T = 1 too, so (teacher at 1) one pass
    serves both sides; pi_1 = q zeros every sample's advantage (a fixed point), and with the clip
    out of the way the ratio pi_1 / mu_T importance-weights the pi_T samples into
    grad KL(pi_1 || q); with the default clip the ratio (not 1 on fresh samples) is clipped and
    the expected gradient is no longer that."""
    z, lq = _bandit()
    temp = 0.625
    assert _expected_gradient(lq.clone(), lq, temp,
                              _cfg(use_sampler_temperature=False)).abs().max() < 1e-12
    wide = _cfg(use_sampler_temperature=False, clip_eps_low=0.999, clip_eps_high=1e6)
    torch.testing.assert_close(_expected_gradient(z, lq, temp, wide),
                               _grad_reverse_kl(z, lq, 1.0, 1.0), rtol=1e-9, atol=1e-12)
    clipped = _expected_gradient(z, lq, temp, _cfg(use_sampler_temperature=False))
    assert (clipped - _grad_reverse_kl(z, lq, 1.0, 1.0)).abs().max() > 1e-3
