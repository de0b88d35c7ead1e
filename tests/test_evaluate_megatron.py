"""`evaluate` end to end in a world of one with a real megatron-core model and stand-in servers:
its metrics and JSONL rows equal float64 values computed here from the same model's logits
(called directly, outside the pipeline schedule), in the exact mode and in the sampled one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megatron_opd.envs.base import Environment, EnvPrompt, SpecialIds
from megatron_opd.serving.sglang_client import GenerateResult, ScoreResult

VOCAB = 30  # padded to 32 rows in megatron (make_vocab_size_divisible_by=8)
STOP = 1


@pytest.fixture(scope="module")
def world():
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig, TrainConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.learner.train_step import wrap_for_training
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_opd.models.spec import MoEModelSpec

    install_megatron_cpu_compat()
    layout = ParallelConfig(micro_batch_size=2)
    groups = init_distributed(layout, seed=0)
    spec = MoEModelSpec(vocab_size=VOCAB, make_vocab_size_divisible_by=8)
    torch.manual_seed(0)
    chunks = build_model_chunks(spec, transformer_config(spec, layout=layout))
    ddp, _, _ = wrap_for_training(chunks, TrainConfig(steps=10, distributed_optimizer=False),
                                  groups)
    yield groups, ddp, chunks
    destroy_distributed()


class _Env(Environment):
    name = "test"
    special = SpecialIds(pad=0, eos=STOP, stop_ids=(STOP,))

    def train_prompts(self):
        return iter(())

    def eval_prompts(self):
        return []

    @property
    def has_verifier(self):
        return True

    def reward(self, prompt, response_ids):
        return float(len(response_ids) > 0 and response_ids[0] == prompt.token_ids[0])

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


class _Rollout:
    """Greedy: echo the first prompt token then stop; sampled: fixed random tokens (one response
    empty is not possible with a stop id: every response has >= 1 token)."""

    def __init__(self, version: int, responses: list[list[int]]):
        self.version, self.responses, self.calls = version, responses, []

    def generate(self, ids, params, return_logprob=True):
        self.calls.append(params)  # one dict for the batch, or one per prompt
        if (params if isinstance(params, dict) else params[0])["temperature"] == 0.0:
            outs = [[p[0], STOP] for p in ids]
        else:
            outs = self.responses
        return [GenerateResult(list(o), np.zeros(0, np.float32), np.full(len(o), self.version),
                               self.version, "stop" if o[-1] == STOP else "length") for o in outs]


def _logq(prefix: list[int]) -> np.ndarray:
    rng = np.random.default_rng(len(prefix) * 7919 + sum(prefix))
    x = rng.normal(size=VOCAB) * 2
    return x - np.log(np.exp(x).sum())


class _Teacher:
    def __init__(self):
        self.top_k = []

    def score(self, input_ids, *, start, top_k=0):
        self.top_k.append(top_k)
        out = []
        for x, s in zip(input_ids, start):
            rows = [_logq(x[:j]) for j in range(s, len(x))]
            lp = np.array([r[t] for r, t in zip(rows, x[s:])], np.float32)
            if top_k:
                order = [np.argsort(-r)[:top_k] for r in rows]
                ids = np.stack(order).astype(np.int32)
                tlp = np.stack([r[o] for r, o in zip(rows, order)]).astype(np.float32)
            else:
                ids, tlp = np.zeros((len(lp), 0), np.int32), np.zeros((len(lp), 0), np.float32)
            out.append(ScoreResult(lp, ids, tlp))
        return out


def _reference(chunks, prompts, responses):
    """Float64 per response: sums of k1, k3, exact KL over its tokens, from the model's logits
    (padded columns dropped) and the teacher's distributions."""
    from megatron_opd.models.qwen3_moe import causal_attention_mask

    model = chunks[0]
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            x = torch.tensor([p + r])
            s = x.shape[1]
            logits = model(x, torch.arange(s)[None], causal_attention_mask(s)).double()[0]
            assert logits.shape[-1] == 32  # megatron's padded vocabulary
            logp = torch.log_softmax(logits[:, :VOCAB], -1)
            k1 = k3 = kl = 0.0
            for j, y in enumerate(r):
                lpt = logp[len(p) - 1 + j]
                lq = torch.from_numpy(_logq(p + r[:j])).double()
                lq_y = float(np.float32(_logq(p + r[:j])[y]))  # the teacher sends float32
                d = lq_y - float(lpt[y])
                k1 += -d
                k3 += math.expm1(d) - d
                kl += float((lpt.exp() * (lpt - lq)).sum())
            out.append((k1, k3, kl, len(r)))
    return out


@pytest.mark.parametrize("exact", [True, False])
def test_evaluate_matches_reference(world, tmp_path, exact):
    from megatron_opd.learner.evaluate import evaluate, prompt_seed

    groups, ddp, chunks = world
    env = _Env()
    prompts = [EnvPrompt((5, 6, 7), source="a"), EnvPrompt((8, 9), source="b"),
               EnvPrompt((10, 11, 12, 13), source="c")]
    g = np.random.default_rng(3)
    responses = [g.integers(2, VOCAB, 4).tolist() + [STOP], g.integers(2, VOCAB, 6).tolist(),
                 [STOP]]
    rollout, teacher = _Rollout(7, responses), _Teacher()
    m = evaluate(ddp, groups, env, prompts, rollout, teacher, version=7, vocab_size=VOCAB,
                 max_new_tokens=6, seed=11, micro_batch_size=2, samples_dir=tmp_path / "samples",
                 exact_kl_max_vocab=VOCAB if exact else VOCAB - 1)
    ref = _reference(chunks, [list(p.token_ids) for p in prompts], responses)
    n = sum(r[3] for r in ref)
    assert teacher.top_k == [VOCAB if exact else 0]
    assert [c["temperature"] for c in rollout.calls[1]] == [1.0] * 3  # one per prompt, seeded
    assert [c["sampling_seed"] for c in rollout.calls[1]] == [prompt_seed(11, i) for i in range(3)]
    assert rollout.calls[0]["stop_token_ids"] == [STOP]
    assert m["eval/kl_tokens"] == n
    assert m["eval/reverse_kl_k1"] == pytest.approx(sum(r[0] for r in ref) / n, rel=1e-4)
    assert m["eval/reverse_kl_k3"] == pytest.approx(sum(r[1] for r in ref) / n, rel=1e-4)
    if exact:
        assert m["eval/reverse_kl_method"] == 0.0
        assert m["eval/reverse_kl"] == pytest.approx(sum(r[2] for r in ref) / n, rel=1e-4)
    else:
        assert m["eval/reverse_kl_method"] == 1.0
        assert m["eval/reverse_kl"] == m["eval/reverse_kl_k3"]
    assert m["eval/reverse_kl_k1_se"] > 0 and m["eval/reverse_kl_k3_se"] > 0
    assert m["eval/accuracy"] == 1.0  # the greedy stand-in echoes the first prompt token
    assert m["eval/served_version_ok"] == 1.0 and m["eval/version"] == 7
    assert m["eval/response_len"] == pytest.approx(np.mean([len(r) for r in responses]))
    assert m["eval/kl_out_of_vocab_tokens"] == 0

    rows = [json.loads(x) for x in (tmp_path / "samples" / "eval-7.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["a", "b", "c"]
    for row, p, resp, rf in zip(rows, prompts, responses, ref):
        assert row["prompt_token_ids"] == list(p.token_ids)
        assert row["prompt"] == env.decode(p.token_ids)
        assert row["greedy"]["token_ids"] == [p.token_ids[0], STOP]
        assert row["greedy"]["reward"] == 1.0
        assert row["sampled"]["token_ids"] == resp
        assert row["sampled"]["text"] == env.decode(resp)
        assert row["sampled"]["finish_reason"] == ("stop" if resp[-1] == STOP else "length")
        assert row["sampled"]["kl_tokens"] == rf[3]
        assert row["sampled"]["k1_sum"] == pytest.approx(rf[0], rel=1e-4, abs=1e-5)
        assert row["sampled"]["k3_sum"] == pytest.approx(rf[1], rel=1e-4, abs=1e-5)
        if exact:
            assert row["sampled"]["exact_kl_sum"] == pytest.approx(rf[2], rel=1e-4, abs=1e-5)
