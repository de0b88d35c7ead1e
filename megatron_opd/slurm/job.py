"""The driver inside a run's Slurm job (the batch script execs it on the first learner node).

    python -m megatron_opd.slurm.job --run-dir DIR

It is `megatron_opd.launch.run` with a Slurm site: SGLang servers start with `srun` on the
rollout and teacher nodes (`megatron_opd.serving.serve` picks each one's port there and writes
`DIR/endpoints/<name>.json`), the learner starts with `srun` + torchrun on the learner nodes, the
orchestrator beside this driver. Logs: `DIR/logs/<server>.log`, `learner.log` (every rank),
`orchestrator.log`, and the job's own `slurm-<jobid>.out`.

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

from megatron_opd.config import Config, ConfigError, load_config
from megatron_opd.procs import free_port
from megatron_opd.slurm.script import ROLES


def hostnames(nodelist: str) -> list[str]:
    """Slurm's compressed node list (e.g. `gpu[01-03,07],big01`, `r[1-2]n[1-2]`) as host names,
    in order; zero padding is kept (what `scontrol show hostnames` prints)."""
    out: list[str] = []
    for item in _split_top_level(nodelist):
        out += _expand(item)
    return out


def _split_top_level(nodelist: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    return [x for x in (i.strip() for i in items) if x]


def _expand(item: str) -> list[str]:
    if "[" not in item:
        return [item]
    head, rest = item.split("[", 1)
    ranges, tail = rest.split("]", 1)
    names = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        width = len(lo)
        names += [f"{head}{n:0{width}d}" for n in range(int(lo), int(hi or lo) + 1)]
    return [n + t for n in names for t in _expand(tail)] if tail else names


def role_hosts(cfg: Config, env: dict) -> dict[str, list[str]]:
    """The nodes of each role: one het component each, or consecutive slices of one allocation."""
    c = cfg.cluster
    counts = {"learner": c.learner_nodes, "rollout": c.rollout.nodes, "teacher": c.teacher.nodes}
    if cfg.slurm.heterogeneous:
        hosts = {}
        for i, role in enumerate(ROLES):
            key = f"SLURM_JOB_NODELIST_HET_GROUP_{i}"
            if key not in env:
                raise RuntimeError(f"{key} is not set: slurm.heterogeneous=true needs the "
                                   "heterogeneous job that launchers/slurm/submit.sh makes")
            hosts[role] = hostnames(env[key])
    else:
        nodes, hosts = hostnames(env["SLURM_JOB_NODELIST"]), {}
        for role in ROLES:
            hosts[role], nodes = nodes[:counts[role]], nodes[counts[role]:]
    for role in ROLES:
        if len(hosts[role]) != counts[role]:
            raise RuntimeError(f"the job gave the {role} {len(hosts[role])} node(s), the config "
                               f"asks for {counts[role]}")
    return hosts


class SlurmSite:
    """Where a Slurm job puts a run's processes (see megatron_opd.launch.LocalSite)."""

    def __init__(self, cfg: Config, run_dir: Path, env: dict):
        from megatron_opd.serving.serve import advertised_address

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.hosts = role_hosts(cfg, env)
        self.address = advertised_address()  # this node: the learner's global rank 0 runs here
        gpus = cfg.cluster.gpus_per_node
        self.rollout_server_world_size = cfg.cluster.rollout.gpus_per_server if gpus else 1

    def srun(self, role: str, hosts: list[str]) -> list[str]:
        args = ["srun", f"--nodes={len(hosts)}", "--ntasks-per-node=1",
                f"--nodelist={','.join(hosts)}", "--overlap", "--kill-on-bad-exit=1",
                f"--job-name={role}"]
        if self.cfg.slurm.heterogeneous:
            args.insert(1, f"--het-group={ROLES.index(role)}")
        return args

    def servers(self, cfg: Config, models, logs: Path) -> dict:
        from megatron_opd.serving.sglang_server import RemoteSGLangServer

        from megatron_opd.launch import server_options

        gpus, common = cfg.cluster.gpus_per_node, server_options(cfg)
        endpoints = self.run_dir / "endpoints"
        endpoints.mkdir(exist_ok=True)
        fleets: dict[str, list] = {}
        for role, model_dir in (("teacher", models.teacher_dir),
                                ("rollout", models.student_dir)):
            per_server = getattr(cfg.cluster, role).gpus_per_server
            per_node = gpus // per_server if gpus else 1
            fleets[role] = []
            for n, host in enumerate(self.hosts[role]):
                for i in range(per_node):
                    name = f"{role}-{n * per_node + i}"
                    extra = ["--tp-size", str(per_server), "--base-gpu-id",
                             str(i * per_server)] if gpus else []
                    if role == "rollout":
                        extra += ["--weight-version", "0"]
                    fleets[role].append(RemoteSGLangServer(
                        name, str(model_dir), endpoints / f"{name}.json", str(logs / f"{name}.log"),
                        self.srun(role, [host]), extra_args=tuple(extra),
                        enable_return_routed_experts=(role == "rollout"
                                                      and cfg.train.routing_replay == "r3"),
                        **common))
        return fleets

    def learner_command(self, cfg: Config, run_dir: Path) -> list[str]:
        hosts = self.hosts["learner"]
        per_node = cfg.cluster.gpus_per_node or cfg.parallel.world_size // len(hosts)
        return self.srun("learner", hosts) + [
            sys.executable, "-m", "megatron_opd.slurm.node_launch", f"--nnodes={len(hosts)}",
            f"--nproc-per-node={per_node}", f"--master-addr={self.address}",
            f"--master-port={free_port(self.address)}", "--run-dir", str(run_dir)]


def main(argv: list[str] | None = None) -> int:
    from megatron_opd.config import validate_cluster_fit
    from megatron_opd.launch import ProcessDied, Terminated, run

    p = argparse.ArgumentParser(prog="megatron_opd.slurm.job")
    p.add_argument("--run-dir", required=True, type=Path)
    args = p.parse_args(argv)
    env = dict(os.environ)
    job_id, restarts = env.get("SLURM_JOB_ID", "?"), int(env.get("SLURM_RESTART_COUNT", "0"))
    try:
        cfg = load_config(args.run_dir / "config.yaml")
        validate_cluster_fit(cfg)
    except ConfigError as e:
        print(f"megatron-opd: config error: {e}", file=sys.stderr)
        return 2
    site = SlurmSite(cfg, args.run_dir, env)
    print(f"[megatron-opd] Slurm job {job_id} (start {restarts + 1}) on "
          + ", ".join(f"{r}: {','.join(h)}" for r, h in site.hosts.items()), flush=True)
    if restarts and not (args.run_dir / "checkpoints" / "latest").is_file():
        cfg.run.overwrite = True  # restarted before any checkpoint: start the run over
    try:
        summary = run(cfg, site, preempt_signal=signal.SIGUSR1)
    except ProcessDied as e:
        print(f"megatron-opd: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated):
        print("megatron-opd: terminated; all processes stopped (a requeued job resumes from the "
              "latest checkpoint)", file=sys.stderr, flush=True)
        return 143
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
