"""What a run starts, computed once from the config for every site: the SGLang fleets
(`fleet_specs`: one `ServerSpec` per server) and the learner's torchrun command line
(`torchrun_command`). A site only turns them into processes where it puts them (sites.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_opd.config import Config, ConfigError, validate_teacher_slots

FLEETS = ("teacher", "rollout")  # started in this order
LEARNER_MODULE = "megatron_opd.learner.main"


@dataclass(frozen=True)
class ServerSpec:
    """One SGLang server of a run, wherever it runs."""

    role: str  # "teacher" (scores) | "rollout" (student weights, updated every step)
    name: str  # its log (`logs/<name>.log`), endpoint file and restart count are named so
    model_dir: str
    node: int  # index into the role's nodes (0 on one machine)
    gpu_ids: tuple[int, ...]  # its GPUs on that node; () where the site does not place GPUs
    extra_args: tuple[str, ...]  # further `sglang.launch_server` arguments
    routed_experts: bool  # return the routed experts of every token (routing replay R3)
    teacher: str = ""  # the teacher it serves when teacher.teachers lists several ("" else)

    @property
    def world_size(self) -> int:
        """GPUs (ranks) of this server: what the learner's weight broadcast group counts."""
        return max(1, len(self.gpu_ids))


def fleet_specs(cfg: Config, models, nodes: dict[str, int] | None = None,
                gpus_per_node: int = 0) -> dict[str, list[ServerSpec]]:
    """The teacher and rollout fleets (`models`: envs.RunModels). `nodes` (nodes per role) is
    None on one machine: `<role>.num_servers` servers per role, named by the role when there is
    one (the quickstart) and `<role>-<i>` otherwise. On a cluster each node of a role runs
    `gpus_per_node / <role>.gpus_per_server` servers (one per node without GPUs) on disjoint
    GPUs, named `<role>-<i>`: the job's nodes are filled, and `<role>.num_servers` must be 1
    (the default: fill them) or that count (docs/slurm.md). The rollout servers start at weight
    version 0."""
    fleets: dict[str, list[ServerSpec]] = {}
    # teacher.source=self: the teacher is the student, from its init (serving/self_teacher.py)
    teacher_dir = models.student_dir if cfg.teacher.source == "self" else models.teacher_dir
    for role, model_dir in zip(FLEETS, (teacher_dir, models.student_dir)):
        per_server = getattr(cfg.cluster, role).gpus_per_server
        per_node = gpus_per_node // per_server if gpus_per_node else 1
        wanted = getattr(cfg, role).num_servers
        if nodes is None:
            layout = [(0, i) for i in range(wanted)]
        else:
            filled = nodes[role] * per_node
            if wanted not in (1, filled):
                raise ConfigError(
                    f"{role}.num_servers: the Slurm job runs {filled} {role} server(s) "
                    f"({nodes[role]} node(s) x {per_node} per node: cluster.{role}.nodes, "
                    f"cluster.gpus_per_node / cluster.{role}.gpus_per_server); set it to "
                    f"{filled} or 1 (fill the nodes)")
            layout = [(node, i) for node in range(nodes[role]) for i in range(per_node)]
        fleets[role] = []
        if role == "teacher" and cfg.teacher.teachers:
            fleets[role] = _named_teachers(cfg, models, None if nodes is None else layout,
                                           per_server if gpus_per_node else 0)
            continue
        for node, i in layout:
            gpu_ids, extra = _gpu_placement(i, per_server if gpus_per_node else 0)
            if role == "teacher" and cfg.teacher.signal == "hidden":
                # the final hidden states of scored positions (docs/teachers.md); a chunked
                # prefill returns only its last chunk's rows, so a chunk holds a whole sequence
                extra += ("--enable-return-hidden-states",
                          "--chunked-prefill-size", str(hidden_prefill_chunk(cfg)))
            if role == "rollout" or cfg.teacher.source == "self":  # self: refreshed versions
                extra += ("--weight-version", "0")
                # in_place updates cannot flush the cache: no prefix may outlive them
                if cfg.weight_sync.pause_mode == "in_place":
                    extra += ("--disable-radix-cache",)
            one = nodes is None and wanted == 1
            fleets[role].append(ServerSpec(
                role=role, name=role if one else f"{role}-{node * per_node + i}",
                model_dir=str(model_dir), node=node, gpu_ids=gpu_ids, extra_args=extra,
                routed_experts=role == "rollout" and cfg.train.routing_replay == "r3"))
    return fleets


def _gpu_placement(i: int, per_server: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The GPUs of a node's `i`-th server of `per_server` GPUs (0: no GPUs) and the SGLang
    arguments that put it there."""
    if not per_server:
        return (), ()
    gpu_ids = tuple(range(i * per_server, (i + 1) * per_server))
    return gpu_ids, ("--tp-size", str(per_server), "--base-gpu-id", str(gpu_ids[0]))


def _named_teachers(cfg: Config, models, slots: list[tuple[int, int]] | None,
                    per_server: int) -> list[ServerSpec]:
    """Several teachers (teacher.teachers): each one's `num_servers` servers of its checkpoint
    ("" = the run's teacher), named `teacher-<name>` (`teacher-<name>-<i>` with several). On one
    machine (`slots` None) they all run here; in a Slurm job they take the teacher nodes' server
    slots ((node, index on the node), in order) in config order, which they must fill exactly
    (a slot left over would hold GPUs no teacher uses)."""
    from megatron_opd.serving.teachers import teacher_specs

    if slots is not None:
        validate_teacher_slots(cfg, len(slots))
    out, k = [], 0
    for t in teacher_specs(cfg):
        for i in range(t.num_servers):
            node, index = slots[k] if slots is not None else (0, 0)
            gpu_ids, extra = _gpu_placement(index, per_server)
            k += 1
            out.append(ServerSpec(
                role="teacher", name=f"teacher-{t.name}" + (f"-{i}" if t.num_servers > 1 else ""),
                model_dir=t.init or str(models.teacher_dir), node=node, gpu_ids=gpu_ids,
                extra_args=extra, routed_experts=False, teacher=t.name))
    return out


def hidden_prefill_chunk(cfg: Config) -> int:
    """A hidden-state teacher's prefill chunk: twice the longest sequence it scores (a
    privileged prompt adds its hint), at least SGLang's default of 4096. (Unchunked, -1, leaves
    a CPU server no KV cache: SGLang sizes its memory by the chunk.)"""
    longest = cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens,
                                               cfg.env.max_response_tokens)
    return max(4096, 2 * longest)


def server_options(cfg: Config) -> dict:
    """SGLangServer keyword arguments every server of a run shares (`server.*`; Prometheus
    metrics on, for the supervisor's per-server tokens/s; the frames a server started with
    --enable-return-hidden-states sends them in: teacher.hidden_dtype)."""
    sv = cfg.server
    return dict(dtype=sv.dtype, max_total_tokens=sv.max_total_tokens, threads=sv.threads or None,
                enable_metrics=True, hidden_states_dtype=cfg.teacher.hidden_dtype)


def learner_ranks_per_node(cfg: Config, nnodes: int) -> int:
    """Learner ranks on each of its `nnodes` nodes (all of `parallel.world_size` on one machine;
    a Slurm job's layout fills its nodes exactly: config.validate_cluster_fit)."""
    return cfg.parallel.world_size // nnodes


def torchrun_command(nnodes: int, nproc: int, node_rank: int, master_addr: str,
                     master_port: int, run_dir: str | Path) -> list[str]:
    """The learner's torchrun on one node: a static rendezvous on `master_addr` (global rank 0
    runs on node rank 0, where the run's sockets were announced; c10d's rendezvous would hand out
    node ranks by arrival). torchrun forwards SIGTERM to its ranks. Its entry point is
    compat/torchrun.py: the rendezvous store listens on `master_addr`, not on every interface."""
    return [sys.executable, "-m", "megatron_opd.compat.torchrun", f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}", f"--node-rank={node_rank}",
            f"--master-addr={master_addr}", f"--master-port={master_port}",
            "-m", LEARNER_MODULE, "--run-dir", str(run_dir)]


def single_process_learner(run_dir: str | Path) -> list[str]:
    """A one-rank learner without torchrun."""
    return [sys.executable, "-m", LEARNER_MODULE, "--run-dir", str(run_dir)]
