"""Sites: where a run's processes start. `run(cfg, site)` (runner.py) is the one launch path;
a site only says where. What starts is computed once for every site (fleet.py: the fleets'
`ServerSpec`s, the learner's torchrun line); a site turns it into processes:

- `LocalSite` (`megatron-opd train`): every process on this machine, on loopback;
- `SlurmSite` (the driver inside a Slurm job, megatron_opd/slurm/job.py): servers with `srun` on
  their nodes of the job, the learner with `srun` + torchrun on the learner nodes.

A new launcher is a new site.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Protocol

from megatron_opd.config import Config
from megatron_opd.launch.fleet import (FLEETS, ServerSpec, fleet_specs, learner_ranks_per_node,
                                       server_options, single_process_learner, torchrun_command)
from megatron_opd.listeners import port_for_later


class Site(Protocol):
    address: str  # where the learner's global rank 0 runs: its sockets and weight sync bind here
    nodes: dict[str, int] | None  # nodes per server role; None: everything on this machine
    gpus_per_node: int  # GPUs a site places servers on per node (0: no GPU placement)

    def server(self, spec: ServerSpec, logs: Path, options: dict):
        """The SGLangServer (not started) of `spec`; `options`: `server_options(cfg)`."""

    def learner_command(self, cfg: Config, run_dir: Path) -> list[str]:
        """The command that starts every learner rank."""

    def rerun_command(self, run_dir: Path) -> str:
        """The shell command that runs this run again (with the config it was saved with)."""


def _rerun(verb: str, run_dir: Path) -> str:
    """`cd <here> && megatron-opd <verb> --config <run>/config.yaml`: the saved config, from
    the directory the run was started in (its relative paths, run.dir too, are relative to it;
    an override of run.dir would be a config change, refused on resume)."""
    return (f"cd {shlex.quote(os.getcwd())} && "
            + shlex.join(["megatron-opd", verb, "--config", str(run_dir / "config.yaml")]))


def place_fleets(cfg: Config, models, logs: Path, site: Site
                 ) -> tuple[dict[str, list[ServerSpec]], dict[str, list]]:
    """The fleets' specs (`fleet_specs`, `models`: envs.RunModels) and their SGLang servers as
    `site` places them (not started), both {role: [...]} in the same order."""
    specs, options = fleet_specs(cfg, models, site.nodes, site.gpus_per_node), server_options(cfg)
    return specs, {role: [site.server(s, logs, options) for s in specs[role]] for role in FLEETS}


def make_servers(cfg: Config, models, logs: Path, site: Site | None = None) -> dict:
    """The run's SGLang servers (not started), {role: [server]}, placed by `site` (default:
    this machine)."""
    return place_fleets(cfg, models, logs, LocalSite() if site is None else site)[1]


class LocalSite:
    """Every process on this machine, on loopback: a fleet of one server per role, `world_size`
    learner ranks (one process without torchrun for one rank)."""

    address = "127.0.0.1"
    nodes = None
    gpus_per_node = 0  # SGLang picks its device; one server per role

    def server(self, spec: ServerSpec, logs: Path, options: dict):
        from megatron_opd.serving.sglang_server import SGLangServer

        return SGLangServer(spec.name, spec.model_dir, port_for_later(),
                            str(logs / f"{spec.name}.log"),
                            extra_args=spec.extra_args,
                            enable_return_routed_experts=spec.routed_experts, **options)

    def rerun_command(self, run_dir: Path) -> str:
        return _rerun("train", run_dir)

    def learner_command(self, cfg: Config, run_dir: Path) -> list[str]:
        if cfg.parallel.world_size == 1:
            return single_process_learner(run_dir)
        return torchrun_command(1, learner_ranks_per_node(cfg, 1), 0, self.address,
                                port_for_later(), run_dir)


class SlurmSite:
    """The nodes of a run's Slurm job (roles from `SLURM_JOB_NODELIST*`); the driver (this
    process) runs on the first learner node, so the learner's global rank 0 runs here too."""

    def __init__(self, cfg: Config, run_dir: Path, env: dict):
        from megatron_opd.serving.serve import advertised_address
        from megatron_opd.slurm.nodes import role_hosts

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.hosts = role_hosts(cfg, env)
        self.address = advertised_address()  # this node: the learner's global rank 0 runs here
        self.nodes = {role: len(hosts) for role, hosts in self.hosts.items()}
        self.gpus_per_node = cfg.cluster.gpus_per_node

    def rerun_command(self, run_dir: Path) -> str:
        return _rerun("submit", run_dir)

    def srun(self, role: str, hosts: list[str]) -> list[str]:
        from megatron_opd.slurm.script import ROLES

        args = ["srun", f"--nodes={len(hosts)}", "--ntasks-per-node=1",
                f"--nodelist={','.join(hosts)}", "--overlap", "--kill-on-bad-exit=1",
                f"--job-name={role}"]
        if self.cfg.slurm.heterogeneous:
            args.insert(1, f"--het-group={ROLES.index(role)}")
        return args

    def server(self, spec: ServerSpec, logs: Path, options: dict):
        """`megatron_opd.serving.serve` through srun on the spec's node: it picks the port there
        and writes `<run>/endpoints/<name>.json`."""
        from megatron_opd.serving.sglang_server import RemoteSGLangServer

        endpoints = self.run_dir / "endpoints"
        endpoints.mkdir(exist_ok=True)
        host = self.hosts[spec.role][spec.node]
        return RemoteSGLangServer(
            spec.name, spec.model_dir, endpoints / f"{spec.name}.json",
            str(logs / f"{spec.name}.log"), self.srun(spec.role, [host]),
            extra_args=spec.extra_args, enable_return_routed_experts=spec.routed_experts,
            **options)

    def learner_command(self, cfg: Config, run_dir: Path) -> list[str]:
        """`srun` one task per learner node, each running `megatron_opd.slurm.node_launch`: the
        torchrun line of `torchrun_command` with its node rank from SLURM_PROCID."""
        hosts = self.hosts["learner"]
        return self.srun("learner", hosts) + [
            sys.executable, "-m", "megatron_opd.slurm.node_launch", f"--nnodes={len(hosts)}",
            f"--nproc-per-node={learner_ranks_per_node(cfg, len(hosts))}",
            f"--master-addr={self.address}", f"--master-port={port_for_later(self.address)}",
            "--run-dir", str(run_dir)]
