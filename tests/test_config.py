"""Config tree: YAML + dotlist overrides, errors that name the key, round trip of the resolved tree."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_opd.config import ConfigError, config_from_dict, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_loads_and_overrides_apply():
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["train.steps=7", "async.max_staleness=0",
                                                         "rollout.top_p=0.9", "env.digits.ops=[rev]"])
    assert cfg.train.steps == 7 and cfg.async_.max_staleness == 0
    assert cfg.rollout.top_p == 0.9 and cfg.env.digits.ops == ["rev"]


def test_resolved_config_round_trips():
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["train.lr=0.5"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert "async" in yaml.safe_load(dump_config(cfg))  # YAML spelling of the section


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("bogus.x=1", "bogus"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("logging.progress=3", "logging.progress"),
    ("objective.kl_logprobs=magic", "objective.kl_logprobs"),
    ("async.max_staleness=-1", "async.max_staleness"),
    ("env.digits.ops=[nope]", "env.digits.ops[0]"),
    ("env.name=chat", "data.train"),
    ("env.name=nope", "env.name"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens"),
    ("model.num_kv_heads=3", "model.num_kv_heads"),
    ("rollout.max_new_tokens=2", "rollout.max_new_tokens"),
    ("train=5", "train"),
    ("parallel.tensor_parallel=3", "parallel.tensor_parallel"),
    ("parallel.tensor_parallel=2", "parallel.expert_tensor_parallel"),
    ("parallel.expert_parallel=3", "parallel.expert_parallel"),
    ("parallel.pipeline_parallel=3", "parallel.pipeline_parallel"),
    ("parallel.virtual_pipeline_parallel=2", "parallel.virtual_pipeline_parallel"),
    ("parallel.context_parallel=2", "parallel.context_parallel"),
    ("parallel.micro_batch_size=7", "train.batch_size"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/quickstart.yaml", [override])
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_cli_refuses_bad_config_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "train", "--config",
                          str(ROOT / "configs/quickstart.yaml"), "train.stepz=3",
                          f"run.dir={run_dir}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "train.stepz: unknown key" in out.stderr
    assert not run_dir.exists()  # nothing was started or written


def test_fp8_without_a_gpu_is_refused_before_anything_starts(tmp_path):
    """The CLI exits 2 naming precision.fp8 (no GPU / Transformer Engine here) before it makes a
    run directory or starts a server."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "train", "--config",
                          "configs/quickstart.yaml", f"run.dir={run_dir}",
                          "precision.params_dtype=bfloat16", "precision.fp8=blockwise"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "precision.fp8" in out.stderr and "fp8_fallback" in out.stderr
    assert not run_dir.exists()


def test_init_checkpoints_define_the_model_specs(tmp_path):
    """A readable init.student / init.teacher defines model / teacher.model (config.json read as
    JSON: 1e-06 stays a number); keys the YAML gives must agree; the saved config reloads."""
    from tests.hf_fixtures import make_char_tokenizer, make_hf_moe

    tok = make_char_tokenizer(tmp_path / "tok")
    student = make_hf_moe(tmp_path / "s", "mixtral", tok, hidden_size=32, num_heads=2,
                          num_kv_heads=1, num_experts=4)
    teacher = make_hf_moe(tmp_path / "t", "qwen3_moe", tok, num_layers=3)
    args = [f"init.student={student}", f"init.teacher={teacher}", "data.train=x.jsonl"]
    cfg = load_config(ROOT / "configs/hf-example.yaml", args)
    assert (cfg.model.family, cfg.model.hidden_size, cfg.model.num_experts) == ("mixtral", 32, 4)
    assert cfg.model.vocab_size == 104 and cfg.model.rms_norm_eps == 1e-6
    assert cfg.model.eos_token_id == 98 and cfg.model.pad_token_id == 96
    assert (cfg.teacher.model.family, cfg.teacher.model.num_layers) == ("qwen3_moe", 3)
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    assert load_config(ROOT / "configs/hf-example.yaml", args + ["model.hidden_size=32"]) == cfg
    with pytest.raises(ConfigError, match=r"^model.hidden_size: 64 but init.student"):
        load_config(ROOT / "configs/hf-example.yaml", args + ["model.hidden_size=64"])
    with pytest.raises(ConfigError, match=r"^teacher.model.num_layers: 2 but init.teacher"):
        load_config(ROOT / "configs/hf-example.yaml", args + ["teacher.model.num_layers=2"])


def test_rollout_top_p_follows_the_objective_unless_set():
    """ALGORITHMS.md §2: the LSM recipe samples with top-p 0.9; other objectives keep 1.0; a
    value given explicitly wins, and the saved config holds the resolved number."""
    base = "configs/quickstart.yaml"
    assert load_config(base).rollout.top_p == 1.0
    lsm = ["objective.terms=[lsm]", "teacher.top_k=8"]
    assert load_config(base, lsm).rollout.top_p == 0.9
    assert load_config(base, ["objective.name=lsm", "teacher.top_k=8"]).rollout.top_p == 0.9
    assert load_config(base, [*lsm, "rollout.top_p=1.0"]).rollout.top_p == 1.0
    assert load_config(base, ["rollout.top_p=0.5"]).rollout.top_p == 0.5


def test_proximal_policies_off_the_tokens_version_need_an_r_d_treatment():
    """ewma / loglinear / linear: r_d = pi_prox / mu carries staleness, so ignoring it
    ("none") is refused, naming the key; the default (tis) and snapshot + none load."""
    base = "configs/quickstart.yaml"
    for proximal in ("ewma", "loglinear", "linear"):
        with pytest.raises(ConfigError, match=r"^correction\.discrepancy: none ignores r_d"):
            load_config(base, [f"correction.proximal={proximal}", "correction.discrepancy=none"])
        assert load_config(base, [f"correction.proximal={proximal}"]).correction.discrepancy == "tis"
    load_config(base, ["correction.proximal=snapshot", "correction.discrepancy=none"])
