"""Checkpoint conversion (tools/convert_checkpoint.py) against `transformers` and the learner:
random HF Qwen3-MoE and Mixtral models (fp32, seeded) -> megatron dist checkpoint converted
under one layout -> loaded by the learner's own `load_checkpoint` under other layouts (real
torchrun processes, gloo): logits equal transformers' (1e-5) and a training step runs from it;
-> back to HF under yet another layout: every tensor bit-identical. Bad input is refused with the
key or tensor named."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_opd.models.spec import MoEModelSpec, hf_causal_lm_class, to_hf_config
from megatron_opd.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
WORKER = Path(__file__).parent / "workers" / "convert_worker.py"
SPECS = {
    "qwen3_moe": MoEModelSpec(family="qwen3_moe", vocab_size=48, hidden_size=64, num_layers=4,
                              num_attention_heads=4, num_kv_heads=2, head_dim=16,
                              moe_ffn_hidden_size=32, num_experts=8, moe_router_topk=2),
    "mixtral": MoEModelSpec(family="mixtral", vocab_size=40, hidden_size=64, num_layers=3,
                            num_attention_heads=4, num_kv_heads=2, head_dim=16,
                            moe_ffn_hidden_size=48, num_experts=4, moe_router_topk=2),
}
# (family) -> layout the HF checkpoint is converted under, layouts it is loaded (and exported) under
CONVERT_UNDER = {"qwen3_moe": ["--ep", "2"], "mixtral": []}
LOAD_UNDER = {
    "qwen3_moe": {"world1": (1, {}), "tp2": (2, dict(tensor_parallel=2, expert_tensor_parallel=2)),
                  "pp2": (2, dict(pipeline_parallel=2, micro_batch_size=2))},
    "mixtral": {"world1": (1, {}), "ep2": (2, dict(expert_parallel=2))},
}
EXPORT_UNDER = {"qwen3_moe": "tp2", "mixtral": "ep2"}  # the megatron -> HF layout tested


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOL), *args, "--no-progress"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def read_hf(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def make_hf(spec: MoEModelSpec, out: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    hf = hf_causal_lm_class(spec)(to_hf_config(spec)).float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:  # non-trivial norms, so a swapped or dropped norm shows
                p.add_(0.3 * torch.randn_like(p))
            if n.endswith("gate.weight") and "experts" not in n:
                p.mul_(40.0)  # decisive routing: no top-2 near ties that summation order flips
    hf.save_pretrained(out)
    return hf


@pytest.fixture(scope="module", params=list(SPECS))
def converted(request, tmp_path_factory):
    family = request.param
    spec = SPECS[family]
    tmp = tmp_path_factory.mktemp(family)
    hf = make_hf(spec, tmp / "hf")
    (tmp / "tok").mkdir()
    (tmp / "tok" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    g = torch.Generator().manual_seed(1)
    data = {"input_ids": torch.randint(0, spec.vocab_size, (4, 10), generator=g),
            "targets": torch.randint(0, spec.vocab_size, (4, 10), generator=g)}
    torch.save(data, tmp / "data.pt")
    cli("hf-to-megatron", "--hf", str(tmp / "hf"), "--out", str(tmp / "ckpt"),
        *CONVERT_UNDER[family])
    return family, spec, tmp, hf, data


def run_worker(tmp: Path, spec, nproc: int, layout: dict, name: str) -> dict:
    layout = {"micro_batch_size": 4, **layout}
    out = tmp / f"{name}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKER), "--layout", json.dumps(layout),
           "--spec", json.dumps(dataclasses.asdict(spec)), "--ckpt", str(tmp / "ckpt"),
           "--data", str(tmp / "data.pt"), "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def test_checkpoint_is_the_learners_format(converted):
    _, spec, tmp, _, _ = converted
    ckpt = tmp / "ckpt"
    assert (ckpt / "latest").read_text() == "step_00000000"
    meta = json.loads((ckpt / "step_00000000" / "meta.json").read_text())
    assert meta["weights_only"] is True and meta["step"] == 0 and meta["version"] == 0
    assert MoEModelSpec(**meta["model"]) == spec
    md = ckpt / "step_00000000" / "megatron"
    assert (md / "metadata.json").is_file() and (md / "common.pt").is_file()
    assert not list(md.glob(".group*")), "per-group parts must be merged away"


def test_learner_loads_converted_checkpoint_under_layouts(converted):
    family, spec, tmp, hf, data = converted
    with torch.no_grad():
        ref = hf(input_ids=data["input_ids"]).logits
    lp = torch.log_softmax(ref.double(), -1).gather(-1, data["targets"].unsqueeze(-1))
    ref_loss = float(-lp.sum() / lp.numel())
    for name, (nproc, layout) in LOAD_UNDER[family].items():
        got = run_worker(tmp, spec, nproc, layout, name)
        diff = (got["logits"] - ref).abs().max().item()
        assert diff <= 1e-5, f"{family} {name}: logits differ from transformers by {diff}"
        assert got["step"] == 0 and got["version"] == 0
        # training starts from it: the first step's loss is transformers' and it is applied
        assert got["loss"] == pytest.approx(ref_loss, rel=2e-6), name
        assert got["stepped"] and got["grad_norm"] > 0


def test_round_trip_is_bit_identical_under_other_layouts(converted):
    family, spec, tmp, _, _ = converted
    original = read_hf(tmp / "hf")
    layouts = {"world1": [], "tp2": ["--tp", "2", "--etp", "2"], "ep2": ["--ep", "2"]}
    for name in ("world1", EXPORT_UNDER[family]):
        out = tmp / f"back_{name}"
        cli("megatron-to-hf", "--ckpt", str(tmp / "ckpt"), "--out", str(out),
            "--tokenizer", str(tmp / "tok"), "--layers-per-group", "2", *layouts[name])
        back = read_hf(out)
        assert set(back) == set(original), name
        for k, t in original.items():
            assert back[k].dtype == t.dtype and torch.equal(back[k], t), f"{name}: {k}"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(original)
        assert (out / "tokenizer_config.json").is_file()
    # transformers loads the export (sharded safetensors + index) as the same architecture
    model = hf_causal_lm_class(spec).from_pretrained(tmp / "back_world1", dtype=torch.float32)
    assert model.config.num_hidden_layers == spec.num_layers
    from megatron_opd.convert.hf_config import read_config_json, spec_from_hf_config

    assert spec_from_hf_config(read_config_json(tmp / "back_world1")) == spec


def test_spec_mismatch_names_the_tensor(converted):
    family, spec, tmp, _, _ = converted
    wrong = dataclasses.replace(spec, moe_ffn_hidden_size=spec.moe_ffn_hidden_size * 2)
    (tmp / "wrong").mkdir(exist_ok=True)
    to_hf_config(wrong).save_pretrained(tmp / "wrong")
    proc = cli("megatron-to-hf", "--ckpt", str(tmp / "ckpt"), "--out", str(tmp / "x"),
               "--hf-config", str(tmp / "wrong"), ok=False)
    assert proc.returncode != 0
    assert "decoder.layers.mlp.experts.experts.linear_fc" in proc.stderr
    assert "global shape" in proc.stderr
    assert not (tmp / "x").exists()


# ----------------------------------------------------------------------------- bad input
def test_unexpressible_hf_config_is_refused():
    from megatron_opd.convert.hf_config import UnsupportedConfig, spec_from_hf_config

    base = to_hf_config(SPECS["qwen3_moe"]).to_dict()
    for key, value in [("norm_topk_prob", False), ("mlp_only_layers", [1]),
                       ("hidden_act", "gelu"), ("rope_scaling", {"type": "yarn", "factor": 4})]:
        with pytest.raises(UnsupportedConfig, match=key):
            spec_from_hf_config({**base, key: value})
    with pytest.raises(UnsupportedConfig, match="model_type='deepseek_v3'"):
        spec_from_hf_config({**base, "model_type": "deepseek_v3"})
    mixtral = to_hf_config(SPECS["mixtral"]).to_dict()
    with pytest.raises(UnsupportedConfig, match="sliding_window"):
        spec_from_hf_config({**mixtral, "sliding_window": 16})
    assert spec_from_hf_config(base) == SPECS["qwen3_moe"]
    assert spec_from_hf_config(mixtral) == SPECS["mixtral"]


def test_hf_tensor_shape_and_name_errors(tmp_path):
    from megatron_opd.convert.hf_io import LazyHFReader

    spec = SPECS["mixtral"]
    make_hf(spec, tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(str(f))
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=f"{name} has shape"):
        LazyHFReader(tmp_path).check(spec)
    del tensors[name]
    save_file(tensors, str(f))
    with pytest.raises(KeyError, match=name):
        LazyHFReader(tmp_path).check(spec)


def test_cli_refuses_bad_arguments(tmp_path):
    make_hf(dataclasses.replace(SPECS["qwen3_moe"], num_layers=2), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": False}))
    proc = cli("hf-to-megatron", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o"),
               ok=False)
    assert proc.returncode != 0 and "norm_topk_prob=False" in proc.stderr
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    proc = cli("hf-to-megatron", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o"),
               "--tp", "3", ok=False)
    assert proc.returncode != 0 and "parallel.tensor_parallel" in proc.stderr
    proc = cli("hf-to-megatron", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o"),
               "--family", "mixtral", ok=False)
    assert proc.returncode != 0 and "--family" in proc.stderr
    proc = cli("megatron-to-hf", "--ckpt", str(tmp_path / "nothing"), "--out",
               str(tmp_path / "o"), ok=False)
    assert proc.returncode != 0 and "--ckpt" in proc.stderr
