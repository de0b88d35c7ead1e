"""The fleets end to end, without the learner (issue 15's integration check): two rollout
servers behind SGLang's model gateway (smg, round robin), one teacher server, and the calculator
tool environment run by the orchestrator's `rollout_and_score`, while the weight publisher
replaces the rollout fleet's weights again and again in each pause mode.

Every sample is checked against independent references:
- per-token versions: the rollout models A and B differ, and versions alternate between them, so
  the behaviour log-prob of every assistant token must be transformers' log-prob under the model
  its version names, given exactly the tokens before it (prompt, earlier turns, tool tokens).
  That also proves token-in/token-out through continuations (abort) and retractions (retract).
  Under in_place a response decoded on KV of older weights matches neither model and must be
  flagged (`stale_kv`); unflagged ones are checked like the others;
- loss masks: the masked (tool) runs are exactly the environment's observation text, with
  log-prob 0, and every token the model sampled trains;
- teacher: sampled-token and top-K log-probs at every response position equal a direct call to
  the teacher server on the same tokens.

The same fleet then takes updates directly (no router) while long greedy responses run through
`serving/resume.generate_through_updates`, in each pause mode and by disk (the fallback), with
the same per-token reference; and in_place is refused on a server with a prefix cache. (One
module: the servers start once.)
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import load_file

from megatron_opd.envs import make_env
from megatron_opd.orchestrator import rollout_and_score
from megatron_opd.serving.resume import generate_through_updates
from megatron_opd.serving.router import RoutedClient, SmgRouter
from megatron_opd.serving.sglang_client import SGLangClient
from megatron_opd.serving.sglang_server import SGLangServer, free_port
from megatron_opd.serving.teachers import TeacherRouter
from tests.hf_fixtures import make_hf_moe
from tests.test_multiturn import check_teacher_scores
from tests.test_tool_env import make_tool_tokenizer, tool_config

pytestmark = pytest.mark.slow

K = 4  # teacher top-K
TOL = 2e-4  # fp32 both sides; SGLang's torch-native attention sums in another order
UPDATES = 4  # weight updates per pause mode


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from transformers import Qwen3MoeForCausalLM

    root = tmp_path_factory.mktemp("fleet")
    tok = make_tool_tokenizer(root / "tok")
    dirs = {name: make_hf_moe(root / name, tokenizer_dir=tok, max_position_embeddings=1024,
                              seed=seed, head_scale=scale)
            for name, seed, scale in (("A", 0, 1.0), ("B", 1, 1.0), ("teacher", 2, 3.0))}
    rollout = [SGLangServer(f"rollout-{i}", str(dirs["A"]), free_port(),
                            str(root / f"rollout-{i}.log"), max_total_tokens=4096, threads=1,
                            extra_args=("--weight-version", "0", "--disable-radix-cache"))
               for i in range(2)]
    teacher = SGLangServer("teacher", str(dirs["teacher"]), free_port(), str(root / "teacher.log"),
                           max_total_tokens=4096, threads=1)
    router = None
    try:
        for s in rollout + [teacher]:
            s.start()
        for s in rollout + [teacher]:
            s.wait_ready(300)
        router = SmgRouter("rollout-router", [s.url for s in rollout], "round_robin",
                           free_port(), str(root / "router.log"))
        router.start()
        router.wait_ready(120)
        models = {m: Qwen3MoeForCausalLM.from_pretrained(dirs[m], dtype=torch.float32).eval()
                  for m in "AB"}
        yield dict(dirs=dirs, rollout=rollout, teacher=teacher, router=router, models=models)
    finally:
        if router is not None:
            router.stop()
        for s in rollout + [teacher]:
            s.stop()


@pytest.fixture(scope="module")
def publisher(fleet):
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.weight_sync import DistributedWeightPublisher

    install_megatron_cpu_compat()
    init_distributed(ParallelConfig())  # the learner's own world exists beside the update group
    pub = DistributedWeightPublisher([SGLangClient(s.url) for s in fleet["rollout"]],
                                     bucket_bytes=1 << 16)
    pub.connect()
    pub.served = {0: "A"}  # version -> the model it is (the test's bookkeeping)
    try:
        yield pub
    finally:
        pub.close()
        destroy_distributed()


def _reference(models, which: str, seq: list[int]) -> np.ndarray:
    """log p(seq[j] | seq[<j]) for j >= 1 under model A or B (float64 softmax)."""
    with torch.no_grad():
        lp = torch.log_softmax(models[which](torch.tensor([seq])).logits[0].double(), -1)
    return lp[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0].numpy()


@pytest.mark.parametrize("mode", ["retract", "abort", "in_place"])
def test_tool_episodes_through_the_router_across_updates_in_each_pause_mode(fleet, publisher,
                                                                           mode):
    cfg = tool_config(fleet["dirs"]["A"], f"teacher.top_k={K}", "rollout.max_new_tokens=12",
                      "env.max_turns=3", "env.max_response_tokens=200",
                      "data.max_prompt_tokens=300", f"weight_sync.pause_mode={mode}")
    env = make_env(cfg, fleet["dirs"]["A"])
    rollout = RoutedClient(fleet["router"].url)  # what RunWiring.rollout_client gives a fleet
    teacher = TeacherRouter.single(cfg, SGLangClient(fleet["teacher"].url))
    weights = {m: load_file(str(fleet["dirs"][m] / "model.safetensors")) for m in "AB"}
    publisher.pause_mode = mode
    done, errors = threading.Event(), []

    def publish_repeatedly():  # A <-> B, each update while episodes run
        try:
            for _ in range(UPDATES):
                time.sleep(0.4)
                version = max(publisher.served) + 1
                model = "B" if publisher.served[version - 1] == "A" else "A"
                publisher.publish(weights[model].items(), version=version)
                publisher.served[version] = model
        except Exception as e:  # reported by the test thread
            errors.append(e)
        finally:
            done.set()

    stream = env.train_prompts()
    first = max(publisher.served)
    thread = threading.Thread(target=publish_repeatedly)
    thread.start()
    samples, n = [], 0
    try:
        while not done.is_set() or n < 2:
            examples = [next(stream) for _ in range(4)]
            groups = rollout_and_score(cfg, env, rollout, teacher, examples,
                                       [f"{mode}-{n}-{i}" for i in range(4)])
            samples += [s for g in groups for s in g]
            n += 1
    finally:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(samples) == 4 * n  # every episode came back as a sample

    pre, post = cfg.env.calculator.observation.split("{result}")
    spanning = flagged = tool_runs = 0
    for s in samples:
        s.validate()
        assert s.finish_reason != "abort"  # an aborted turn is continued, never sent cut
        P, resp = len(s.prompt_ids), s.response_ids.tolist()
        seq = s.prompt_ids.tolist() + resp
        mask, lp, v = s.loss_mask.astype(bool), s.behaviour_logprobs, s.token_versions
        # versions: non-decreasing, each one the fleet served during this mode's updates
        assert np.all(np.diff(v) >= 0) and set(v.tolist()) <= set(range(first, first + UPDATES + 1))
        spanning += len(set(v[mask].tolist())) > 1
        # tool tokens: each masked run is the environment's observation, log-prob 0
        runs = [m.span() for m in re.finditer(r"0+", "".join("1" if x else "0" for x in mask))]
        for a, b in runs:
            text = env.tokenizer.decode(resp[a:b], skip_special_tokens=False)
            assert re.fullmatch(re.escape(pre) + r".*" + re.escape(post), text, re.S), text
            assert np.all(lp[a:b] == 0.0)
        tool_runs += len(runs)
        # behaviour log-probs: transformers under the model of each token's version
        stale = bool(s.metadata.get("stale_kv"))
        flagged += stale
        assert not stale or mode == "in_place"
        if not stale:
            fresh = {m: _reference(fleet["models"], m, seq)[P - 1:] for m in set(
                publisher.served[x] for x in v[mask].tolist())}
            expect = np.array([fresh[publisher.served[x]][j] if mask[j] else 0.0
                               for j, x in enumerate(v.tolist())])
            assert np.abs(lp - expect)[mask].max() < TOL, (mode, v.tolist())
        # teacher: the same numbers as a direct call on the same tokens
        check_teacher_scores(s, fleet["teacher"].url, K)
    assert tool_runs > 0, "no episode had more than one turn"
    assert spanning > 0, "no episode met a weight update"
    # every rollout server took every update, and the router still routes to both
    last = max(publisher.served)
    assert last == first + UPDATES
    for s in fleet["rollout"]:
        assert SGLangClient(s.url).weight_version() == str(last)
    assert fleet["router"].workers() == {s.url: True for s in fleet["rollout"]}
    # scoring goes through the router too (a teacher fleet's path): same numbers as one server
    seqs = [s.prompt_ids.tolist() + s.response_ids.tolist() for s in samples[:4]]
    start = [len(s.prompt_ids) for s in samples[:4]]
    routed = RoutedClient(fleet["router"].url).score(seqs, start=start, top_k=K)
    direct = SGLangClient(fleet["rollout"][0].url).score(seqs, start=start, top_k=K)
    for a, b in zip(routed, direct):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
    print(f"{mode}: {len(samples)} samples, {spanning} spanning updates, {flagged} stale_kv, "
          f"{tool_runs} tool observations")

# Direct to the two rollout servers (no router): long greedy responses with an update mid-way,
# continued by `serving/resume.generate_through_updates` (what the orchestrator's turns use).
N = 160  # new tokens per request: long enough to be running when the update comes
PROMPTS = [[1, 5, 9, 13, 17], [1, 22, 7, 40], [1, 60, 3, 3, 8, 11]]
SEQ = [1, 13, 4, 5, 6, 17, 6, 5, 4, 2, 31, 63]


def _running(url: str) -> int:
    """Requests the server is decoding now (GET /v1/loads)."""
    loads = requests.get(f"{url}/v1/loads", timeout=10).json()["loads"]
    return sum(int(x.get("num_running_reqs", 0)) for x in loads)


def _wait_running(urls, deadline_s=60.0):
    deadline = time.time() + deadline_s
    while not all(_running(u) for u in urls):
        assert time.time() < deadline, "requests never started running"
        time.sleep(0.02)


def _generate_during_update(fleet, mode, update):
    """Each server decodes PROMPTS (greedy, N tokens) through generate_through_updates while
    `update()` runs once every server has requests running; returns the results per server."""
    servers = fleet["rollout"]
    out, errors = {}, []

    def work(i, url):
        try:
            client = SGLangClient(url)
            # as a long-lived client that has seen the served version: a fresh one flags every
            # in_place response, conservatively (serving/resume.py's _stale_kv)
            client.newest_version_seen = int(client.weight_version())
            out[i] = generate_through_updates(
                client, PROMPTS,
                {"temperature": 0.0, "max_new_tokens": N, "ignore_eos": True}, pause_mode=mode)
        except Exception as e:  # reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, s.url)) for i, s in enumerate(servers)]
    for t in threads:
        t.start()
    try:
        _wait_running([s.url for s in servers])
        update()
    finally:
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    return [out[i] for i in range(len(servers))]


def _check(results, fleet, old, new, served, mode):
    spanned = 0
    for per_server in results:
        for prompt, r in zip(PROMPTS, per_server):
            assert r.finish_reason == "length" and len(r.output_ids) == N  # never truncated
            v = r.token_versions.tolist()
            assert set(v) <= {old, new} and v == sorted(v), v
            spanned += len(set(v)) == 2
            # in_place flags spanning responses, and every one whose first token is newer than
            # the client had seen: its prompt may have been prefilled by the old weights, the
            # first token tagged after the update
            assert r.stale_kv == (mode == "in_place" and (len(set(v)) == 2 or v[0] == new))
            seq = list(prompt) + list(r.output_ids)
            fresh = {m: _reference(fleet["models"], m, seq)[len(prompt) - 1:] for m in "AB"}
            expect = np.array([fresh[served[x]][j] for j, x in enumerate(v)])
            diff = np.abs(r.output_logprobs - expect)
            if mode == "in_place":
                old_part = np.array(v) == old
                assert diff[old_part].max() < TOL
                # decoded with the new weights on the old weights' KV: not a fresh computation
                if (~old_part).any() and len(set(v)) == 2:
                    assert diff[~old_part].max() > 10 * TOL
            else:
                assert diff.max() < TOL, (mode, v, diff)
            if mode == "abort" and len(set(v)) == 2:  # continued: the server's input was
                # prompt + the partial output (the last call's prompt)
                assert r.meta_info["prompt_tokens"] > len(prompt)
                assert r.meta_info["prompt_tokens"] + r.meta_info["completion_tokens"] \
                    == len(prompt) + N
    assert spanned >= 2, "no response met the update on both servers"


def _expect_serving(fleet, version, model):
    want = _reference(fleet["models"], model, SEQ)[5:]
    for s in fleet["rollout"]:
        c = SGLangClient(s.url)
        assert c.weight_version() == str(version)
        assert np.abs(c.score([SEQ], start=[6])[0].logprobs - want).max() < TOL


def _next(pub):
    old = max(pub.served)
    new = old + 1
    model = "B" if pub.served[old] == "A" else "A"
    return old, new, model


@pytest.mark.parametrize("mode", ["retract", "abort", "in_place"])
def test_distributed_update_in_each_pause_mode_with_requests_in_flight(fleet, publisher, mode):
    dirs = fleet["dirs"]
    old, new, model = _next(publisher)
    publisher.pause_mode = mode
    results = _generate_during_update(fleet, mode, lambda: publisher.publish(
        load_file(str(dirs[model] / "model.safetensors")).items(), version=new))
    publisher.served[new] = model
    _check(results, fleet, old, new, publisher.served, mode)
    _expect_serving(fleet, new, model)

    # interrupt sync (correction.proximal=interrupt) aborts and pauses the fleet in abort mode
    # itself before the publisher pauses it with its own mode: the update still goes through
    old, new, model = _next(publisher)
    for c in publisher.clients:
        c.abort_all()
        c.pause_generation("abort")
    try:
        publisher.publish(load_file(str(dirs[model] / "model.safetensors")).items(), version=new)
    finally:
        for c in publisher.clients:
            c.continue_generation()
    publisher.served[new] = model
    _expect_serving(fleet, new, model)


def test_disk_fallback_updates_every_server_in_place_with_requests_in_flight(fleet, publisher,
                                                                            tmp_path):
    """Paused in_place, a disk update that flushes the cache is refused by SGLang (HTTP 400:
    requests still run); the publisher sends it without the flush."""
    from megatron_opd.weight_sync import DiskWeightPublisher

    dirs = fleet["dirs"]
    old, new, model = _next(publisher)
    disk = DiskWeightPublisher(publisher.clients, tmp_path / "weights", dirs["A"],
                               pause_mode="in_place")
    results = _generate_during_update(fleet, "in_place", lambda: disk.publish(
        load_file(str(dirs[model] / "model.safetensors")).items(), version=new))
    publisher.served[new] = model
    _check(results, fleet, old, new, publisher.served, "in_place")
    _expect_serving(fleet, new, model)


def test_in_place_is_refused_on_a_server_with_a_prefix_cache(fleet):
    """A server that keeps finished requests' prefixes would serve them to new requests after
    an in_place update: KV of older weights that no span shows."""
    from megatron_opd.weight_sync import check_servers_for_mode

    class WithCache(SGLangClient):
        def server_info(self):
            return {**super().server_info(), "disable_radix_cache": False}

    servers = fleet["rollout"]
    assert SGLangClient(servers[0].url).server_info()["disable_radix_cache"] is True
    check_servers_for_mode([SGLangClient(servers[0].url)], "in_place")
    with pytest.raises(ValueError, match="weight_sync.pause_mode=in_place.*radix"):
        check_servers_for_mode([WithCache(servers[0].url)], "in_place")
    check_servers_for_mode([WithCache(servers[0].url)], "retract")  # flushed with the update
