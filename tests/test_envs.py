"""The environment interface: the digits environment behind it, nothing outside envs/ naming a
concrete environment, and a config that loads without torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_opd.config import load_config
from megatron_opd.envs import make_env, max_prompt_tokens

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_opd"
# what names a concrete environment: its modules and its classes
CONCRETE = re.compile(r"envs\.(digits|digits_models|chat|calculator|tools)\b|"
                      r"envs import .*\b(digits|chat|calculator|tools)\b|"
                      r"\b(DigitTask|DigitsEnv|ChatEnv|CalculatorEnv|CalculatorEpisode)\b")


def test_no_module_outside_envs_names_a_concrete_environment():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE / "envs":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if CONCRETE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert not (PACKAGE / "task.py").exists() and not (PACKAGE / "prepare.py").exists()


def test_config_loads_and_validates_without_torch():
    code = ("import sys, megatron_opd.config as c\n"
            "for f in sys.argv[1:]:\n"
            "    c.load_config(f)\n"
            "bad = sorted(m for m in ('torch', 'transformers', 'megatron') if m in sys.modules)\n"
            "assert not bad, bad\n")
    configs = sorted(str(p) for p in (ROOT / "configs").glob("*.yaml"))
    out = subprocess.run([sys.executable, "-c", code, *configs], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_digits_environment_is_the_quickstart_task():
    """Same prompts, held-out set and rewards as the task the quickstart always trained on."""
    cfg = load_config(ROOT / "configs/quickstart.yaml")
    env = make_env(cfg)
    task = env.task
    evals = env.eval_prompts()
    assert [p.token_ids for p in evals] == [ex.prompt_ids for ex in task.eval_set(64, 0)]
    held = {p.token_ids for p in evals}
    stream = env.train_prompts()
    train = [next(stream) for _ in range(300)]
    assert not held & {p.token_ids for p in train}
    again = env.train_prompts()  # deterministic: prompt i is the same after a restart
    assert [next(again).token_ids for _ in range(300)] == [p.token_ids for p in train]
    p = train[0]
    answer = task.answer_for(p.token_ids)
    assert env.reward(p, answer) == 1.0 and env.reward(p, answer[:-1]) == 0.0
    assert p.metadata == {"op": p.source} and p.source in cfg.env.digits.ops
    assert np.array_equal(env.loss_mask(p, answer), np.ones(len(answer), dtype=np.uint8))
    assert env.special.stop_ids == (task.eos,) and env.special.pad == task.pad
    assert max_prompt_tokens(cfg) == max(len(x.token_ids) for x in train) == 3 + 7


def _real_configs():
    """Every config but the digits ones (quickstart variants: their models are made here)."""
    import yaml

    return sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                  if (yaml.safe_load(p.read_text()).get("env") or {}).get("name") != "digits")


@pytest.mark.parametrize("name", _real_configs())
def test_submit_dry_run_renders_every_chat_config(name, tmp_path):
    """hf-example, tool-quickstart and the real-scale configs (their checkpoints and prompt files live on a
    cluster): `submit --dry-run` renders the job here; `train` would refuse the missing files."""
    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    out = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "submit", "--dry-run",
                          "--config", str(ROOT / "configs" / name), f"run.dir={run_dir}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "TMPDIR": str(tmp)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert not run_dir.exists()  # a dry run writes nothing in run.dir ...
    (named,) = tmp.iterdir()  # ... but the job's files go to the temporary directory it names
    assert str(named) in out.stderr and (named / "job.sbatch").read_text() in out.stdout
    import yaml

    saved = yaml.safe_load((named / "config.yaml").read_text())  # what the job will load
    assert saved["env"]["name"] in ("chat", "calculator") and saved["init"]["student"]
    assert saved["data"]["train"] or saved["env"]["name"] == "calculator"  # its own prompts


def test_a_stream_started_at_a_position_is_the_suffix():
    """What a resumed orchestrator relies on: train_prompts(start=n) yields exactly the prompts
    of positions >= n of the full stream, positions increasing."""
    cfg = load_config(ROOT / "configs/quickstart.yaml")
    env = make_env(cfg)
    full = env.train_prompts()
    head = [next(full) for _ in range(120)]
    assert [p.position for p in head] == list(range(120))
    tail = env.train_prompts(start=77)
    assert [(p.position, p.token_ids) for p in (next(tail) for _ in range(43))] == \
        [(p.position, p.token_ids) for p in head[77:]]
