"""What an exported Hugging Face directory holds besides its weights: config.json,
generation_config.json and tokenizer files, carried through from the HF model the weights came
from when it is known, and the write-aside-then-rename that never leaves a partial directory.

Without a source, config.json is generated from the spec (`to_hf_config`). With one (`HFSource`:
the HF directory a conversion or run started from, or its config recorded in a converted
checkpoint's meta.json), its config.json is written unchanged except for what the exported
weights define: `dtype` (`torch_dtype`) and `architectures` when the source lacks it; its
generation_config.json and tokenizer files are copied. A source describing another architecture
than the weights' is refused, naming the key.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from megatron_opd.convert.errors import BadCheckpoint
from megatron_opd.models.spec import MoEModelSpec, hf_architecture, to_hf_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja")
# spec fields that are not the HF architecture: token ids belong to the tokenizer / generation
# config (a source's null stays null), the vocabulary padding to megatron alone
_NOT_ARCHITECTURE = ("bos_token_id", "eos_token_id", "pad_token_id",
                     "make_vocab_size_divisible_by")


@dataclass
class HFSource:
    """The HF model an export descends from: its config.json (and generation config) as dicts,
    and its directory when it still exists (for the tokenizer files)."""
    config: dict
    generation_config: dict | None = None
    dir: Path | None = None

    @classmethod
    def from_path(cls, path: str | Path) -> "HFSource":
        """An HF model directory, or a config.json file (config only)."""
        path = Path(path)
        if path.is_file():
            return cls(config=json.loads(path.read_text()))
        if not (path / "config.json").is_file():
            raise BadCheckpoint(f"{path}: no config.json, point at the Hugging Face model "
                                f"directory the weights came from")
        gen = path / "generation_config.json"
        return cls(config=json.loads((path / "config.json").read_text()),
                   generation_config=json.loads(gen.read_text()) if gen.is_file() else None,
                   dir=path.resolve())

    def to_meta(self) -> dict:
        return {"dir": str(self.dir) if self.dir else None, "config": self.config,
                "generation_config": self.generation_config}

    @classmethod
    def from_meta(cls, meta: dict | None) -> "HFSource | None":
        if not meta or not meta.get("config"):
            return None
        d = Path(meta["dir"]) if meta.get("dir") else None
        return cls(config=meta["config"], generation_config=meta.get("generation_config"),
                   dir=d if d is not None and d.is_dir() else None)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_config(spec: MoEModelSpec, dtype: torch.dtype, source: HFSource | None) -> dict:
    """config.json of an export of `spec`'s weights in `dtype`."""
    if source is None:
        cfg = to_hf_config(spec).to_diff_dict()
        cfg["dtype"] = _dtype_name(dtype)
        return cfg
    from megatron_opd.convert.hf_config import UnsupportedConfig, spec_from_hf_config

    try:
        theirs = spec_from_hf_config(source.config, "source config.json")
    except UnsupportedConfig as e:
        raise BadCheckpoint(f"{e}, pass the HF config the weights were converted from") from None
    for f in fields(MoEModelSpec):
        if f.name not in _NOT_ARCHITECTURE and getattr(theirs, f.name) != getattr(spec, f.name):
            where = source.dir or "the recorded source config"
            raise BadCheckpoint(
                f"{where}: config.json describes another model than the weights "
                f"({f.name} {getattr(theirs, f.name)!r} vs {getattr(spec, f.name)!r}), pass the "
                f"HF config the weights came from (--hf-config)")
    cfg = dict(source.config)
    cfg.setdefault("architectures", [hf_architecture(spec)])
    if not cfg["architectures"]:
        cfg["architectures"] = [hf_architecture(spec)]
    for key in ("dtype", "torch_dtype"):  # transformers 5 writes dtype, 4 torch_dtype
        if key in cfg:
            cfg[key] = _dtype_name(dtype)
    if "dtype" not in cfg and "torch_dtype" not in cfg:
        cfg["dtype"] = _dtype_name(dtype)
    return cfg


def tokenizer_files(src: str | Path, required: bool = True) -> list[str]:
    """Names of the tokenizer files in `src` (BadCheckpoint if `required` and there are none)."""
    src = Path(src)
    if not src.is_dir():
        raise BadCheckpoint(f"--tokenizer: {src} is not a directory, pass the directory holding "
                            f"tokenizer.json / tokenizer_config.json")
    names = sorted(f.name for f in src.iterdir() if f.name in TOKENIZER_FILES)
    if not names and required:
        raise BadCheckpoint(f"--tokenizer: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in "
                            f"{src}, pass the directory holding them")
    return names


def copy_tokenizer(src: str | Path, dst: Path, required: bool = True) -> list[str]:
    src = Path(src)
    copied = tokenizer_files(src, required)
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied


def write_metadata(dst: Path, spec: MoEModelSpec, dtype: torch.dtype,
                   source: HFSource | None = None,
                   tokenizer_dir: str | Path | None = None,
                   tokenizer_required: bool = True) -> None:
    """config.json, generation_config.json and tokenizer files of an export into `dst`
    (`tokenizer_dir` first, else the source's directory when it has them)."""
    (dst / "config.json").write_text(json.dumps(export_config(spec, dtype, source), indent=2,
                                                sort_keys=True) + "\n")
    gen = source.generation_config if source is not None else None
    if gen is None:
        gen = {"bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id,
               "pad_token_id": spec.pad_token_id}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, dst, required=tokenizer_required)
    elif source is not None and source.dir is not None:
        copy_tokenizer(source.dir, dst, required=False)


@contextlib.contextmanager
def atomic_dir(out: str | Path):
    """Yield a fresh hidden directory next to `out`; on success it replaces `out`, on any error
    it is removed (a failed export leaves neither a partial `out` nor debris)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
