"""Offline OPD data (ALGORITHMS.md §9, Lightning OPD): student rollouts scored once by the teacher.

`megatron-opd precompute-teacher` (and `megatron-opd train` with `teacher.mode=offline`, when the
store is missing; both through megatron_opd/offline_build.py) samples `teacher.offline_samples`
responses of the student's *init* from the environment's training stream, with the live run's sampler (`rollout.*`, groups of `rollout.group_size`)
and rewards, scores them with the teacher (sampled-token log-prob, top-K when `teacher.top_k > 0`)
and stores them. Training then reads the store in order, cycling, and never asks the teacher.

Layout of a store directory:
    manifest.json      format, version, config hash, teacher revision, count, K, group size,
                       sampler, one entry per shard {file, count, sha256}
    shard-00000.npz    up to SHARD_SIZE samples as flat arrays + offsets (numpy .npz of plain
    ...                numeric / fixed-width unicode arrays; read with allow_pickle=False); each
                       sample's environment metadata as a JSON string

This module is the data format only: it starts no server and makes no request.

Writes are atomic: shards and then the manifest go into a temporary sibling directory that is
renamed into place at the end. A directory without a manifest (or whose shards do not match their
recorded hashes) is never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_opd import sample_fields
from megatron_opd.config import Config, to_dict
from megatron_opd.transport import Sample

FORMAT = "megatron-opd-offline"
# bump when what is stored, or how it is made, changes. 3: per-sample `teacher_temperature` (a
# version-2 store has none; it is refused, not read as 1)
OFFLINE_VERSION = 3
SHARD_SIZE = 1024
MANIFEST = "manifest.json"
# From the field table (megatron_opd/sample_fields.py): ragged Sample tensors, stored flat over
# the shard's samples ([sum P] or [sum T, ...]) with one offsets array per leading letter, and
# per-sample numbers ([n]). Besides these, a shard holds `group` (int64 [n]: group number in the
# store), `metadata` (JSON strings) and `finish_reason`.
_RAGGED_ARRAYS = sample_fields.stored_ragged()
_SAMPLE_ARRAYS = sample_fields.stored_per_sample()
_OFFSETS = {"P": "prompt_offsets", "T": "response_offsets"}
_LETTER = {f.name: f.shape[0] for f in sample_fields.FIELDS if f.name in _RAGGED_ARRAYS}
# The length of a sample along each ragged letter is that of the first stored array that has it.
_LENGTH_OF = {c: next(n for n in _RAGGED_ARRAYS if _LETTER[n] == c) for c in _OFFSETS}
# Sample tensors not stored: read back as version 0 (the init made them) or left out (optional).
_NOT_STORED = {"token_versions": lambda n: np.zeros(n, dtype=np.int64)}


class StoreError(RuntimeError):
    pass


# ------------------------------------------------------------------------------ identity
def store_config(cfg: Config) -> dict:
    """Everything that decides the stored data (the hash covers exactly this)."""
    from megatron_opd.envs import models_identity

    r, t = cfg.rollout, cfg.teacher
    return {"format": FORMAT, "version": OFFLINE_VERSION,
            "models": models_identity(cfg),  # teacher + student init
            "env": to_dict(cfg.env), "data": to_dict(cfg.data), "seed": cfg.run.seed,
            "rollout": {"temperature": r.temperature, "top_p": r.top_p,
                        "max_new_tokens": r.max_new_tokens, "group_size": r.group_size},
            "teacher": {"top_k": t.top_k, "revision": t.revision, "temperature": t.temperature,
                        "offline_samples": t.offline_samples},
            "server_dtype": cfg.server.dtype}


def store_key(cfg: Config) -> str:
    blob = json.dumps(store_config(cfg), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def store_path(cfg: Config) -> Path:
    """`teacher.offline_store`, or `<run.cache_dir>/offline/<store_key>` when it is empty."""
    if cfg.teacher.offline_store:
        return Path(cfg.teacher.offline_store).resolve()
    return (Path(cfg.run.cache_dir) / "offline" / store_key(cfg)).resolve()


# ------------------------------------------------------------------------------ writing
def _shard_arrays(samples: list[Sample], group_of: dict[str, int]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for letter, off in _OFFSETS.items():
        lengths = [len(getattr(s, _LENGTH_OF[letter])) for s in samples]
        out[off] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    for name, dtype in _RAGGED_ARRAYS.items():
        # [sum P], [sum T] or, for the top-K arrays, [sum T, K] (K may be 0)
        out[name] = np.concatenate([getattr(s, name) for s in samples]).astype(dtype)
    for name, dtype in _SAMPLE_ARRAYS.items():
        out[name] = np.asarray([getattr(s, name) for s in samples], dtype=dtype)
    out["group"] = np.asarray([group_of[s.group_id] for s in samples], dtype=np.int64)
    # fixed-width unicode arrays: plain numpy dtypes, no pickling involved
    out["metadata"] = np.asarray([json.dumps(s.metadata, sort_keys=True) for s in samples],
                                 dtype=np.str_)
    out["finish_reason"] = np.asarray([s.finish_reason for s in samples], dtype=np.str_)
    return out


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_store(path: str | Path, samples: list[Sample], config_hash: str,
                extra: dict | None = None) -> dict:
    """Write `samples` (whole groups, in order) as a store at `path`, atomically; returns the
    manifest. If a complete store appeared at `path` meanwhile, it is kept and returned."""
    path = Path(path)
    if not samples:
        raise StoreError("write_store: no samples")
    Ks = {s.teacher_topk_ids.shape[1] for s in samples}
    if len(Ks) != 1:
        raise StoreError(f"write_store: samples disagree on teacher top-K width {sorted(Ks)}")
    revisions = {s.teacher_revision for s in samples}
    if len(revisions) != 1:
        raise StoreError(f"write_store: several teacher revisions {sorted(revisions)}")
    group_of: dict[str, int] = {}
    for s in samples:
        group_of.setdefault(s.group_id, len(group_of))
    sizes = np.bincount([group_of[s.group_id] for s in samples])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        shards = []
        for i in range(0, len(samples), SHARD_SIZE):
            part = samples[i:i + SHARD_SIZE]
            buf = io.BytesIO()
            np.savez(buf, **_shard_arrays(part, group_of))
            data = buf.getvalue()
            name = f"shard-{i // SHARD_SIZE:05d}.npz"
            _fsync_write(tmp / name, data)
            shards.append({"file": name, "count": len(part),
                           "sha256": hashlib.sha256(data).hexdigest()})
        first = samples[0]
        manifest = {
            "format": FORMAT, "version": OFFLINE_VERSION, "config_hash": config_hash,
            "teacher_revision": first.teacher_revision, "count": len(samples),
            "top_k": int(first.teacher_topk_ids.shape[1]), "num_groups": len(group_of),
            "group_size": int(sizes.max()) if int(sizes.min()) == int(sizes.max()) else 0,
            "temperature": float(first.temperature), "top_p": float(first.top_p),
            "teacher_temperature": float(first.teacher_temperature),
            "policy_version": 0, "created_at": time.time(), "shards": shards, **(extra or {}),
        }
        # The manifest is written last, and the directory only appears under its name complete.
        _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        _clear_incomplete(path)
        try:
            tmp.rename(path)
        except OSError:
            if open_store(path) is None:  # not a complete store that won a race: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return open_store(path).manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _clear_incomplete(path: Path) -> None:
    """Remove what a crashed writer could have left at `path` (never a complete store and never
    anything that is not ours)."""
    if not path.exists() or (path / MANIFEST).exists():
        return
    if not path.is_dir() or any(not (p.is_file() and p.name.startswith("shard-"))
                                for p in path.iterdir()):
        raise StoreError(f"teacher.offline_store: {path} exists and is not an offline store")
    shutil.rmtree(path)


# ------------------------------------------------------------------------------ reading
@dataclass
class OfflineStore:
    path: Path
    manifest: dict

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    def _load_shard(self, entry: dict) -> dict[str, np.ndarray]:
        data = (self.path / entry["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StoreError(f"{self.path / entry['file']}: contents do not match the manifest")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except ValueError as e:  # an object array would need pickle: refused
            raise StoreError(f"{self.path / entry['file']}: {e}") from None

    def iter_samples(self) -> Iterator[tuple[int, Sample]]:
        """(group number, Sample) in store order; ids are the stored positions, versions 0."""
        n = 0
        revision = self.manifest["teacher_revision"]
        for entry in self.manifest["shards"]:
            z = self._load_shard(entry)
            offsets = {c: z[off] for c, off in _OFFSETS.items()}
            if any(len(o) != entry["count"] + 1 for o in offsets.values()):
                raise StoreError(f"{self.path / entry['file']}: count mismatch")
            for i in range(entry["count"]):
                span = {c: slice(int(o[i]), int(o[i + 1])) for c, o in offsets.items()}
                group = int(z["group"][i])
                tensors = {name: z[name][span[_LETTER[name]]] for name in _RAGGED_ARRAYS}
                scalars = {name: float(z[name][i]) for name in _SAMPLE_ARRAYS}
                t = span["T"].stop - span["T"].start
                yield group, Sample(
                    sample_id=f"stored-{n:09d}", group_id=f"stored-g{group:09d}",
                    **tensors, **{name: make(t) for name, make in _NOT_STORED.items()},
                    teacher_revision=revision, **scalars,
                    metadata={**json.loads(str(z["metadata"][i])), "offline": True},
                    finish_reason=str(z["finish_reason"][i]))
                n += 1

    def groups(self) -> Iterator[list[Sample]]:
        """Whole groups, in store order."""
        current, members = None, []
        for group, sample in self.iter_samples():
            if members and group != current:
                yield members
                members = []
            current = group
            members.append(sample)
        if members:
            yield members

    def training_groups(self, run_name: str) -> Iterator[list[Sample]]:
        """The store in order, cycling forever. Ids carry the cycle, so they stay unique across
        cycles (the learner de-duplicates by sample id) and a group of one cycle never merges
        with the same group of the next."""
        for cycle in range(1 << 62):
            for group in self.groups():
                for s in group:
                    s.sample_id = f"{run_name}-off-c{cycle}-{s.sample_id.removeprefix('stored-')}"
                    s.group_id = f"{run_name}-off-c{cycle}-{s.group_id.removeprefix('stored-')}"
                    s.created_at = time.time()
                yield group


def open_store(path: str | Path, expect_hash: str | None = None) -> OfflineStore | None:
    """The complete store at `path`, or None when there is none (no manifest: never used).
    Raises StoreError when the store was made from another config (`expect_hash`) or is not a
    store this build reads."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    if manifest.get("format") != FORMAT or manifest.get("version") != OFFLINE_VERSION:
        raise StoreError(f"{path}: not a version-{OFFLINE_VERSION} {FORMAT} store (format "
                         f"{manifest.get('format')!r}, version {manifest.get('version')!r}); "
                         "remove it to rebuild (`megatron-opd precompute-teacher`)")
    if expect_hash is not None and manifest.get("config_hash") != expect_hash:
        raise StoreError(f"teacher.offline_store: {path} holds data of another config (hash "
                         f"{manifest.get('config_hash')}, this config {expect_hash}); remove it "
                         "or point teacher.offline_store elsewhere")
    missing = [e["file"] for e in manifest["shards"] if not (path / e["file"]).is_file()]
    if missing:
        raise StoreError(f"{path}: shards missing: {missing}")
    return OfflineStore(path, manifest)
