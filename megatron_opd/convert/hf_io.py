"""Hugging Face safetensors, one tensor at a time: a lazy reader (names and shapes come from the
file headers; a tensor is read from disk only when asked for) and a writer of one safetensors
file per layer group plus `model.safetensors.index.json`, config.json and the tokenizer
(`hf_export`: carried through from the source HF model when known)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from megatron_opd.convert.errors import BadCheckpoint, open_safetensors
from megatron_opd.convert.hf_export import HFSource, write_metadata
from megatron_opd.models.hf_mapping import full_to_hf, hf_names
from megatron_opd.models.sharding import full_shapes
from megatron_opd.models.spec import MoEModelSpec


def expected_hf_shapes(spec: MoEModelSpec) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the spec with its shape (from the megatron shapes, no memory used)."""
    out = {}
    for name, shape in full_shapes(spec):
        for hf, t in full_to_hf(name, torch.empty(shape, device="meta"), spec):
            out[hf] = tuple(t.shape)
    return out


class LazyHFReader:
    """The safetensors files of an HF directory: only the headers are read up front; `get(name)`
    reads that one tensor through `safe_open` (a memory map). `release()` closes the maps: pages
    a map has touched count in the process's RSS until it is closed, so converters release
    after every layer group."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise BadCheckpoint(f"--hf: no *.safetensors in {self.dir}, point at a Hugging Face "
                                f"model directory")
        self._handles: dict[Path, object] = {}
        self.file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:  # every header up front: a truncated file fails before any output
            with open_safetensors(f) as h:
                for name in h.keys():
                    if name in self.file_of:
                        raise ValueError(f"--hf: tensor {name} is in both "
                                         f"{self.file_of[name].name} and {f.name}")
                    self.file_of[name] = f
                    self._shapes[name] = tuple(h.get_slice(name).get_shape())

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        f = self.file_of[name]
        if f not in self._handles:
            self._handles[f] = open_safetensors(f)
        t = self._handles[f].get_tensor(name)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def release(self) -> None:
        self._handles.clear()

    def check(self, spec: MoEModelSpec) -> None:
        """Same tensor names and shapes as the spec's HF architecture, or an error naming them."""
        want = expected_hf_shapes(spec)
        have = set(self.file_of)
        missing, unexpected = sorted(set(want) - have), sorted(have - set(want))
        if missing or unexpected:
            raise KeyError(f"--hf {self.dir}: tensors do not match the {spec.family} "
                           f"architecture of its config.json: missing {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''}, unexpected "
                           f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        for name in hf_names(spec):
            if self.shape(name) != want[name]:
                raise ValueError(f"--hf {self.dir}: tensor {name} has shape {self.shape(name)}, "
                                 f"config.json implies {want[name]}")


class HFShardWriter:
    """Writes `model-0000i-of-0000N.safetensors` per call of `write`, then (in `finish`) the
    index, config.json, generation_config.json and tokenizer files; everything under a hidden
    temporary directory next to `out`, renamed into place at the end (`abort` removes it), so a
    failed export never leaves a half-written model."""

    def __init__(self, out: str | Path, spec: MoEModelSpec, num_files: int):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp",
                                         dir=self.out.parent))
        self.spec, self.num_files = spec, num_files
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.dtype: torch.dtype | None = None
        self._written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self._written += 1
        name = f"model-{self._written:05d}-of-{self.num_files:05d}.safetensors"
        if tensors:
            save_file(tensors, str(self.tmp / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            self.weight_map[k] = name
            self.total_bytes += t.numel() * t.element_size()
            self.dtype = self.dtype or t.dtype

    def finish(self, source: HFSource | None = None,
               tokenizer_dir: str | Path | None = None) -> Path:
        missing = set(hf_names(self.spec)) - set(self.weight_map)
        if missing:
            raise RuntimeError(f"HF export incomplete: {sorted(missing)[:10]} never written")
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total_bytes},
             "weight_map": dict(sorted(self.weight_map.items()))}, indent=1))
        write_metadata(self.tmp, self.spec, self.dtype, source, tokenizer_dir)
        shutil.rmtree(self.out, ignore_errors=True)
        self.tmp.rename(self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
