"""The learner's own model chunks for this rank's layout, built on the meta device (no memory),
with one layer group at a time given real storage.

Using the learner's builders and megatron's `sharded_state_dict()` (rather than writing keys by
hand) is what makes a converted checkpoint exactly what the learner saves and loads: same keys,
global shapes, layer/expert offsets and fc1 [gate; up] factories.
Groups: `layers_per_group` consecutive global layers; the embedding joins the first group, the
final norm and output layer the last.
"""

from __future__ import annotations

import gc
import re

import torch

from megatron_opd.models.sharding import placements
from megatron_opd.models.spec import MoEModelSpec

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def layer_groups(spec: MoEModelSpec, layers_per_group: int) -> list[range]:
    if layers_per_group < 1:
        raise ValueError(f"--layers-per-group: must be >= 1, got {layers_per_group}")
    n = spec.num_layers
    return [range(s, min(s + layers_per_group, n)) for s in range(0, n, layers_per_group)]


def in_group(full_name: str, layers: range, first: bool, last: bool) -> bool:
    """Whether a full (one-process) parameter name belongs to this group."""
    m = _LAYER.match(full_name)
    if m:
        return int(m.group(1)) in layers
    return first if full_name.startswith("embedding.") else last


class Skeleton:
    """This rank's model chunks on the meta device, under `layout` (megatron's parallel state
    must be initialised for it)."""

    def __init__(self, spec: MoEModelSpec, layout, groups, params_dtype=torch.float32):
        from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config

        self.spec, self.groups = spec, groups
        with torch.device("meta"):
            self.chunks = build_model_chunks(
                spec, transformer_config(spec, params_dtype=params_dtype, layout=layout))
        self._placement = {(pl.chunk, pl.local_name): pl
                           for pl in placements(self.chunks, groups).values()}
        self._meta: dict[tuple[int, str], torch.nn.Parameter] = {}

    def materialize(self, accept) -> int:
        """Give every parameter whose full name `accept`s real (uninitialised) storage, keeping
        megatron's attributes (partition dim, expert flags, ...); returns the bytes allocated."""
        total = 0
        for c, chunk in enumerate(self.chunks):
            for name, p in list(chunk.named_parameters()):
                pl = self._placement[(c, name)]
                if p.device.type != "meta" or not accept(pl.full_name):
                    continue
                real = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                          requires_grad=False)
                real.__dict__.update(p.__dict__)
                self._swap(chunk, name, real)
                self._meta[(c, name)] = p
                total += real.numel() * real.element_size()
        return total

    def release(self) -> None:
        """Back to meta: the group's storage is freed."""
        for (c, name), p in self._meta.items():
            self._swap(self.chunks[c], name, p)
        self._meta.clear()
        # megatron's sharded-state-dict objects form reference cycles that would keep the
        # group's tensors alive until the next automatic collection
        gc.collect()

    @staticmethod
    def _swap(chunk, name: str, param) -> None:
        owner, _, leaf = name.rpartition(".")
        chunk.get_submodule(owner)._parameters[leaf] = param

    def sharded_state_dict(self, layers: range | None = None, first: bool = True,
                           last: bool = True) -> dict:
        """The learner's model sharded state dict (`learner.checkpoint` structure), restricted
        to one group (layers=None: everything, e.g. to read global shapes). Every layer's
        ShardedObjects (`_extra_state`, no tensor data) go with the first group: megatron
        validates them per key over all layers."""
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        out = []
        for chunk in self.chunks:
            sd = chunk.sharded_state_dict()
            if layers is not None:
                global_of = [m.layer_number - 1 for m in chunk.decoder.layers]

                def keep(key: str, value) -> bool:
                    m = _LAYER.match(key)
                    if isinstance(value, ShardedObject):
                        return first
                    if m:
                        return global_of[int(m.group(1))] in layers
                    return first if key.startswith("embedding.") else last
                sd = {k: v for k, v in sd.items() if keep(k, v)}
            out.append(sd)
        return out[0] if len(out) == 1 else {f"chunk{i}": sd for i, sd in enumerate(out)}
