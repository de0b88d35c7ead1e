"""pi_old of each `correction.proximal` strategy (snapshot, replica, interrupt, EWMA) against a
brute-force recomputation with the true historical weights (the probe scored with the live
weights of every version while they were live), on one rank, TP2 and EP2 (real megatron-core, torchrun, gloo); the EWMA parameters
against the closed form, a reset included; and no token beyond `async.max_staleness` trained
under any strategy. The worker is tests/workers/proximal_worker.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_opd.learner.proximal import interpolated_logprobs, interpolation_alpha
from megatron_opd.models.spec import MoEModelSpec, to_hf_config
from megatron_opd.procs import free_port

SPEC = MoEModelSpec(vocab_size=32, hidden_size=32, num_layers=2, num_attention_heads=4,
                    num_kv_heads=2, head_dim=8, moe_ffn_hidden_size=32, num_experts=4,
                    moe_router_topk=2)
WORKER = Path(__file__).parent / "workers" / "proximal_worker.py"
STEPS, STALENESS, BETA, RESET_AT = 4, 2, 0.5, 3  # as in the worker
LAYOUTS = {"one": (1, dict(micro_batch_size=2)),
           "tp2": (2, dict(tensor_parallel=2, expert_tensor_parallel=2, micro_batch_size=2)),
           "ep2": (2, dict(expert_parallel=2, micro_batch_size=2))}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import Qwen3MoeForCausalLM

    tmp = tmp_path_factory.mktemp("proximal")
    torch.manual_seed(0)
    hf = Qwen3MoeForCausalLM(to_hf_config(SPEC)).float()
    with torch.no_grad():  # decisive routing: no near-tie top-2 flips between layouts
        for layer in hf.model.layers:
            layer.mlp.gate.weight.mul_(40.0)
    hf.save_pretrained(tmp / "hf")
    return tmp


@pytest.fixture(scope="module", params=list(LAYOUTS))
def results(request, hf_dir) -> list[dict]:
    nproc, layout = LAYOUTS[request.param]
    out = hf_dir / f"{request.param}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKER), "--layout", json.dumps(layout),
           "--spec", json.dumps(dataclasses.asdict(SPEC)), "--hf", str(hf_dir / "hf"),
           "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(f"{out}.rank{r}.pt") for r in range(nproc)]


def _expected(res: dict, i: int, held) -> torch.Tensor:
    """Per token: the reference of its version when `held(version)`, else mu."""
    tv, mu = res["token_versions"][i], res["behaviour"][i]
    out = mu.clone()
    for v, rows in res["ref"].items():
        if held(v) and i in rows:
            out = torch.where(tv == v, rows[i], out)
    return out


def test_versions_really_differ(results):
    for res in results:
        for i in res["ref"][0]:
            assert (res["ref"][0][i] - res["ref"][STEPS][i]).abs().max() > 1e-2


def test_snapshot_is_exact_for_every_held_version(results):
    for res in results:
        assert res["live_intact"]
        for i, old in res["snapshot"].items():
            exp = _expected(res, i, lambda v: v >= STEPS - STALENESS)
            torch.testing.assert_close(old, exp, atol=2e-5, rtol=0)
        m = res["snapshot_metrics"]
        assert 0 < m["offpolicy/proximal_fallback_fraction"] < 1
        assert m["offpolicy/extra_bytes"] > 0


def test_replica_is_exact_for_the_fleets_version(results):
    for res in results:
        assert res["replica_version"] == STEPS - 1  # publish_lag=1
        for i, old in res["replica"].items():
            torch.testing.assert_close(old, _expected(res, i, lambda v: v == STEPS - 1),
                                       atol=2e-5, rtol=0)


def test_interrupt_is_exact_for_every_version(results):
    """Each version's tokens scored just before its weights moved on, gathered across the
    layout's ranks, and the fleet's current version in the step: no fallback anywhere."""
    for res in results:
        for i, old in res["interrupt"].items():
            torch.testing.assert_close(old, _expected(res, i, lambda v: True), atol=2e-5, rtol=0)
        assert res["interrupt_metrics"]["offpolicy/proximal_fallback_fraction"] == 0.0


def test_ewma_parameters_equal_the_closed_form_with_a_reset(results):
    for res in results:
        assert res["ewma_resets"] == 1
        p = res["params"]
        # reset after step RESET_AT: theta_prox restarts from theta_RESET_AT with weight 1
        w = [BETA ** (STEPS - i) for i in range(RESET_AT, STEPS + 1)]
        for k, got in enumerate(res["ewma_prox"]):
            exp = sum(wi * p[i][k] for wi, i in zip(w, range(RESET_AT, STEPS + 1))) / sum(w)
            torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-5)
        # pi_prox is a real forward with those weights: between the versions, not any of them
        for i, old in res["ewma"].items():
            assert (old - res["ref"][STEPS][i]).abs().max() > 1e-4


def test_no_token_beyond_the_staleness_bound_is_trained(results):
    for res in results:
        for name, (a, b) in res["stale_grads"].items():
            for x, y in zip(a, b):
                assert torch.equal(x, y), name
        a, b = res["control_grads"]  # without the bound the junk moves the gradient
        assert any(not torch.equal(x, y) for x, y in zip(a, b))


def test_interpolated_proximal_baselines():
    tv = torch.tensor([[5, 4, 3, 1]])
    alpha = interpolation_alpha(tv, 5)
    torch.testing.assert_close(alpha, torch.tensor([[0.0, 0.0, 0.5, 0.75]], dtype=torch.float64))
    mu = torch.log(torch.tensor([[0.2, 0.3, 0.4, 0.1]], dtype=torch.float64))
    cur = torch.log(torch.tensor([[0.5, 0.5, 0.2, 0.3]], dtype=torch.float64))
    ll = interpolated_logprobs("loglinear", mu, cur, alpha)
    torch.testing.assert_close(ll, mu + alpha * (cur - mu))
    lin = interpolated_logprobs("linear", mu, cur, alpha)
    torch.testing.assert_close(lin.exp(), (1 - alpha) * mu.exp() + alpha * cur.exp())


def test_ewma_reset_cooldown_spaces_resets_out():
    """Resets fire when the active fraction is below tau, at most once per cooldown + 1 steps;
    cooldown 0 is the paper's rule (every low step resets)."""
    from megatron_opd.learner.proximal import ProximalPolicy

    active = [0.5, 0.5, 0.5, 0.95, 0.5, 0.5, 0.5, 0.5]
    resets = {}
    for cooldown in (0, 2):
        model = torch.nn.Linear(2, 2)
        p = ProximalPolicy("ewma", [model], [model], max_staleness=2, publish_lag=0,
                           ewma_tau=0.9, ewma_cooldown=cooldown)
        p.start(0)
        at = []
        for step, a in enumerate(active, start=1):
            before = p.ewma.resets
            p.after_step(step, a)
            if p.ewma.resets > before:
                at.append(step)
        resets[cooldown] = at
    assert resets[0] == [1, 2, 3, 5, 6, 7, 8]
    assert resets[2] == [3, 6]  # 3 steps since start, then 3 since the reset at step 3
