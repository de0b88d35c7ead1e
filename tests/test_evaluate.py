"""Held-out evaluation (megatron_opd/learner/evaluate.py, losses.eval_kl_fn) against float64
references written here: the exact full-vocabulary KL, the sampled k1/k3 estimators (unbiased:
with many responses drawn from pi they land within a few standard errors of the exact KL), the
ratio standard error (its formula, and its calibration over repeated evaluations), a padded
vocabulary (ids >= vocab_size absent), TP=2 shards equal to one process, the memory bound of the
sampled path at V = 50k, the teacher request (top_k = 0 unless exact), the atomic JSONL and
which completions are of other weights than the evaluated ones (off_version)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_opd.envs.base import Environment, EnvPrompt, SpecialIds
from megatron_opd.learner.evaluate import (METHOD_EXACT, METHOD_K3, eval_records, kl_inputs,
                                           kl_metrics, off_version, ratio_mean_se,
                                           write_jsonl_atomic)
from megatron_opd.learner.losses import EVAL_KL_COLUMNS, eval_kl_fn, sampled_kl_terms
from megatron_opd.learner.train_step import MicroBatch
from megatron_opd.procs import free_port
from megatron_opd.serving.sglang_client import GenerateResult, ScoreResult
from tests.alloc_probe import AllocationProbe

# ----------------------------------------------------------------------------- references


def _problem(seed: int, rows: int, T: int, vocab: int, padded: int, P: int = 3,
             dtype=torch.float64):
    """Logits [rows, P+T, padded] (columns >= vocab hold large junk: they must be ignored),
    teacher log-probs over the true vocabulary [rows, T, vocab], response positions P-1.., a mask
    with varied lengths and responses y ~ pi (softmax over the true vocabulary), drawn here."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, P + T, padded, generator=g, dtype=torch.float64) * 1.5
    z[..., vocab:] = 30.0  # junk in the padded columns
    logq = torch.log_softmax(torch.randn(rows, T, vocab, generator=g, dtype=torch.float64) * 2, -1)
    index = torch.arange(P - 1, P - 1 + T).expand(rows, T).clone()
    lengths = torch.randint(1, T + 1, (rows,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    logp = torch.log_softmax(z[:, P - 1:P - 1 + T, :vocab], -1)
    y = torch.multinomial(logp.exp().reshape(-1, vocab), 1, generator=g).view(rows, T)
    data = {"response_index": index, "response_ids": y, "loss_mask": mask,
            "teacher_logprobs": logq.gather(-1, y[..., None]).squeeze(-1).float(),
            "teacher_full_logprobs": logq.float()}
    return z.to(dtype), data, logp, logq


def _reference_table(logp: torch.Tensor, logq: torch.Tensor, data: dict) -> torch.Tensor:
    """Float64 per-row [k1 sum, k3 sum, tokens, exact KL sum], written from ALGORITHMS.md §1."""
    y, mask = data["response_ids"], data["loss_mask"].double()
    lp = logp.gather(-1, y[..., None]).squeeze(-1)
    lq = data["teacher_logprobs"].double()
    k1 = lp - lq
    r = torch.exp(lq - lp)
    k3 = (r - 1) - torch.log(r)
    p = logp.exp()
    kl = (p * (logp - logq)).sum(-1)
    return torch.stack([(k1 * mask).sum(1), (k3 * mask).sum(1), mask.sum(1), (kl * mask).sum(1)], 1)


def _run_fn(z, data, vocab, exact, mbs=None, tp_group=None, tp_rank=0, chunk_tokens=4096):
    """eval_kl_fn over micro-batches of `mbs` rows, as forward_backward would call it."""
    rows = z.shape[0]
    mbs = mbs or rows
    out: dict = {}
    fn = eval_kl_fn(tp_group, tp_rank, vocab, exact=exact, rows_out=out, chunk_tokens=chunk_tokens)
    with torch.no_grad():
        for j, a in enumerate(range(0, rows, mbs)):
            mb = MicroBatch(torch.zeros(1), {k: v[a:a + mbs] for k, v in data.items()}, index=j)
            fn(z[a:a + mbs].clone(), mb)
    return torch.cat([out[j] for j in sorted(out)])


# ----------------------------------------------------------------------------- estimators


def test_table_matches_float64_reference_with_padded_vocab():
    """Exact KL, k1 and k3 per response equal the float64 reference; the junk in the padded
    columns (ids >= vocab_size) changes nothing; micro-batching changes nothing."""
    vocab, padded = 11, 16
    z, data, logp, logq = _problem(0, rows=6, T=5, vocab=vocab, padded=padded)
    ref = _reference_table(logp, logq, data)
    got = _run_fn(z, data, vocab, exact=True, mbs=2)
    assert got.dtype == torch.float64 and got.shape == (6, len(EVAL_KL_COLUMNS))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # teacher log-probs travel as fp32
    # the same logits without the padded columns: identical
    unpadded = _run_fn(z[..., :vocab].contiguous(), data, vocab, exact=True)
    torch.testing.assert_close(got, unpadded, rtol=1e-12, atol=1e-12)
    # the sampled path gives the same k1/k3 and leaves the exact column at 0
    sampled = _run_fn(z, data, vocab, exact=False)
    torch.testing.assert_close(sampled[:, :3], got[:, :3], rtol=1e-12, atol=1e-12)
    assert (sampled[:, 3] == 0).all()


def test_float32_logits():
    vocab = 9
    z, data, logp, logq = _problem(1, rows=4, T=6, vocab=vocab, padded=vocab, dtype=torch.float32)
    ref = _reference_table(torch.log_softmax(z[:, 2:8].double(), -1), logq, data)
    torch.testing.assert_close(_run_fn(z, data, vocab, exact=True), ref, rtol=1e-4, atol=1e-4)


def test_k1_k3_are_unbiased_within_standard_errors():
    """Many responses drawn from pi: the k1 and k3 token means approach the exact token-mean KL
    (the table's exact column, itself checked above) within 4 standard errors; k3 is >= 0 per
    token (its variance is the smaller one only when q is close to pi: not asserted here)."""
    vocab = 12
    z, data, logp, logq = _problem(2, rows=3000, T=4, vocab=vocab, padded=vocab)
    m = kl_metrics(_run_fn(z, data, vocab, exact=True, mbs=500), exact=True)
    exact = m["eval/reverse_kl"]
    assert m["eval/reverse_kl_method"] == METHOD_EXACT
    for k in ("k1", "k3"):
        se = m[f"eval/reverse_kl_{k}_se"]
        assert 0 < se < 0.05 * exact
        assert abs(m[f"eval/reverse_kl_{k}"] - exact) < 4 * se, (k, m)
    k1, k3 = sampled_kl_terms(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -0.5]))
    assert (k3 >= 0).all() and k1.dtype == torch.float64
    # sampled mode: eval/reverse_kl is the k3 estimate
    ms = kl_metrics(_run_fn(z, data, vocab, exact=False, mbs=500), exact=False)
    assert ms["eval/reverse_kl_method"] == METHOD_K3
    assert ms["eval/reverse_kl"] == ms["eval/reverse_kl_k3"]
    assert ms["eval/reverse_kl_k3"] == pytest.approx(m["eval/reverse_kl_k3"])


def test_teacher_zero_probability_gives_infinite_kl():
    k1, k3 = sampled_kl_terms(torch.tensor([-1.0]), torch.tensor([-math.inf]))
    assert k1.item() == math.inf and k3.item() == math.inf


def test_standard_error_is_the_ratio_formula_and_is_calibrated():
    rng = np.random.default_rng(0)
    s = rng.normal(size=7)
    n = np.array([3, 0, 1, 5, 2, 2, 4], dtype=float)
    mean, se = ratio_mean_se(s, n)
    used = n > 0
    N = n[used].sum()
    K = s[used].sum() / N
    m = used.sum()
    want = 0.0
    for si, ni in zip(s[used], n[used]):
        want += (si - K * ni) ** 2
    assert mean == pytest.approx(K, rel=1e-14)
    assert se == pytest.approx(math.sqrt(m / (m - 1) * want) / N, rel=1e-12)
    assert ratio_mean_se([1.0], [2]) == (0.5, 0.0)
    assert ratio_mean_se([0.0, 0.0], [0, 0]) == (0.0, 0.0)

    # calibration: over repeated independent evaluations the spread of the estimate matches the
    # mean reported standard error. Responses here are exchangeable (every row sees the same
    # per-position distributions, lengths differ); with prompts that differ, the ratio SE also
    # counts prompt-to-prompt variation (a prompt population), so for a fixed prompt set it errs
    # on the large side.
    g = torch.Generator().manual_seed(3)
    vocab, rows, T, reps = 10, 64, 6, 400
    logp = torch.log_softmax(torch.randn(T, vocab, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(T, vocab, generator=g, dtype=torch.float64) * 2, -1)
    logp, logq = logp.expand(rows, T, vocab), logq.expand(rows, T, vocab)
    lengths = torch.randint(1, T + 1, (rows,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    y = torch.multinomial(logp.exp().reshape(-1, vocab), reps, replacement=True, generator=g)
    y = y.T.reshape(reps, rows, T)
    lp = logp.expand(reps, -1, -1, -1).gather(-1, y[..., None]).squeeze(-1)
    lq = logq.expand(reps, -1, -1, -1).gather(-1, y[..., None]).squeeze(-1)
    k1, k3 = sampled_kl_terms(lp, lq)
    for k in (k1, k3):
        est, ses = zip(*[ratio_mean_se((k[i] * mask).sum(1).numpy(), mask.sum(1).numpy())
                         for i in range(reps)])
        assert np.std(est, ddof=1) == pytest.approx(np.mean(ses), rel=0.15)


# ----------------------------------------------------------------------------- TP = 2


def _tp_worker(rank: int, world: int, port: int, out_dir: str, vocab: int, padded: int):
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        tp = dist.new_group([0, 1])
        z, data, _, _ = _problem(4, rows=4, T=5, vocab=vocab, padded=padded)
        v_l = padded // world
        shard = z[..., rank * v_l:(rank + 1) * v_l].contiguous()
        res = {e: _run_fn(shard, data, vocab, exact=e, mbs=2, tp_group=tp, tp_rank=rank)
               for e in (True, False)}
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("vocab", [13, 7])  # 7: rank 1's shard is all padding
def test_tp2_shards_equal_one_process(tmp_path, vocab):
    padded = 16
    mp.spawn(_tp_worker, args=(2, free_port(), str(tmp_path), vocab, padded), nprocs=2, join=True)
    z, data, _, _ = _problem(4, rows=4, T=5, vocab=vocab, padded=padded)
    for e in (True, False):
        want = _run_fn(z, data, vocab, exact=e, mbs=2)
        for r in range(2):
            got = torch.load(tmp_path / f"rank{r}.pt")[e]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- memory, inputs


def test_sampled_path_builds_nothing_vocab_wide_beyond_a_chunk():
    """V = 50k (padded to 50,048), 4 x 16 response tokens, chunks of 8: no storage beyond one
    float32 [chunk, V_local] scratch, i.e. nothing of [rows, T, V] (the exact path builds it)."""
    vocab, padded, rows, T, P, chunk = 50_000, 50_048, 4, 16, 4, 8
    g = torch.Generator().manual_seed(5)
    z = torch.randn(rows, P + T, padded, generator=g)
    data = {"response_index": torch.arange(P - 1, P - 1 + T).expand(rows, T).contiguous(),
            "response_ids": torch.randint(0, vocab, (rows, T), generator=g),
            "loss_mask": torch.ones(rows, T), "teacher_logprobs": -torch.rand(rows, T) * 10}
    out: dict = {}
    fn = eval_kl_fn(None, 0, vocab, exact=False, rows_out=out, chunk_tokens=chunk)
    mb = MicroBatch(torch.zeros(1), data)
    probe = AllocationProbe(bound=chunk * padded * 4, inputs=[z, *data.values()])
    with torch.no_grad(), probe:
        fn(z, mb)
    assert probe.big == []
    assert out[0].shape == (rows, 4) and torch.isfinite(out[0]).all()
    # the exact path on the same input does build [rows, T, V] tensors (what the probe detects)
    fn_exact = eval_kl_fn(None, 0, vocab, exact=True, rows_out={}, chunk_tokens=chunk)
    data_exact = dict(data, teacher_full_logprobs=torch.zeros(rows, T, 1).expand(rows, T, vocab))
    probe = AllocationProbe(bound=chunk * padded * 4, inputs=[z, *data.values()])
    with torch.no_grad(), probe:
        fn_exact(z, MicroBatch(torch.zeros(1), data_exact))
    assert any(shape[-1] >= vocab and math.prod(shape[:-1]) == rows * T
               for shape in (a.shape for a in probe.big))


class _StubTeacher:
    """Answers score() like SGLangClient: log q of every scored token and the top-K."""

    def __init__(self, logq_fn):
        self.calls, self.logq_fn = [], logq_fn

    def score(self, input_ids, *, start, top_k=0):
        self.calls.append({"n": len(input_ids), "start": list(start), "top_k": top_k})
        out = []
        for x, s in zip(input_ids, start):
            lq = [self.logq_fn(x[:j]) for j in range(s, len(x))]  # full vectors
            lp = np.array([row[t] for row, t in zip(lq, x[s:])], dtype=np.float32)
            if top_k:
                order = [np.argsort(-row)[:top_k] for row in lq]
                ids = np.stack(order).astype(np.int32)
                tlp = np.stack([row[o] for row, o in zip(lq, order)]).astype(np.float32)
            else:
                ids, tlp = np.zeros((len(lp), 0), np.int32), np.zeros((len(lp), 0), np.float32)
            out.append(ScoreResult(lp, ids, tlp))
        return out


def _logq_fn(model_vocab: int):
    def f(prefix):
        rng = np.random.default_rng(len(prefix) * 1000 + sum(prefix))
        x = rng.normal(size=model_vocab) * 2
        return x - np.log(np.exp(x).sum())
    return f


def test_kl_inputs_sampled_asks_top_k_0_and_builds_no_vocab_tensor():
    vocab = 152_064
    # the teacher model's vocabulary is padded (vocab + 8): id vocab + 3 exists there, not in the
    # tokenizer's vocabulary; the second response is empty
    teacher = _StubTeacher(_logq_fn(vocab + 8))
    prompts = [[1, 2, 3], [4, 5], [6]]
    responses = [[7, 8], [], [9, 10, vocab + 3]]
    t = kl_inputs(prompts, responses, teacher, vocab, pad=0, mbs=2, exact=False)
    assert teacher.calls == [{"n": 2, "start": [3, 1], "top_k": 0}]
    assert "teacher_full_logprobs" not in t
    for name, x in t.items():
        if isinstance(x, torch.Tensor):
            assert max(x.shape) < 100, name
    assert t["input_ids"].shape == (4, 5)  # rows padded to a multiple of mbs
    assert t["input_ids"][0].tolist() == [1, 2, 3, 7, 8]
    assert t["input_ids"][1].tolist() == [4, 5, 0, 0, 0]
    assert t["response_index"][0, :2].tolist() == [2, 3]
    assert t["response_index"][2].tolist() == [0, 1, 2]
    assert t["loss_mask"].tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert t["response_ids"][2].tolist() == [9, 10, 0] and t["out_of_vocab"] == 1
    lq = _logq_fn(vocab + 8)
    assert t["teacher_logprobs"][0, 1].item() == pytest.approx(lq([1, 2, 3, 7])[8], rel=1e-6)
    assert t["teacher_logprobs"][2, 0].item() == pytest.approx(lq([6])[9], rel=1e-6)


def test_kl_inputs_exact_drops_teacher_ids_beyond_vocab():
    """A teacher with a padded model vocabulary (20 > 16): its top-K over the true vocabulary
    lands by id; ids >= vocab_size are dropped, never indexed."""
    vocab, teacher_vocab = 16, 20
    teacher = _StubTeacher(_logq_fn(teacher_vocab))
    t = kl_inputs([[1, 2]], [[3, 4]], teacher, vocab, pad=0, mbs=1, exact=True)
    assert teacher.calls[0]["top_k"] == vocab
    full = t["teacher_full_logprobs"]
    assert full.shape == (1, 2, vocab)
    lq = _logq_fn(teacher_vocab)
    for j, prefix in enumerate([[1, 2], [1, 2, 3]]):
        row = lq(prefix)
        top = set(np.argsort(-row)[:vocab].tolist())
        for v in range(vocab):
            want = row[v] if v in top else -math.inf
            assert full[0, j, v].item() == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- records


class _TinyEnv(Environment):
    name = "tiny"
    special = SpecialIds(pad=0, eos=1, stop_ids=(1,))

    def train_prompts(self):
        return iter(())

    def eval_prompts(self):
        return []

    @property
    def has_verifier(self):
        return True

    def reward(self, prompt, response_ids):
        return float(list(response_ids) == [5, 1])

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def _gen(ids, finish="stop", version=3):
    return GenerateResult(output_ids=list(ids), output_logprobs=np.zeros(0, np.float32),
                          token_versions=np.full(len(ids), version), weight_version=version,
                          finish_reason=finish)


def test_records_and_atomic_jsonl(tmp_path):
    env = _TinyEnv()
    prompts = [EnvPrompt((2, 3), source="row-0", label="5"), EnvPrompt((4,), source="row-1")]
    gen = {"greedy": [_gen([5, 1]), _gen([6, 6], "length")],
           "sampled": [_gen([5, 7, 1]), _gen([8])],
           "greedy_reward": [1.0, 0.0], "sampled_reward": [0.0, 0.0]}
    table = torch.tensor([[0.3, 0.2, 3.0, 0.25], [math.inf, math.inf, 1.0, 0.0]],
                         dtype=torch.float64)
    recs = eval_records(env, prompts, gen, table, version=3, exact=True)
    path = write_jsonl_atomic(tmp_path / "samples" / "eval-3.jsonl", recs)
    lines = path.read_text().splitlines()
    rows = [json.loads(x) for x in lines]  # strict JSON: no NaN/Infinity literals
    assert len(rows) == 2
    r0 = rows[0]
    assert r0["prompt"] == "w2 w3" and r0["prompt_token_ids"] == [2, 3] and r0["label"] == "5"
    assert r0["source"] == "row-0" and r0["version"] == 3
    assert r0["greedy"] == {"text": "w5 w1", "token_ids": [5, 1], "finish_reason": "stop",
                            "weight_version": 3, "reward": 1.0}
    assert r0["sampled"]["token_ids"] == [5, 7, 1] and r0["sampled"]["text"] == "w5 w7 w1"
    assert r0["sampled"]["k1_sum"] == 0.3 and r0["sampled"]["k3_sum"] == 0.2
    assert r0["sampled"]["kl_tokens"] == 3 and r0["sampled"]["exact_kl_sum"] == 0.25
    assert rows[1]["greedy"]["finish_reason"] == "length"
    assert rows[1]["sampled"]["k1_sum"] == "inf"
    assert sorted(os.listdir(path.parent)) == ["eval-3.jsonl"]

    # a failure mid-write leaves the previous file intact and no temporary behind
    before = path.read_bytes()
    bad = recs + [{"x": object()}]
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, bad)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["eval-3.jsonl"]


def test_records_without_verifier_have_no_reward():
    class NoVerifier(_TinyEnv):
        @property
        def has_verifier(self):
            return False

    env = NoVerifier()
    gen = {"greedy": [_gen([5, 1])], "sampled": [_gen([5, 1])], "greedy_reward": None,
           "sampled_reward": None}
    rec = eval_records(env, [EnvPrompt((2,), source="a")], gen,
                       torch.zeros(1, 4, dtype=torch.float64), version=0, exact=False)[0]
    assert "reward" not in rec["greedy"] and "exact_kl_sum" not in rec["sampled"]
    assert "label" not in rec


def test_off_version_finds_completions_not_made_entirely_by_the_evaluated_weights():
    spanning = _gen([5, 6, 7], version=4)
    spanning.token_versions = np.array([3, 4, 4])  # the weights changed mid-completion
    results = [_gen([5, 1], version=4), _gen([5, 1], version=3), spanning, _gen([], version=4),
               _gen([], version=2)]
    assert off_version(results, 4) == [1, 2, 4]
    assert off_version(results, 3) == [0, 2, 3, 4]
    assert off_version([], 4) == []


def test_kl_metrics_without_tokens():
    m = kl_metrics(torch.zeros(2, 4, dtype=torch.float64), exact=False)
    assert m["eval/reverse_kl"] == 0.0 and m["eval/kl_tokens"] == 0.0

