"""The sbatch script of a run, rendered from its config (the one source of truth).

Components of the heterogeneous job, in this order (`--het-group` of every srun):
0 learner (`cluster.learner_nodes`; the batch script and the orchestrator run on its first
node), 1 rollout fleet, 2 teacher fleet. With `slurm.heterogeneous=false` it is one allocation
of the summed nodes, the roles taking them in the same order.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from megatron_opd.config import Config

ROLES = ("learner", "rollout", "teacher")


@dataclass(frozen=True)
class Component:
    role: str
    nodes: int


def components(cfg: Config) -> list[Component]:
    c = cfg.cluster
    return [Component("learner", c.learner_nodes), Component("rollout", c.rollout.nodes),
            Component("teacher", c.teacher.nodes)]


def _component_options(cfg: Config, nodes: int) -> list[str]:
    s, c = cfg.slurm, cfg.cluster
    opts = [f"--nodes={nodes}", "--ntasks-per-node=1"]
    if c.gpus_per_node:
        opts += [f"--gpus-per-node={c.gpus_per_node}", "--exclusive"]
    if s.cpus_per_node:
        opts.append(f"--cpus-per-task={s.cpus_per_node}")
    if s.mem:
        opts.append(f"--mem={s.mem}")
    if s.partition:
        opts.append(f"--partition={s.partition}")
    return opts


def render(cfg: Config, run_dir: Path, workdir: Path, python: str) -> str:
    """The batch script: #SBATCH lines per component, then the driver (exec'd, so the
    preemption warning signal reaches it directly)."""
    s = cfg.slurm
    run_dir, workdir = Path(run_dir).resolve(), Path(workdir).resolve()
    logs = run_dir / "logs"
    common = [f"--job-name={s.job_name or cfg.run.name}", f"--time={s.time_limit}",
              f"--output={logs}/slurm-%j.out", "--open-mode=append", f"--chdir={workdir}"]
    if s.account:
        common.append(f"--account={s.account}")
    if s.qos:
        common.append(f"--qos={s.qos}")
    common.append("--requeue" if s.requeue else "--no-requeue")
    if s.preempt_signal_s:
        common.append(f"--signal=B:USR1@{s.preempt_signal_s}")
    common += s.extra_sbatch
    parts = components(cfg)
    lines = ["#!/bin/bash",
             f"# Rendered by megatron-opd from {run_dir}/config.yaml: edit the config, not this.",
             "# Components: " + ", ".join(f"{p.role} ({p.nodes} node(s))" for p in parts)]
    if s.heterogeneous:
        for i, part in enumerate(parts):
            if i:
                lines.append("#SBATCH hetjob")
            lines.append(f"# component {i}: {part.role}")
            lines += [f"#SBATCH {o}" for o in (common if i == 0 else []) +
                      _component_options(cfg, part.nodes)]
    else:
        lines += [f"#SBATCH {o}" for o in common +
                  _component_options(cfg, sum(p.nodes for p in parts))]
    lines += ["", "set -euo pipefail"]
    lines += s.setup
    for kv in s.env:
        name, value = kv.split("=", 1)
        lines.append(f"export {name}={shlex.quote(value)}")
    lines += [f"exec {shlex.quote(python)} -m megatron_opd.slurm.job --run-dir "
              f"{shlex.quote(str(run_dir))}", ""]
    return "\n".join(lines)
