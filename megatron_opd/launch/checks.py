"""What every launcher refuses before any process starts (`preflight`): the paths of the
config (`config.PATHS`: inputs exist, the directories the run writes can be written, the run
secret is private), files the run needs, and a precision the learner's machine cannot run."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_opd.config import PATHS, Config, ConfigError, iter_fields


def preflight(cfg: Config, *, files: bool = True, learner: bool = True,
              node_paths: bool = False) -> None:
    """The checks of every launcher, in one place. `files`: this machine sees the run's files
    (`check_startable`); `learner`: the learner runs on this machine or on nodes like it (the
    embedded launcher; the Slurm job driver, which runs on the first learner node), so a precision
    it cannot run (FP8 without a suitable GPU or Transformer Engine, ...) is refused here, not
    after the servers started. `submit` checks files only: it runs on a login node; it also
    checks the paths the nodes use (`node_paths`: slurm.python)."""
    if files:
        check_startable(cfg, node_paths=node_paths)
    if learner:
        check_learner_here(cfg)


def check_paths(cfg: Config, *, node_paths: bool = False) -> None:
    """Every path field by its `config.PATHS` rule, naming the key: an input that is given must
    exist; a directory the run writes must not be an existing non-directory and must be
    creatable and writable; the run secret (`transport.secret_file`, or the run's own
    `run.dir/transport.key` when one was made) must be private and whole. `node_paths`: also
    the paths the cluster's nodes use (slurm.python; `submit` sees the shared filesystem)."""
    for key, name, value, _ in iter_fields(cfg):
        rule = PATHS.get(name)
        if rule is None or not value:
            continue
        if rule.kind == "input":
            if not Path(value).exists():
                raise ConfigError(f"{key}: {value} does not exist, fix the path (or leave it "
                                  f"empty: {rule.empty})")
        elif rule.kind == "output":
            check_writable_dir(key, value)
        elif node_paths:
            if not (Path(value).is_file() and os.access(value, os.X_OK)):
                raise ConfigError(f"{key}: {value} is not an executable file, name the Python "
                                  f"of the nodes (or leave it empty: {rule.empty})")
    check_secret(cfg)


def check_writable_dir(key: str, value: str) -> None:
    """`value` is a directory that exists or can be made, and can be written (naming `key`)."""
    path = Path(os.path.abspath(value))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {value} is a file, not a directory, give a directory path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: cannot make {value}: {existing} is a file, not a directory, "
                          "give a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {existing} is not writable, give a directory you can write "
                          "(or change its permissions)")


def check_secret(cfg: Config) -> None:
    """The run secret, before any server starts: `transport.secret_file`, or the one a previous
    start made in the run directory; missing (when configured), readable by group or others, or
    the wrong size is refused naming the key."""
    from megatron_opd.transport.auth import SecretFileError, load_secret

    if cfg.transport.secret_file:
        key, path = "transport.secret_file", Path(cfg.transport.secret_file)
    else:
        key, path = "run.dir", Path(cfg.run.dir) / "transport.key"
        if not path.exists():
            return  # made for the run (mode 0600) when it starts
    try:
        load_secret(path)
    except SecretFileError as e:
        raise ConfigError(f"{key}: {e}") from None


def check_learner_here(cfg: Config) -> None:
    """Resolve `precision.*` against this machine's GPU and TE, as the learner does at start
    (learner/main.py); raises PrecisionError naming the key."""
    from megatron_opd.models.precision import resolve_here

    resolve_here(cfg.precision, distributed_optimizer=cfg.train.distributed_optimizer)


def check_startable(cfg: Config, *, here: bool = True, node_paths: bool = False) -> None:
    """What a run needs on disk, refused before any process starts: the config's paths
    (`check_paths`), the checkpoints named by `init.*` (config.json, weights, the student's
    tokenizer), one vocabulary for student and teacher, and the prompt files. `here=False`
    (`submit --dry-run` away from the cluster) skips what only the cluster's filesystem holds."""
    if not here:
        return
    check_paths(cfg, node_paths=node_paths)
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
