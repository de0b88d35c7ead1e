"""Hugging Face safetensors, one tensor at a time: a lazy reader (names and shapes come from the
file headers; a tensor is read from disk only when asked for) and a writer of one safetensors
file per layer group plus `model.safetensors.index.json`, config.json and the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_opd.models.hf_mapping import full_to_hf, hf_names
from megatron_opd.models.sharding import full_shapes
from megatron_opd.models.spec import MoEModelSpec, to_hf_config


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
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"--hf: no *.safetensors in {self.dir}")
        self._handles: dict[Path, object] = {}
        self.file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    if name in self.file_of:
                        raise ValueError(f"--hf: tensor {name} is in both "
                                         f"{self.file_of[name].name} and {f.name}")
                    self.file_of[name] = f
                    self._shapes[name] = tuple(h.get_slice(name).get_shape())

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        from safetensors import safe_open

        f = self.file_of[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt")
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
    index, config.json, generation_config.json and tokenizer files; everything under
    `<out>.tmp`, renamed into place at the end (a crash never leaves a half-written model)."""

    def __init__(self, out: str | Path, spec: MoEModelSpec, num_files: int):
        self.out = Path(out)
        self.tmp = self.out.with_name(self.out.name + ".tmp")
        self.spec, self.num_files = spec, num_files
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._written = 0
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self._written += 1
        name = f"model-{self._written:05d}-of-{self.num_files:05d}.safetensors"
        if tensors:
            save_file(tensors, str(self.tmp / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            self.weight_map[k] = name
            self.total_bytes += t.numel() * t.element_size()

    def finish(self, tokenizer_dir: str | Path | None = None) -> Path:
        missing = set(hf_names(self.spec)) - set(self.weight_map)
        if missing:
            raise RuntimeError(f"HF export incomplete: {sorted(missing)[:10]} never written")
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total_bytes},
             "weight_map": dict(sorted(self.weight_map.items()))}, indent=1))
        to_hf_config(self.spec).save_pretrained(str(self.tmp))
        (self.tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": self.spec.bos_token_id, "eos_token_id": self.spec.eos_token_id,
             "pad_token_id": self.spec.pad_token_id}))
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, self.tmp)
        shutil.rmtree(self.out, ignore_errors=True)
        self.tmp.rename(self.out)
        return self.out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                    "chat_template.jinja")


def copy_tokenizer(src: str | Path, dst: Path) -> list[str]:
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--tokenizer: {src} is not a directory")
    copied = [f.name for f in src.iterdir() if f.name in _TOKENIZER_FILES]
    if not copied:
        raise FileNotFoundError(f"--tokenizer: no tokenizer files ({', '.join(_TOKENIZER_FILES)})"
                                f" in {src}")
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied
