"""A real one-node Slurm cluster on loopback, for trying the launchers and for the tests.

    python launchers/slurm/local_cluster.py start --dir /tmp/slurm   # prints `export SLURM_CONF=...`
    python launchers/slurm/local_cluster.py stop --dir /tmp/slurm

Needs root and Debian's `slurm-wlm` and `munge` (`.ci/run` installs them). It starts munged (as
the `munge` user, with the key the package made), then slurmctld and one slurmd per virtual node
(`slurmd -N n1` ...; all on this machine, each with its own port, spool and log) with a
slurm.conf in `--dir`. Several nodes because the components of a heterogeneous job never share a
node (measured: on one node such a job stays pending with reason Resources). Each node advertises
`--cpus` CPUs, whatever the machine has (slurmd trusts the configured count).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_CONF = """\
ClusterName=opdlocal
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
# heterogeneous jobs are placed by the backfill scheduler: look every second
SchedulerParameters=bf_interval=1
{nodes}
PartitionName=local Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_names(nodes: int) -> list[str]:
    return [f"n{i + 1}" for i in range(nodes)]


def start(directory: Path, nodes: int = 3, cpus: int = 4, timeout: float = 60.0) -> Path:
    """Start munged, slurmctld and the slurmds; return slurm.conf's path once all are idle."""
    for tool in ("munged", "slurmctld", "slurmd", "sinfo"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise RuntimeError(f"{tool} not found: install Debian's slurm-wlm and munge "
                               "(apt-get install -y slurm-wlm munge)")
    directory = directory.resolve()
    names = node_names(nodes)
    (directory / "state").mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / f"spool-{name}").mkdir(exist_ok=True)
    _start_munge()
    host = socket.gethostname()
    node_lines = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 "
                           f"Port={_free_port()} CPUs={cpus} State=UNKNOWN" for n in names)
    conf = directory / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, dir=directory, nodes=node_lines,
                                      names=",".join(names), ctld_port=_free_port(),
                                      d_port=_free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-i"], env=env, check=True)  # -i: ignore stale state
    for name in names:
        subprocess.run(["slurmd", "-N", name], env=env, check=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True,
                             text=True)
        states = out.stdout.split()
        if out.returncode == 0 and len(states) == nodes and all(s == "idle" for s in states):
            return conf
        time.sleep(0.5)
    raise RuntimeError(f"slurm node not idle after {timeout:.0f} s; see {directory}/slurmctld.log "
                       f"and {directory}/slurmd.log")


def _start_munge() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    for d in ("/run/munge", "/var/lib/munge", "/var/log/munge", "/etc/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    shutil.chown("/etc/munge/munge.key", "munge", "munge")
    os.chmod("/etc/munge/munge.key", 0o400)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)


def stop(directory: Path) -> None:
    """Stop the slurmds and slurmctld (by their pid files); munged is left running."""
    directory = directory.resolve()
    for pid_file in [*sorted(directory.glob("slurmd-*.pid")), directory / "slurmctld.pid"]:
        try:
            pid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--dir", required=True, type=Path, help="scratch directory of the cluster")
    p.add_argument("--nodes", type=int, default=3, help="virtual nodes (one slurmd each)")
    p.add_argument("--cpus", type=int, default=4, help="CPUs each node advertises")
    args = p.parse_args()
    if args.action == "start":
        conf = start(args.dir, args.nodes, args.cpus)
        print(f"export SLURM_CONF={conf}")
    else:
        stop(args.dir)


if __name__ == "__main__":
    main()
