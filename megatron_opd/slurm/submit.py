"""Submit a run to Slurm: validate, prepare the run directory, render the script, `sbatch`.

    python -m megatron_opd.slurm.submit --config FILE [key=value ...] [--dry-run]

(`launchers/slurm/submit.sh` and `megatron-opd submit` call this.) Everything the job needs is
in the run directory on the shared filesystem: `config.yaml` (resolved, read by every process),
`job.sbatch` (the script, rendered from that config), later `wiring.json`, `endpoints/`, logs and
checkpoints. Submitting again with the same config and run directory resumes the run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from megatron_opd.config import Config, dump_config, load_config, validate_cluster_fit
from megatron_opd.errors import RunFailed, guarded


def submit(cfg: Config, *, dry_run: bool = False, workdir: Path | None = None) -> tuple[Path, str]:
    """Prepare the run dir and submit; returns (script path, job id or "" on a dry run)."""
    from megatron_opd.launch import prepare_run_dir, preflight, run_secret
    from megatron_opd.slurm.script import render

    validate_cluster_fit(cfg)
    # The files where the cluster sees them (a dry run may render away from the cluster); the
    # learner's precision is checked by the job on its first learner node (slurm/job.py).
    preflight(cfg, files=not dry_run, learner=False)
    run_dir = prepare_run_dir(cfg)  # refuses a finished run / another config, wipes on overwrite
    # The job must never wipe what it resumes from: `run.overwrite` was honoured just now.
    cfg.run.overwrite = False
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    run_secret(cfg, run_dir)  # made once, here (mode 0600), so every start of the job shares it
    python = cfg.slurm.python or sys.executable
    script = run_dir / "job.sbatch"
    script.write_text(render(cfg, run_dir, workdir or Path.cwd(), python))
    if dry_run:
        return script, ""
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise RunFailed(f"sbatch not found: submit from a Slurm login node ({script} is "
                        "rendered; --dry-run only renders)") from None
    if out.returncode != 0:
        raise RunFailed(f"sbatch refused {script}: {out.stderr.strip() or out.stdout.strip()}")
    job_id = re.split(r"[;+]", out.stdout.strip())[0]
    (run_dir / "slurm_jobs.txt").open("a").write(f"{job_id}\n")
    return script, job_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-opd submit", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config")
    p.add_argument("--dry-run", action="store_true", help="render the script, do not submit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    return guarded(lambda: _submit(args))


def _submit(args) -> int:
    cfg = load_config(args.config, args.overrides)
    script, job_id = submit(cfg, dry_run=args.dry_run)
    if job_id:
        print(f"megatron-opd: submitted job {job_id} ({script}); logs in "
              f"{script.parent / 'logs'}; follow with: squeue -j {job_id}")
        print(job_id)
    else:
        print(script.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
