"""Publishing the learner's weights to SGLang servers, as policy version v.

Distributed (default): the learner (rank 0) and every server rank join one extra process group
(gloo on CPU, NCCL on GPUs) that is separate from the learner's own world; for each bucket the
learner asks the servers to receive (`update_weights_from_distributed`, which blocks until the
broadcasts arrive) and broadcasts the tensors in the announced order. Disk (fallback): write a
complete HF model directory for the version and ask the servers to load it.
Both wrap the update in begin/end_weight_update and tag it with `weight_version = str(v)`.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import timedelta
from pathlib import Path
from typing import Iterable

import torch

from megatron_opd.serving.sglang_client import SGLangClient


def _buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int):
    bucket, size = [], 0
    for name, t in named:
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class DistributedWeightPublisher:
    def __init__(self, clients: list[SGLangClient], master_addr: str = "127.0.0.1",
                 master_port: int | None = None, backend: str = "gloo",
                 group_name: str = "megatron_opd_weights", server_world_size: int = 1,
                 bucket_bytes: int = 64 << 20, timeout_s: float = 300.0,
                 pause_mode: str | None = "retract"):
        from megatron_opd.serving.sglang_server import free_port

        self.clients, self.backend, self.group_name = clients, backend, group_name
        self.master_addr, self.master_port = master_addr, master_port or free_port(master_addr)
        self.server_world_size = server_world_size  # ranks per server (its TP size)
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        # SGLang holds a reader lock for every running request, so an update would wait for
        # in-flight generations to finish. Pausing with "retract" frees their KV cache and lets
        # them continue on the new weights (per-token versions record the switch); None waits.
        self.pause_mode = pause_mode
        self.group = None
        self._pool = ThreadPoolExecutor(max_workers=max(2, len(clients)))

    @property
    def world_size(self) -> int:
        return 1 + self.server_world_size * len(self.clients)

    def connect(self) -> None:
        """Form the update group: servers join in threads while this process hosts the store."""
        from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

        futures = [self._pool.submit(c.init_weights_update_group, self.master_addr, self.master_port,
                                     1 + i * self.server_world_size, self.world_size,
                                     self.group_name, self.backend)
                   for i, c in enumerate(self.clients)]
        timeout = timedelta(seconds=self.timeout_s)
        store = torch.distributed.TCPStore(self.master_addr, self.master_port, self.world_size,
                                           is_master=True, timeout=timeout)
        # Servers wrap the rendezvous store in PrefixStore(group_name); match it exactly.
        store = PrefixStore(self.group_name, store)
        self.group, _ = _new_process_group_helper(
            self.world_size, 0, [], Backend(self.backend), store, group_name=self.group_name,
            backend_options=None, timeout=timeout)
        _world.pg_group_ranks[self.group] = {i: i for i in range(self.world_size)}
        for f in futures:
            f.result(timeout=self.timeout_s)

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                flush_cache: bool = True) -> float:
        """Send every tensor; afterwards the servers answer with `weight_version == version`.
        The servers are paused and their update opened (HTTP round trips) in the background while
        the first bucket is produced (on a parallel learner: gathered by every rank), so
        generation runs on the old weights until there is something to send."""
        if self.group is None:
            raise RuntimeError("DistributedWeightPublisher.publish before connect()")
        t0 = time.time()
        paused, opened = [], []
        opening = self._pool.submit(self._open_update, paused, opened)
        try:
            for bucket in _buckets(named_tensors, self.bucket_bytes):
                opening.result(timeout=self.timeout_s)  # raises if pausing or beginning failed
                names = [n for n, _ in bucket]
                dtypes = [_dtype_name(t) for _, t in bucket]
                shapes = [list(t.shape) for _, t in bucket]
                futures = [self._pool.submit(c.update_weights_from_distributed, names, dtypes,
                                             shapes, self.group_name, str(version), flush_cache)
                           for c in self.clients]
                for _, t in bucket:
                    torch.distributed.broadcast(t.detach().contiguous(), src=0, group=self.group)
                for f in futures:
                    f.result(timeout=self.timeout_s)
            opening.result(timeout=self.timeout_s)  # (nothing to send: still report its error)
        finally:
            wait([opening], timeout=self.timeout_s)
            try:
                for c in opened:
                    c.end_weight_update()
            finally:
                for c in paused:
                    c.continue_generation()
        return time.time() - t0

    def _open_update(self, paused: list, opened: list) -> None:
        if self.pause_mode:
            for c in self.clients:
                c.pause_generation(self.pause_mode)
                paused.append(c)
        for c in self.clients:
            c.begin_weight_update()
            opened.append(c)

    def close(self) -> None:
        if self.group is not None:
            for c in self.clients:
                try:
                    c.destroy_weights_update_group(self.group_name)
                except Exception:
                    pass  # the server may already be gone at shutdown
            torch.distributed.destroy_process_group(self.group)
            self.group = None
        self._pool.shutdown(wait=False)


class DiskWeightPublisher:
    """Fallback: a complete HF model dir per version (written aside, then renamed into place)."""

    def __init__(self, clients: list[SGLangClient], directory: str | Path, base_model_dir: str | Path,
                 keep: int = 2):
        self.clients, self.directory = clients, Path(directory)
        self.base_model_dir, self.keep = Path(base_model_dir), keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                flush_cache: bool = True) -> float:
        from safetensors.torch import save_file

        t0 = time.time()
        final = self.directory / f"v{version:06d}"
        tmp = self.directory / f".v{version:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in self.base_model_dir.iterdir():  # config, tokenizer, generation config
            if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)
        save_file({n: t.detach().contiguous() for n, t in named_tensors}, str(tmp / "model.safetensors"))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for c in self.clients:
            c.begin_weight_update()
            try:
                c.update_weights_from_disk(str(final), str(version), flush_cache)
            finally:
                c.end_weight_update()
        for old in sorted(self.directory.glob("v*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return time.time() - t0

    def close(self) -> None:
        pass
