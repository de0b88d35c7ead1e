"""Routing replay (R3: experts given from outside, e.g. SGLang; R2: the learner's own recorded
choice): after a 5-sigma perturbation of every router, free routing changes, and with replay the
experts each router actually uses equal the forced ones exactly - at one process, TP2 (sequence
parallel shards), EP2 and PP2 (real torchrun processes)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_opd.learner.routing_replay import experts_from_rollout
from megatron_opd.models.spec import to_hf_config
from megatron_opd.procs import free_port
from tests.test_layouts import SPEC

WORKER = Path(__file__).parent / "workers" / "replay_worker.py"
LAYOUTS = {
    "world1": (1, {}),
    "tp2": (2, {"tensor_parallel": 2, "expert_tensor_parallel": 2}),
    "ep2": (2, {"expert_parallel": 2}),
    "pp2": (2, {"pipeline_parallel": 2}),
}
B, S = 4, 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import Qwen3MoeForCausalLM

    tmp = tmp_path_factory.mktemp("replay")
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(to_hf_config(SPEC)).float().save_pretrained(tmp / "hf")
    g = torch.Generator().manual_seed(3)
    forced = torch.stack([torch.randperm(SPEC.num_experts, generator=g)[:SPEC.moe_router_topk]
                          for _ in range(B * S * SPEC.num_layers)])
    data = {"input_ids": torch.randint(0, SPEC.vocab_size, (B, S), generator=g),
            "forced": forced.view(B, S, SPEC.num_layers, SPEC.moe_router_topk)}
    torch.save(data, tmp / "data.pt")
    return tmp, data


@pytest.mark.parametrize("name", LAYOUTS)
def test_replay_forces_exact_experts(setup, name):
    tmp, data = setup
    nproc, layout = LAYOUTS[name]
    out = tmp / f"{name}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKER),
           "--layout", json.dumps({"micro_batch_size": B, **layout}),
           "--spec", json.dumps(dataclasses.asdict(SPEC)), "--hf", str(tmp / "hf"),
           "--data", str(tmp / "data.pt"), "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    # [layers, tokens (sequence-major: position * B + sample), k], experts sorted per token
    expected_r3 = data["forced"].permute(2, 1, 0, 3).reshape(SPEC.num_layers, S * B, -1)
    assert torch.equal(got["replay_r3"], expected_r3.sort(-1).values)
    assert torch.equal(got["recorded"], got["free_before"])  # R2 records what was used
    assert torch.equal(got["replay_r2"], got["recorded"])
    changed = (got["free_after"] != got["free_before"]).any(-1).float().mean().item()
    assert changed > 0.3, f"perturbation changed only {changed:.0%} of routings"


def test_experts_from_rollout_fills_only_positions_without_data():
    routed = torch.tensor([[[5, 1]], [[2, 7]]], dtype=torch.int32)  # 2 positions, 1 layer, k=2
    out = experts_from_rollout(routed, seq_len=4, top_k=2)
    assert out.dtype == torch.long and out.shape == (4, 1, 2)
    assert out[:2].tolist() == [[[5, 1]], [[2, 7]]] and out[2:].tolist() == [[[0, 1]]] * 2
    with pytest.raises(ValueError, match="top_k"):
        experts_from_rollout(routed, seq_len=4, top_k=3)
