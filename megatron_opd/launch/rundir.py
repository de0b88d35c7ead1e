"""The run directory (fresh, resumed under the same config, or overwritten) and its secret."""

from __future__ import annotations

import shutil
from pathlib import Path

from megatron_opd.config import Config, ConfigError, dump_config
from megatron_opd.errors import RunDirTaken

# Keys that may change when a run is resumed (everything else must match the saved config).
RESUMABLE_CHANGES = ("train.steps", "run.overwrite", "logging.progress", "logging.tensorboard",
                     "server.start_timeout_s", "server.request_timeout_s")


def prepare_run_dir(cfg: Config) -> Path:
    """A fresh run directory; or, when it holds a checkpoint and `train.resume` is on, the same
    directory to continue (the learner resumes from `checkpoints/latest`, drops metrics logged
    after it, and replays the accepted samples of its spool). `run.overwrite=true` wipes it."""
    run_dir = Path(cfg.run.dir).resolve()
    resumable = (run_dir / "checkpoints" / "latest").is_file() and cfg.train.resume
    if cfg.run.overwrite:
        for name in ("metrics.jsonl", "curves.png", "summary.json", "wiring.json"):
            (run_dir / name).unlink(missing_ok=True)
        for name in ("checkpoints", "spool", "tensorboard"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    elif resumable:
        _check_resumable(cfg, run_dir)
    elif (run_dir / "metrics.jsonl").exists():
        raise RunDirTaken(f"run.dir: {run_dir} already holds a run without a checkpoint to "
                          "resume from (set run.overwrite=true to replace it)")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def _check_resumable(cfg: Config, run_dir: Path) -> None:
    """Refuse to continue a run under a different config (naming the keys that differ)."""
    import yaml

    from megatron_opd.config import to_dict

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"run.dir: {run_dir} has a checkpoint but no config.yaml to resume with")
    saved, now = _flatten(yaml.safe_load(saved_path.read_text()) or {}), _flatten(to_dict(cfg))
    # Keys only one side has come from another megatron-opd version (a key added since, with its
    # default, or one removed): not a change of this run.
    differ = sorted(k for k in set(saved) & set(now)
                    if saved[k] != now[k] and k not in RESUMABLE_CHANGES)
    if differ:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in differ[:5])
        raise ConfigError(f"{differ[0]}: run.dir {run_dir} holds a checkpoint made with another "
                          f"config; differing: {shown}. Resume with the same config (only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change), or set "
                          "run.overwrite=true to start over")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def run_secret(cfg: Config, run_dir: Path) -> str:
    """The HMAC key of this run's ZeroMQ messages: the configured file, or one made for the run
    (mode 0600, kept across resumes). Authenticating on loopback too costs little (samples are
    small) and keeps one code path."""
    from megatron_opd.transport import load_secret, write_secret

    path = Path(cfg.transport.secret_file) if cfg.transport.secret_file else run_dir / "transport.key"
    if not cfg.transport.secret_file and not path.exists():
        write_secret(path)
    load_secret(path)  # refuses a missing or group/world-readable file, naming it
    return str(path)
