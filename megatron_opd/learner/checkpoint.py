"""Learner checkpoints: megatron dist_checkpointing (model + optimizer, loadable under another
TP/PP/EP layout), LR schedule, per-rank RNG, and the trainer's counters and data cursor.

Layout on disk: `<run>/checkpoints/step_<N>/` with `megatron/` (dist checkpoint), `rng/rank<r>.pt`,
`meta.json` (written last; `weights_only: true` for a converted checkpoint, see
`load_checkpoint`), optional `hf/` export; `<run>/checkpoints/latest` names the newest
complete one. A checkpoint is written under `step_<N>.tmp` and renamed only after every rank
finished and meta.json is on disk, then `latest` is replaced atomically: a crash at any moment
leaves the previous checkpoint as `latest`, loadable.

meta.json records the size of every other file of the checkpoint (`files`: {relative path:
bytes}). Before a resume, `latest_checkpoint` checks them (a stat per file, no reading): a
checkpoint with a missing or resized file (e.g. a truncated `.distcp`) is named as damaged and
the newest intact older one is used instead, said in the log; none intact is an error naming
each. `repair_latest` (the launcher, before any process starts) also moves the damaged ones
aside (`step_<N>.damaged`) and points `latest` at the intact one, so that every process of the
run (the orchestrator reads `latest` too) resumes from the same checkpoint. Sizes, not
checksums: crc32 runs at ~1.7 GB/s on one core and would read the whole checkpoint back at every
save and again at every resume (docs/fault-tolerance.md).
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

from megatron_opd.convert.errors import BadCheckpoint

# Optimizer state in a per-parameter canonical form, so a different layout can load it. The
# gather to DP rank 0 goes over gloo groups ("mem_efficient") without CUDA: the other path moves
# buffers with .cuda().
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                   "chained_optim_avoid_prefix": True,  # EP = 1 and EP > 1 chain differently
                   "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


# meta.json flag of a checkpoint holding model weights only (no optimizer, scheduler, RNG).
WEIGHTS_ONLY = "weights_only"
# meta.json: {path relative to the checkpoint: size in bytes} of every file but meta.json.
FILES = "files"
DAMAGED_SUFFIX = ".damaged"  # a damaged checkpoint moved aside by `repair_latest`


class CheckpointError(BadCheckpoint):
    """No intact checkpoint to resume from (the message names each one and what is wrong); bad
    input, refused before anything starts when the launcher finds it (exit 2)."""


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
        from megatron_opd.logs import event

        event("learner", "checkpoint saved", step=state.step, path=final)
    dist.barrier()
    return final


def commit_checkpoint(root: Path, tmp: Path, final: Path, meta: dict, keep: int = 0) -> None:
    """Rank 0, after every rank wrote `tmp`: meta.json last (with the size of every other file),
    rename into place, point `latest` at it, drop all but the newest `keep` (0: keep all). Also
    used by checkpoint conversion."""
    meta = {**meta, FILES: _file_sizes(tmp)}
    _fsync_write(tmp / "meta.json", json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_write(root / "latest.tmp", final.name)
    os.replace(root / "latest.tmp", root / "latest")
    for old in sorted(root.glob("step_????????"))[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def kept_consumed_through(root: Path) -> list[int] | None:
    """`data_cursor["consumed_through"]` of every kept checkpoint under `root` (-1 where
    absent); None when a meta.json cannot be read (the caller then releases nothing)."""
    out = []
    for meta in root.glob("step_????????/meta.json"):
        try:
            out.append(int(json.loads(meta.read_text())["data_cursor"]
                           .get("consumed_through", -1)))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return out


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state (not even `step`), and megatron's DistributedOptimizer
    cannot describe what it will load then (0.16.1 asserts on the missing step without apex/TE).
    Its own remedy, one zero-gradient step, creates the state; loading overwrites all of it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not opt.optimizer.state:
            init()


def _file_sizes(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and f.relative_to(path) != Path("meta.json")}


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the checkpoint at `path` (None: intact): meta.json missing or
    unreadable, or a file recorded in it missing or of another size than at save. A checkpoint
    from before sizes were recorded is taken as it is."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return f"{path / 'meta.json'} missing (not a complete checkpoint)"
    except (OSError, ValueError) as e:
        return f"{path / 'meta.json'} unreadable ({e})"
    for rel, size in (meta.get(FILES) or {}).items():
        try:
            actual = (path / rel).stat().st_size
        except FileNotFoundError:
            return f"{path / rel} missing"
        if actual != size:
            cut = "truncated: " if actual < size else ""
            return f"{path / rel} {cut}{actual} bytes, {size} at save"
    return None


def _candidates(root: Path) -> list[Path]:
    """The checkpoint `latest` names, then the older complete-looking ones, newest first."""
    named = root / (root / "latest").read_text().strip()
    older = sorted((p for p in root.glob("step_????????") if p.name < named.name), reverse=True)
    return [named, *older]


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def latest_checkpoint(root: Path, *, source: str = "learner") -> Path | None:
    """The checkpoint to resume from under `root`: the one `latest` names if it is intact,
    else the newest intact older one (the damaged ones are named in the log, as `source`);
    None without `latest`. Raises CheckpointError naming every checkpoint when none is intact."""
    from megatron_opd.logs import event

    root = Path(root)
    if not (root / "latest").exists():
        return None
    damaged = []
    for path in _candidates(root):
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged and _is_rank0():
                event(source, "resuming from an older checkpoint", path=path,
                      skipped=",".join(p.name for p, _ in damaged))
            return path
        damaged.append((path, problem))
        if _is_rank0():
            event(source, "checkpoint damaged, not resumed from", path=path, problem=repr(problem))
    raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(
        why for _, why in damaged) + "; put an intact one back, or start the run over with "
        "run.overwrite=true")


def repair_latest(root: Path, *, source: str = "megatron-opd") -> Path | None:
    """Before any process of a resumed run starts: `latest_checkpoint`, and when it is not the
    one `latest` names, move the damaged newer ones aside (`step_<N>.damaged`) and point
    `latest` at it, so the learner and the orchestrator read the same checkpoint."""
    from megatron_opd.logs import event

    root = Path(root)
    found = latest_checkpoint(root, source=source)
    if found is None or found == _candidates(root)[0]:
        return found
    for path in _candidates(root):
        if path == found:
            break
        if path.exists():
            aside = path.with_name(path.name + DAMAGED_SUFFIX)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            event(source, "damaged checkpoint moved aside", path=aside)
    _fsync_write(root / "latest.tmp", found.name)
    os.replace(root / "latest.tmp", root / "latest")
    return found


def load_checkpoint(path: Path, chunks: list, optimizer, scheduler) -> TrainerState:
    """Collective. Loads under the current layout whatever layout saved it; RNG states are
    restored when the world size is unchanged (otherwise ranks keep their fresh seeds).
    A `weights_only` checkpoint (meta.json; what `megatron_opd.convert` writes) holds the model
    alone: the optimizer and LR schedule stay as built (fresh Adam moments, warmup from step 0)
    and the ranks keep their seeds."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    state = _load(path, meta, chunks, optimizer, scheduler)
    if _is_rank0():
        from megatron_opd.logs import event

        event("learner", "checkpoint loaded", step=state.step, path=path)
    return state


def _load(path: Path, meta: dict, chunks, optimizer, scheduler) -> TrainerState:
    from megatron.core import dist_checkpointing, tensor_parallel

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
