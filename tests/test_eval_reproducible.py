"""Evaluation of given weights is reproducible: per-prompt sampling seeds honoured by a real
SGLang server on CPU (through megatron_opd/compat/sglang_cpu.py), so evaluating the same weights
twice gives the same completions and the same figures (to float32 rounding), and another seed
gives other ones. Completions the server made at another weight version than the evaluated one
are requested again, or the evaluation is refused (never reported).

The hash behind SGLang's seeded sampling is checked against MurmurHash3 written here from the
published algorithm (the CPU patch replaces sgl-kernel's op with torch integer ops).

One server (model A) serves both the rollout and the teacher role; the learner holds model B,
so the KL figures are not zero and depend on every sampled token (they are not a meaningful KL:
reproducibility is what is tested)."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from megatron_opd.envs.base import Environment, EnvPrompt, SpecialIds
from tests.test_sglang_serving import SPEC, save_model

STOP = 2  # EOS of the test tokenizer (SPECIALS: pad, bos, eos)


def _murmur3_x86_32(key: bytes, seed: int = 0) -> int:
    """MurmurHash3_x86_32 as published (Appleby; 4-byte little-endian blocks), for keys whose
    length is a multiple of 4."""
    c1, c2, m = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF
    h = seed
    for (k,) in struct.iter_unpack("<I", key):
        k = (k * c1) & m
        k = ((k << 15) | (k >> 17)) & m
        k = (k * c2) & m
        h ^= k
        h = ((h << 13) | (h >> 19)) & m
        h = (h * 5 + 0xE6546B64) & m
    h ^= len(key)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


def test_cpu_murmur_hash_is_murmur3_of_seed_position_and_column():
    from megatron_opd.compat.sglang_cpu import murmur_hash32_torch

    rng = random.Random(0)
    seeds = [0, 1, 2**32 - 1, 2**32, 2**62 - 1] + [rng.getrandbits(62) for _ in range(5)]
    positions = [rng.randrange(2**31) for _ in seeds]
    cols = [0, 1, 7, 255, 151935]
    got = murmur_hash32_torch(torch.tensor(seeds), torch.tensor(positions, dtype=torch.int32),
                              torch.tensor(cols))
    for i, (s, p) in enumerate(zip(seeds, positions)):
        for j, c in enumerate(cols):
            key = struct.pack("<IIII", s & 0xFFFFFFFF, s >> 32, p, c)
            assert int(got[i, j]) == _murmur3_x86_32(key), (s, p, c)


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
        return float(len(response_ids) > 0 and response_ids[0] == prompt.token_ids[-1])

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A real SGLang server on model A (the rollout and the teacher), and a megatron world of
    one holding model B."""
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig, TrainConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.learner.train_step import wrap_for_training
    from megatron_opd.models.hf_mapping import load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_opd.serving.sglang_client import SGLangClient
    from megatron_opd.serving.sglang_server import SGLangServer, free_port

    root = tmp_path_factory.mktemp("eval_models")
    a, b = save_model(root / "A", 0), save_model(root / "B", 1)
    server = SGLangServer("rollout", str(a), free_port(), str(root / "server.log"),
                          max_total_tokens=2048, threads=1, extra_args=("--weight-version", "0"))
    server.start()
    install_megatron_cpu_compat()
    layout = ParallelConfig(micro_batch_size=4)
    groups = init_distributed(layout, seed=0)
    try:
        chunks = build_model_chunks(SPEC, transformer_config(SPEC, layout=layout))
        load_hf_checkpoint(chunks, str(b), SPEC, groups)
        ddp, _, _ = wrap_for_training(chunks, TrainConfig(steps=10, distributed_optimizer=False),
                                      groups)
        server.wait_ready(300)
        yield groups, ddp, SGLangClient(server.url)
    finally:
        server.stop()
        destroy_distributed()


def _evaluate(setup, out_dir, seed: int):
    from megatron_opd.learner.evaluate import evaluate

    groups, ddp, client = setup
    # two identical prompts: their own seeds, so their completions are independent draws
    prompts = [EnvPrompt((1, 5, 6, 7), source="a"), EnvPrompt((1, 5, 6, 7), source="a2"),
               EnvPrompt((1, 8, 9), source="b"), EnvPrompt((1, 10, 11, 12, 13), source="c"),
               EnvPrompt((1, 14), source="d"), EnvPrompt((1, 15, 16, 17), source="e")]
    metrics = evaluate(ddp, groups, _Env(), prompts, client, client, version=0,
                       vocab_size=SPEC.vocab_size, max_new_tokens=10, seed=seed,
                       micro_batch_size=4, samples_dir=out_dir)
    records = [json.loads(x) for x in (out_dir / "eval-0.jsonl").read_text().splitlines()]
    return metrics, records


def _without_sums(records):
    return [{**r, "sampled": {k: v for k, v in r["sampled"].items() if not k.endswith("_sum")}}
            for r in records]


def test_evaluating_the_same_weights_twice_gives_identical_figures(setup, tmp_path):
    first, rec1 = _evaluate(setup, tmp_path / "first", seed=5)
    again, rec2 = _evaluate(setup, tmp_path / "again", seed=5)
    other, rec3 = _evaluate(setup, tmp_path / "other", seed=6)
    sampled = [[r["sampled"]["token_ids"] for r in rec] for rec in (rec1, rec2, rec3)]
    assert sampled[0] == sampled[1]  # the same completions (and greedy ones, rewards) ...
    assert _without_sums(rec1) == _without_sums(rec2)
    # ... so the same figures, up to float32 rounding (on the quickstart's weights they
    # differed by a relative 2e-8; docs/fault-tolerance.md)
    assert set(first) == set(again)
    for key in first:
        if key.endswith("_s"):  # timings
            continue
        assert again[key] == pytest.approx(first[key], rel=1e-6, abs=1e-9), key
    assert first["eval/kl_tokens"] > 20 and first["eval/reverse_kl_k3"] > 0
    # the seeds are what fixes them: another seed draws other completions and figures
    assert sampled[2] != sampled[0]
    assert other["eval/reverse_kl_k1"] != first["eval/reverse_kl_k1"]
    assert sampled[0][0] != sampled[0][1]  # one seed per prompt, not one for the batch


def _set_served_version(client, version: int) -> None:
    """What a publish ends with on the server: its weight version (real HTTP, no weights sent:
    the weights stay those of model A)."""
    client._post("update_weight_version", {"new_version": str(version),
                                           "abort_all_requests": False})
    assert client.weight_version() == str(version)


class _PublishLandsDuringEvaluation:
    """The real client of the rollout server; right after its first /generate answered, the
    server's version moves to `version` (a publish finishing while evaluation runs)."""

    def __init__(self, client, version: int):
        self.client, self.version, self.calls = client, version, 0

    def generate(self, *args, **kwargs):
        out = self.client.generate(*args, **kwargs)
        self.calls += 1
        if self.calls == 1:
            _set_served_version(self.client, self.version)
        return out


def test_completions_of_other_weights_are_requested_again_or_refused(setup, tmp_path):
    """Evaluation never reports figures of other weights than those it evaluates: completions
    the server made at another version are requested again (and, the weights being the same,
    come back identical: the per-prompt seeds), and an evaluation whose server keeps serving
    another version raises on every rank."""
    from megatron_opd.learner.evaluate import EvalVersionError, evaluate

    groups, ddp, client = setup
    prompts = [EnvPrompt((1, 5, 6, 7), source="a"), EnvPrompt((1, 8, 9), source="b"),
               EnvPrompt((1, 10, 11, 12, 13), source="c")]

    def run(rollout, version: int, out_dir):
        m = evaluate(ddp, groups, _Env(), prompts, rollout, client, version=version,
                     vocab_size=SPEC.vocab_size, max_new_tokens=10, seed=5, micro_batch_size=4,
                     samples_dir=out_dir)
        recs = [json.loads(x) for x in (out_dir / f"eval-{version}.jsonl").read_text()
                .splitlines()]
        return m, recs

    try:
        base, base_recs = run(client, 0, tmp_path / "v0")
        assert base["eval/redone_completions"] == 0 and base["eval/served_version_ok"] == 1.0
        # version 1 is asked for while the server still answers as version 0: the first batch
        # (the greedy completions) is requested again once the version moved
        racing = _PublishLandsDuringEvaluation(client, 1)
        m, recs = run(racing, 1, tmp_path / "v1")
        assert m["eval/redone_completions"] == len(prompts) and racing.calls == 3
        assert m["eval/served_version_ok"] == 1.0
        assert {r[k]["weight_version"] for r in recs for k in ("greedy", "sampled")} == {1}
        for a, b in zip(base_recs, recs):
            assert a["greedy"]["token_ids"] == b["greedy"]["token_ids"]
            assert a["sampled"]["token_ids"] == b["sampled"]["token_ids"]
        assert m["eval/reverse_kl_k1"] == pytest.approx(base["eval/reverse_kl_k1"], rel=1e-6)
        # nobody publishes version 2: refused, no file written
        with pytest.raises(EvalVersionError, match=r"version 2: 3 of 3 completions still came "
                                                   r"from weights \[1\]"):
            run(client, 2, tmp_path / "v2")
        assert not (tmp_path / "v2").exists()
    finally:
        _set_served_version(client, 0)
