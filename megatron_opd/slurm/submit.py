"""Submit a run to Slurm: validate, prepare the run directory, render the script, `sbatch`.

    python -m megatron_opd.slurm.submit --config FILE [key=value ...] [--dry-run]

(`launchers/slurm/submit.sh` and `megatron-opd submit` call this.) Everything the job needs is
in the run directory on the shared filesystem: `config.yaml` (resolved, read by every process),
`job.sbatch` (the script, rendered from that config), `transport.key` (the run secret), later
`wiring.json`, `endpoints/`, logs and checkpoints. Submitting again with the same config and run
directory resumes the run. `--dry-run` touches nothing of the run directory (and makes no
secret): it prints the script and writes `config.yaml` and `job.sbatch` as they would be into a
new temporary directory, which it names.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_opd.config import Config, dump_config, load_config, validate_cluster_fit
from megatron_opd.errors import BadInput, Parser, RunFailed, guarded

DRY_RUN_PREFIX = "megatron-opd-dry-run-"


def submit(cfg: Config, *, dry_run: bool = False, workdir: Path | None = None) -> tuple[Path, str]:
    """Prepare the run dir and submit; returns (script path, job id). A dry run writes nothing
    in the run directory: it returns the script rendered for it, written with the resolved
    config into a new temporary directory, and ""."""
    from megatron_opd.launch import prepare_run_dir, preflight, run_secret
    from megatron_opd.slurm.script import render

    validate_cluster_fit(cfg)
    python = cfg.slurm.python or sys.executable
    workdir = workdir or Path.cwd()
    if dry_run:
        # The files may live where only the cluster sees them: the dry run checks the config
        # alone, renders for the run directory as it is named, and writes only its own copy.
        run_dir = Path(cfg.run.dir).resolve()
        cfg.run.overwrite = False  # what the job would load (see below)
        out = Path(tempfile.mkdtemp(prefix=DRY_RUN_PREFIX))
        (out / "config.yaml").write_text(dump_config(cfg))
        script = out / "job.sbatch"
        script.write_text(render(cfg, run_dir, workdir, python))
        return script, ""
    # The files where the cluster sees them; the learner's precision is checked by the job on
    # its first learner node (slurm/job.py); the nodes' Python here (the shared filesystem).
    preflight(cfg, files=True, learner=False, node_paths=True)
    run_dir = prepare_run_dir(cfg)  # refuses a finished run / another config, wipes on overwrite
    # The job must never wipe what it resumes from: `run.overwrite` was honoured just now.
    cfg.run.overwrite = False
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    run_secret(cfg, run_dir)  # made once, here (mode 0600), so every start of the job shares it
    script = run_dir / "job.sbatch"
    script.write_text(render(cfg, run_dir, workdir, python))
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
    p = Parser(prog="megatron-opd submit", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (required)")
    p.add_argument("--dry-run", action="store_true", help="render the script, do not submit; "
                   "writes nothing in run.dir (its files go to a temporary directory it names)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    return guarded(lambda: _submit(args))


def _submit(args) -> int:
    if args.config is None:
        raise BadInput("submit: no --config given, pass --config FILE (e.g. `megatron-opd "
                       "submit --config configs/my-run.yaml --dry-run`)")
    cfg = load_config(args.config, args.overrides)
    script, job_id = submit(cfg, dry_run=args.dry_run)
    if job_id:
        print(f"megatron-opd: submitted job {job_id} ({script}); logs in "
              f"{script.parent / 'logs'}; follow with: squeue -j {job_id}")
        print(job_id)
    else:
        print(script.read_text())
        print(f"megatron-opd: dry run: nothing written in {Path(cfg.run.dir).resolve()} and "
              f"nothing submitted; the job's config.yaml and job.sbatch are in {script.parent}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
