"""SGLang's routed experts (`return_routed_experts`) on CPU equal the routing of `transformers`.

One real SGLang server (float32, --enable-return-routed-experts, which needs the
`_cuda_host_register` no-op of megatron_opd.compat.sglang_cpu) serves a tiny random Qwen3-MoE;
the same full token sequences go through Qwen3MoeForCausalLM in float32 and the top-k expert *sets*
must agree at every (position, layer) SGLang reports.
"""

import importlib
import sys

import numpy as np
import pytest
import torch

from megatron_opd.compat import sglang_cpu
from megatron_opd.models.spec import MoEModelSpec, to_hf_config
from megatron_opd.serving.sglang_client import SGLangClient
from megatron_opd.serving.sglang_server import SGLangServer, free_port
from megatron_opd.tokenizer import SPECIALS, save_tokenizer

SPEC = MoEModelSpec(num_layers=3, num_experts=8, moe_router_topk=2)
SHAPE = (SPEC.num_layers, SPEC.moe_router_topk)
TIE = 1e-4  # sets may differ only where transformers' k-th and (k+1)-th router logits nearly tie
PROMPTS = [[1, 13, 4, 5, 6, 17], [1, 7, 8, 9, 10, 11, 12, 20, 21], [1, 3], [1, 30, 31, 29, 4]]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from transformers import Qwen3MoeForCausalLM

    path = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(to_hf_config(SPEC)).float().save_pretrained(path)
    save_tokenizer(path, list(SPECIALS) + [f"w{i}" for i in range(SPEC.vocab_size - 3)])
    return path


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = SGLangServer("routed", str(model_path), free_port(), str(log), dtype="float32",
                       max_total_tokens=2048, threads=1, enable_return_routed_experts=True,
                       extra_args=("--weight-version", "0"))  # the client reads int versions
    srv.start()
    try:
        srv.wait_ready(300)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference(model_path):
    """seq -> (sorted top-k expert ids [len(seq), layers, k], top-k margin [len(seq), layers])."""
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def route(seq):
        with torch.no_grad():
            out = model(torch.tensor([seq]), output_router_logits=True)
        assert len(out.router_logits) == SPEC.num_layers
        logits = torch.stack([r.reshape(len(seq), SPEC.num_experts) for r in out.router_logits], 1)
        # the router takes top-k of softmax(logits): the same experts as top-k of the logits
        top = torch.topk(logits, SPEC.moe_router_topk + 1, dim=-1).values
        ids = torch.topk(logits, SPEC.moe_router_topk, dim=-1).indices
        margin = top[..., -2] - top[..., -1]
        return np.sort(ids.numpy(), -1), margin.numpy()

    return route


def agreement(routed, ref_ids, ref_margin):
    """Boolean [rows, layers]: the sets agree, or transformers itself has a near-tie there."""
    same = (np.sort(routed, -1) == ref_ids).all(-1)
    return same | (ref_margin < TIE)


def check_against_reference(res, prompt, reference, start=0):
    seq = prompt + res.output_ids
    rows = len(seq) - 1 - start
    assert res.routed_experts is not None and res.routed_experts.dtype == np.int32
    assert res.routed_experts.shape == (rows, *SHAPE)  # positions start .. P+T-2
    assert res.routed_experts_start == start
    r = res.routed_experts
    assert r.min() >= 0 and r.max() < SPEC.num_experts
    assert (r[..., 0] != r[..., 1]).all()  # top-2: distinct experts
    ids, margin = reference(seq)
    ids, margin = ids[start:start + rows], margin[start:start + rows]
    ok = agreement(r, ids, margin)
    assert ok.all(), f"routing differs at (position, layer) {np.argwhere(~ok) + [start, 0]}"
    assert (np.sort(r, -1) == ids).all(-1).mean() > 0.98  # near-ties are rare, not the rule
    return ids, margin


def test_greedy_routing_matches_transformers_at_every_position(server, reference):
    client = SGLangClient(server.url, routed_experts_shape=SHAPE)
    results = client.generate(PROMPTS, {"temperature": 0.0, "max_new_tokens": 8},
                              return_routed_experts=True)
    for prompt, res in zip(PROMPTS, results):
        assert res.finish_reason == "length" and len(res.output_ids) == 8
        ids, margin = check_against_reference(res, prompt, reference)
        # The comparison discriminates: a wrong layer order or a one-position shift fails it.
        r = res.routed_experts
        assert not agreement(r[:, ::-1], ids, margin).all()
        assert not agreement(r[1:], ids[:-1], margin[:-1]).all()
        assert not agreement(r[:-1], ids[1:], margin[1:]).all()


def test_start_len_stop_token_and_scoring_only(server, reference):
    client = SGLangClient(server.url)
    prompt = PROMPTS[1]
    first = client.generate([prompt], {"temperature": 0.0, "max_new_tokens": 8},
                            routed_experts_shape=SHAPE, return_routed_experts=True)[0]
    # stop at the first output token (after the second) that was not generated before
    j = next(j for j in range(2, 8) if first.output_ids[j] not in first.output_ids[:j])
    stop = first.output_ids[j]
    # rows start at routed_experts_start_len; a stop token counts as generated and has no row
    res = client.generate([prompt], {"temperature": 0.0, "max_new_tokens": 8,
                                     "stop_token_ids": [stop]},
                          return_routed_experts=True, routed_experts_shape=SHAPE,
                          routed_experts_start_len=4)[0]
    assert res.finish_reason == "stop" and res.output_ids == first.output_ids[:j + 1]
    check_against_reference(res, prompt, reference, start=4)
    rows = len(prompt) + j - 4  # positions 4 .. P+j-1
    np.testing.assert_array_equal(np.sort(res.routed_experts, -1),
                                  np.sort(first.routed_experts[4:4 + rows], -1))
    # max_new_tokens=0: P - 1 rows (the last prompt token's routing is not returned)
    res = client.generate([prompt], {"temperature": 0.0, "max_new_tokens": 0},
                          return_routed_experts=True, routed_experts_shape=SHAPE)[0]
    assert res.output_ids == []
    check_against_reference(res, prompt, reference)
    # start_len = whole prompt, nothing generated: no rows
    res = client.generate([prompt], {"temperature": 0.0, "max_new_tokens": 0},
                          return_routed_experts=True, routed_experts_shape=SHAPE,
                          routed_experts_start_len=len(prompt))[0]
    assert res.routed_experts.shape == (0, *SHAPE)


def test_client_needs_the_shape_and_a_valid_start():
    client = SGLangClient("http://127.0.0.1:9")  # nothing is sent
    with pytest.raises(ValueError, match="routed_experts_shape"):
        client.generate([[1, 2]], {"max_new_tokens": 1}, return_routed_experts=True)
    with pytest.raises(ValueError, match="routed_experts_start_len"):
        client.generate([[1, 2, 3], [1]], {"max_new_tokens": 1}, return_routed_experts=True,
                        routed_experts_shape=SHAPE, routed_experts_start_len=2)


def test_post_import_patch_applies_on_first_import_and_when_already_imported(
        tmp_path, monkeypatch):
    pkg = tmp_path / "mopd_fake_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("common", "other"):
        (pkg / f"{name}.py").write_text(
            "def _cuda_host_register(buffer, registration_granularity_bytes=None):\n"
            "    raise RuntimeError('Torch not compiled with CUDA enabled')\n"
            "def alloc(buffer):\n"
            "    _cuda_host_register(buffer)\n"
            "    return buffer\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    patch = sglang_cpu._no_op_host_register_without_cuda
    try:
        assert sglang_cpu._patch_when_imported("mopd_fake_pkg.common", patch) is True
        assert "mopd_fake_pkg.common" not in sys.modules  # nothing imported early
        mod = importlib.import_module("mopd_fake_pkg.common")
        buf = torch.zeros(4, dtype=torch.int32)
        assert mod.alloc(buf) is buf  # the module-global call site sees the no-op
        assert getattr(buf, "_sglang_cuda_host_registered_ranges") == []
        assert "raise RuntimeError" in importlib.import_module("inspect").getsource(mod)
        assert sglang_cpu._patch_when_imported("mopd_fake_pkg.common", patch) is False  # once
        other = importlib.import_module("mopd_fake_pkg.other")  # imported before the patch
        with pytest.raises(RuntimeError, match="CUDA"):
            other.alloc(buf)
        assert sglang_cpu._patch_when_imported("mopd_fake_pkg.other", patch) is True
        assert other.alloc(buf) is buf
    finally:
        for name in ("mopd_fake_pkg.common", "mopd_fake_pkg.other", "mopd_fake_pkg"):
            sys.modules.pop(name, None)
