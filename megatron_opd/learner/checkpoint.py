"""Learner checkpoints: megatron dist_checkpointing (model + optimizer, loadable under another
TP/PP/EP layout), LR schedule, per-rank RNG, and the trainer's counters and data cursor.

Layout on disk: `<run>/checkpoints/step_<N>/` with `megatron/` (dist checkpoint), `rng/rank<r>.pt`,
`meta.json` (written last; `weights_only: true` for a converted checkpoint, see
`load_checkpoint`), optional `hf/` export; `<run>/checkpoints/latest` names the newest
complete one. A checkpoint is written under `step_<N>.tmp` and renamed only after every rank
finished and meta.json is on disk, then `latest` is replaced atomically: a crash at any moment
leaves the previous checkpoint as `latest`, loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

# Optimizer state in a per-parameter canonical form, so a different layout can load it. The
# gather to DP rank 0 goes over gloo groups ("mem_efficient") without CUDA: the other path moves
# buffers with .cuda().
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                   "chained_optim_avoid_prefix": True,  # EP = 1 and EP > 1 chain differently
                   "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


# meta.json flag of a checkpoint holding model weights only (no optimizer, scheduler, RNG).
WEIGHTS_ONLY = "weights_only"


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly."""
    step: int = 0  # optimizer steps attempted (skipped ones included)
    version: int = 0  # policy version = weight publications
    counters: dict[str, float] = field(default_factory=dict)
    data_cursor: dict = field(default_factory=dict)  # owned by the data source, opaque here


def _model_sharded_state_dict(chunks: list) -> dict:
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model(chunks: list, loaded: dict) -> None:
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded[f"chunk{i}"])


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(root: Path, chunks: list, optimizer, scheduler, state: TrainerState,
                    *, keep: int = 2, hf_export=None) -> Path:
    """Collective: every rank calls it. `hf_export(path)`, when given, is called by every rank
    (it gathers) and writes a Hugging Face copy from rank 0."""
    from megatron.core import dist_checkpointing, tensor_parallel

    root = Path(root)
    final = root / f"step_{state.step:08d}"
    tmp = root / f"step_{state.step:08d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "megatron").mkdir(parents=True)
        (tmp / "rng").mkdir()
    dist.barrier()
    model_sd = _model_sharded_state_dict(chunks)
    sharded = {"model": model_sd,
               "optimizer": optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_METADATA)}
    dist_checkpointing.save(sharded, str(tmp / "megatron"))
    rng = {"cpu": torch.get_rng_state(),
           "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / "rng" / f"rank{rank}.pt")
    if hf_export is not None:
        hf_export(tmp / "hf")
    dist.barrier()
    if rank == 0:
        meta = {"step": state.step, "version": state.version, "counters": state.counters,
                "data_cursor": state.data_cursor, "scheduler": scheduler.state_dict(),
                "world_size": dist.get_world_size(), "saved_at": time.time()}
        commit_checkpoint(root, tmp, final, meta, keep)
    dist.barrier()
    return final


def commit_checkpoint(root: Path, tmp: Path, final: Path, meta: dict, keep: int = 0) -> None:
    """Rank 0, after every rank wrote `tmp`: meta.json last, rename into place, point `latest`
    at it, drop all but the newest `keep` (0: keep all). Also used by checkpoint conversion."""
    _fsync_write(tmp / "meta.json", json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_write(root / "latest.tmp", final.name)
    os.replace(root / "latest.tmp", root / "latest")
    for old in sorted(root.glob("step_????????"))[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state (not even `step`), and megatron's DistributedOptimizer
    cannot describe what it will load then (0.16.1 asserts on the missing step without apex/TE).
    Its own remedy, one zero-gradient step, creates the state; loading overwrites all of it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not opt.optimizer.state:
            init()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    pointer = Path(root) / "latest"
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "meta.json").exists():
        raise RuntimeError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: Path, chunks: list, optimizer, scheduler) -> TrainerState:
    """Collective. Loads under the current layout whatever layout saved it; RNG states are
    restored when the world size is unchanged (otherwise ranks keep their fresh seeds).
    A `weights_only` checkpoint (meta.json; what `megatron_opd.convert` writes) holds the model
    alone: the optimizer and LR schedule stay as built (fresh Adam moments, warmup from step 0)
    and the ranks keep their seeds."""
    from megatron.core import dist_checkpointing, tensor_parallel

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get(WEIGHTS_ONLY):
        model_sd = _model_sharded_state_dict(chunks)
        loaded = dist_checkpointing.load({"model": model_sd}, str(path / "megatron"))
        _load_model(chunks, loaded["model"])
        # bf16/fp16 params: the optimizer's fp32 main copies were taken at construction
        optimizer.reload_model_params()
        return TrainerState(step=meta["step"], version=meta["version"],
                            counters=meta["counters"], data_cursor=meta["data_cursor"])
    _materialize_optimizer_state(optimizer)
    model_sd = _model_sharded_state_dict(chunks)
    sharded = {"model": model_sd,
               "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                         metadata=_OPTIM_METADATA)}
    loaded = dist_checkpointing.load(sharded, str(path / "megatron"))
    _load_model(chunks, loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / "rng" / f"rank{dist.get_rank()}.pt"
    if meta["world_size"] == dist.get_world_size() and rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return TrainerState(step=meta["step"], version=meta["version"],
                        counters=meta["counters"], data_cursor=meta["data_cursor"])
