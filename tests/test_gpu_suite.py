"""bench/gpu_suite.sh --dry-run: the prepared GPU check runs on CPU (same code path, CPU-sized
shapes, gloo) and its JSON line carries values checked here against independent references:
the FLOPs count against the closed form for the slice's shapes, the layer count against plan's
memory model, the published weights against what the learner's model holds."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(lines[-1])


def test_every_part_reports(suite):
    assert suite["bench"] == "gpu_suite" and suite["dry_run"] is True
    assert suite["device"] == "cpu" and suite["failed"] == []
    parts = suite["parts"]
    assert set(parts) == {"wheels", "learner", "nccl", "fp8", "gpu_tests"}
    for name, part in parts.items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        if part["status"] == "skipped":
            assert part["reason"] and suite["skipped"][name] == part["reason"]
    # no Transformer Engine on CPU: FP8 is skipped with the import's error
    assert parts["fp8"]["status"] == "skipped"
    assert "transformer_engine" in parts["fp8"]["reason"]
    assert parts["wheels"]["versions"]["megatron_core"] == "0.16.1"
    tests = parts["gpu_tests"]
    assert tests["status"] == "ok" and tests["failed"] == 0 and tests["passed"] >= 7
    assert tests["skipped_tests"] == ["test_real_readings"]  # no GPU here


def test_learner_flops_and_rates(suite):
    lr = suite["parts"]["learner"]
    m = lr["model"]
    # the dry spec keeps the real config's structure: untied embeddings, q/k norms
    assert m["tie_word_embeddings"] is False
    h, L, nq, nkv, d = (m["hidden_size"], m["num_layers"], m["num_attention_heads"],
                        m["num_kv_heads"], m["head_dim"])
    E, k, f, V, s = (m["num_experts"], m["moe_router_topk"], m["moe_ffn_hidden_size"],
                     m["vocab_size"], lr["seq_len"])
    # per token: QKV h*(nq+2nkv)*d, output nq*d*h, router h*E, k experts of 3*h*f, output layer
    # h*V; 6 FLOPs per multiply-add forward+backward; causal attention 2 matmuls over s/2
    matmul = L * (h * (nq + 2 * nkv) * d + nq * d * h + h * E + k * 3 * h * f) + h * V
    assert lr["matmul_params"] == matmul
    assert lr["flops_per_token"] == 6 * matmul + 6 * L * nq * d * s
    assert lr["flops_per_step"] == lr["flops_per_token"] * lr["batch_size"] * s
    total = (L * (h * (nq + 2 * nkv) * d + nq * d * h + h * E + E * 3 * h * f + 2 * h + 2 * d)
             + 2 * h * V + h)
    assert lr["total_params"] == total
    bf = lr["modes"]["bfloat16"]
    assert bf["status"] == "ok" and bf["all_steps_applied"] and bf["losses_finite"]
    assert bf["tokens_per_step"] == lr["tokens_per_step"] == lr["batch_size"] * s
    assert bf["tokens_per_s"] == pytest.approx(lr["tokens_per_step"] / bf["step_s_median"])
    assert bf["achieved_tflops"] == pytest.approx(lr["flops_per_step"] / bf["step_s_median"] / 1e12)
    assert bf["mfu"] == pytest.approx(bf["achieved_tflops"] / bf["peak_tflops"])
    assert bf["peak_source"].startswith("measured")  # no datasheet peak for a CPU
    assert len(bf["step_s"]) == lr["steps"]
    # the CPU stand-ins were applied (dry run), and only there
    assert "patch_cuda_current_device" in lr["cpu_compat_patches"]
    assert lr["patches_without_te"] == []
    fig = suite["figures"]
    assert fig["learner.mfu"] == bf["mfu"] and fig["learner.layers"] == L


def test_layers_are_the_most_plan_fits(suite):
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from _gpu_common import DRY_SHAPES, slice_config, with_layers

    from megatron_opd.plan import learner_memory

    lr = suite["parts"]["learner"]
    cfg = slice_config(True, DRY_SHAPES)
    budget = lr["memory_gib"] * 2 ** 30
    fits = [n for n in range(1, DRY_SHAPES.max_layers + 1)
            if learner_memory(with_layers(cfg, n), DRY_SHAPES.seq_len)["total"] <= budget]
    assert lr["layers"] == max(fits) == 2  # DRY_MEMORY_GIB is set between two and three layers
    assert lr["plan_estimate_gib"] * 2 ** 30 == pytest.approx(
        learner_memory(with_layers(cfg, 2), DRY_SHAPES.seq_len)["total"])


def test_publisher_delivers_every_weight(suite):
    nc = suite["parts"]["nccl"]
    lr = suite["parts"]["learner"]
    assert nc["backend"] == "gloo" and nc["status"] == "ok"
    # every HF tensor of the slice: per layer q,k,v,o, q/k norms, 2 layer norms, router and
    # 3 per expert; embedding, final norm, lm_head
    E = lr["model"]["num_experts"]
    assert nc["tensors"] == nc["layers"] * (9 + 3 * E) + 3
    assert nc["total_params"] == lr["total_params"]  # the same slice, same layer count
    assert nc["bytes"] > 2 * nc["total_params"] - 1  # bf16 weights (fp32 where megatron keeps it)
    assert nc["buckets"] >= 2 and nc["bucket_bytes"] == 64 * 1024
    assert nc["received_equal_sent_exact"] is True and nc["checksums_match"] is True
    assert nc["served_version"] == str(nc["final_version"])
    assert nc["publish_over_raw"] == pytest.approx(nc["publish_s_median"] / nc["raw_s_median"])
    assert all(t > 0 and math.isfinite(t) for t in nc["publish_s"] + nc["raw_s"])
