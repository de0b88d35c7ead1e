#!/usr/bin/env bash
# Submit a megatron-opd run to Slurm as one heterogeneous job (learner | rollout | teacher nodes),
# rendered from the run's YAML config:
#
#   launchers/slurm/submit.sh --config configs/my-run.yaml [key=value ...] [--dry-run]
#
# The node counts come from `cluster.*`, sbatch options from `slurm.*`; the script lands in
# <run.dir>/job.sbatch. Submitting the same config and run.dir again resumes the run.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON=${PYTHON:-$here/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
exec "$PYTHON" -m megatron_opd.slurm.submit "$@"
