"""A real SGLang server on CPU: generation, teacher scoring and weight publishing vs transformers."""

import os

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from megatron_opd.models.spec import MoEModelSpec, to_hf_config
from megatron_opd.serving.sglang_client import SGLangClient, token_versions_from_meta
from megatron_opd.serving.sglang_server import SGLangServer, ServerStartError, free_port
from megatron_opd.tokenizer import SPECIALS, save_tokenizer

SPEC = MoEModelSpec()
TOL = 1e-4  # fp32 on both sides; SGLang's torch-native attention sums in another order
SEQ = [1, 13, 4, 5, 6, 17, 6, 5, 4, 2, 31]  # includes the last vocab id (SGLang reports it as 0)


def save_model(path, seed):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    Qwen3MoeForCausalLM(to_hf_config(SPEC)).float().save_pretrained(path)
    save_tokenizer(path, list(SPECIALS) + [f"w{i}" for i in range(SPEC.vocab_size - 3)])
    return path


def reference_logprobs(path, seq):
    from transformers import Qwen3MoeForCausalLM

    m = Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor([seq])).logits[0].double(), -1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_model(root / "A", 0), save_model(root / "B", 1)


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = SGLangServer("test", str(models[0]), free_port(), str(log), max_total_tokens=2048,
                       threads=1, extra_args=("--weight-version", "0"))
    srv.start()
    try:
        srv.wait_ready(300)
        yield srv
    finally:
        srv.stop()


def test_greedy_generation_and_logprobs_match_transformers(server, models):
    client = SGLangClient(server.url)
    prompt = SEQ[:6]
    res = client.generate([prompt], {"temperature": 0.0, "max_new_tokens": 5})[0]
    ref = reference_logprobs(models[0], prompt + res.output_ids)
    for j, tok in enumerate(res.output_ids):
        row = ref[len(prompt) - 1 + j]
        assert tok == int(row.argmax())  # greedy
        assert abs(res.output_logprobs[j] - row[tok].item()) < TOL
    assert res.weight_version == 0 and list(res.token_versions) == [0] * len(res.output_ids)


def test_flush_cache_drops_the_prefix_cache(server):
    """SGLang answers /flush_cache in plain text: the client reads the status only."""
    client = SGLangClient(server.url)
    prompt, params = SEQ[:7], {"temperature": 0.0, "max_new_tokens": 1}
    client.generate([prompt], params)
    assert client.generate([prompt], params)[0].meta_info["cached_tokens"] > 0
    client.flush_cache()
    assert client.generate([prompt], params)[0].meta_info["cached_tokens"] == 0


def test_teacher_scoring_matches_transformers_including_top_k(server, models):
    client = SGLangClient(server.url)
    start = 6
    sc = client.score([SEQ], start=[start], top_k=SPEC.vocab_size)[0]
    ref = reference_logprobs(models[0], SEQ)
    expected = np.array([ref[j - 1, SEQ[j]].item() for j in range(start, len(SEQ))])
    assert np.abs(sc.logprobs - expected).max() < TOL
    # top-K = whole vocabulary: a full distribution, ids are real ids (all distinct)
    for row_ids, row_lp, j in zip(sc.topk_ids, sc.topk_logprobs, range(start, len(SEQ))):
        assert sorted(row_ids.tolist()) == list(range(SPEC.vocab_size))
        assert np.abs(row_lp - ref[j - 1, row_ids].numpy()).max() < TOL


def test_distributed_and_disk_weight_publishing(server, models, tmp_path):
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.weight_sync import DiskWeightPublisher, DistributedWeightPublisher

    client = SGLangClient(server.url)
    ref_a, ref_b = reference_logprobs(models[0], SEQ), reference_logprobs(models[1], SEQ)
    expected = lambda ref: np.array([ref[j - 1, SEQ[j]].item() for j in range(6, len(SEQ))])
    install_megatron_cpu_compat()
    init_distributed(ParallelConfig())  # the learner's own world exists beside the update group
    pub = DistributedWeightPublisher([client])
    try:
        pub.connect()
        pub.publish(load_file(str(models[1] / "model.safetensors")).items(), version=3)
        assert client.weight_version() == "3"
        got = client.score([SEQ], start=[6])[0].logprobs
        assert np.abs(got - expected(ref_b)).max() < TOL
        assert np.abs(got - expected(ref_a)).max() > 0.1
        res = client.generate([SEQ[:6]], {"temperature": 1.0, "max_new_tokens": 3})[0]
        assert res.weight_version == 3 and set(res.token_versions) == {3}
    finally:
        pub.close()
        destroy_distributed()
    disk = DiskWeightPublisher([client], tmp_path / "weights", models[0])
    disk.publish(load_file(str(models[0] / "model.safetensors")).items(), version=4)
    assert client.weight_version() == "4"
    assert np.abs(client.score([SEQ], start=[6])[0].logprobs - expected(ref_a)).max() < TOL


def test_token_versions_from_spans():
    meta = {"weight_version": "7", "weight_versions": [
        {"version": "5", "start": 0, "end": 2}, {"version": "7", "start": 2, "end": 5}]}
    assert token_versions_from_meta(meta, 5).tolist() == [5, 5, 7, 7, 7]
    assert token_versions_from_meta({"weight_version": "2"}, 3).tolist() == [2, 2, 2]


def test_bad_model_path_gives_clear_error_with_log_tail(tmp_path):
    srv = SGLangServer("broken", str(tmp_path / "no-such-model"), free_port(),
                       str(tmp_path / "broken.log"), threads=1)
    srv.start()
    with pytest.raises(ServerStartError) as err:
        srv.wait_ready(120)
    assert "'broken'" in str(err.value) and "last lines of" in str(err.value)
    assert "no-such-model" in str(err.value)
    srv.stop()


def test_stop_leaves_no_process_of_the_group(models, tmp_path):
    srv = SGLangServer("stopper", str(models[0]), free_port(), str(tmp_path / "s.log"),
                       max_total_tokens=1024, threads=1)
    srv.start()
    srv.wait_ready(300)
    group = [p for p in psutil.process_iter() if _pgid(p.pid) == srv.pid]
    assert len(group) >= 2  # launcher + scheduler/detokenizer children
    srv.stop()
    alive = [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
