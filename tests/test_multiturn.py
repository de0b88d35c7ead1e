"""Multi-turn rollouts, token in / token out (megatron_opd/episodes.py).

Without servers: a scripted generate checks each turn's input ids, the per-token fields of
assistant and tool tokens and the episode limits. With one real SGLang server (module scope; it
serves a tiny random model with the tool tokenizer, as rollout and as teacher): the calculator
environment through the orchestrator's `rollout_and_score`, checked against what the server
itself says about the same tokens (a direct teacher call, and the rollout's own log-probs)."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from megatron_opd.envs import make_env
from megatron_opd.episodes import ENV_LOGPROB, run_episodes
from megatron_opd.serving.sglang_client import GenerateResult
from tests.test_tool_env import CALL_END, CALL_START, make_tool_tokenizer, tool_config


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tool_tokenizer(tmp_path_factory.mktemp("tok"))


def res(ids, version=0, finish="stop", lp=-0.5, stale=False):
    return GenerateResult(output_ids=list(ids), output_logprobs=np.full(len(ids), lp, np.float32),
                          token_versions=np.full(len(ids), version, np.int64),
                          weight_version=version, finish_reason=finish, stale_kv=stale)


class Scripted:
    """generate() answering each episode's turns from a script (a list of turns per episode),
    recording every call."""

    def __init__(self, env, turns: dict[int, list]):
        self.env, self.turns, self.calls = env, turns, []

    def __call__(self, inputs, params, keys, prefixes):
        self.calls.append((inputs, params, keys, prefixes))
        out = []
        for x, key in zip(inputs, keys):
            text, version, finish = self.turns[int(key)].pop(0)
            out.append(res(self.env.tokenizer(text, add_special_tokens=False)["input_ids"],
                           version, finish, stale=version == 9))
        return out


def test_turn_inputs_are_the_exact_tokens_so_far_and_tool_tokens_are_masked(tok_dir):
    env = make_env(tool_config(tok_dir, "env.max_turns=4", "env.max_response_tokens=400"), tok_dir)
    p = next(env.train_prompts())
    answer = p.label
    script = {0: [(f"hm {CALL_START}{p.metadata['expression']}{CALL_END}", 0, "stop"),
                  (f"{CALL_START}1+{CALL_END}", 1, "stop"),
                  (f"{answer}<|im_end|>", 1, "stop")],
              1: [("no end here", 0, "length"), ("7<|im_end|>", 2, "stop")]}
    gen = Scripted(env, script)
    sp = {"temperature": 1.0, "max_new_tokens": 16, "stop_token_ids": list(env.special.stop_ids)}
    a, b = run_episodes(env, [p, p], gen, sp, keys=["0", "1"])
    # call k's input is the prompt + every token of the episode before it, exactly
    for inputs, params, keys, prefixes in gen.calls:
        for x, key, param, (pr, resp, vers) in zip(inputs, keys, params, prefixes):
            t = (a, b)[int(key)]
            assert x == list(p.token_ids) + t.output_ids[:len(x) - len(p.token_ids)]
            assert pr == list(p.token_ids) and x == pr + resp and len(vers) == len(resp)
            assert env.call_end_id in param["stop_token_ids"]
            assert param["max_new_tokens"] == min(16, 400 - len(resp))
    assert [len(c[0]) for c in gen.calls] == [2, 2, 1]
    # episode a: turn, observation (the tool's result), turn, observation (error), final turn
    obs1 = env.encode_observation(env.observation(str(eval(p.metadata["expression"]))))
    obs2 = env.encode_observation(env.observation("error: not an expression: '1+'"))
    turns = [env.tokenizer(s[0], add_special_tokens=False)["input_ids"] for s in
             [(f"hm {CALL_START}{p.metadata['expression']}{CALL_END}",),
              (f"{CALL_START}1+{CALL_END}",), (f"{answer}<|im_end|>",)]]
    assert a.output_ids == turns[0] + list(obs1) + turns[1] + list(obs2) + turns[2]
    assert a.loss_mask == [1] * len(turns[0]) + [0] * len(obs1) + [1] * len(turns[1]) + \
        [0] * len(obs2) + [1] * len(turns[2])
    mask, lp, versions = a.arrays()
    assert np.all(lp[mask == 1] == -0.5) and np.all(lp[mask == 0] == ENV_LOGPROB)
    # tool tokens carry the version of the assistant token before them: non-decreasing
    assert versions.tolist() == [0] * (len(turns[0]) + len(obs1)) + \
        [1] * (len(turns[1]) + len(obs2) + len(turns[2]))
    assert a.done and a.reward == 1.0 and a.finish_reason == "stop"
    assert a.metadata == {"turns": 3, "tool_calls": 2, "tool_errors": 1}
    assert len(a.turns) == 3 and all(a.loss_mask[s] == 1 for s, _ in a.turns)
    # episode b: a turn cut by its budget is an error observation, then a wrong answer
    assert b.done and b.reward == 0.0 and b.metadata["tool_errors"] == 1


def test_episodes_end_at_max_turns_and_max_response_tokens(tok_dir):
    env = make_env(tool_config(tok_dir, "env.max_turns=2", "env.max_response_tokens=400"), tok_dir)
    p = next(env.train_prompts())
    sp = {"temperature": 1.0, "max_new_tokens": 16}
    gen = Scripted(env, {0: [("aaaa", 0, "length"), ("bbbb", 9, "length")]})
    (t,) = run_episodes(env, [p], gen, sp, keys=["0"])
    assert t.finish_reason == "max_turns" and not t.done and t.reward == 0.0
    assert t.metadata["truncated"] == "max_turns" and t.metadata["stale_kv"] is True
    assert t.loss_mask[-4:] == [1] * 4  # ends on the assistant turn (no observation after it)
    # budget: 4 + an observation (~100 tokens) + 4 would pass 60: the observation is not added
    env = make_env(tool_config(tok_dir, "env.max_response_tokens=60"), tok_dir)
    gen = Scripted(env, {0: [("aaaa", 0, "length")]})
    (t,) = run_episodes(env, [p], gen, sp, keys=["0"])
    assert t.finish_reason == "max_tokens" and len(gen.calls) == 1
    assert t.output_ids == env.tokenizer("aaaa", add_special_tokens=False)["input_ids"]
    assert t.loss_mask == [1, 1, 1, 1]


def test_an_aborted_turn_is_refused_not_trained(tok_dir):
    env = make_env(tool_config(tok_dir), tok_dir)
    p = next(env.train_prompts())
    with pytest.raises(RuntimeError, match="aborted"):
        run_episodes(env, [p], lambda *a: [res([5, 6], finish="abort")], {"max_new_tokens": 8})


# ----------------------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def server(tok_dir, tmp_path_factory):
    from megatron_opd.serving.sglang_server import SGLangServer, free_port
    from tests.hf_fixtures import make_hf_moe

    root = tmp_path_factory.mktemp("mt")
    model = make_hf_moe(root / "model", tokenizer_dir=tok_dir, max_position_embeddings=1024)
    srv = SGLangServer("mt", str(model), free_port(), str(root / "server.log"),
                       max_total_tokens=4096, threads=1, extra_args=("--weight-version", "0"),
                       enable_return_routed_experts=True)
    srv.start()
    try:
        srv.wait_ready(300)
        yield srv, model
    finally:
        srv.stop()


def direct_scores(url, seq, k):
    """The teacher server's own answer for a whole sequence: log-prob of every token and its
    top-k at every position (entry j predicts token j; entry 0 is null)."""
    r = requests.post(f"{url}/generate", json={
        "input_ids": seq, "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": k}, timeout=120)
    r.raise_for_status()
    meta = r.json()["meta_info"]
    return meta["input_token_logprobs"], meta["input_top_logprobs"]


def check_teacher_scores(s, url, k):
    """A sample's teacher log-probs (sampled token and top-k, every response position) equal a
    direct call to the teacher server on the same tokens."""
    P, n = len(s.prompt_ids), len(s.response_ids)
    lps, tops = direct_scores(url, s.prompt_ids.tolist() + s.response_ids.tolist(), k)
    np.testing.assert_allclose(s.teacher_logprobs, [lps[P + t][0] for t in range(n)], atol=1e-5)
    for t in range(n):
        row = tops[P + t]
        np.testing.assert_allclose(s.teacher_topk_logprobs[t], [e[0] for e in row], atol=1e-5)
        assert s.teacher_topk_ids[t].tolist() == [e[1] for e in row] or \
            np.ptp([e[0] for e in row]) < 1e-5  # ties may come in another order


def direct_routing(url, seq, shape):
    """The server's experts for every position of `seq` (one token generated, so the last
    position of seq is routed too): [len(seq), layers, top_k]."""
    from megatron_opd.serving.sglang_client import decode_routed_experts

    r = requests.post(f"{url}/generate", json={
        "input_ids": seq, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_routed_experts": True}, timeout=120)
    r.raise_for_status()
    return decode_routed_experts(r.json()["meta_info"]["routed_experts"], len(seq), shape)


def test_calculator_episodes_on_a_real_server_are_token_in_token_out(server, tok_dir):
    from megatron_opd.orchestrator import rollout_and_score
    from megatron_opd.serving.sglang_client import SGLangClient

    srv, model = server
    K = 5
    cfg = tool_config(model, "teacher.top_k=5", "rollout.group_size=2", "train.batch_size=16",
                      "env.max_turns=3", "env.max_response_tokens=400", "rollout.max_new_tokens=8",
                      "data.max_prompt_tokens=300", "train.routing_replay=r3")
    env = make_env(cfg, model)
    client = SGLangClient(srv.url)
    calls = []

    class Recording:  # the rollout client, recording each call's input ids
        def generate(self, inputs, params, **kw):
            calls.append([list(x) for x in inputs])
            return client.generate(inputs, params, **kw)

    stream = env.train_prompts()
    examples = [next(stream), next(stream)]
    from megatron_opd.serving.teachers import TeacherRouter

    groups = rollout_and_score(cfg, env, Recording(), TeacherRouter.single(cfg, client), examples,
                               ["g0", "g1"])
    samples = [s for g in groups for s in g]
    assert [s.group_id for s in samples] == ["g0", "g0", "g1", "g1"]
    multi = 0
    for s in samples:
        s.validate()
        P, resp, mask = len(s.prompt_ids), s.response_ids.tolist(), s.loss_mask
        full = s.prompt_ids.tolist() + resp
        # every turn's input was a prefix of the final sequence (nothing re-tokenised), and
        # each turn's input is the previous input + its output + the observation
        # (a group's copies share their first input: the prompt)
        mine = sorted({tuple(x) for c in calls for x in c if full[:len(x)] == x}, key=len)
        assert len(mine) == int(s.metadata["turns"]) >= 1
        multi += len(mine) > 1
        turn_starts = [len(x) - P for x in mine]
        assert all(mask[t] == 1 and (t == 0 or mask[t - 1] == 0) for t in turn_starts)
        assert mask.sum() == sum(1 for t in range(len(resp)) if mask[t])  # 0/1 only
        if len(mine) > 1:  # tool tokens: masked, log-prob 0, version of the token before
            tool = mask == 0
            assert tool.any() and np.all(s.behaviour_logprobs[tool] == 0.0)
        assert np.all(s.token_versions == 0)  # the server's version, on every token
        # teacher: sampled-token and top-K at every response position == a direct call
        check_teacher_scores(s, srv.url, K)
        # one model serves both: the rollout's log-prob of each assistant token is the
        # teacher's log-prob of it in the final sequence (exact token-in/token-out)
        live = mask == 1
        np.testing.assert_allclose(s.behaviour_logprobs[live], s.teacher_logprobs[live],
                                   atol=2e-4)
        # R3: the rollout engine's experts for every input position, as the server routes them
        shape = (cfg.model.num_layers, cfg.model.moe_router_topk)
        assert s.routed_experts.shape == (len(full) - 1, *shape)
        ref = direct_routing(srv.url, full, shape)[:len(full) - 1]
        same = np.sort(s.routed_experts, -1) == np.sort(ref, -1)
        assert same.all(-1).mean() > 0.95  # near-tied gates may flip between prefill and decode
    assert multi >= 2  # a random model's turns end by length: error observations, more turns


def test_interrupt_sync_registers_whole_episodes_and_continues_a_turn(tok_dir):
    """With correction.proximal=interrupt, a turn's partial output is continued after the
    interrupt, and the row the gate hands to the learner is the episode so far (its prompt,
    every earlier token and this turn's), so the learner scores the sample's own positions."""
    from megatron_opd.interrupt_sync import InterruptGate
    from megatron_opd.orchestrator import turn_generator

    env = make_env(tool_config(tok_dir, "env.max_turns=2", "env.max_response_tokens=400"), tok_dir)
    p = next(env.train_prompts())
    cfg = tool_config(tok_dir, "correction.proximal=interrupt")
    gate = InterruptGate()
    seen = []

    class Rollout:  # turn 1: cut by the interrupt after 2 tokens, then continued; turn 2: stop
        def generate(self, inputs, params, **kw):
            seen.append((inputs, params, {k: v for k, v in gate.rows.items()}))
            if len(seen) == 1:
                return [res([65, 66], version=3, finish="abort")]
            if len(seen) == 2:
                return [res([67], version=4, finish="length")]
            return [res([68, env.special.eos], version=4)]

    generate = turn_generator(cfg, Rollout(), gate)
    (t,) = run_episodes(env, [p], generate, {"max_new_tokens": 3}, keys=["s-0"])
    P = list(p.token_ids)
    assert seen[1][0] == [P + [65, 66]] and seen[1][1][0]["max_new_tokens"] == 1
    prompt, response, versions = seen[1][2]["s-0"]  # registered after the first (cut) call
    assert prompt == P and response == [65, 66] and versions.tolist() == [3, 3]
    obs = list(env.encode_observation(env.observation(
        "error: the turn ended without a tool call or an answer")))
    assert seen[2][0] == [P + [65, 66, 67] + obs]  # turn 2: the episode so far
    prompt, response, versions = gate.rows["s-0"]  # the whole episode, for the learner
    assert prompt == P and response == t.output_ids
    assert versions.tolist() == t.token_versions == [3, 3, 4] + [4] * len(obs) + [4, 4]
    assert t.loss_mask == [1, 1, 1] + [0] * len(obs) + [1, 1] and t.done
    assert gate.stats["continued_requests"] == 1
