"""HF <-> megatron dist checkpoint, one layer group at a time, under any learner layout.

Both directions run collectively on every rank of an initialised layout (`init_distributed`);
a world of one is the usual case. Memory: one group's parameters (this rank's shards of them)
plus one full HF tensor at a time, never the model (docs/checkpoints.md has measurements).
- hf_to_megatron: each rank fills its shards of the group straight from the safetensors files,
  the group is saved as a dist checkpoint, and the groups are merged into the learner's layout
  `<out>/step_00000000/{megatron/, meta.json}` + `<out>/latest`, marked `weights_only`.
- megatron_to_hf: each group is loaded (a partial sharded state dict), gathered to full tensors
  and written as one safetensors file by rank 0; config.json, generation config and tokenizer
  come from the source HF model when known (`--hf-config`, or the one hf_to_megatron recorded in
  meta.json `hf_source`, or the run's `init.student`), see `hf_export`.
Vocabulary padding: the converted checkpoint has the conversion layout's padded vocabulary rows
(zeros; `padded_vocab_size(spec, tp)`), so convert under the run's tensor parallelism (`--config`)
when TP does not divide vocab_size; megatron_to_hf reads any padded size and drops the padding.
Bad input files (truncated safetensors, missing or short `.distcp`) raise BadCheckpoint naming
the file before any output exists; on any failure the partial output is removed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.convert.dcp import (check_files, global_shapes, merge_group_checkpoints,
                                       read_regions, relabel_layers)
from megatron_opd.convert.hf_export import HFSource, export_config, tokenizer_files
from megatron_opd.convert.hf_io import HFShardWriter, LazyHFReader
from megatron_opd.convert.skeleton import Skeleton, in_group, layer_groups
from megatron_opd.models.hf_mapping import full_from_hf, full_to_hf
from megatron_opd.models.sharding import VOCAB_TENSORS, iter_full_tensors, load_full_state
from megatron_opd.models.spec import MoEModelSpec, check_hf_expressible, padded_vocab_size

STEP_DIR = "step_00000000"


def _layer_groups(spec: MoEModelSpec, layers_per_group: int, desc: str, progress: bool):
    """Yield (index, layers, first, last, accept) per layer group under a progress bar (rank 0);
    `accept(name)` says whether a parameter belongs to the group (embedding with the first,
    final norm and output layer with the last)."""
    from tqdm import tqdm

    plan = layer_groups(spec, layers_per_group)
    with tqdm(total=len(plan), desc=desc, unit="group", file=sys.stderr,
              disable=not progress or dist.get_rank() != 0) as bar:
        for g, layers in enumerate(plan):
            first, last = g == 0, g == len(plan) - 1

            def accept(name: str, layers=layers, first=first, last=last) -> bool:
                return in_group(name, layers, first, last)
            yield g, layers, first, last, accept
            bar.update()


def hf_to_megatron(hf_dir: str | Path, out_root: str | Path, spec: MoEModelSpec, groups, *,
                   dtype: torch.dtype = torch.float32, layers_per_group: int = 1,
                   progress: bool = True) -> Path:
    """Collective. Writes `<out_root>/step_00000000` (weights only) and `<out_root>/latest`."""
    check_hf_expressible(spec)
    reader = LazyHFReader(hf_dir)
    reader.check(spec)
    skel = Skeleton(spec, groups.layout, groups, params_dtype=dtype)
    root, rank = Path(out_root), dist.get_rank()
    tmp, final = root / f"{STEP_DIR}.tmp", root / STEP_DIR
    new_root = not root.exists()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "megatron").mkdir(parents=True)
    dist.barrier()

    try:
        _hf_to_megatron_groups(reader, tmp, final, root, spec, groups, skel, dtype,
                               layers_per_group, progress, Path(hf_dir))
    except BaseException:
        if rank == 0:  # nothing partial stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            if new_root and root.is_dir() and not any(root.iterdir()):
                root.rmdir()
        raise
    return final


def _hf_to_megatron_groups(reader, tmp: Path, final: Path, root: Path, spec, groups, skel,
                           dtype, layers_per_group: int, progress: bool, hf_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    from megatron_opd.learner.checkpoint import WEIGHTS_ONLY, commit_checkpoint

    rank = dist.get_rank()
    rows = padded_vocab_size(spec, groups.layout.tensor_parallel)

    def hf_get(name: str) -> torch.Tensor:
        return reader.get(name, dtype)

    plan = layer_groups(spec, layers_per_group)
    parts = []
    for g, layers, first, last, accept in _layer_groups(spec, layers_per_group, "hf -> megatron",
                                                        progress):
        # one layer group at a time: memory stays bounded
        skel.materialize(accept)
        load_full_state(skel.chunks, groups, lambda n: full_from_hf(n, hf_get, spec, rows),
                        accept)
        part = tmp / "megatron" / f".group{g:05d}"
        if rank == 0:
            part.mkdir()
        dist.barrier()
        sd = {"model": skel.sharded_state_dict(layers, first, last)}
        relabel_layers(sd, layers.start, len(layers))
        dist_checkpointing.save(sd, str(part))
        del sd
        skel.release()
        reader.release()
        parts.append(part)
    dist.barrier()
    if rank == 0:
        merge_group_checkpoints(parts, [r.start for r in plan], spec.num_layers,
                                tmp / "megatron")
        meta = {"step": 0, "version": 0,
                "counters": {"skipped_steps": 0, "dropped_stale_tokens": 0},
                "data_cursor": {}, "scheduler": None, "world_size": dist.get_world_size(),
                "saved_at": time.time(), WEIGHTS_ONLY: True,
                "model": dataclasses.asdict(spec), "dtype": str(dtype).removeprefix("torch."),
                "converted_from": str(hf_dir.resolve()),
                # what megatron_to_hf carries into config.json even if the HF dir is gone
                "hf_source": HFSource.from_path(hf_dir).to_meta(),
                "converted_under": dataclasses.asdict(groups.layout)}
        root.mkdir(parents=True, exist_ok=True)
        commit_checkpoint(root, tmp, final, meta)
    dist.barrier()


def resolve_megatron_dir(path: str | Path) -> Path:
    """A checkpoints root (with `latest`), one `step_<N>` directory, or its `megatron/` dir."""
    from megatron_opd.learner.checkpoint import latest_checkpoint

    path = Path(path)
    if (path / "latest").is_file():
        return latest_checkpoint(path) / "megatron"
    for d in (path / "megatron", path):
        if (d / ".metadata").is_file():
            return d
    raise FileNotFoundError(f"--ckpt: {path} is neither a checkpoints directory with `latest`, "
                            f"a step_<N> directory nor a megatron dist checkpoint")


def check_shapes(skel: Skeleton, stored: dict, where: Path) -> None:
    """Every tensor the model needs is in the checkpoint with the global shape the spec gives
    (vocabulary tensors: at least vocab_size rows; their padding depends on the saving TP)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for v in nested_values(skel.sharded_state_dict()):
        tensors = nested_values(v.build()) if isinstance(v, ShardedTensorFactory) else [v]
        for t in tensors:
            if not isinstance(t, ShardedTensor):
                continue
            if t.key not in stored:
                raise KeyError(f"--ckpt {where}: tensor {t.key} is missing (the model spec "
                               f"needs it; is the spec / --hf-config the checkpoint's model?)")
            have, want = tuple(stored[t.key][0]), tuple(t.global_shape)
            if t.key in VOCAB_TENSORS:
                ok = have[1:] == want[1:] and have[0] >= skel.spec.vocab_size
            else:
                ok = have == want
            if not ok:
                raise ValueError(f"--ckpt {where}: tensor {t.key} has global shape "
                                 f"{stored[t.key][0]}, the model spec gives {want}")


def _regions(sharded_sd: dict, stored: dict) -> list:
    """(key, global offset, destination) of every ShardedTensor: the destinations are the
    materialised parameters themselves (or views of them, e.g. fc1's gate and up halves).
    Vocabulary rows the checkpoint does not have (it was padded for a smaller TP) are zeroed
    instead of read: padding only, dropped on export."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_sd)
    out = []
    for t in nested_values(sharded_sd):
        if not isinstance(t, ShardedTensor):
            continue
        dest = t.data.view((1,) * t.prepend_axis_num + t.local_shape)
        if t.key in VOCAB_TENSORS:
            start, rows = t.global_offset[0], stored[t.key][0][0]
            keep = max(0, min(dest.shape[0], rows - start))
            dest[keep:].zero_()
            if keep == 0:
                continue
            dest = dest[:keep]
        out.append((t.key, t.global_offset, dest))
    return out


def megatron_to_hf(ckpt: str | Path, out: str | Path, spec: MoEModelSpec, groups, *,
                   dtype: torch.dtype | None = None, layers_per_group: int = 1,
                   tokenizer_dir: str | Path | None = None, progress: bool = True,
                   source: HFSource | None = None) -> Path:
    """Collective. Model weights of a learner (or converted) checkpoint -> HF directory `out`
    (sharded safetensors + index + config.json + generation config (+ tokenizer)), written by
    rank 0. `dtype`: of the HF tensors (default: as stored). `source`: the HF model whose
    config.json / generation config / tokenizer files to carry through (default:
    `source_of_checkpoint`); none: config.json generated from the spec."""

    check_hf_expressible(spec)
    mdir = resolve_megatron_dir(ckpt)
    check_files(mdir)
    stored = global_shapes(mdir)
    if "embedding.word_embeddings.weight" not in stored:
        raise KeyError(f"--ckpt {mdir}: no embedding.word_embeddings.weight (not a model "
                       f"checkpoint of the learner?)")
    stored_dtype = stored["embedding.word_embeddings.weight"][1]
    skel = Skeleton(spec, groups.layout, groups, params_dtype=stored_dtype)
    check_shapes(skel, stored, mdir)
    source = source if source is not None else source_of_checkpoint(ckpt)
    # refuse a mismatched source config or tokenizer dir on every rank, before any output
    export_config(spec, dtype or stored_dtype, source)
    if tokenizer_dir is not None:
        tokenizer_files(tokenizer_dir)
    plan = layer_groups(spec, layers_per_group)
    rank0 = dist.get_rank() == 0
    writer = HFShardWriter(out, spec, len(plan)) if rank0 else None
    try:
        for _, layers, first, last, accept in _layer_groups(spec, layers_per_group,
                                                            "megatron -> hf", progress):
            # one layer group at a time: memory stays bounded
            skel.materialize(accept)
            read_regions(mdir, _regions(skel.sharded_state_dict(layers, first, last), stored))
            tensors = {}
            for name, t in iter_full_tensors(skel.chunks, groups, spec, only=accept):
                for hf_name, x in full_to_hf(name, t, spec):
                    if rank0:  # own, contiguous storage: safetensors refuses shared memory
                        tensors[hf_name] = x.to(dtype or x.dtype, copy=True).contiguous()
            if rank0:
                writer.write(tensors)
            del tensors
            skel.release()
        if rank0:
            writer.finish(source, tokenizer_dir)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    dist.barrier()
    return Path(out)


def spec_of_checkpoint(ckpt: str | Path) -> MoEModelSpec | None:
    """The model spec a checkpoint records: meta.json `model` (converted checkpoints) or the
    run's config.yaml `model:` section (learner checkpoints under `<run>/checkpoints/`)."""
    mdir = resolve_megatron_dir(ckpt)
    meta = mdir.parent / "meta.json"
    if meta.is_file():
        model = json.loads(meta.read_text()).get("model")
        if model:
            return MoEModelSpec(**model)
    model = _run_config(mdir).get("model")
    return MoEModelSpec(**model) if model else None


def _run_config(mdir: Path) -> dict:
    """The config.yaml of the run a learner checkpoint `<run>/checkpoints/step_N/megatron` is of."""
    run_cfg = mdir.parent.parent.parent / "config.yaml"
    if not run_cfg.is_file():
        return {}
    import yaml

    return yaml.safe_load(run_cfg.read_text()) or {}


def source_of_checkpoint(ckpt: str | Path) -> HFSource | None:
    """The HF model a checkpoint descends from: meta.json `hf_source` (recorded by
    hf_to_megatron), else the run's `init.student` directory; None when neither is known."""
    mdir = resolve_megatron_dir(ckpt)
    meta = mdir.parent / "meta.json"
    if meta.is_file():
        source = HFSource.from_meta(json.loads(meta.read_text()).get("hf_source"))
        if source is not None:
            return source
    student = (_run_config(mdir).get("init") or {}).get("student")
    if student and (Path(student) / "config.json").is_file():
        return HFSource.from_path(student)
    return None
