"""Publishing the learner's weights to SGLang servers, as policy version v.

Distributed (default): the learner (rank 0) and every server rank join one extra process group
(gloo on CPU, NCCL on GPUs) that is separate from the learner's own world; for each bucket the
learner asks the servers to receive (`update_weights_from_distributed`, which blocks until the
broadcasts arrive) and broadcasts the tensors in the announced order. Disk (fallback): write a
complete HF model directory for the version and ask the servers to load it.
Both wrap the update in begin/end_weight_update and tag it with `weight_version = str(v)`,
and reach every rollout server of the fleet.

Pause modes (`weight_sync.pause_mode`): around the update every server is paused with the mode,
then resumed. retract: running requests' KV is freed and recomputed with the new weights (the
cache is flushed with the update). abort: running requests return their partial output
(serving/resume.py continues them). in_place: running requests keep their KV cache from the old
weights, so the update cannot flush it (SGLang refuses a flush while requests run): it is sent
with flush_cache=False, and the servers must run without a prefix cache (checked: a finished
request's cached prefix would otherwise serve new requests with KV of older weights).

Overlap: the distributed publisher remembers the (name, dtype, shape) of every tensor of its
first publish (the stream's order is fixed by the model and layout). Later publishes announce
each bucket to the servers before its tensors exist and broadcast every tensor asynchronously
as soon as it is produced, so producing (on a parallel learner: gathering) tensor i+1 overlaps
the broadcast of tensor i; a stream that departs from the remembered one is an error.

A server that dies and is restarted by the launcher (docs/fault-tolerance.md) comes back with the
student init at version 0 and outside the update group. The next publish then fails (HTTP
connection errors, or the gloo broadcast to the dead peer); the distributed publisher drains the
weights it was given (on a parallel learner every rank takes part in gathering them), waits for
every server to answer again, re-forms the update group on a fresh rendezvous port and raises
`PublishInterrupted`: `publish_with_retries` then gathers and sends the full weights again. The
disk publisher keeps the written directory and simply asks the restarted server to load it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import timedelta
from pathlib import Path
from typing import Iterable

import torch

from megatron_opd.serving.sglang_client import SGLangClient, SGLangError, ServerUnavailable


PAUSE_MODES = ("abort", "retract", "in_place")


def pause_servers(clients, mode: str | None, paused: list | None = None) -> None:
    """Pause every server with `mode` (None: no pause; then an update waits for the running
    requests to finish). Abort mode aborts first: SGLang's abort-mode pause re-checks for
    running requests only once a second."""
    if mode is not None and mode not in PAUSE_MODES:
        raise ValueError(f"weight_sync.pause_mode: {mode!r} is not one of {PAUSE_MODES}")
    for c in clients if mode else ():
        if mode == "abort":
            c.abort_all()
        c.pause_generation(mode)
        if paused is not None:
            paused.append(c)


def update_flushes_cache(mode: str | None, flush_cache: bool = True) -> bool:
    """in_place keeps running requests (and their KV): SGLang cannot flush then."""
    return flush_cache and mode != "in_place"


def check_servers_for_mode(clients, mode: str | None) -> None:
    """in_place needs servers without a prefix cache (see the module docstring)."""
    if mode != "in_place":
        return
    for c in clients:
        if not c.server_info().get("disable_radix_cache"):
            raise ValueError(
                f"weight_sync.pause_mode=in_place: rollout server {c.url} runs with a prefix "
                "(radix) cache, which would serve new requests KV computed by older weights; "
                "start it with --disable-radix-cache or choose pause_mode retract or abort")


class PublishInterrupted(RuntimeError):
    """A server failed during publish; the update group was re-formed with the servers as they
    are now. Publish the full weights again (`publish_with_retries`)."""


class _Source:
    """The weights iterator, remembering whether it raised itself (then nothing is retried)."""

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]]):
        self._it, self.failed = iter(named), False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            raise
        except BaseException:
            self.failed = True
            raise

    def drain(self) -> None:
        for _ in self:
            pass


def _tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _meta_nbytes(shape_dtype) -> int:
    shape, dtype = shape_dtype
    n = 1
    for d in shape:
        n *= int(d)
    return n * getattr(torch, dtype).itemsize


def _describe(got) -> str:
    return "the end of the stream" if got is None else \
        f"{got[0]} {_dtype_name(got[1])}{list(got[1].shape)}"


def _buckets(named: Iterable[tuple[str, object]], bucket_bytes: int, nbytes=_tensor_nbytes):
    """Consecutive groups of at least bucket_bytes (the last one smaller)."""
    bucket, size = [], 0
    for name, t in named:
        bucket.append((name, t))
        size += nbytes(t)
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
                 pause_mode: str | None = "retract", reconnect_timeout_s: float = 0.0):
        from megatron_opd.serving.sglang_server import free_port

        self.clients, self.backend, self.group_name = clients, backend, group_name
        self.base_group_name = group_name
        # How long a failed publish waits for every server to answer again (a restart) before
        # giving up; 0: a failed publish raises its error (no reconnection).
        self.reconnect_timeout_s = reconnect_timeout_s
        self.reconnects = 0
        self.master_addr, self.master_port = master_addr, master_port or free_port(master_addr)
        self.server_world_size = server_world_size  # ranks per server (its TP size)
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        # SGLang holds a reader lock for every running request, so an update would wait for
        # in-flight generations to finish. Pausing with "retract" frees their KV cache and lets
        # them continue on the new weights (per-token versions record the switch); None waits.
        if pause_mode is not None and pause_mode not in PAUSE_MODES:
            raise ValueError(f"weight_sync.pause_mode: {pause_mode!r} is not one of {PAUSE_MODES}")
        self.pause_mode = pause_mode
        # [(name, dtype, shape)] of the stream, learnt on the first publish (see module doc)
        self.manifest: list[tuple[str, str, list[int]]] | None = None
        self.group = None
        self._pool = ThreadPoolExecutor(max_workers=max(2, len(clients)))
        # one thread per server for its bucket requests: they reach it in bucket order
        self._lanes = [ThreadPoolExecutor(max_workers=1) for _ in clients]

    @property
    def world_size(self) -> int:
        return 1 + self.server_world_size * len(self.clients)

    def connect(self) -> None:
        """Form the update group: servers join in threads while this process hosts the store."""
        from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

        check_servers_for_mode(self.clients, self.pause_mode)

        futures = [self._pool.submit(c.init_weights_update_group, self.master_addr, self.master_port,
                                     1 + i * self.server_world_size, self.world_size,
                                     self.group_name, self.backend)
                   for i, c in enumerate(self.clients)]
        from megatron_opd.listeners import loopback_socket_env, tcp_store

        # gloo/NCCL of this group listen on `lo` too when the rendezvous is on loopback
        os.environ.update(loopback_socket_env(self.master_addr))
        timeout = timedelta(seconds=self.timeout_s)
        # The rendezvous listens on master_addr only (loopback on one machine, the node's
        # address in a job), never on every interface as a plain TCPStore would.
        store = tcp_store(self.master_addr, self.master_port, self.world_size, is_master=True,
                          timeout=timeout)
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
        source = _Source(named_tensors)
        try:
            self._send(source, version, flush_cache)
        except Exception as e:
            if source.failed or self.reconnect_timeout_s <= 0:
                raise
            source.drain()  # the other learner ranks gather every tensor with us
            print(f"[weight_sync] publishing version {version} failed ({e}); reconnecting",
                  file=sys.stderr, flush=True)
            self.reconnect()
            raise PublishInterrupted(f"publishing version {version} failed ({e}); the update "
                                     "group was re-formed: publish again") from e
        return time.time() - t0

    def reconnect(self) -> None:
        """Wait until every server answers (within reconnect_timeout_s), drop the old group on
        every side, and form a new one on a fresh rendezvous port and group name."""
        from megatron_opd.serving.sglang_server import free_port

        if self.group is not None:
            try:
                torch.distributed.destroy_process_group(self.group)
            except Exception:
                pass
            self.group = None
        for c in self.clients:
            c.wait_ready(self.reconnect_timeout_s)
            try:  # a server that survived still holds the old group
                c.destroy_weights_update_group(self.group_name)
            except SGLangError:
                pass  # a restarted server has none
        self.reconnects += 1
        self.group_name = f"{self.base_group_name}_r{self.reconnects}"
        self.master_port = free_port(self.master_addr)
        self.connect()

    def _send(self, named_tensors, version: int, flush_cache: bool) -> None:
        paused, opened = [], []
        opening = self._pool.submit(self._open_update, paused, opened)
        flush = update_flushes_cache(self.pause_mode, flush_cache)
        sent = False
        try:
            if self.manifest is None:
                self._send_learning(named_tensors, version, flush, opening)
            else:
                self._send_overlapped(named_tensors, version, flush, opening)
            opening.result(timeout=self.timeout_s)  # (nothing to send: still report its error)
            sent = True
        finally:
            wait([opening], timeout=self.timeout_s)

            def close(c) -> list:  # every server resumes, even if one of them failed
                errs = []
                for done, call in ((opened, c.end_weight_update), (paused, c.continue_generation)):
                    if c in done:
                        try:
                            call()
                        except Exception as e:
                            errs.append(e)
                return errs

            errors = [e for errs in self._pool.map(close, self.clients) for e in errs]
            if sent and errors:  # (after a failure, the first error is the one that matters)
                raise errors[0]

    def _announce(self, bucket_meta, version: int, flush: bool) -> list:
        """Every server starts receiving one bucket (its HTTP call returns once it is loaded)."""
        names, dtypes, shapes = (list(x) for x in zip(*bucket_meta))
        return [lane.submit(c.update_weights_from_distributed, names, dtypes, shapes,
                            self.group_name, str(version), flush)
                for lane, c in zip(self._lanes, self.clients)]

    def _send_learning(self, named_tensors, version: int, flush: bool, opening) -> None:
        """Bucket by bucket, each produced whole before it is announced; records the manifest."""
        manifest = []
        for bucket in _buckets(named_tensors, self.bucket_bytes):
            opening.result(timeout=self.timeout_s)  # raises if pausing or beginning failed
            meta = [(n, _dtype_name(t), list(t.shape)) for n, t in bucket]
            futures = self._announce(meta, version, flush)
            for _, t in bucket:
                torch.distributed.broadcast(t.detach().contiguous(), src=0, group=self.group)
            for f in futures:
                f.result(timeout=self.timeout_s)
            manifest += meta
        self.manifest = manifest

    def _send_overlapped(self, named_tensors, version: int, flush: bool, opening) -> None:
        """Each bucket is announced from the manifest, then every tensor is broadcast
        asynchronously as soon as the stream yields it (the next one is produced meanwhile).
        Two buckets are in flight: bucket i+1 is announced (queued behind bucket i on each
        server), produced and broadcast while the servers still receive and load bucket i."""
        it = iter(named_tensors)
        inflight = []  # per bucket: (HTTP futures, [(work, tensor)]): tensors live until sent
        try:
            for bucket in _buckets(((m, (m[2], m[1])) for m in self.manifest),
                                   self.bucket_bytes, nbytes=_meta_nbytes):
                meta = [m for m, _ in bucket]
                opening.result(timeout=self.timeout_s)
                pending = []
                inflight.append((self._announce(meta, version, flush), pending))
                for name, dtype, shape in meta:
                    got = next(it, None)
                    if got is None or got[0] != name or _dtype_name(got[1]) != dtype \
                            or list(got[1].shape) != shape:
                        self.manifest = None
                        raise RuntimeError(
                            f"weight stream departs from the first publish's at {name} "
                            f"{dtype}{shape}: got {_describe(got)}")
                    t = got[1].detach().contiguous()
                    pending.append((torch.distributed.broadcast(t, src=0, group=self.group,
                                                                async_op=True), t))
                while len(inflight) > 1:
                    self._finish(*inflight.pop(0))
            while inflight:
                self._finish(*inflight.pop(0))
        finally:
            # After an error, the broadcasts already queued finish (their tensors live till
            # then). A bucket announced but not wholly produced leaves the servers waiting for
            # the rest until the update group's timeout: a stream that fails midway (a gather
            # error) is fatal to the learner anyway, and loading a partial bucket would be worse.
            for _, pending in inflight:
                for work, _ in pending:
                    work.wait()
        extra = next(it, None)
        if extra is not None:
            self.manifest = None
            raise RuntimeError(f"weight stream has more tensors than the first publish's: "
                               f"{_describe(extra)}")

    def _finish(self, futures, pending) -> None:
        for work, _ in pending:
            work.wait()
        for f in futures:
            f.result(timeout=self.timeout_s)

    def _open_update(self, paused: list, opened: list) -> None:
        pause_servers(self.clients, self.pause_mode, paused)
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
        for lane in self._lanes:
            lane.shutdown(wait=False)


def publish_with_retries(make_weights, publisher, version: int, attempts: int = 1,
                         flush_cache: bool = True) -> float:
    """Publish `version`, gathering and sending the full weights again after a server fault.

    Called by every learner rank: `make_weights()` streams the weights (on a parallel learner
    every rank takes part in gathering them); `publisher` is rank 0's (None on the others). After
    `PublishInterrupted` (the publisher already re-formed its update group) all ranks go round
    again, at most `attempts` times in all; rank 0 tells the others by a broadcast."""
    import torch.distributed as dist

    t0 = time.time()
    for attempt in range(attempts):
        weights, again = make_weights(), False
        if publisher is not None:
            try:
                publisher.publish(weights, version, flush_cache)
            except PublishInterrupted:
                if attempt + 1 >= attempts:
                    raise
                again = True
        else:
            for _ in weights:
                pass
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([int(again)], dtype=torch.int64)
            dist.broadcast(flag, src=0)
            again = bool(flag.item())
        if not again:
            break
    return time.time() - t0


class DiskWeightPublisher:
    """Fallback: a complete HF model dir per version (written aside, then renamed into place)."""

    def __init__(self, clients: list[SGLangClient], directory: str | Path, base_model_dir: str | Path,
                 keep: int = 2, reconnect_timeout_s: float = 0.0,
                 pause_mode: str | None = "retract"):
        if pause_mode is not None and pause_mode not in PAUSE_MODES:
            raise ValueError(f"weight_sync.pause_mode: {pause_mode!r} is not one of {PAUSE_MODES}")
        self.clients, self.directory = clients, Path(directory)
        self.pause_mode, self._checked = pause_mode, False
        # A server that does not answer (restarting) is waited for this long, then asked again
        # to load the version's directory; 0: its error raises at once.
        self.reconnect_timeout_s = reconnect_timeout_s
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
        if not self._checked:
            check_servers_for_mode(self.clients, self.pause_mode)
            self._checked = True
        paused = []
        try:
            for c in self.clients:
                try:
                    pause_servers([c], self.pause_mode, paused)
                except ServerUnavailable:  # restarting: nothing runs there; _load waits for it
                    if self.reconnect_timeout_s <= 0:
                        raise
            for c in self.clients:
                self._load(c, final, version, update_flushes_cache(self.pause_mode, flush_cache))
        finally:
            errors = []
            for c in paused:  # every paused server resumes, even after a failure
                try:
                    c.continue_generation()
                except Exception as e:
                    errors.append(e)
        if errors:
            raise errors[0]
        for old in sorted(self.directory.glob("v*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return time.time() - t0

    def _load(self, c: SGLangClient, path: Path, version: int, flush_cache: bool) -> None:
        for attempt in range(3):
            try:
                c.begin_weight_update()
                try:
                    c.update_weights_from_disk(str(path), str(version), flush_cache)
                finally:
                    c.end_weight_update()
                return
            except ServerUnavailable as e:
                if self.reconnect_timeout_s <= 0 or attempt == 2:
                    raise
                print(f"[weight_sync] loading version {version} on {c.url} failed ({e}); "
                      "waiting for the server", file=sys.stderr, flush=True)
                c.wait_ready(self.reconnect_timeout_s)

    def close(self) -> None:
        pass
