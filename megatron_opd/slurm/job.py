"""The driver inside a run's Slurm job (the batch script execs it on the first learner node).

    python -m megatron_opd.slurm.job --run-dir DIR

It is `megatron_opd.launch.run` with `megatron_opd.launch.SlurmSite`: SGLang servers start with
`srun` on the rollout and teacher nodes (`megatron_opd.serving.serve` picks each one's port there
and writes `DIR/endpoints/<name>.json`), the learner starts with `srun` + torchrun on the learner
nodes, the orchestrator beside this driver. Before anything starts it refuses what `train`
refuses (launch.preflight: files, and the learner's precision on this, the first learner, node);
errors and exit statuses as every entry point (megatron_opd/errors.py). Logs:
`DIR/logs/<server>.log`, `learner.log` (every rank), `orchestrator.log`, and the job's own
`slurm-<jobid>.out`.

Preemption: sbatch's `--signal=B:USR1@N` warns this process; the learner checkpoints at its next
step and exits, the driver stops the rest and runs `scontrol requeue` on its own job (at most
`slurm.max_requeues` times). A requeued job runs this again and resumes from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from megatron_opd.config import load_config
from megatron_opd.errors import guarded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron_opd.slurm.job")
    p.add_argument("--run-dir", required=True, type=Path)
    args = p.parse_args(argv)
    return guarded(lambda: _drive(args.run_dir, dict(os.environ)),
                   interrupted_note="(a requeued job resumes from the latest checkpoint)")


def _drive(run_dir: Path, env: dict) -> int:
    from megatron_opd.config import validate_cluster_fit
    from megatron_opd.launch import SlurmSite, preflight, run

    job_id, restarts = env.get("SLURM_JOB_ID", "?"), int(env.get("SLURM_RESTART_COUNT", "0"))
    cfg = load_config(run_dir / "config.yaml")
    validate_cluster_fit(cfg)
    site = SlurmSite(cfg, run_dir, env)
    print(f"[megatron-opd] Slurm job {job_id} (start {restarts + 1}) on "
          + ", ".join(f"{r}: {','.join(h)}" for r, h in site.hosts.items()), flush=True)
    # This node is the first learner node: the learner's precision is checked here, and the
    # files on the cluster's filesystem, as `train` does, before any server starts.
    preflight(cfg, files=True, learner=True)
    if restarts and not (run_dir / "checkpoints" / "latest").is_file():
        cfg.run.overwrite = True  # restarted before any checkpoint: start the run over
    summary = run(cfg, site, preempt_signal=signal.SIGUSR1)
    if "preempted" in summary:
        step = summary["preempted"]["step"]
        if cfg.slurm.requeue and restarts < cfg.slurm.max_requeues:
            print(f"[megatron-opd] checkpoint at step {step}; requeuing job {job_id} "
                  f"(restart {restarts + 1}/{cfg.slurm.max_requeues})", flush=True)
            subprocess.run(["scontrol", "requeue", job_id], check=True)
        else:
            print(f"[megatron-opd] checkpoint at step {step}; not requeued (slurm.requeue="
                  f"{cfg.slurm.requeue}, restarts {restarts}/{cfg.slurm.max_requeues}); submit "
                  "the same config again to resume", flush=True)
        return 0
    print(json.dumps(summary, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
