"""The teacher fleet: routing sequences to several teachers, revisions, the scoring temperature.

Unit tests of the routing rules need no server. The rest run two real SGLang teacher servers on
CPU (one module-scoped fixture, two tiny models of different weights) and compare against direct
calls to each teacher and against transformers in float64.
"""

import numpy as np
import pytest
import requests
import torch

from megatron_opd.config import ConfigError, load_config
from megatron_opd.serving.sglang_client import SGLangClient
from megatron_opd.serving.teachers import (
    SINGLE, RoutedScores, TeacherFleet, TeacherRouter, TeacherRoutingError, TeacherSpec,
    TeacherTemperatureError, current_revisions, route_key, teacher_specs)
from tests.test_sglang_serving import SEQ, SPEC, save_model

QUICKSTART = "configs/quickstart.yaml"
TWO = ["teacher.route_by=column", "teacher.route_column=domain",
       "teacher.teachers=[{name: math, revision: math-v3, routes: [algebra, geometry]},"
       " {name: prose, revision: prose-v1}]"]
TOL = 1e-4  # fp32 server vs float64 transformers


# --- config and routing rules (no server) -------------------------------------------------------

def test_one_teacher_by_default():
    cfg = load_config(QUICKSTART)
    (spec,) = teacher_specs(cfg)
    assert spec == TeacherSpec(SINGLE, "", "teacher-v0", 1, ())
    assert current_revisions(cfg) == {"teacher-v0"}
    assert route_key(cfg, "digits", {"domain": "x"}) == ""
    one = _Recorder()
    out = TeacherRouter.single(cfg, one).score([[1, 2, 3]], start=[1], keys=["anything"])
    assert out.teachers == [SINGLE] and out.revisions == ["teacher-v0"]
    assert one.calls == [([[1, 2, 3]], [1], 0, 1.0)]


def test_several_teachers_and_their_route_keys():
    cfg = load_config(QUICKSTART, TWO + ["teacher.teachers[1].init=/p"])
    math, prose = teacher_specs(cfg)
    assert (math.name, math.init, math.revision, math.routes) == \
        ("math", "", "math-v3", ("algebra", "geometry"))  # init "" = the run's (prepared) one
    assert (prose.init, prose.routes) == ("/p", ("prose",))  # no routes: its name
    assert current_revisions(cfg) == {"math-v3", "prose-v1"}
    assert route_key(cfg, "digits", {"domain": "geometry", "row": 3}) == "geometry"
    assert route_key(cfg, "digits", {"domain": 7}) == "7"
    with pytest.raises(TeacherRoutingError, match="teacher.route_column: .*'domain'"):
        route_key(cfg, "digits", {"row": 3})
    with pytest.raises(TeacherRoutingError, match="string or an integer"):
        route_key(cfg, "digits", {"domain": ["a"]})
    with_default = load_config(QUICKSTART, TWO + ["teacher.default=prose"])
    assert route_key(with_default, "digits", {"row": 3}) == ""  # goes to the default
    by_env = load_config(QUICKSTART, ["teacher.route_by=env",
                                      "teacher.teachers=[{name: digits, revision: d1}]"])
    assert route_key(by_env, "digits", {"domain": "algebra"}) == "digits"


@pytest.mark.parametrize("override, key", [
    ("teacher.route_by=env", "teacher.route_by"),  # routing without teachers
    ("teacher.default=math", "teacher.default"),
    ("teacher.teachers=[{name: a, revision: r}]", "teacher.route_by"),  # teachers, no routing
])
def test_routing_without_its_parts_is_refused(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(QUICKSTART, [override])


@pytest.mark.parametrize("override, key", [
    ("teacher.teachers[1].routes=[geometry]", "teacher.teachers[1].routes"),
    ("teacher.teachers[1].name=math", "teacher.teachers[1].name"),
    ("teacher.teachers[1].name='a b'", "teacher.teachers[1].name"),
    ("teacher.teachers[1].revision=math-v3", "teacher.teachers[1].revision"),
    ("teacher.teachers[0].revision=", "teacher.teachers[0].revision"),
    ("teacher.teachers[0].num_servers=0", "teacher.teachers[0].num_servers"),
    ("teacher.default=nobody", "teacher.default"),
    ("teacher.route_column=", "teacher.route_column"),
    ("teacher.mode=offline", "teacher.teachers"),
])
def test_bad_teacher_lists_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match="^" + key.replace("[", r"\[").replace("]", r"\]")
                       + ": "):
        load_config(QUICKSTART, TWO + [override])


def test_a_teachers_vocabulary_must_be_the_students(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        **json.loads((save_model(tmp_path / "m", 0) / "config.json").read_text()),
        "vocab_size": SPEC.vocab_size + 8}))
    with pytest.raises(ConfigError, match=r"^teacher.teachers\[0\].init: vocab_size"):
        load_config(QUICKSTART, TWO + [f"teacher.teachers[0].init={tmp_path}"])


class _Recorder:
    """Stands in for a fleet's client (no server): answers each sequence with its own length."""

    def __init__(self):
        self.calls = []

    def score(self, input_ids, *, start, top_k, temperature):
        from megatron_opd.serving.sglang_client import ScoreResult

        self.calls.append((input_ids, start, top_k, temperature))
        return [ScoreResult(np.full(len(x) - s, len(x), np.float32), np.zeros((len(x) - s, 0)),
                            np.zeros((len(x) - s, 0))) for x, s in zip(input_ids, start)]


def test_unknown_key_is_refused_before_any_request():
    a, b = _Recorder(), _Recorder()
    router = TeacherRouter([TeacherFleet(TeacherSpec("a", "", "ra", 1, ("x",)), a),
                            TeacherFleet(TeacherSpec("b", "", "rb", 1, ("y",)), b)],
                           temperature=1.0, top_k=0)
    with pytest.raises(TeacherRoutingError, match="'z'"):
        router.score([[1, 2], [1, 2, 3]], start=[1, 1], keys=["x", "z"])
    assert not a.calls and not b.calls
    out = router.score([[1, 2], [1, 2, 3], [1, 2, 3, 4]], start=[1, 1, 2], keys=["y", "x", "y"])
    assert [r.logprobs[0] for r in out.results] == [2, 3, 4]  # back in the caller's order
    assert out.teachers == ["b", "a", "b"] and out.revisions == ["rb", "ra", "rb"]
    assert b.calls == [([[1, 2], [1, 2, 3, 4]], [1, 2], 0, 1.0)]  # one request per teacher
    router.score([[1, 2]], start=[1], keys=["x"], top_k=5, temperature=1.0)  # evaluation's own
    assert a.calls[-1][2:] == (5, 1.0)
    # as one client for evaluation: the prompt before `start` picks the key
    from megatron_opd.envs import EnvPrompt

    cfg = load_config(QUICKSTART, ["teacher.route_by=column", "teacher.route_column=d",
                                   "teacher.teachers=[{name: a, revision: ra, routes: [x]},"
                                   " {name: b, revision: rb, routes: [y]}]"])
    plain = router.for_prompts(cfg, "digits", [EnvPrompt((1, 2), "p", metadata={"d": "x"}),
                                               EnvPrompt((1,), "q", metadata={"d": "y"})])
    before = len(a.calls), len(b.calls)
    got = plain.score([[1, 2, 3], [1, 5, 6, 7]], start=[2, 1], top_k=3)
    assert [r.logprobs[0] for r in got] == [3, 4]
    assert a.calls[-1][:3] == ([[1, 2, 3]], [2], 3) and b.calls[-1][0] == [[1, 5, 6, 7]]
    assert (len(a.calls), len(b.calls)) == (before[0] + 1, before[1] + 1)
    with pytest.raises(ValueError, match="two teachers"):
        TeacherRouter([TeacherFleet(TeacherSpec("a", "", "ra", 1, ("x",)), a),
                       TeacherFleet(TeacherSpec("b", "", "rb", 1, ("x",)), b)],
                      temperature=1.0, top_k=0)


# --- two real teacher servers ------------------------------------------------------------------

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny teachers of different weights, one SGLang server each (started together)."""
    from megatron_opd.serving.sglang_server import SGLangServer, free_port

    root = tmp_path_factory.mktemp("teachers")
    paths = {"math": save_model(root / "math", 0), "prose": save_model(root / "prose", 1)}
    servers = {}
    try:
        for name, path in paths.items():
            servers[name] = SGLangServer(f"teacher-{name}", str(path), free_port(),
                                         str(root / f"{name}.log"), max_total_tokens=2048,
                                         threads=1)
            servers[name].start()
        for srv in servers.values():
            srv.wait_ready(300)
        yield {name: (paths[name], servers[name].url) for name in paths}
    finally:
        for srv in servers.values():
            srv.stop()


def _reference(path, seq, temperature=1.0):
    """transformers' log-probs of every next token, float64, at `temperature`."""
    from transformers import Qwen3MoeForCausalLM

    m = Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor([seq])).logits[0].double() / temperature, -1)


def _router(teachers, temperature=1.0, top_k=4, default=""):
    fleets = [TeacherFleet(TeacherSpec("math", "", "math-v3", 1, ("algebra", "geometry")),
                           SGLangClient(teachers["math"][1]), (teachers["math"][1],)),
              TeacherFleet(TeacherSpec("prose", "", "prose-v1", 1, ("prose",)),
                           SGLangClient(teachers["prose"][1]), (teachers["prose"][1],))]
    return TeacherRouter(fleets, temperature=temperature, top_k=top_k, default=default)


SEQS = [SEQ, SEQ[:8], [3, 9, 4, 4, 7, 2], SEQ[2:], [5, 6, 7, 8, 9]]
STARTS = [6, 3, 2, 4, 1]
KEYS = ["algebra", "prose", "geometry", "prose", "algebra"]
OWNER = {"algebra": "math", "geometry": "math", "prose": "prose"}


def _check_against(scores: RoutedScores, teachers, temperature, top_k):
    for x, s, key, res in zip(SEQS, STARTS, KEYS, scores.results):
        ref = _reference(teachers[OWNER[key]][0], x, temperature)
        want = np.array([ref[j - 1, x[j]].item() for j in range(s, len(x))])
        assert np.abs(res.logprobs - want).max() < TOL
        for j, ids, lps in zip(range(s, len(x)), res.topk_ids, res.topk_logprobs):
            top = ref[j - 1].topk(top_k)
            assert sorted(ids.tolist()) == sorted(top.indices.tolist())
            assert np.abs(lps - ref[j - 1, ids].numpy()).max() < TOL


@slow
def test_each_row_is_scored_by_its_teacher(teachers):
    router = _router(teachers)
    out = router.score(SEQS, start=STARTS, keys=KEYS)
    assert out.teachers == [OWNER[k] for k in KEYS]
    assert out.revisions == [{"math": "math-v3", "prose": "prose-v1"}[OWNER[k]] for k in KEYS]
    _check_against(out, teachers, 1.0, 4)
    # equal to a direct call to that teacher, and not to the other one (different weights)
    for x, s, key, res in zip(SEQS, STARTS, KEYS, out.results):
        other = "prose" if OWNER[key] == "math" else "math"
        mine = SGLangClient(teachers[OWNER[key]][1]).score([x], start=[s], top_k=4)[0]
        theirs = SGLangClient(teachers[other][1]).score([x], start=[s], top_k=4)[0]
        np.testing.assert_allclose(res.logprobs, mine.logprobs, atol=1e-6)
        np.testing.assert_array_equal(res.topk_ids, mine.topk_ids)
        assert np.abs(res.logprobs - theirs.logprobs).max() > 1e-2
    with pytest.raises(TeacherRoutingError):
        router.score(SEQS, start=STARTS, keys=KEYS[:-1] + ["poetry"])
    fallback = _router(teachers, default="prose").score([SEQ], start=[6], keys=["poetry"])
    assert fallback.teachers == ["prose"] and fallback.revisions == ["prose-v1"]


@slow
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_patched_server_scores_prompt_tokens_at_the_requests_temperature(teachers, temperature):
    """The compat patch, on a real server: input_token_logprobs and input_top_logprobs of a
    prefill-only request at temperature T are log_softmax(logits / T) at every position."""
    path, url = teachers["math"]
    k = 5
    r = requests.post(f"{url}/generate", timeout=60, json={
        "input_ids": SEQ, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": k,
        "sampling_params": {"max_new_tokens": 0, "temperature": temperature}}).json()
    ref = _reference(path, SEQ, temperature)
    meta = r["meta_info"]
    sampled = [e[0] for e in meta["input_token_logprobs"][1:]]
    want = [ref[j - 1, SEQ[j]].item() for j in range(1, len(SEQ))]
    assert np.abs(np.array(sampled) - want).max() < TOL
    for j, row in enumerate(meta["input_top_logprobs"][1:], start=1):
        ids = [e[1] for e in row]
        assert sorted(ids) == sorted(ref[j - 1].topk(k).indices.tolist())
        assert max(abs(e[0] - ref[j - 1, e[1]].item()) for e in row) < TOL


def _client_passes_temperature() -> bool:
    """Whether SGLangClient.score sends a temperature other than 1 (the issue 15 change)."""
    client = SGLangClient("http://127.0.0.1:9")
    client._post_retrying = lambda *a, **k: ([{"meta_info": {
        "input_token_logprobs": [[None, 1, None], [-1.0, 2, None]]}}], "")
    try:
        client.score([[1, 2]], start=[1], temperature=0.5)
    except ValueError:
        return False
    return True


needs_client = pytest.mark.skipif(not _client_passes_temperature(),
                                  reason="SGLangClient.score refuses temperature != 1")


@slow
@needs_client
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_routed_scores_are_at_the_teacher_temperature(teachers, temperature):
    router = _router(teachers, temperature=temperature)
    _check_against(router.score(SEQS, start=STARTS, keys=KEYS), teachers, temperature, 4)
    measured = router.verify_temperature(SEQ)
    assert set(measured) == {teachers["math"][1], teachers["prose"][1]}
    assert all(abs(t - temperature) < 1e-3 * temperature for t in measured.values())


@slow
@needs_client
def test_a_server_scoring_at_one_is_refused(teachers):
    """What an unpatched server does (log-probs at 1 whatever it is asked) fails the check."""
    class AtOne(SGLangClient):
        def score(self, input_ids, *, start, top_k=0, temperature=1.0):
            return super().score(input_ids, start=start, top_k=top_k, temperature=1.0)

    with pytest.raises(TeacherTemperatureError, match="at temperature 1, not"):
        _router(teachers, temperature=0.5).verify_temperature(SEQ, client_for=AtOne)
    assert _router(teachers).verify_temperature(SEQ, client_for=AtOne) == {}  # T = 1: nothing
