"""Model families and router knobs, all through the one MoEModelSpec.

Mixtral (family "mixtral"): a random `transformers` Mixtral saved with `save_pretrained` loads
into megatron with the same logits, round-trips HF -> megatron -> HF bit-identically, gives the
same loss and every gradient, and under EP2 / TP2 (real torchrun processes) equals one process.
Router knobs (sigmoid scoring, switch aux loss, aux-loss-free expert bias, shared experts): the
megatron MoE layer computes exactly an independent reference of the rule the knob names, the aux
loss equals its closed form (value and gradient), the expert bias updates from token counts
through the real training path, gradients are finite and non-zero, and HF export of knobs HF
cannot express is refused with an error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from megatron_opd.models.hf_mapping import (hf_names, hf_to_megatron, iter_hf_weights,
                                            load_hf_checkpoint, megatron_to_hf,
                                            save_hf_checkpoint)
from megatron_opd.models.qwen3_moe import build_gpt_model, forward_logits
from megatron_opd.models.spec import MoEModelSpec, to_hf_config
from megatron_opd.procs import free_port
from tests.test_layouts import LAYOUTS, WORKER

MIXTRAL = {
    "gqa": MoEModelSpec(family="mixtral"),
    "mha": MoEModelSpec(family="mixtral", num_kv_heads=4, num_experts=4, moe_router_topk=3,
                        moe_ffn_hidden_size=48),
    "gqa-6heads-3layers": MoEModelSpec(family="mixtral", vocab_size=48, hidden_size=96,
                                       num_layers=3, num_attention_heads=6, num_kv_heads=2,
                                       head_dim=16, moe_ffn_hidden_size=40, num_experts=6,
                                       moe_router_topk=2, rope_theta=1e6, rms_norm_eps=1e-5),
}


@pytest.fixture(scope="module", autouse=True)
def megatron_world():
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed

    install_megatron_cpu_compat()
    groups = init_distributed(ParallelConfig(), seed=0)
    yield groups
    destroy_distributed()


@pytest.fixture(autouse=True)
def aux_loss_scale_restored():
    """megatron keeps the aux-loss backward scale in a class attribute: a plain `backward()` with
    the aux loss on and no scale set creates a 0-d one, and every later megatron schedule in the
    process then fails copying its [1]-shaped scale into it. Give each test a clean slate and
    leave the process as found."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    before = MoEAuxLossAutoScaler.main_loss_backward_scale
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = before


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _random_hf_mixtral(spec: MoEModelSpec, seed: int):
    """A random transformers Mixtral with non-trivial norms (so a swapped norm shows)."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    hf = MixtralForCausalLM(to_hf_config(spec)).float()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return hf


def _fused_mixtral(per_expert: dict, spec: MoEModelSpec) -> dict:
    """On-disk Mixtral names -> transformers 5's in-memory ones (`mlp.`, fused experts)."""
    out = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in per_expert.items()
           if ".experts." not in k}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}.block_sparse_moe.experts."
        q = f"model.layers.{i}.mlp.experts."
        out[q + "gate_up_proj"] = torch.stack([torch.cat([per_expert[f"{p}{e}.w1.weight"],
                                                          per_expert[f"{p}{e}.w3.weight"]])
                                               for e in range(spec.num_experts)])
        out[q + "down_proj"] = torch.stack([per_expert[f"{p}{e}.w2.weight"]
                                            for e in range(spec.num_experts)])
    return out


# ----------------------------------------------------------------------------- Mixtral vs HF
def test_mixtral_config_and_names():
    from transformers import MixtralConfig

    spec = MIXTRAL["gqa-6heads-3layers"]
    cfg = to_hf_config(spec)
    assert isinstance(cfg, MixtralConfig)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (6, 2, 40)
    assert cfg.head_dim == spec.hidden_size // spec.num_attention_heads
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.num_key_value_heads == 2
    names = hf_names(spec)
    assert "model.layers.2.block_sparse_moe.gate.weight" in names
    assert "model.layers.0.block_sparse_moe.experts.5.w3.weight" in names
    assert not any("q_norm" in n or "k_norm" in n or ".mlp." in n for n in names)


@pytest.mark.parametrize("name", MIXTRAL)
def test_mixtral_hf_to_megatron_logits_and_round_trip(name, tmp_path):
    from transformers import MixtralForCausalLM

    spec = MIXTRAL[name]
    hf = _random_hf_mixtral(spec, seed=3)
    hf.save_pretrained(tmp_path / "ref")
    disk = load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert set(disk) == set(hf_names(spec))  # per-expert names, as SGLang loads them
    model = build_gpt_model(spec).eval()
    load_hf_checkpoint(model, tmp_path / "ref", spec)
    ids = torch.randint(0, spec.vocab_size, (3, 11), generator=torch.Generator().manual_seed(2))
    ref_model = MixtralForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32).eval()
    with torch.no_grad():
        ours, ref = forward_logits(model, ids), ref_model(input_ids=ids).logits
    assert (ours - ref).abs().max().item() <= 1e-5
    # HF -> megatron -> HF, as tensors and through the model and its exporter: bit-identical
    back = megatron_to_hf(hf_to_megatron(disk, spec), spec)
    assert set(back) == set(disk) and all(torch.equal(back[k], disk[k]) for k in disk)
    save_hf_checkpoint(model, spec, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(disk) and all(torch.equal(out[k], disk[k]) for k in disk)
    again = MixtralForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ref)


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_mixtral_loss_and_every_gradient_equal_transformers(name, tmp_path):
    spec = MIXTRAL[name]
    hf = _random_hf_mixtral(spec, seed=5)
    hf.save_pretrained(tmp_path / "ref")
    model = build_gpt_model(spec)
    load_hf_checkpoint(model, tmp_path / "ref", spec)
    ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    ours = F.cross_entropy(forward_logits(model, ids).flatten(0, 1), target.flatten())
    ref = F.cross_entropy(hf(input_ids=ids).logits.flatten(0, 1), target.flatten())
    ours.backward()
    ref.backward()
    assert abs(ours.item() - ref.item()) < 1e-5
    grads = _fused_mixtral(megatron_to_hf({n: p.grad for n, p in model.named_parameters()},
                                          spec), spec)
    ref_params = dict(hf.named_parameters())
    assert set(grads) == set(ref_params)
    nonzero = 0
    for n, p in ref_params.items():
        g, r = grads[n], p.grad
        if n == "model.embed_tokens.weight":  # HF's Embedding(padding_idx) never updates pad
            keep = torch.arange(spec.vocab_size) != spec.pad_token_id
            g, r = g[keep], r[keep]
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-4), n
        nonzero += bool(r.abs().max() > 0)
    assert nonzero == len(ref_params)


# ----------------------------------------------------------------------------- Mixtral layouts
LAYOUT_SPEC = MoEModelSpec(family="mixtral", vocab_size=32, hidden_size=64, num_layers=2,
                           num_attention_heads=4, num_kv_heads=2, head_dim=16,
                           moe_ffn_hidden_size=32, num_experts=4, moe_router_topk=2)


def _run_layout(tmp: Path, nproc: int, layout: dict, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKER), "--layout", json.dumps(layout),
           "--spec", json.dumps(dataclasses.asdict(LAYOUT_SPEC)), "--hf", str(tmp / "hf"),
           "--data", str(tmp / "data.pt"), "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def mixtral_layouts(tmp_path_factory):
    from transformers import MixtralForCausalLM

    tmp = tmp_path_factory.mktemp("mixtral_layouts")
    torch.manual_seed(0)
    hf = MixtralForCausalLM(to_hf_config(LAYOUT_SPEC)).float()
    with torch.no_grad():  # decisive routing (see tests/test_layouts.py)
        for layer in hf.model.layers:
            layer.mlp.gate.weight.mul_(40.0)
    hf.save_pretrained(tmp / "hf")
    g = torch.Generator().manual_seed(1)
    B, S = 8, 12
    data = {"input_ids": torch.randint(0, LAYOUT_SPEC.vocab_size, (B, S), generator=g),
            "targets": torch.randint(0, LAYOUT_SPEC.vocab_size, (B, S), generator=g)}
    data["weights"] = torch.rand(B, S, generator=g) * (torch.rand(B, S, generator=g) > 0.3)
    torch.save(data, tmp / "data.pt")
    ref = _run_layout(tmp, 1, dict(micro_batch_size=4), tmp / "ref.pt")
    return tmp, hf, data, ref


def test_mixtral_layout_reference_matches_transformers(mixtral_layouts):
    _, hf, data, ref = mixtral_layouts
    with torch.no_grad():
        logits = hf(input_ids=data["input_ids"]).logits.double()
    lp = torch.log_softmax(logits, -1).gather(-1, data["targets"].unsqueeze(-1)).squeeze(-1)
    w = data["weights"].double()
    assert ref["tokens"] == int((w != 0).sum())
    assert ref["loss"] == pytest.approx((-(lp * w).sum() / (w != 0).sum()).item(), rel=2e-6)
    assert not any("layernorm" in n and "self_attention" in n for n in ref["grads"])
    expert_grads = [g for n, g in ref["grads"].items() if "local_experts" in n]
    assert all(g.abs().sum() > 0 for g in expert_grads), "every expert must receive tokens"


@pytest.mark.parametrize("name", ["ep2", "tp2"])
def test_mixtral_layout_equals_one_process(mixtral_layouts, name):
    tmp, _, _, ref = mixtral_layouts
    nproc, layout = LAYOUTS[name]
    got = _run_layout(tmp, nproc, layout, tmp / f"{name}.pt")
    assert got["tokens"] == ref["tokens"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-7)
    assert set(got["params"]) == set(ref["params"])
    for n, p in ref["params"].items():
        assert torch.equal(got["params"][n], p), n
    for n, g in ref["grads"].items():
        diff = (got["grads"][n] - g).abs().max().item()
        assert diff <= 2e-5 * max(1.0, g.abs().max().item()), f"{name}: {n} differs by {diff}"


# ----------------------------------------------------------------------------- router knobs
KNOBS = {
    "sigmoid": dict(router_score_function="sigmoid"),
    "sigmoid-top1": dict(router_score_function="sigmoid", moe_router_topk=1),
    "expert-bias": dict(router_score_function="sigmoid", router_expert_bias=True),
    "shared-expert": dict(shared_expert_ffn_hidden_size=48),
    "aux-loss": dict(router_aux_loss_coeff=0.05),
    "all-mixtral": dict(family="mixtral", router_score_function="sigmoid",
                        router_expert_bias=True, shared_expert_ffn_hidden_size=32,
                        router_aux_loss_coeff=0.01),
}
REFUSED = {  # knob -> the key the refusal must name
    "sigmoid": "model.router_score_function", "sigmoid-top1": "model.router_score_function",
    "expert-bias": "model.router_expert_bias",
    "shared-expert": "model.shared_expert_ffn_hidden_size",
    "all-mixtral": "model.router_expert_bias",
}


def _knob_spec(name: str) -> MoEModelSpec:
    return MoEModelSpec(**KNOBS[name])


def _reference_moe(mlp, x: torch.Tensor, spec: MoEModelSpec) -> torch.Tensor:
    """Independent MoE block: route (softmax of the top-k logits, or sigmoid scores with the
    expert bias used for selection only, renormalised when k > 1), SwiGLU experts, plus the
    shared expert."""
    h = x.reshape(-1, x.shape[-1])
    logits = h @ mlp.router.weight.T
    k = spec.moe_router_topk
    if spec.router_score_function == "softmax":
        top, idx = logits.topk(k, dim=-1)
        w = torch.softmax(top, dim=-1)
    else:
        s = torch.sigmoid(logits)
        sel = s + mlp.router.expert_bias if spec.router_expert_bias else s
        idx = sel.topk(k, dim=-1).indices
        w = s.gather(1, idx)
        w = w / w.sum(-1, keepdim=True) if k > 1 else w

    def swiglu(fc1, fc2, t):
        gate, up = (t @ fc1.T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ fc2.T

    out = torch.zeros_like(h)
    experts = mlp.experts.local_experts
    for t in range(h.shape[0]):
        for j in range(k):
            e = experts[int(idx[t, j])]
            out[t] += w[t, j] * swiglu(e.linear_fc1.weight, e.linear_fc2.weight, h[t])
    if spec.shared_expert_ffn_hidden_size:
        sh = mlp.shared_experts
        out = out + swiglu(sh.linear_fc1.weight, sh.linear_fc2.weight, h)
    return out.view_as(x)


@pytest.mark.parametrize("name", ["base", "base-mixtral"] + list(KNOBS))
def test_moe_layer_computes_the_knobs_rule(name):
    spec = {"base": MoEModelSpec(), "base-mixtral": MoEModelSpec(family="mixtral")}.get(name) \
        or _knob_spec(name)
    torch.manual_seed(0)
    model = build_gpt_model(spec).eval()
    mlp = model.decoder.layers[0].mlp
    with torch.no_grad():
        mlp.router.weight.mul_(20.0)  # decisive routing
        if spec.router_expert_bias:  # a bias that changes which experts are chosen
            mlp.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, spec.num_experts))
        x = torch.randn(7, 2, spec.hidden_size, generator=torch.Generator().manual_seed(4))
        ours, _ = mlp(x)
        ref = _reference_moe(mlp, x, spec)
        assert (ours - ref).abs().max().item() <= 1e-5
        if spec.router_expert_bias:  # and the bias mattered: without it routing differs
            bias = mlp.router.expert_bias.clone()
            mlp.router.expert_bias.zero_()
            assert (_reference_moe(mlp, x, spec) - ref).abs().max().item() > 1e-3
            mlp.router.expert_bias.copy_(bias)


@pytest.mark.parametrize("name", KNOBS)
def test_knobs_build_forward_backward(name):
    spec = _knob_spec(name)
    torch.manual_seed(0)
    model = build_gpt_model(spec).train()
    ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    loss = F.cross_entropy(forward_logits(model, ids).flatten(0, 1), target.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    must_move = [n for n in grads if "local_experts" not in n]  # experts may get no tokens
    assert must_move and all(grads[n].abs().max() > 0 for n in must_move), \
        [n for n in must_move if not grads[n].abs().max() > 0]
    assert any(grads[n].abs().max() > 0 for n in grads if "local_experts" in n)
    if spec.shared_expert_ffn_hidden_size:
        assert sum("shared_experts" in n for n in grads) == 2 * spec.num_layers
    assert ("decoder.layers.0.mlp.router.expert_bias" in model.state_dict()) == \
        spec.router_expert_bias


@pytest.mark.parametrize("name", REFUSED)
def test_hf_export_refused_naming_the_key(name, tmp_path):
    spec = _knob_spec(name)
    key = REFUSED[name]
    model = build_gpt_model(spec)
    with pytest.raises(ValueError, match=key):
        save_hf_checkpoint(model, spec, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()
    with pytest.raises(ValueError, match=key):
        iter_hf_weights(model, spec)
    with pytest.raises(ValueError, match=key):
        megatron_to_hf(_weights(model), spec)
    with pytest.raises(ValueError, match=key):
        to_hf_config(spec)
    with pytest.raises(ValueError, match=key):
        load_hf_checkpoint(model, tmp_path, spec)


def test_aux_loss_is_exportable_and_changes_nothing_at_inference(tmp_path):
    spec = _knob_spec("aux-loss")
    torch.manual_seed(0)
    model = build_gpt_model(spec).eval()
    save_hf_checkpoint(model, spec, tmp_path / "hf")  # a training-only term: HF config as usual
    plain = build_gpt_model(dataclasses.replace(spec, router_aux_loss_coeff=0.0)).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, spec.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(forward_logits(model, ids), forward_logits(plain, ids))


def test_aux_loss_value_and_gradient_equal_closed_form():
    """megatron "aux_loss": L = coeff * E / (k T^2) * sum_i (sum_t p_ti) * n_i with p = softmax of
    all router logits and n_i the tokens routed to expert i (top-k); with per-token loss scaling
    megatron back-propagates L * T. So the router gradient moves by exactly d(L T)/dW."""
    from megatron.core.transformer.moe.moe_utils import (MoEAuxLossAutoScaler,
                                                         clear_aux_losses_tracker,
                                                         get_moe_layer_wise_logging_tracker)

    coeff = 0.05
    spec = MoEModelSpec(family="mixtral", num_experts=4, moe_router_topk=2,
                        router_aux_loss_coeff=coeff)
    torch.manual_seed(0)
    model = build_gpt_model(spec).train()
    plain = build_gpt_model(dataclasses.replace(spec, router_aux_loss_coeff=0.0)).train()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    router_in = {}
    last = spec.num_layers - 1
    model.decoder.layers[last].mlp.router.register_forward_hook(
        lambda mod, args, out: router_in.__setitem__("x", args[0].detach().clone()))
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    clear_aux_losses_tracker()
    losses = []
    for m in (model, plain):
        loss = F.cross_entropy(forward_logits(m, ids).flatten(0, 1), target.flatten())
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]  # the aux loss adds gradient, not loss value

    x = router_in["x"].reshape(-1, spec.hidden_size)
    T, E, k = x.shape[0], spec.num_experts, spec.moe_router_topk
    W = model.decoder.layers[last].mlp.router.weight.detach().clone().requires_grad_(True)
    p = torch.softmax(x @ W.T, dim=-1)
    n = F.one_hot(p.topk(k, dim=-1).indices, E).sum(dim=(0, 1)).to(p.dtype)
    aux = E / (k * T * T) * (p.sum(0) * n).sum()
    tracked = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
    assert tracked[last].item() == pytest.approx(aux.item(), rel=1e-5)
    assert tracked[0].item() > 0
    (expected,) = torch.autograd.grad(coeff * aux * T, W)
    name = f"decoder.layers.{last}.mlp.router.weight"
    got = dict(model.named_parameters())[name].grad - dict(plain.named_parameters())[name].grad
    assert expected.abs().max() > 1e-4
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-4)
    first = "decoder.layers.0.mlp.router.weight"
    assert not torch.allclose(dict(model.named_parameters())[first].grad,
                              dict(plain.named_parameters())[first].grad)


def test_expert_bias_updates_from_token_counts_in_training_path(megatron_world):
    """Through the real training path (DDP, megatron schedule, finalize_model_grads): after one
    step each layer's bias moves by rate * sign(mean count - count) and the counters reset."""
    from megatron_opd.config import ParallelConfig, TrainConfig
    from megatron_opd.learner.train_step import (MicroBatch, forward_backward, optimizer_step,
                                                 wrap_for_training)
    from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config

    groups = megatron_world
    spec = _knob_spec("all-mixtral")
    config = transformer_config(spec, layout=ParallelConfig(micro_batch_size=4))
    torch.manual_seed(0)
    chunks = build_model_chunks(spec, config)
    routers = [layer.mlp.router for layer in chunks[0].decoder.layers]
    inputs: dict[int, list] = {i: [] for i in range(len(routers))}
    for i, r in enumerate(routers):
        r.register_forward_hook(lambda mod, args, out, i=i: inputs[i].append(args[0].detach()))
    ddp, optimizer, scheduler = wrap_for_training(
        chunks, TrainConfig(steps=10, distributed_optimizer=False, warmup_steps=0), groups)
    g = torch.Generator().manual_seed(1)
    micro = [MicroBatch(torch.randint(0, spec.vocab_size, (4, 10), generator=g),
                        {"targets": torch.randint(0, spec.vocab_size, (4, 10), generator=g)})
             for _ in range(2)]

    def loss_fn(logits, mb):
        stats = vocab_parallel_token_stats(logits, mb.data["targets"], group=groups.tp)
        return -stats.logprobs.sum(), mb.data["targets"].numel(), {}

    loss, tokens, _ = forward_backward(ddp, micro, loss_fn, groups)
    assert tokens == 80 and torch.isfinite(torch.tensor(loss))
    rate = config.moe_router_bias_update_rate
    for i, r in enumerate(routers):
        x = torch.cat([t.reshape(-1, spec.hidden_size) for t in inputs[i]])
        assert x.shape[0] == 80
        chosen = torch.sigmoid(x @ r.weight.detach().T).topk(spec.moe_router_topk, -1).indices
        counts = F.one_hot(chosen, spec.num_experts).sum(dim=(0, 1)).float()
        expected = rate * torch.sign(counts.mean() - counts)
        assert expected.abs().sum() > 0
        assert torch.allclose(r.expert_bias, expected), (r.expert_bias, expected)
        assert r.local_tokens_per_expert.sum() == 0
    stepped, grad_norm = optimizer_step(optimizer, scheduler, loss)
    assert stepped and grad_norm > 0 and torch.isfinite(torch.tensor(grad_norm))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("fields,key", [
    (dict(family="llama"), "model.family"),
    (dict(router_score_function="tanh"), "model.router_score_function"),
    (dict(router_aux_loss_coeff=-0.1), "model.router_aux_loss_coeff"),
    (dict(router_aux_loss_coeff=float("nan")), "model.router_aux_loss_coeff"),
    (dict(router_expert_bias=True), "model.router_expert_bias"),  # softmax + bias
    (dict(shared_expert_ffn_hidden_size=-8), "model.shared_expert_ffn_hidden_size"),
    (dict(family="mixtral", head_dim=32), "model.head_dim"),
    (dict(family="mixtral", tie_word_embeddings=True), "model.tie_word_embeddings"),
])
def test_spec_validation_names_the_key(fields, key):
    spec = MoEModelSpec(**fields)
    with pytest.raises(ValueError, match=key):
        spec.validate()
    with pytest.raises(ValueError, match=key):
        build_gpt_model(spec)


def test_new_fields_are_config_keys():
    from megatron_opd.config import ConfigError, load_config

    cfg = load_config(None, ["model.family=mixtral", "model.router_score_function=sigmoid",
                             "model.router_expert_bias=true", "model.router_aux_loss_coeff=1e-2",
                             "model.shared_expert_ffn_hidden_size=32"])
    assert (cfg.model.family, cfg.model.router_score_function, cfg.model.router_expert_bias,
            cfg.model.router_aux_loss_coeff, cfg.model.shared_expert_ffn_hidden_size) == \
        ("mixtral", "sigmoid", True, 0.01, 32)
    assert cfg.prepare.teacher_model.family == "qwen3_moe"
    with pytest.raises(ConfigError, match="model.family"):
        load_config(None, ["model.family=gpt2"])
