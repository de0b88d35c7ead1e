"""One rank of a multi-process test on CPU: the process group every TP2 worker opens (gloo over
loopback, one thread per process: the machines have two cores) and always closes."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


@contextmanager
def gloo_rank(rank: int, world: int, port: int):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
