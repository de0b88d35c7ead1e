"""One learner node's torchrun, started by `srun --ntasks-per-node=1` on every learner node.

    python -m megatron_opd.slurm.node_launch --nnodes N --nproc-per-node G \
        --master-addr A --master-port P --run-dir DIR

The node rank is this task's rank in the step (SLURM_PROCID): task 0 runs on the step's first
node, which is the job driver's node, so global rank 0 (the learner's sockets and weight-sync
rendezvous) is where the driver told the other processes to look. A static rendezvous (not
c10d's first-come ranks) keeps it that way.
"""

from __future__ import annotations

import argparse
import os
import sys


def torchrun_command(nnodes: int, nproc: int, node_rank: int, master_addr: str,
                     master_port: int, run_dir: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}", f"--node-rank={node_rank}",
            f"--master-addr={master_addr}", f"--master-port={master_port}",
            "-m", "megatron_opd.learner.main", "--run-dir", run_dir]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="megatron_opd.slurm.node_launch")
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    node_rank = int(os.environ.get("SLURM_PROCID", "0"))
    cmd = torchrun_command(args.nnodes, args.nproc_per_node, node_rank, args.master_addr,
                           args.master_port, args.run_dir)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
