"""The run directory and its secret. What `prepare_run_dir` finds decides what a run does,
before any process starts:

- nothing of a run: a fresh run;
- a finished run (its latest checkpoint, or its summary when `train.checkpoint=false`, reached
  `train.steps`): `RunFinished`, and the launcher says so and exits 0 without touching a file;
  the same config with a larger `train.steps` continues it from its final checkpoint;
- a checkpoint and `train.resume` on: the same run continues (only RESUMABLE_CHANGES may differ
  from its saved config); a damaged latest checkpoint is moved aside and `latest` points at the
  newest intact one (learner/checkpoint.py `repair_latest`), none intact is refused naming each;
- metrics but no checkpoint: refused (`RunDirTaken`);
- `run.overwrite=true`: every artifact of the previous run is deleted first (RUN_FILES,
  RUN_DIRS, logs/), so metrics, ledger, logs and samples describe exactly one run. Kept: the run
  secret `transport.key` and what `megatron-opd submit` wrote for Slurm (`job.sbatch`,
  `slurm_jobs.txt`, `logs/slurm-<job>.out`, which the running job may be writing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_opd.config import Config, ConfigError, dump_config
from megatron_opd.errors import RunDirTaken

# Keys that may change when a run is resumed (everything else must match the saved config).
RESUMABLE_CHANGES = ("train.steps", "run.overwrite", "logging.progress", "logging.tensorboard",
                     "server.start_timeout_s", "server.request_timeout_s")

# What a run writes in its directory (deleted by run.overwrite=true; logs/ is emptied but for
# Slurm's job logs). The temporary files are those of an interrupted rewrite.
RUN_FILES = ("config.yaml", "wiring.json", "wiring.json.tmp", "metrics.jsonl", "metrics.tmp",
             "ledger.jsonl", "ledger.tmp", "summary.json", "curves.png", "server_restarts.json",
             "server_restarts.tmp", "preempt.request", "preempted.json", "preempted.tmp",
             "fleet_stats.json", "fleet_stats.json.tmp")
RUN_DIRS = ("checkpoints", "spool", "samples", "tensorboard", "weights", "endpoints")
SLURM_LOG_PREFIX = "slurm-"  # logs/slurm-<job id>.out: the Slurm job's own output


class RunFinished(RunDirTaken):
    """`run.dir` holds a run that already reached `train.steps`: nothing to do. The launcher
    (runner.run) reports it and exits 0; anything else refuses it as a taken run dir."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary  # the finished run's summary.json (or its step count)


def prepare_run_dir(cfg: Config) -> Path:
    """A fresh run directory; or, when it holds a checkpoint and `train.resume` is on, the same
    directory to continue (the learner resumes from `checkpoints/latest`, drops metrics logged
    after it, and replays the accepted samples of its spool). `run.overwrite=true` wipes it.
    Raises RunFinished (having written nothing) when it holds a run that reached train.steps."""
    run_dir = Path(cfg.run.dir).resolve()
    latest = run_dir / "checkpoints" / "latest"
    if cfg.run.overwrite:
        _wipe(run_dir)
    else:
        done = completed_steps(run_dir)
        resumable = latest.is_file() and cfg.train.resume
        if resumable or done is not None and (run_dir / "config.yaml").is_file():
            _check_resumable(cfg, run_dir)  # another config is named, finished or not
        if done is not None and done >= cfg.train.steps:
            raise RunFinished(
                f"run.dir: {run_dir} holds a finished run ({done} steps, train.steps="
                f"{cfg.train.steps}): nothing to do; raise train.steps to continue it, or set "
                "run.overwrite=true to start over", _summary(run_dir, done))
        if resumable:
            from megatron_opd.learner.checkpoint import repair_latest

            repair_latest(run_dir / "checkpoints")  # a damaged latest: named, moved aside
        elif (run_dir / "metrics.jsonl").exists():
            raise RunDirTaken(f"run.dir: {run_dir} already holds a run without a checkpoint to "
                              "resume from (set run.overwrite=true to replace it)")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def completed_steps(run_dir: Path) -> int | None:
    """Steps the run in `run_dir` completed for good: the step of its latest checkpoint, or of
    its summary (written when a run finishes; the only record with train.checkpoint=false),
    whichever is larger; None when it has neither."""
    found = []
    latest = run_dir / "checkpoints" / "latest"
    try:
        meta = run_dir / "checkpoints" / latest.read_text().strip() / "meta.json"
        found.append(int(json.loads(meta.read_text())["step"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no checkpoint, or a damaged one: resuming finds out (repair_latest)
    try:
        found.append(int(json.loads((run_dir / "summary.json").read_text())["steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return max(found) if found else None


def _summary(run_dir: Path, done: int) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {"steps": done}


def _wipe(run_dir: Path) -> None:
    """Delete every artifact of the run in `run_dir` (RUN_FILES, RUN_DIRS, logs/ but Slurm's)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    logs = run_dir / "logs"
    for path in logs.iterdir() if logs.is_dir() else ():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif not path.name.startswith(SLURM_LOG_PREFIX):
            path.unlink()


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
