"""Weight updates to a fleet of two real SGLang servers (CPU, gloo) with requests in flight, in
each pause mode (`weight_sync.pause_mode`), and generation that goes on through them
(`serving/resume.generate_through_updates`).

Independent check of per-token versions: models A and B differ, decoding is greedy, so every
token's log-prob must be transformers' log-prob under the model of the version the token carries,
given exactly prompt + the tokens before it (what the server's input must have been, also for a
response continued after an abort). Under in_place the tokens decoded after the update sit on KV
computed by the old weights: their log-probs match neither model's fresh computation, and the
response is flagged `stale_kv`."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import load_file

from megatron_opd.models.spec import MoEModelSpec, to_hf_config
from megatron_opd.serving.resume import generate_through_updates
from megatron_opd.serving.sglang_client import SGLangClient
from megatron_opd.serving.sglang_server import SGLangServer, free_port
from megatron_opd.tokenizer import SPECIALS, save_tokenizer

SPEC = MoEModelSpec(vocab_size=64, max_position_embeddings=1024)
TOL = 1e-4  # fp32 on both sides; SGLang's torch-native attention sums in another order
N = 160  # new tokens per request: long enough to be running when the update comes
PROMPTS = [[1, 5, 9, 13, 17], [1, 22, 7, 40], [1, 60, 3, 3, 8, 11]]
SEQ = [1, 13, 4, 5, 6, 17, 6, 5, 4, 2, 31, 63]

pytestmark = pytest.mark.slow


def _save(path, seed):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    Qwen3MoeForCausalLM(to_hf_config(SPEC)).float().save_pretrained(path)
    save_tokenizer(path, list(SPECIALS) + [f"w{i}" for i in range(SPEC.vocab_size - 3)])
    return path


class _Reference:
    """transformers' log-probs under model A or B (version v is served by MODEL_OF[v])."""

    def __init__(self, dirs):
        from transformers import Qwen3MoeForCausalLM

        self.dirs = dirs
        self.models = {k: Qwen3MoeForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
                       for k, d in dirs.items()}

    def logprobs(self, which: str, seq: list[int]) -> torch.Tensor:
        """[len(seq) - 1]: log p(seq[j] | seq[<j]) for j >= 1."""
        with torch.no_grad():
            lp = torch.log_softmax(self.models[which](torch.tensor([seq])).logits[0].double(), -1)
        return lp[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two rollout servers (without a prefix cache: in_place needs it) and the references."""
    root = tmp_path_factory.mktemp("fleet")
    dirs = {"A": _save(root / "A", 0), "B": _save(root / "B", 1)}
    servers = [SGLangServer(f"rollout-{i}", str(dirs["A"]), free_port(),
                            str(root / f"rollout-{i}.log"), max_total_tokens=4096, threads=1,
                            context_length=1024,
                            extra_args=("--weight-version", "0", "--disable-radix-cache"))
               for i in range(2)]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(300)
        yield servers, dirs, _Reference(dirs)
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def publisher(fleet):
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.weight_sync import DistributedWeightPublisher

    servers, _, _ = fleet
    install_megatron_cpu_compat()
    init_distributed(ParallelConfig())  # the learner's own world exists beside the update group
    pub = DistributedWeightPublisher([SGLangClient(s.url) for s in servers], bucket_bytes=1 << 16)
    pub.connect()
    pub.version = 0  # what the fleet serves (the test's own bookkeeping)
    pub.served = {0: "A"}
    try:
        yield pub
    finally:
        pub.close()
        destroy_distributed()


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
    servers, _, _ = fleet
    out, errors = {}, []

    def work(i, url):
        try:
            out[i] = generate_through_updates(
                SGLangClient(url), PROMPTS,
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
    _, _, ref = fleet
    spanned = 0
    for per_server in results:
        for prompt, r in zip(PROMPTS, per_server):
            assert r.finish_reason == "length" and len(r.output_ids) == N  # never truncated
            v = r.token_versions.tolist()
            assert set(v) <= {old, new} and v == sorted(v), v
            spanned += len(set(v)) == 2
            assert r.stale_kv == (mode == "in_place" and len(set(v)) == 2)
            seq = list(prompt) + list(r.output_ids)
            fresh = {m: ref.logprobs(m, seq)[len(prompt) - 1:].numpy() for m in "AB"}
            expect = np.array([fresh[served[x]][j] for j, x in enumerate(v)])
            diff = np.abs(r.output_logprobs - expect)
            if mode == "in_place":
                old_part = np.array(v) == old
                assert diff[old_part].max() < TOL
                # decoded with the new weights on the old weights' KV: not a fresh computation
                if (~old_part).any() and r.stale_kv:
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
    servers, _, ref = fleet
    want = ref.logprobs(model, SEQ)[5:].numpy()
    for s in servers:
        c = SGLangClient(s.url)
        assert c.weight_version() == str(version)
        assert np.abs(c.score([SEQ], start=[6])[0].logprobs - want).max() < TOL


def _next(pub):
    old = pub.version
    new = old + 1
    model = "B" if pub.served[old] == "A" else "A"
    return old, new, model


@pytest.mark.parametrize("mode", ["retract", "abort", "in_place"])
def test_distributed_update_in_each_pause_mode_with_requests_in_flight(fleet, publisher, mode):
    _, dirs, _ = fleet
    old, new, model = _next(publisher)
    publisher.pause_mode = mode
    results = _generate_during_update(fleet, mode, lambda: publisher.publish(
        load_file(str(dirs[model] / "model.safetensors")).items(), version=new))
    publisher.version, publisher.served[new] = new, model
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
    publisher.version, publisher.served[new] = new, model
    _expect_serving(fleet, new, model)


def test_disk_fallback_updates_every_server_in_place_with_requests_in_flight(fleet, publisher,
                                                                            tmp_path):
    """Paused in_place, a disk update that flushes the cache is refused by SGLang (HTTP 400:
    requests still run); the publisher sends it without the flush."""
    from megatron_opd.weight_sync import DiskWeightPublisher

    _, dirs, _ = fleet
    old, new, model = _next(publisher)
    disk = DiskWeightPublisher(publisher.clients, tmp_path / "weights", dirs["A"],
                               pause_mode="in_place")
    results = _generate_during_update(fleet, "in_place", lambda: disk.publish(
        load_file(str(dirs[model] / "model.safetensors")).items(), version=new))
    publisher.version, publisher.served[new] = new, model
    _check(results, fleet, old, new, publisher.served, "in_place")
    _expect_serving(fleet, new, model)


def test_in_place_is_refused_on_a_server_with_a_prefix_cache(fleet):
    """A server that keeps finished requests' prefixes would serve them to new requests after
    an in_place update: KV of older weights that no span shows."""
    from megatron_opd.weight_sync import check_servers_for_mode

    class WithCache(SGLangClient):
        def server_info(self):
            return {**super().server_info(), "disable_radix_cache": False}

    servers, _, _ = fleet
    assert SGLangClient(servers[0].url).server_info()["disable_radix_cache"] is True
    check_servers_for_mode([SGLangClient(servers[0].url)], "in_place")
    with pytest.raises(ValueError, match="weight_sync.pause_mode=in_place.*radix"):
        check_servers_for_mode([WithCache(servers[0].url)], "in_place")
    check_servers_for_mode([WithCache(servers[0].url)], "retract")  # flushed with the update
