"""`megatron-opd plan`: parameter counts against `transformers` and megatron-core models and
published totals, memory formulas against closed forms, and the real CLI on every config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_opd import plan as P
from megatron_opd.cli import main as cli_main
from megatron_opd.config import ConfigError, config_from_dict, dump_config, load_config
from megatron_opd.models.spec import MoEModelSpec, hf_causal_lm_class, to_hf_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
QWEN = ROOT / "configs/qwen3-30b-a3b-from-qwen3-235b-a22b.yaml"
MIXTRAL = ROOT / "configs/mixtral-8x7b-from-mixtral-8x22b.yaml"
GIB = 2 ** 30

TINY = {
    "qwen3_moe": MoEModelSpec(vocab_size=97, hidden_size=64, num_layers=3, num_attention_heads=4,
                              num_kv_heads=2, head_dim=24, moe_ffn_hidden_size=40, num_experts=6,
                              moe_router_topk=2),
    "qwen3_moe_tied": MoEModelSpec(vocab_size=97, hidden_size=64, num_layers=2,
                                   num_attention_heads=4, num_kv_heads=1, head_dim=8,
                                   moe_ffn_hidden_size=24, num_experts=5, moe_router_topk=3,
                                   tie_word_embeddings=True),
    "mixtral": MoEModelSpec(vocab_size=101, hidden_size=48, num_layers=3, num_attention_heads=6,
                            num_kv_heads=2, head_dim=8, moe_ffn_hidden_size=40, num_experts=4,
                            moe_router_topk=2, family="mixtral"),
}


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", sorted(TINY))
def test_param_counts_equal_transformers_models(name):
    """Total: every parameter of the HF model. Active: the total less the (E - k) / E share of
    the expert tensors, read from the HF model's own expert parameters."""
    spec = TINY[name]
    model = hf_causal_lm_class(spec)(to_hf_config(spec))
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    e, k = spec.num_experts, spec.moe_router_topk
    counts = P.param_counts(spec)
    assert counts.total == total
    assert counts.active == total - expert * (e - k) // e
    assert counts.num_layers * counts.num_experts * counts.expert == expert


def test_param_count_equals_megatron_model():
    """The learner's own megatron-core GPTModel (one process), with a shared expert (a megatron-only
    knob the HF families lack), has exactly the planned parameters."""
    code = r"""
import json, sys
from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
from megatron_opd.config import ParallelConfig
from megatron_opd.learner.parallel import destroy_distributed, init_distributed
from megatron_opd.models.qwen3_moe import build_gpt_model
from megatron_opd.models.spec import MoEModelSpec
install_megatron_cpu_compat()
init_distributed(ParallelConfig(), seed=0)
out = {}
for name, kw in json.loads(sys.argv[1]).items():
    model = build_gpt_model(MoEModelSpec(**kw))
    out[name] = sum(p.numel() for p in model.parameters())
destroy_distributed()
print(json.dumps(out))
"""
    specs = {"shared": dict(vocab_size=50, hidden_size=32, num_layers=2, num_attention_heads=4,
                            num_kv_heads=2, head_dim=8, moe_ffn_hidden_size=24, num_experts=4,
                            moe_router_topk=2, shared_expert_ffn_hidden_size=40),
             "mixtral": dict(vocab_size=50, hidden_size=32, num_layers=2, num_attention_heads=4,
                             num_kv_heads=2, head_dim=8, moe_ffn_hidden_size=24, num_experts=4,
                             moe_router_topk=2, family="mixtral")}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(specs)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for name, kw in specs.items():
        assert got[name] == P.param_counts(MoEModelSpec(**kw)).total, name


def _spec(path: Path, teacher: bool = False) -> MoEModelSpec:
    cfg = load_config(path)
    return cfg.teacher.model if teacher else cfg.model


@pytest.mark.parametrize("path, teacher, total, active", [
    (QWEN, False, 30.5e9, 3.3e9),  # Qwen3 model card: 30.5B total, 3.3B activated
    (QWEN, True, 235e9, 22e9),  # Qwen3 model card: 235B total, 22B activated
    (MIXTRAL, False, 46.7e9, 12.9e9),  # Mixtral paper / card: 46.7B total, 12.9B active
    (MIXTRAL, True, 141e9, 39e9),  # Mixtral-8x22B announcement: 141B total, 39B active
])
def test_param_counts_match_published_totals(path, teacher, total, active):
    """The architectures written in the configs give the published parameter counts (2%)."""
    counts = P.param_counts(_spec(path, teacher))
    assert counts.total == pytest.approx(total, rel=0.02)
    assert counts.active == pytest.approx(active, rel=0.02)


# ---------------------------------------------------------------- memory formulas
def test_model_state_bytes_closed_form():
    """One rank, no sharding: fp32 = 4 (weights) + 4 (grads) + 8 (Adam) bytes per parameter;
    bf16 with the distributed optimizer over DP 4 = 2 + 4 + 12 / 4."""
    spec = MoEModelSpec(**{**vars(TINY["qwen3_moe"]), "vocab_size": 32})  # the prepared teacher's
    n = P.param_counts(spec).total
    cfg = config_from_dict({"model": vars(spec), "cluster": {"gpus_per_node": 0},
                            "train": {"distributed_optimizer": False}})
    st = P.learner_memory(cfg, seq=20)["stages"]["first"]
    assert st["params_dense"] + st["params_experts"] == n
    assert st["parts"]["weights"] == 4 * n and st["parts"]["gradients"] == 4 * n
    assert st["parts"]["optimizer"] == 8 * n
    cfg = config_from_dict({"model": vars(spec), "cluster": {"gpus_per_node": 0},
                            "parallel": {"world_size": 4, "micro_batch_size": 1},
                            "precision": {"params_dtype": "bfloat16"},
                            "train": {"batch_size": 8}})
    st = P.learner_memory(cfg, seq=20)["stages"]["first"]
    assert st["parts"]["weights"] == 2 * n and st["parts"]["gradients"] == 4 * n
    assert st["parts"]["optimizer"] == pytest.approx(12 * n / 4)


@pytest.mark.parametrize("proximal,staleness,lag,gpu,host", [
    ("behaviour", 2, 0, 0, 0),
    ("snapshot", 4, 0, 0, 5 * 2),  # versions [v - 4, v] in bf16
    ("ewma", 4, 0, 0, 4 + 2),  # float32 EWMA + a transient bf16 copy of the live weights
    ("replica", 2, 1, 2, 2 * 2),  # a second bf16 model on the GPU; the lag keeps 2 versions
])
def test_pi_old_memory_closed_form(proximal, staleness, lag, gpu, host):
    """Bytes per parameter of the rank: `gpu` on the learner GPU, `host` in CPU memory."""
    spec = MoEModelSpec(**{**vars(TINY["qwen3_moe"]), "vocab_size": 32})
    n = P.param_counts(spec).total
    cfg = config_from_dict({"model": vars(spec), "cluster": {"gpus_per_node": 0},
                            "precision": {"params_dtype": "bfloat16"},
                            "async": {"max_staleness": staleness, "publish_lag": lag},
                            "correction": {"proximal": proximal}})
    st = P.learner_memory(cfg, seq=20)["stages"]["first"]
    assert st["parts"]["replica"] == gpu * n
    assert st["host"]["total"] == host * n


def test_stage_params_closed_form_for_the_qwen_layout():
    """TP 4 x EP 16: a rank holds 128 / 16 experts of every layer, a quarter of attention and of
    the vocabulary, and whole norms and routers."""
    cfg = load_config(QWEN)
    h, layers = 2048, 48
    dense, experts = P.stage_params(P.param_counts(cfg.model), cfg, first=True, last=True)
    assert experts == layers * 8 * 3 * h * 768
    attention = h * 32 * 128 * 2 + 2 * h * 4 * 128
    assert dense == layers * (attention / 4 + 2 * h + 2 * 128 + h * 128) + 2 * 151936 * h / 4 + h


def test_activation_bytes_closed_form():
    """A hand-expanded case of the per-layer formula (docs/plan.md), TP 1, bf16, fused attention:
    per token 2(2h + (nh+2kv)d + (nh+kv)d + nh d) + 4 nh for attention, and
    2*2h + 6E + k*2(2h + 3f) for the MoE block."""
    spec = MoEModelSpec(hidden_size=64, num_attention_heads=4, num_kv_heads=2, head_dim=16,
                        moe_ffn_hidden_size=32, num_experts=4, moe_router_topk=2)
    attn = 2 * (128 + 8 * 16 + 6 * 16 + 4 * 16) + 16
    moe = 2 * 128 + 6 * 4 + 2 * 2 * (128 + 96)
    got = P.activation_bytes_per_layer(spec, micro_batch=3, seq=10, tp=1, etp=1, sp=False)
    assert got == 30 * (attn + moe)
    # unfused attention adds fp32 softmax + bf16 probabilities, [s, s] per head and sample
    unfused = P.activation_bytes_per_layer(spec, micro_batch=3, seq=10, tp=1, etp=1, sp=False,
                                           fused_attention=False)
    assert unfused - got == pytest.approx(3 * 4 * 10 * 10 * 6 - 30 * 16)
    # TP 2 with sequence parallel halves every term (ETP 1: expert tokens follow the SP shard)
    half = P.activation_bytes_per_layer(spec, micro_batch=3, seq=10, tp=2, etp=1, sp=True)
    assert half == pytest.approx(got / 2)


@pytest.mark.parametrize("pp, vpp, mbs, stage, want", [
    (1, 1, 64, 0, 48),  # no pipeline: one micro-batch through all layers
    (4, 1, 64, 0, 48),  # 1F1B: stage 0 holds PP micro-batches of L / PP layers
    (4, 1, 64, 3, 12),  # the last stage holds one
    (4, 1, 2, 0, 24),  # fewer micro-batches than stages
    (4, 2, 64, 0, 48 * (1 + 3 / 8)),  # interleaved: L (1 + (PP - 1) / (PP v))
    (4, 3, 64, 0, 48 * (1 + 3 / 12)),
])
def test_pipeline_in_flight_closed_form(pp, vpp, mbs, stage, want):
    assert P.held_layer_microbatches(pp, vpp, mbs, 48, stage) == pytest.approx(want)


def test_server_memory_closed_form():
    """Weights split over the server's GPUs (KV heads replicated past num_kv_heads), KV cache of
    server.max_total_tokens: 2 (K, V) x layers x KV heads per GPU x head_dim x dtype bytes."""
    spec = TINY["qwen3_moe"]
    n = P.param_counts(spec)
    m = P.server_memory(spec, 1, "bfloat16", 1000, 50, 80 * GIB, "k")
    assert m["weights"] == 2 * n.total
    assert m["kv_per_token"] == 2 * 3 * 2 * 24 * 2 and m["kv_cache"] == 1000 * m["kv_per_token"]
    m4 = P.server_memory(spec, 4, "bfloat16", 1000, 50, 80 * GIB, "k")
    assert m4["kv_per_token"] == 2 * 3 * 1 * 24 * 2  # 2 KV heads over 4 GPUs: one per GPU
    with pytest.raises(ConfigError, match="^k: 4 GPUs per server must divide"):
        P.server_memory(TINY["mixtral"], 4, "bfloat16", 1000, 50, 80 * GIB, "k")
    small = P.server_memory(spec, 1, "bfloat16", 40, 50, 80 * GIB, "k")
    assert not small["fits"] and "less than one sequence" in small["why"]


# ---------------------------------------------------------------- config keys and init dirs
def test_teacher_model_round_trips_and_names_keys():
    cfg = load_config(MIXTRAL)
    assert cfg.teacher.model.hidden_size == 6144 and cfg.init.teacher
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    for override, key in [("teacher.model.vocab_size=32768", "teacher.model.vocab_size"),
                          ("init.teacher=", "init.teacher"),
                          ("teacher.model.num_kv_heads=5", "teacher.model.num_kv_heads"),
                          ("teacher.model.max_position_embeddings=1000",
                           "teacher.model.max_position_embeddings"),
                          ("teacher.model.shared_expert_ffn_hidden_size=64", "teacher.model.")]:
        with pytest.raises(ConfigError) as err:
            load_config(MIXTRAL, [override])
        assert str(err.value).startswith(key), str(err.value)


def test_init_dir_config_json_is_compared(tmp_path):
    spec = TINY["mixtral"]
    to_hf_config(spec).to_json_file(str(tmp_path / "config.json"))
    assert P.check_init_dir(spec, str(tmp_path), "model", "init.student")
    assert not P.check_init_dir(spec, str(tmp_path / "absent"), "model", "init.student")
    other = MoEModelSpec(**{**vars(spec), "num_layers": 4})
    with pytest.raises(ConfigError, match=r"^teacher.model.num_layers: 4 but init.teacher"):
        P.check_init_dir(other, str(tmp_path), "teacher.model", "init.teacher")


# ---------------------------------------------------------------- the CLI
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_plan_cli_on_every_config_fits(path):
    out = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "plan", "--config", str(path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "\nverdict: FITS" in out.stdout
    for word in ("TP ", "expert-DP", "learner memory per GPU", "rollout server per GPU",
                 "teacher server per GPU", "active per token"):
        assert word in out.stdout


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_plan_json_on_every_config(path, capsys):
    """Machine-readable output; GPU configs also fit with 2048-token prompts."""
    cfg = load_config(path)
    args = ["plan", "--config", str(path), "--json"]
    if cfg.cluster.gpus_per_node:
        args += ["--prompt-tokens", "2048"]
    assert cli_main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["verdict"]["fits"]
    c = cfg.cluster
    assert plan["total_gpus"] == c.gpus_per_node * (c.learner_nodes + c.rollout.nodes
                                                   + c.teacher.nodes)
    lay = plan["layout"]
    assert lay["world_size"] == (lay["tensor_parallel"] * lay["context_parallel"]
                                 * lay["pipeline_parallel"] * lay["data_parallel"])
    assert lay["world_size"] == (lay["expert_tensor_parallel"] * lay["expert_parallel"]
                                 * lay["pipeline_parallel"] * lay["expert_data_parallel"])
    assert plan["learner"]["total"] <= c.gpu_memory_gib * GIB


@pytest.mark.parametrize("path, overrides, key", [
    (QWEN, ["parallel.tensor_parallel=3"], "parallel.tensor_parallel"),  # heads 32
    (QWEN, ["parallel.world_size=32"], "parallel.world_size"),  # 2 nodes x 8 GPUs = 16
    (MIXTRAL, ["cluster.gpus_per_node=4", "cluster.learner_nodes=8", "parallel.tensor_parallel=8",
               "cluster.rollout.gpus_per_server=4", "cluster.teacher.gpus_per_server=4"],
     "parallel.tensor_parallel"),  # TP 8 would span two 4-GPU nodes
    (QWEN, ["cluster.teacher.gpus_per_server=3"], "cluster.teacher.gpus_per_server"),
    (MIXTRAL, ["teacher.model.vocab_size=32768"], "teacher.model.vocab_size"),
])
def test_plan_cli_refuses_bad_layouts_naming_the_key(path, overrides, key, capsys):
    assert cli_main(["plan", "--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert f"config error: {key}:" in err, err


def test_plan_cli_exits_1_when_it_does_not_fit(capsys):
    """bf16 without FP8 builds local layers: unfused attention at 8k tokens cannot fit."""
    assert cli_main(["plan", "--config", str(QWEN), "precision.fp8=null"]) == 1
    out = capsys.readouterr().out
    assert "verdict: DOES NOT FIT" in out and "learner" in out
