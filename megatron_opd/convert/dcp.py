"""megatron dist checkpoints a layer group at a time: one checkpoint merged out of per-group
saves, and reads of parts of stored tensors.

megatron's torch_dist format is a torch.distributed.checkpoint (DCP) directory: data files, a
pickled `.metadata` (per key: global size, dtype and the list of stored chunks; per chunk: file,
offset, length), plus megatron's `metadata.json` and `common.pt`. A save must hold all its
tensors in memory until written, so the converter saves each layer group on its own and then
merges. Layer-stacked keys (`decoder.layers.*`, global shape [num_layers, ...]) are saved per
group as a complete model of that group's k layers (`relabel_layers`: layer axis k, offsets
from 0; a partial layer axis is refused by megatron's sharding validation and, at world size 1,
by its conversion to torch ShardedTensors), and the merge shifts their chunks back to the
global layer offsets. Data files are moved in under a group prefix, the chunk lists of each key
concatenated and the storage index rewritten: the same kind of metadata edit megatron's own
`TorchDistLoadShardedStrategy.remove_sharded_tensors` does. The result is checked to cover
every key's global shape exactly."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import shutil
from pathlib import Path

import torch

_META = ".metadata"


def _read(d: Path):
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_opd.convert.errors import BadCheckpoint

    try:
        return FileSystemReader(str(d)).read_metadata()
    except Exception as e:  # a pickle: truncation shows as any of several exception types
        raise BadCheckpoint(f"{d / _META}: unreadable ({type(e).__name__}: {e}), the checkpoint "
                            f"is incomplete: copy it again or use another step") from None


def check_files(ckpt_dir: Path) -> None:
    """Every data file the checkpoint's metadata points into exists and is long enough, or
    BadCheckpoint naming the first bad one: checked before anything is read or written (DCP
    itself fails mid-read with a traceback from a worker thread)."""
    from megatron_opd.convert.errors import BadCheckpoint

    need: dict[str, int] = {}
    for info in (_read(ckpt_dir).storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(need.items()):
        f = ckpt_dir / rel
        if not f.is_file():
            raise BadCheckpoint(f"{f}: missing (listed in {_META}), the checkpoint is incomplete: "
                                f"copy the whole directory again or use another step")
        if f.stat().st_size < end:
            raise BadCheckpoint(f"{f}: truncated ({f.stat().st_size} of {end} bytes), the "
                                f"checkpoint is incomplete: copy it again or use another step")


LAYER_PREFIX = "decoder.layers."


def relabel_layers(sharded_sd: dict, start: int, count: int) -> None:
    """In place: the group's layer-stacked ShardedTensors (factories built first) as those of a
    `count`-layer model whose layer 0 is global layer `start`."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_sd)

    def relabel(x):
        if isinstance(x, ShardedTensor) and x.key.startswith(LAYER_PREFIX):
            if not start <= x.global_offset[0] < start + count:
                raise RuntimeError(f"{x.key}: layer {x.global_offset[0]} outside the group")
            x = dataclasses.replace(
                x, global_shape=(count, *x.global_shape[1:]),
                global_offset=(x.global_offset[0] - start, *x.global_offset[1:]),
                axis_fragmentations=(count, *x.axis_fragmentations[1:]))
        return x

    dict_list_map_inplace(relabel, sharded_sd)


def _shift(offsets, by: int):
    return type(offsets)((offsets[0] + by, *offsets[1:]))


def merge_group_checkpoints(parts: list[Path], layer_starts: list[int], num_layers: int,
                            out: Path) -> None:
    """Merge the per-group dist checkpoints `parts` (group g's layer-stacked keys relabelled
    from `layer_starts[g]`) into `out` (created), then delete them."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    out.mkdir(parents=True, exist_ok=True)
    state, planner, storage, first = {}, {}, {}, None
    for g, (part, start) in enumerate(zip(parts, layer_starts)):
        md = _read(part)
        first = first or md
        renamed = {}
        for f in sorted(os.listdir(part)):
            if f.endswith(".distcp"):
                renamed[f] = f"g{g:05d}{f}"
                os.replace(part / f, out / renamed[f])
        for idx, info in (md.storage_data or {}).items():
            if idx.fqn.startswith(LAYER_PREFIX) and idx.offset is not None:
                idx = MetadataIndex(idx.fqn, _shift(idx.offset, start), idx.index)
            storage[idx] = dataclasses.replace(info, relative_path=renamed[info.relative_path])
        planner.update(md.planner_data or {})
        for key, m in md.state_dict_metadata.items():
            if isinstance(m, TensorStorageMetadata) and key.startswith(LAYER_PREFIX):
                m = dataclasses.replace(
                    m, size=_shift(m.size, num_layers - m.size[0]),
                    chunks=[dataclasses.replace(c, offsets=_shift(c.offsets, start))
                            for c in m.chunks])
            if key not in state:
                state[key] = m
            elif isinstance(m, TensorStorageMetadata):
                have = state[key]
                if have.size != m.size or have.properties.dtype != m.properties.dtype:
                    raise ValueError(f"{key}: groups disagree on its global shape / dtype "
                                     f"({tuple(have.size)} vs {tuple(m.size)})")
                state[key] = dataclasses.replace(have, chunks=[*have.chunks, *m.chunks])
    for name in ("metadata.json", "common.pt"):  # identical in every part (written by rank 0)
        if (parts[0] / name).exists():
            shutil.copy2(parts[0] / name, out / name)
    merged = dataclasses.replace(first, state_dict_metadata=state, planner_data=planner,
                                 storage_data=storage)
    check_complete(merged)
    with open(out / f"{_META}.tmp", "wb") as f:
        pickle.dump(merged, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(out / f"{_META}.tmp", out / _META)
    for part in parts:
        shutil.rmtree(part)


def check_complete(md) -> None:
    """Every tensor key's chunks tile its global shape (megatron shards never overlap, so equal
    volume means full coverage)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            stored = sum(math.prod(c.sizes) for c in m.chunks)
            if stored != math.prod(m.size):
                raise RuntimeError(f"{key}: merged checkpoint stores {stored} of "
                                   f"{math.prod(m.size)} elements")


def global_shapes(ckpt_dir: Path) -> dict[str, tuple[tuple[int, ...], object]]:
    """key -> (global shape, dtype) of every tensor in a dist checkpoint (metadata only)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = _read(ckpt_dir)
    return {k: (tuple(m.size), m.properties.dtype) for k, m in md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}


def read_regions(ckpt_dir: Path, regions: list[tuple[str, tuple[int, ...], torch.Tensor]]):
    """Fill each destination tensor with the part of checkpoint tensor `key` at `offsets` (its
    shape = the destination's), reading only the stored chunks that overlap it. This rank
    alone (no collective). megatron's own load cannot read part of a layer axis at world size
    1 (its torch ShardedTensor wrapper then counts every layer as local), hence plain DCP."""
    from torch.distributed.checkpoint import FileSystemReader, load

    load({}, storage_reader=FileSystemReader(str(ckpt_dir)),
         planner=_region_planner_class()(ckpt_dir, regions), no_dist=True)


_PLANNER = None


def _region_planner_class():
    """Defined once at module level on first use (torch.distributed.checkpoint imports lazily):
    a class made per call is cyclic garbage that would keep the destinations alive."""
    global _PLANNER
    if _PLANNER is not None:
        return _PLANNER
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionPlanner(DefaultLoadPlanner):
        def __init__(self, ckpt_dir, regions):
            super().__init__()
            self.ckpt_dir, self.regions = ckpt_dir, regions
            self.dest = {(key, tuple(off)): t for key, off, t in regions}

        def create_local_plan(self):
            items = []
            for key, offsets, t in self.regions:
                md = self.metadata.state_dict_metadata.get(key)
                if md is None:
                    raise KeyError(f"{self.ckpt_dir}: tensor {key} is not in the checkpoint")
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.shape)
                items += create_read_items_for_chunk_list(key, md, [chunk])
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            t = self.dest[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
            for dim, (start, length) in enumerate(zip(read_item.dest_offsets,
                                                       read_item.lengths)):
                t = t.narrow(dim, start, length)
            return t

    _PLANNER = RegionPlanner
    return _PLANNER
