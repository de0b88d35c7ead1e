"""What every launcher refuses before any process starts (`preflight`): files the run needs,
and a precision the learner's machine cannot run."""

from __future__ import annotations

from pathlib import Path

from megatron_opd.config import Config, ConfigError


def preflight(cfg: Config, *, files: bool = True, learner: bool = True) -> None:
    """The checks of every launcher, in one place. `files`: this machine sees the run's files
    (`check_startable`); `learner`: the learner runs on this machine or on nodes like it (the
    embedded launcher; the Slurm job driver, which runs on the first learner node), so a precision
    it cannot run (FP8 without a suitable GPU or Transformer Engine, ...) is refused here, not
    after the servers started. `submit` checks files only: it runs on a login node."""
    if files:
        check_startable(cfg)
    if learner:
        check_learner_here(cfg)


def check_learner_here(cfg: Config) -> None:
    """Resolve `precision.*` against this machine's GPU and TE, as the learner does at start
    (learner/main.py); raises PrecisionError naming the key."""
    from megatron_opd.models.precision import resolve_here

    resolve_here(cfg.precision, distributed_optimizer=cfg.train.distributed_optimizer)


def check_startable(cfg: Config, *, here: bool = True) -> None:
    """What a run needs on disk, refused before any process starts: the checkpoints named by
    `init.*` (config.json, weights, the student's tokenizer), one vocabulary for student and
    teacher, and the prompt files. `here=False` (`submit --dry-run` away from the cluster)
    skips what only the cluster's filesystem holds."""
    if not here:
        return
    for key in ("student", "teacher"):
        path = getattr(cfg.init, key)
        if not path:
            continue
        d = Path(path)
        if not (d / "config.json").is_file():
            raise ConfigError(f"init.{key}: {d} is not a Hugging Face model directory (no "
                              "config.json); point it at one (tools/convert_checkpoint.py "
                              "megatron-to-hf makes one from a learner checkpoint)")
        if not any(d.glob("*.safetensors")):
            raise ConfigError(f"init.{key}: {d} has no *.safetensors weights")
    if cfg.env.name == "chat":
        _check_prompt_files(cfg)
    if cfg.init.student:
        from megatron_opd.data.tokenizers import TokenizerMismatch, compare_vocabularies

        try:  # token ids cross between the two models: one vocabulary, or nothing starts
            compare_vocabularies(cfg.init.student, cfg.init.teacher)
        except TokenizerMismatch as e:
            raise ConfigError(f"init.teacher: {e}") from None


def _check_prompt_files(cfg: Config) -> None:
    """Every row of the prompt files parses (a malformed one is named by file and line, or
    skipped and counted with `data.bad_rows=skip`) before any server starts."""
    from megatron_opd.data.prompts import PromptDataError, read_prompt_rows

    d = cfg.data
    for key in ("train", "eval"):
        path = getattr(d, key)
        if not path:
            continue
        if not Path(path).exists():
            raise ConfigError(f"data.{key}: {path} does not exist")
        try:
            rows = read_prompt_rows(path, prompt_key=d.prompt_key, label_key=d.label_key,
                                    on_error="skip" if d.bad_rows == "skip" else "raise")
        except PromptDataError as e:
            raise ConfigError(f"data.{key}: {e} (or set data.bad_rows=skip to skip and count "
                              "malformed rows)") from None
        skipped = f", {rows.skipped} malformed skipped" if rows.skipped else ""
        print(f"[megatron-opd] data.{key}: {len(rows.rows)} prompts in {path}{skipped}",
              flush=True)
