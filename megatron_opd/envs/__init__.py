"""Environments: the one place that knows the concrete ones (base.py has the interface).

Everything else goes through these functions with the run's config: `make_env` (the live
environment), `validate_env_config` and `max_prompt_tokens` (config checks and memory plans,
without torch), `prepare_models` (the models of environments that make their own).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_opd.envs.base import (Environment, EnvPrompt, Episode, MultiTurnEnvironment,
                                    SpecialIds, Step)

__all__ = ["Environment", "EnvPrompt", "Episode", "MultiTurnEnvironment", "RunModels",
           "SpecialIds", "Step", "make_env", "max_prompt_tokens", "models_identity",
           "prepare_models", "validate_env_config"]


def validate_env_config(cfg, need) -> None:
    """The selected environment's section (`need(cond, key, why)` raises naming the key); the
    calculator's section is checked whatever is selected (its fields' own rules)."""
    from megatron_opd.envs.calculator import validate_calculator

    validate_calculator(cfg, need)
    if cfg.env.name == "digits":
        from megatron_opd.envs.digits import validate_digits

        validate_digits(cfg, need)
    elif cfg.env.name == "chat":
        from megatron_opd.envs.chat import validate_chat

        validate_chat(cfg, need)


def max_prompt_tokens(cfg) -> int:
    """The longest /generate input the environment makes (multi-turn: prompt and earlier turns)."""
    if cfg.env.name == "digits":
        from megatron_opd.envs.digits import digits_max_prompt_tokens

        return digits_max_prompt_tokens(cfg)
    if cfg.env.name == "calculator":
        from megatron_opd.envs.calculator import calculator_max_prompt_tokens

        return calculator_max_prompt_tokens(cfg)
    return cfg.data.max_prompt_tokens


def make_env(cfg, tokenizer_dir: str | Path | None = None) -> Environment:
    """The run's environment. `tokenizer_dir`: the student's model directory (its tokenizer,
    generation_config and chat template); the digits environment has its own vocabulary."""
    if cfg.teacher.prompt == "privileged":  # the teacher's prompt holds a hint: privileged.py
        from megatron_opd.envs.privileged import privileged_env

        return privileged_env(cfg, tokenizer_dir)
    if cfg.env.name == "digits":
        from megatron_opd.envs.digits import DigitsEnv

        return DigitsEnv(cfg)
    if tokenizer_dir is None:
        raise ValueError(f"make_env: the {cfg.env.name} environment needs the student's "
                         "tokenizer dir")
    if cfg.env.name == "calculator":
        from megatron_opd.envs.calculator import CalculatorEnv

        return CalculatorEnv(cfg, tokenizer_dir)
    from megatron_opd.envs.chat import ChatEnv

    return ChatEnv(cfg, tokenizer_dir)


@dataclass(frozen=True)
class RunModels:
    """The Hugging Face directories a run starts from (SGLang serves them, the learner loads the
    student's weights and both read the student's tokenizer)."""
    student_dir: Path
    teacher_dir: Path
    meta: dict


def prepare_models(cfg, progress: bool = True) -> RunModels:
    """`init.*` when given, else the models the environment makes itself (`megatron-opd
    prepare`, cached; only the digits environment has such models)."""
    if cfg.init.student:
        return RunModels(Path(cfg.init.student).resolve(), Path(cfg.init.teacher).resolve(),
                         {"init": {"student": cfg.init.student, "teacher": cfg.init.teacher}})
    from megatron_opd.envs.digits_models import prepare

    prepared = prepare(cfg, progress=progress)
    return RunModels(prepared.student_dir, prepared.teacher_dir, prepared.meta)


def models_identity(cfg) -> dict:
    """What decides the models a run starts from (the offline store's hash covers it)."""
    if cfg.init.student:
        import hashlib

        def ident(d: str) -> dict:
            path = Path(d).resolve()
            files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
            return {"dir": str(path), "files": [
                [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()],
                "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
                if (path / "config.json").is_file() else ""}

        return {"student": ident(cfg.init.student), "teacher": ident(cfg.init.teacher)}
    from megatron_opd.envs.digits_models import cache_key

    return {"prepared": cache_key(cfg)}
