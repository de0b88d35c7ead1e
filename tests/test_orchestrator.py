"""The orchestrator without SGLang: GRPO groups and rewards from generate/score results, the
requests it makes, and (over real ZeroMQ sockets) the offline feeder's stream of stored groups."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_opd.config import load_config
from megatron_opd.orchestrator import make_groups, request_prompts, rollout_and_score
from megatron_opd.serving.sglang_client import GenerateResult, ScoreResult
from megatron_opd.serving.teachers import TeacherRouter
from megatron_opd.envs.digits import DigitsEnv

ROOT = Path(__file__).resolve().parents[1]


def config(*overrides):
    return load_config(ROOT / "configs/quickstart.yaml", list(overrides))


def ids(task, words):
    return [task.ids[w] for w in words]


def result(output_ids, version=0, finish="stop"):
    n = len(output_ids)
    return GenerateResult(output_ids=list(output_ids),
                          output_logprobs=-np.linspace(0.1, 0.5, n).astype(np.float32),
                          token_versions=np.full(n, version, dtype=np.int64),
                          weight_version=version, finish_reason=finish)


def score(n, K, seed):
    rng = np.random.default_rng(seed)
    return ScoreResult(-rng.random(n).astype(np.float32),
                       rng.integers(0, 32, (n, K)).astype(np.int32),
                       -rng.random((n, K)).astype(np.float32))


def digits(cfg):
    """(environment, its DigitTask: builds prompts and answers by hand)"""
    env = DigitsEnv(cfg)
    return env, env.task


def two_prompts(task):
    return [DigitsEnv._prompt(task.make("rev", [1, 2, 3])),
            DigitsEnv._prompt(task.make("sort", [3, 1, 2, 2]))]


def test_request_prompts_repeats_each_prompt_back_to_back():
    cfg = config()
    env, task = digits(cfg)
    ex = two_prompts(task)
    assert request_prompts(ex, 3) == [list(ex[0].token_ids)] * 3 + [list(ex[1].token_ids)] * 3
    assert request_prompts(ex, 1) == [list(e.token_ids) for e in ex]


def test_make_groups_sets_one_group_id_rewards_and_sampler_info():
    cfg = config("rollout.group_size=3", "train.batch_size=48", "teacher.top_k=2",
                 "rollout.temperature=0.8", "rollout.top_p=0.95")
    env, task = digits(cfg)
    ex = two_prompts(task)
    eos = "<eos>"
    responses = [  # prompt 0: rev 1 2 3 -> 3 2 1 <eos>; prompt 1: sort 3 1 2 2 -> 1 2 2 3 <eos>
        ids(task, ["3", "2", "1", eos]),  # right
        ids(task, ["3", "2", "1"]),  # right digits, but it did not stop: wrong
        ids(task, ["1", "2", "3", eos]),  # wrong
        ids(task, ["1", "2", "2", "3", eos]),  # right
        ids(task, ["1", "2", "2", "3", eos]),  # right
        ids(task, [eos]),  # wrong
    ]
    results = [result(r, version=i % 2) for i, r in enumerate(responses)]
    scores = [score(len(r), 2, i) for i, r in enumerate(responses)]
    # the samples carry the config's teacher temperature (validation allows only 1.0 with
    # SGLang's scoring; set past it here to see the value travel, not a default)
    cfg.teacher.temperature = 0.5
    groups = make_groups(cfg, env, ex, results, scores, ["run-000000001", "run-000000002"])
    assert [len(g) for g in groups] == [3, 3]
    assert [s.reward for g in groups for s in g] == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    flat = [s for g in groups for s in g]
    assert [s.group_id for s in flat] == ["run-000000001"] * 3 + ["run-000000002"] * 3
    assert len({s.sample_id for s in flat}) == 6
    for i, s in enumerate(flat):
        s.validate()
        assert s.prompt_ids.tolist() == list(ex[i // 3].token_ids)
        assert s.response_ids.tolist() == responses[i]
        assert s.temperature == 0.8 and s.top_p == 0.95 and s.teacher_temperature == 0.5
        assert np.array_equal(s.behaviour_logprobs, results[i].output_logprobs)
        assert np.array_equal(s.token_versions, results[i].token_versions)
        assert np.array_equal(s.teacher_logprobs, scores[i].logprobs)
        assert s.teacher_topk_ids.shape == (len(responses[i]), 2)
        assert np.array_equal(s.teacher_topk_logprobs, scores[i].topk_logprobs)
        assert s.metadata["op"] == ex[i // 3].source


def test_a_group_with_an_empty_response_is_dropped_whole():
    cfg = config("rollout.group_size=2")
    env, task = digits(cfg)
    ex = two_prompts(task)
    responses = [ids(task, ["3", "<eos>"]), [], ids(task, ["1", "<eos>"]), ids(task, ["2"])]
    groups = make_groups(cfg, env, ex, [result(r) for r in responses],
                         [score(len(r), 0, 0) for r in responses], ["g1", "g2"])
    assert [[s.sample_id for s in g] for g in groups] == [["g2-0", "g2-1"]]


def test_group_size_1_keeps_the_sample_id_and_fills_the_reward():
    cfg = config()
    env, task = digits(cfg)
    ex = two_prompts(task)
    responses = [ids(task, ["3", "2", "1", "<eos>"]), ids(task, ["1", "2", "2", "<eos>"])]
    groups = make_groups(cfg, env, ex, [result(r) for r in responses],
                         [score(len(r), 0, 0) for r in responses], ["x1", "x2"])
    assert [(s.sample_id, s.group_id, s.reward) for g in groups for s in g] == \
        [("x1", "x1", 1.0), ("x2", "x2", 0.0)]


class FakeRollout:
    def __init__(self, task):
        self.task, self.calls = task, []

    def generate(self, prompts, sampling, **kw):
        self.calls.append((prompts, sampling, kw))
        return [result([self.task.eos] if i % 2 else [self.task.ids["5"], self.task.eos])
                for i in range(len(prompts))]


class FakeTeacher:  # one teacher's client (TeacherRouter.single routes every row to it)
    def __init__(self):
        self.calls = []

    def score(self, seqs, *, start, top_k, temperature):
        self.calls.append((seqs, start, top_k, temperature))
        return [score(len(x) - s, top_k, 0) for x, s in zip(seqs, start)]


def test_rollout_and_score_requests_group_copies_and_scores_prompt_plus_response():
    cfg = config("rollout.group_size=2", "teacher.top_k=4", "rollout.temperature=0.9")
    env, task = digits(cfg)
    ex = two_prompts(task)
    rollout, teacher = FakeRollout(task), FakeTeacher()
    groups = rollout_and_score(cfg, env, rollout, TeacherRouter.single(cfg, teacher), ex,
                               ["g1", "g2"])
    (prompts, params, kw), = rollout.calls
    assert prompts == request_prompts(ex, 2)
    assert len(params) == 4 and all(p == params[0] for p in params)
    sampling = params[0]
    assert sampling["temperature"] == 0.9 and sampling["top_p"] == 1.0
    assert "sampling_seed" not in sampling and "n" not in sampling  # copies sample independently
    assert sampling["stop_token_ids"] == [task.eos] and kw["return_logprob"]
    (seqs, start, top_k, temperature), = teacher.calls
    assert temperature == cfg.teacher.temperature == 1.0  # stated, not left to a default
    outs = [[task.ids["5"], task.eos], [task.eos]] * 2
    assert seqs == [p + o for p, o in zip(prompts, outs)]
    assert start == [len(p) for p in prompts] and top_k == 4
    assert [[s.group_id for s in g] for g in groups] == [["g1", "g1"], ["g2", "g2"]]
    assert groups[0][0].teacher_topk_ids.shape == (2, 4)


def test_offline_feeder_streams_whole_stored_groups_in_order_cycling(tmp_path):
    """run_orchestrator in offline mode against real ZeroMQ sockets: stored groups come in store
    order, back to back, cycling with fresh ids, and never more than the admission allows."""
    from megatron_opd.offline_store import open_store, write_store
    from megatron_opd.orchestrator import run_orchestrator
    from megatron_opd.transport import (ControlPublisher, SampleServer, Shutdown,
                                        WeightsPublished, free_tcp_endpoint)
    from megatron_opd.wiring import RunWiring

    cfg = config("teacher.mode=offline", "rollout.group_size=2", "train.batch_size=8",
                 "parallel.micro_batch_size=8", "async.max_staleness=0",
                 "rollout.prompts_per_request=4", "run.name=r1")
    env, task = digits(cfg)
    stored = []
    for i in range(3):  # 3 groups of 2 = 6 samples; the learner will want 16
        ex = [DigitsEnv._prompt(task.make("rev", [i, 1, 2]))]
        responses = [ids(task, [str(2), "1", str(i), "<eos>"]), ids(task, ["9", "<eos>"])]
        stored += make_groups(cfg, env, ex, [result(r) for r in responses],
                              [score(len(r), 0, i) for r in responses], [f"g{i}"])[0]
    write_store(tmp_path / "store", stored, "hash0")
    wiring = RunWiring(run_dir=str(tmp_path), rollout_urls=["http://127.0.0.1:9"],
                       teacher_urls=["http://127.0.0.1:9"], samples_endpoint=free_tcp_endpoint(),
                       control_endpoint=free_tcp_endpoint(), teacher_dir="", student_dir="",
                       offline_store=str(tmp_path / "store"))
    rx = SampleServer(wiring.samples_endpoint, run_id="r1")
    control = ControlPublisher(wiring.control_endpoint)
    errors = []

    def target():
        try:
            run_orchestrator(cfg, wiring)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    got = []
    try:
        def drain(until, timeout=10.0):
            deadline = time.time() + timeout
            while len(got) < until and time.time() < deadline:
                msg = rx.recv(timeout_ms=100)
                if msg is not None:
                    got.append(msg)
        drain(8)
        assert len(got) == 8
        drain(9, timeout=1.5)  # version 0, max_staleness 0: one batch admitted, no more
        assert len(got) == 8
        deadline = time.time() + 10
        while len(got) < 16 and time.time() < deadline:  # announce version 1
            control.publish(WeightsPublished(version=1, step=1, published_at=time.time()))
            drain(16, timeout=0.3)
        assert len(got) == 16
    finally:
        for _ in range(20):
            control.publish(Shutdown(reason="test"))
            thread.join(timeout=0.1)
            if not thread.is_alive():
                break
        rx.close(), control.close()
    assert not thread.is_alive() and not errors, errors
    assert len({s.sample_id for s in got}) == 16  # unique across cycles
    ref = [s for _, s in open_store(tmp_path / "store").iter_samples()]
    for i, s in enumerate(got):
        r = ref[i % 6]
        assert s.response_ids.tolist() == r.response_ids.tolist()
        assert s.prompt_ids.tolist() == r.prompt_ids.tolist() and s.reward == r.reward
        assert s.token_versions.tolist() == [0] * s.num_tokens
        cycle, group = divmod(i, 6)
        assert s.group_id == f"r1-off-c{cycle}-g{group // 2:09d}"
    # groups arrive whole and back to back
    assert all(got[i].group_id == got[i + 1].group_id for i in range(0, 16, 2))
    assert all(got[i].group_id != got[i + 1].group_id for i in range(1, 15, 2))


@pytest.mark.parametrize("override, key", [
    ("rollout.group_size=0", "rollout.group_size"),
    ("rollout.group_size=3", "rollout.group_size"),  # does not divide train.batch_size=64
    ("rollout.group_size=64", "rollout.prompts_per_request"),  # 8 x 64 > 3 x 64
    ("teacher.offline_samples=0", "teacher.offline_samples"),
    ("teacher.mode=nope", "teacher.mode"),
])
def test_group_and_offline_config_errors_name_the_key(override, key):
    from megatron_opd.config import ConfigError

    with pytest.raises(ConfigError) as err:
        config(override)
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_offline_mode_refuses_routing_replay():
    from megatron_opd.config import ConfigError

    with pytest.raises(ConfigError, match="^teacher.mode:"):
        config("teacher.mode=offline", "train.routing_replay=r3")
    assert config("teacher.mode=offline").teacher.mode == "offline"


class PausingRollout:
    """The rollout server as a weight update with `pause` sees it: the first call's first
    sequence comes back cut ("abort" mode: finish_reason abort, partial output; "in_place": the
    same sequence goes on decoding with the new version on the old KV cache)."""

    def __init__(self, task, mode):
        self.task, self.mode, self.calls = task, mode, []

    def generate(self, prompts, params, **kw):
        self.calls.append((prompts, params))
        five, eos = self.task.ids["5"], self.task.eos
        out = []
        for i, p in enumerate(prompts):
            if len(self.calls) == 1 and i == 0 and self.mode == "abort":
                out.append(result([five, five], version=0, finish="abort"))
            elif len(self.calls) == 1 and i == 0:  # in_place: one call spans versions 0 and 1
                r = result([five, five, eos], version=0)
                r.token_versions = np.array([0, 1, 1])
                out.append(r)
            else:
                v = len(self.calls) - 1
                out.append(result([five, eos], version=v))
        return out


def test_abort_mode_continues_an_aborted_response_and_never_sends_it_cut():
    cfg = config("weight_sync.pause_mode=abort", "rollout.max_new_tokens=8")
    env, task = digits(cfg)
    ex = two_prompts(task)
    rollout = PausingRollout(task, "abort")
    groups = rollout_and_score(cfg, env, rollout, TeacherRouter.single(cfg, FakeTeacher()), ex,
                               ["g1", "g2"])
    assert len(rollout.calls) == 2
    (again, params), = [rollout.calls[1]]
    five, eos = task.ids["5"], task.eos
    assert again == [list(ex[0].token_ids) + [five, five]]  # prompt + partial: nothing re-sampled
    assert params[0]["max_new_tokens"] == 8 - 2
    first = groups[0][0]
    assert first.response_ids.tolist() == [five, five, five, eos]
    assert first.token_versions.tolist() == [0, 0, 1, 1] and first.finish_reason == "stop"
    assert all(s.finish_reason != "abort" for g in groups for s in g)
    first.validate()


def test_in_place_mode_flags_responses_decoded_on_stale_kv_and_counts_them():
    from megatron_opd.orchestrator import count_sample

    cfg = config("weight_sync.pause_mode=in_place")
    env, task = digits(cfg)
    groups = rollout_and_score(cfg, env, PausingRollout(task, "in_place"),
                               TeacherRouter.single(cfg, FakeTeacher()),
                               two_prompts(task), ["g1", "g2"])
    flat = [s for g in groups for s in g]
    assert [s.metadata.get("stale_kv", False) for s in flat] == [True, False]
    counts = {"stale_kv": 0}
    for s in flat:
        count_sample(counts, s.metadata)
    assert counts == {"stale_kv": 1}
    # retract: spans over versions are normal (KV recomputed), nothing flagged
    cfg = config("weight_sync.pause_mode=retract")
    groups = rollout_and_score(cfg, env, PausingRollout(task, "in_place"),
                               TeacherRouter.single(cfg, FakeTeacher()),
                               two_prompts(task), ["g1", "g2"])
    assert not any(s.metadata.get("stale_kv") for g in groups for s in g)
