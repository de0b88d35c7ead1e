"""Slurm: one heterogeneous job per run, made from the run's config (launchers/slurm/).

- `script.py`: the sbatch script (components, options, preemption signal) rendered from config;
- `submit.py`: validate the config, prepare the run directory, render, `sbatch`;
- `job.py`: the driver that runs inside the job on the first learner node and starts the
  SGLang fleets and the learner with `srun`, the orchestrator beside itself;
- `node_launch.py`: torchrun on each learner node with its node rank from Slurm.
"""
