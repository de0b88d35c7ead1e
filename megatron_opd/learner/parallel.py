"""The learner's parallel layout: torch.distributed + megatron process groups, built once.

`init_distributed(cfg.parallel)` checks the layout against the world size, creates megatron's
groups and returns a `ParallelGroups`, which everything below the driver receives as an argument
(nothing deep in the code asks megatron's `parallel_state` for a group).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_opd.config import ParallelConfig
from megatron_opd.listeners import loopback_socket_env
from megatron_opd.logs import event


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups and this rank's coordinates. Invariants: world = tp*cp*pp*dp and
    world = etp*ep*pp*edp; tp ranks of one stage hold vocab/heads shards of the same layers; ep
    ranks hold disjoint experts (global index = ep_rank * experts_per_rank + local index)."""
    layout: ParallelConfig
    world_size: int
    rank: int
    tp: object
    pp: object
    dp: object  # data parallel (with context parallel folded in: gradients reduce over it)
    cp: object
    ep: object
    etp: object  # the experts' tensor-parallel group
    edp: object  # data parallel of the experts
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    etp_rank: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pipeline_parallel - 1


def check_world_size(layout: ParallelConfig, world_size: int) -> int:
    """Raise LayoutError naming the `parallel.*` key unless the layout fits `world_size`;
    return the data-parallel size."""
    dense = layout.tensor_parallel * layout.context_parallel * layout.pipeline_parallel
    experts = layout.expert_tensor_parallel * layout.expert_parallel * layout.pipeline_parallel
    if world_size % dense:
        raise LayoutError(
            f"parallel.tensor_parallel: tensor_parallel x context_parallel x pipeline_parallel = "
            f"{layout.tensor_parallel} x {layout.context_parallel} x {layout.pipeline_parallel} "
            f"does not divide the world size {world_size}")
    if world_size % experts:
        raise LayoutError(
            f"parallel.expert_parallel: expert_tensor_parallel x expert_parallel x "
            f"pipeline_parallel = {layout.expert_tensor_parallel} x {layout.expert_parallel} x "
            f"{layout.pipeline_parallel} does not divide the world size {world_size}")
    return world_size // dense


def init_distributed(layout: ParallelConfig, seed: int = 1234,
                     backend: str | None = None) -> ParallelGroups:
    """torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) or a
    world of one; then megatron's groups and RNG. gloo without CUDA, nccl with it."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is already initialised")
    # With GPUs, CPU tensors (batches from rank 0, metric totals) still travel: gloo carries
    # them, NCCL the CUDA tensors, in every group megatron creates from the default one.
    backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    world = (dist.get_world_size() if dist.is_initialized()
             else int(os.environ.get("WORLD_SIZE", "1")))
    check_world_size(layout, world)  # before any group exists: a bad layout leaves nothing behind
    if not dist.is_initialized():
        if "nccl" in backend:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # gloo/NCCL listen on `lo` when the world's rendezvous is on loopback (one machine)
        os.environ.update(loopback_socket_env(os.environ.get("MASTER_ADDR", "127.0.0.1")))
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend)
        else:  # a world of one: an in-process store (a TCPStore would listen, on `*`)
            dist.init_process_group(backend=backend, rank=0, world_size=1,
                                    store=dist.HashStore())
    vpp = layout.virtual_pipeline_parallel
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        context_parallel_size=layout.context_parallel,
        expert_model_parallel_size=layout.expert_parallel,
        expert_tensor_parallel_size=layout.expert_tensor_parallel)
    # use_cpu_initialization draws master weights from torch's generator: same seed on all ranks.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    if dist.get_rank() == 0:
        event("learner", "layout", world=dist.get_world_size(), tp=layout.tensor_parallel,
              pp=layout.pipeline_parallel, vpp=vpp, cp=layout.context_parallel,
              ep=layout.expert_parallel, etp=layout.expert_tensor_parallel,
              dp=ps.get_data_parallel_world_size(with_context_parallel=True), backend=backend)
    return ParallelGroups(
        layout=layout, world_size=dist.get_world_size(), rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(with_context_parallel=True),
        cp=ps.get_context_parallel_group(), ep=ps.get_expert_model_parallel_group(),
        etp=ps.get_expert_tensor_parallel_group(), edp=ps.get_expert_data_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(with_context_parallel=True))


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
