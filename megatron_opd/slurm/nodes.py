"""The nodes of each role of a run's Slurm job, read from Slurm's environment."""

from __future__ import annotations

from megatron_opd.config import Config
from megatron_opd.errors import RunFailed
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
    """The nodes of each role: one het component each, or consecutive slices of one allocation.
    A job that does not match the config is a failed start (RunFailed)."""
    c = cfg.cluster
    counts = {"learner": c.learner_nodes, "rollout": c.rollout.nodes, "teacher": c.teacher.nodes}
    if cfg.slurm.heterogeneous:
        hosts = {}
        for i, role in enumerate(ROLES):
            key = f"SLURM_JOB_NODELIST_HET_GROUP_{i}"
            if key not in env:
                raise RunFailed(f"{key} is not set: slurm.heterogeneous=true needs the "
                                "heterogeneous job that launchers/slurm/submit.sh makes")
            hosts[role] = hostnames(env[key])
    else:
        nodes, hosts = hostnames(env["SLURM_JOB_NODELIST"]), {}
        for role in ROLES:
            hosts[role], nodes = nodes[:counts[role]], nodes[counts[role]:]
    for role in ROLES:
        if len(hosts[role]) != counts[role]:
            raise RunFailed(f"the job gave the {role} {len(hosts[role])} node(s), the config "
                            f"asks for {counts[role]}")
    return hosts
