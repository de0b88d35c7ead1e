"""HF exports carry their source through, and bad input files get one clear error.

A source HF Qwen3-MoE directory shaped like a real release (null bos/eos/pad in config.json, a
dense `intermediate_size` unlike the experts', its own generation_config.json, a tokenizer
shorter than the model's vocabulary) goes hf-to-megatron -> megatron-to-hf through the CLI: the
exported config.json equals the source's (only `dtype` follows the exported tensors), its
generation config and tokenizer files are copied, and a real SGLang server on CPU serves the
export with transformers' log-probs. `save_hf_checkpoint` (the learner's export) does the same.
Bad files: a truncated safetensors file and a missing / short `.distcp` are named in one line
`megatron-opd: error: ...`, exit status 2, with no output (partial or hidden) left behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_opd.models.spec import MoEModelSpec, hf_causal_lm_class, to_hf_config

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
SPEC = MoEModelSpec(family="qwen3_moe", vocab_size=40, hidden_size=64, num_layers=2,
                    num_attention_heads=4, num_kv_heads=2, head_dim=16, moe_ffn_hidden_size=32,
                    num_experts=4, moe_router_topk=2, max_position_embeddings=128)
GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": True, "temperature": 0.6,
              "top_p": 0.95, "transformers_version": "5.19.0"}
TOKENIZER_LEN = 36  # ids 36..39 are real model rows no token maps to (like Qwen3's)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args, "--no-progress"], env=_env(),
                          capture_output=True, text=True, timeout=300)


def read_hf(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def make_source(out: Path) -> dict:
    """A source HF dir like a real release; returns its config.json."""
    from megatron_opd.tokenizer import SPECIALS, save_tokenizer

    torch.manual_seed(0)
    hf = hf_causal_lm_class(SPEC)(to_hf_config(SPEC)).float()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.mul_(40.0)
    hf.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=None, intermediate_size=96,
               _name_or_path="org/source-model")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION))
    save_tokenizer(out, list(SPECIALS) + [f"w{i}" for i in range(TOKENIZER_LEN - 3)],
                   model_max_length=128)
    return cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """source -> megatron (CLI) -> HF (CLI, the source taken from the checkpoint's meta.json)."""
    tmp = tmp_path_factory.mktemp("hf_export")
    cfg = make_source(tmp / "src")
    proc = cli("hf-to-megatron", "--hf", str(tmp / "src"), "--out", str(tmp / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = cli("megatron-to-hf", "--ckpt", str(tmp / "ckpt"), "--out", str(tmp / "out"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, cfg


def test_export_carries_the_source_config_generation_config_and_tokenizer(exported):
    tmp, src_cfg = exported
    out_cfg = json.loads((tmp / "out" / "config.json").read_text())
    assert out_cfg == src_cfg  # float32 in, float32 out: nothing differs
    assert out_cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert out_cfg["eos_token_id"] is None and out_cfg["intermediate_size"] == 96
    assert json.loads((tmp / "out" / "generation_config.json").read_text()) == GENERATION
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp / "out" / f).read_bytes() == (tmp / "src" / f).read_bytes(), f
    original, back = read_hf(tmp / "src"), read_hf(tmp / "out")
    assert set(back) == set(original)
    assert all(torch.equal(back[k], t) for k, t in original.items())
    meta = json.loads((tmp / "ckpt" / "step_00000000" / "meta.json").read_text())
    assert meta["hf_source"]["config"] == src_cfg


def test_export_dtype_and_a_vanished_source_dir(exported, tmp_path):
    tmp, src_cfg = exported
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tmp / "ckpt", ckpt)
    meta_f = ckpt / "step_00000000" / "meta.json"
    meta = json.loads(meta_f.read_text())
    meta["hf_source"]["dir"] = str(tmp_path / "gone")  # the config still travels in meta.json
    meta_f.write_text(json.dumps(meta))
    proc = cli("megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "bf16"),
               "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out_cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert out_cfg == {**src_cfg, "dtype": "bfloat16"}
    assert json.loads((tmp_path / "bf16" / "generation_config.json").read_text()) == GENERATION
    assert not (tmp_path / "bf16" / "tokenizer.json").exists()  # the files are gone with the dir
    assert all(t.dtype == torch.bfloat16 for t in read_hf(tmp_path / "bf16").values())


def test_source_of_a_learner_checkpoint_is_its_runs_init_student(exported, tmp_path):
    from megatron_opd.convert.convert import source_of_checkpoint

    tmp, src_cfg = exported
    run = tmp_path / "run"
    shutil.copytree(tmp / "ckpt", run / "checkpoints")
    meta_f = run / "checkpoints" / "step_00000000" / "meta.json"
    meta = json.loads(meta_f.read_text())
    del meta["hf_source"]  # a learner checkpoint records no source of its own
    meta_f.write_text(json.dumps(meta))
    assert source_of_checkpoint(run / "checkpoints") is None
    (run / "config.yaml").write_text(f"init:\n  student: {tmp / 'src'}\n")
    source = source_of_checkpoint(run / "checkpoints")
    assert source.config == src_cfg and source.generation_config == GENERATION


def test_export_without_a_source_has_architectures(tmp_path):
    from megatron_opd.convert.hf_export import export_config

    for family, arch in (("qwen3_moe", "Qwen3MoeForCausalLM"), ("mixtral", "MixtralForCausalLM")):
        spec = dataclasses.replace(SPEC, family=family)
        cfg = export_config(spec, torch.float32, None)
        assert cfg["architectures"] == [arch] and cfg["vocab_size"] == SPEC.vocab_size


def test_a_source_of_another_model_is_refused(exported):
    from megatron_opd.convert.errors import BadCheckpoint
    from megatron_opd.convert.hf_export import HFSource, export_config

    tmp, _ = exported
    source = HFSource.from_path(tmp / "src")
    for key, value in (("rope_theta", 5e5), ("num_experts", 8), ("vocab_size", 48)):
        with pytest.raises(BadCheckpoint, match=key):
            export_config(dataclasses.replace(SPEC, **{key: value}), torch.float32, source)
    # token ids and the megatron-only padding divisor are not the architecture
    export_config(dataclasses.replace(SPEC, eos_token_id=5, make_vocab_size_divisible_by=64),
                  torch.float32, source)


@pytest.fixture(scope="module")
def megatron_world():
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed

    install_megatron_cpu_compat()
    init_distributed(ParallelConfig(), seed=0)
    yield
    destroy_distributed()


def test_save_hf_checkpoint_carries_the_source(exported, megatron_world, tmp_path):
    from megatron_opd.models.hf_mapping import load_hf_checkpoint, save_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_gpt_model

    tmp, src_cfg = exported
    model = build_gpt_model(SPEC)
    load_hf_checkpoint(model, tmp / "src", SPEC)
    save_hf_checkpoint(model, SPEC, tmp_path / "out", source=tmp / "src")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == src_cfg
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == GENERATION
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    back, original = read_hf(tmp_path / "out"), read_hf(tmp / "src")
    assert all(torch.equal(back[k], t) for k, t in original.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


@pytest.mark.slow
def test_sglang_serves_the_export(exported, tmp_path):
    """One real SGLang server on CPU on the exported directory: greedy tokens and their
    log-probs are transformers' on the source directory."""
    from transformers import AutoModelForCausalLM

    from megatron_opd.serving.sglang_client import SGLangClient
    from megatron_opd.serving.sglang_server import SGLangServer, free_port

    tmp, _ = exported
    srv = SGLangServer("export", str(tmp / "out"), free_port(), str(tmp_path / "server.log"),
                       max_total_tokens=2048, threads=1, extra_args=("--weight-version", "0"))
    srv.start()
    try:
        srv.wait_ready(300)
        prompt = [1, 13, 4, 5, 6, 17]
        res = SGLangClient(srv.url).generate([prompt], {"temperature": 0.0,
                                                        "max_new_tokens": 5})[0]
    finally:
        srv.stop()
    ref_model = AutoModelForCausalLM.from_pretrained(tmp / "src", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ref_model(torch.tensor([prompt + res.output_ids])).logits[0].double()
    ref = torch.log_softmax(logits, -1)
    assert len(res.output_ids) >= 1
    for j, tok in enumerate(res.output_ids):
        row = ref[len(prompt) - 1 + j]
        assert tok == int(row.argmax())
        assert abs(res.output_logprobs[j] - row[tok].item()) < 1e-4


# ----------------------------------------------------------------------------- bad files
def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("megatron-opd: error: "), proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[:len(data) * 2 // 3])


def test_truncated_safetensors_is_named(exported, tmp_path):
    tmp, _ = exported
    shutil.copytree(tmp / "src", tmp_path / "src")
    bad = next((tmp_path / "src").glob("*.safetensors"))
    _truncate(bad)
    proc = cli("hf-to-megatron", "--hf", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt"))
    _one_line_error(proc, str(bad), "re-download")
    assert not (tmp_path / "ckpt").exists()


def test_truncated_safetensors_in_the_learners_load(exported, megatron_world, tmp_path):
    from megatron_opd.convert.errors import BadCheckpoint
    from megatron_opd.models.hf_mapping import load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_gpt_model

    tmp, _ = exported
    shutil.copytree(tmp / "src", tmp_path / "src")
    bad = next((tmp_path / "src").glob("*.safetensors"))
    _truncate(bad)
    with pytest.raises(BadCheckpoint, match=str(bad)):
        load_hf_checkpoint(build_gpt_model(SPEC), tmp_path / "src", SPEC)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_bad_distcp_is_named_and_nothing_is_written(exported, tmp_path, damage):
    tmp, _ = exported
    shutil.copytree(tmp / "ckpt", tmp_path / "ckpt")
    files = sorted((tmp_path / "ckpt" / "step_00000000" / "megatron").glob("*.distcp"))
    bad = files[len(files) // 2]
    if damage == "missing":
        bad.unlink()
    else:
        _truncate(bad)
    (tmp_path / "exports").mkdir()
    proc = cli("megatron-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out",
               str(tmp_path / "exports" / "out"))
    _one_line_error(proc, str(bad), damage)
    assert list((tmp_path / "exports").iterdir()) == []  # not even a hidden temporary


def test_a_failed_export_leaves_nothing_and_keeps_the_old_output(tmp_path):
    from megatron_opd.convert.hf_export import atomic_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("previous export")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as d:
            (d / "model.safetensors").write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "old").read_text() == "previous export"
    with atomic_dir(tmp_path / "out") as d:
        (d / "new").write_text("x")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new"]
