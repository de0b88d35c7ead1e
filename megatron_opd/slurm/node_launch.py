"""One learner node's torchrun, started by `srun --ntasks-per-node=1` on every learner node.

    python -m megatron_opd.slurm.node_launch --nnodes N --nproc-per-node G \
        --master-addr A --master-port P --run-dir DIR

The node rank is this task's rank in the step (SLURM_PROCID): task 0 runs on the step's first
node, which is the job driver's node, so global rank 0 (the learner's sockets and weight-sync
rendezvous) is where the driver told the other processes to look. The torchrun line is the one
every launcher uses (`megatron_opd.launch.fleet.torchrun_command`: a static rendezvous).
"""

from __future__ import annotations

import argparse
import os

from megatron_opd.launch.fleet import torchrun_command


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
