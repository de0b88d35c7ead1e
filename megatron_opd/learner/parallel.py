"""The learner's parallel layout, built once at start-up from config.

The walking skeleton runs world size 1 (TP = PP = EP = 1); the layout object and its validation
are where tensor/pipeline/expert parallelism plug in (issue 3).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass
class ParallelLayout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    expert_parallel: int = 1

    def validate(self, world_size: int) -> None:
        for key in ("tensor_parallel", "pipeline_parallel", "expert_parallel"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key}: must be >= 1")
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if world_size % model_parallel:
            raise ValueError(f"parallel.tensor_parallel x parallel.pipeline_parallel = "
                             f"{model_parallel} must divide the world size {world_size}")
        if (world_size // self.pipeline_parallel) % self.expert_parallel:
            raise ValueError(f"parallel.expert_parallel: {self.expert_parallel} must divide "
                             f"world_size / pipeline_parallel = {world_size // self.pipeline_parallel}")


def init_distributed(layout: ParallelLayout, backend: str | None = None, seed: int = 1234) -> None:
    """torch.distributed from torchrun's env (or a world of one), then megatron's groups + RNG."""
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # a plain single process
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend)
    layout.validate(torch.distributed.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        expert_model_parallel_size=layout.expert_parallel)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
