"""Publishing the learner's weights to SGLang servers, as policy version v.

Distributed (default): the learner (rank 0) forms one extra process group (gloo on CPU, NCCL on
GPUs) with each server's ranks, separate from the learner's own world and from the other
servers'; for each bucket the learner asks every server to receive
(`update_weights_from_distributed`, which blocks until the broadcasts arrive) and broadcasts the
tensors in the announced order into every server's group (asynchronously, all at once).
A group per server, not one for the fleet: a server that dies while a broadcast is in flight
leaves the ranks still waiting on it in the same group blocked until the group's timeout
(measured with gloo: its peers' pending receives are not woken when the dead peer's or the
learner's connections close, whatever the learner does with the group: abort, shutdown,
destroy), and a survivor's scheduler cannot do anything else meanwhile. With a group each, the
dead server's broadcasts fail on their own (~0.3 s) and the others are unaffected. The price:
the learner sends each server its own copy (the same for one server; for a large fleet on
NCCL, one group's pipelined broadcast would send the learner's copy once). Disk (fallback): write a
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
the broadcast of tensor i; a stream that departs from the remembered one is an error. Pausing
and opening the update (HTTP round trips, in each server's own thread) overlap producing the
first tensors, which wait for it; the cache is flushed once, with the last bucket (the servers
stay paused between buckets).

A server that fails during an update (an HTTP error, a broadcast to it failing: a dead server
fails both at once) is dropped from that update and the others finish it: the publish returns,
having reached them. A dropped server rejoins at a later publish once it answers (a new group
on a fresh rendezvous port, then the full weights with everyone else); a restarted one comes
back with the student init at version 0 and is served the current weights then. Only when no
server got the version (a fleet of one, or all failed) does the publisher drain the weights it
was given (on a parallel learner every rank takes part in gathering them), wait for every
server to answer again, re-form the groups and raise `PublishInterrupted`:
`publish_with_retries` then gathers and sends the full weights again. The disk publisher keeps
the written directory and simply asks the restarted server to load it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


class _Failed(Exception):
    """A server dropped from this update (its own error is the cause)."""


class DistributedWeightPublisher:
    def __init__(self, clients: list[SGLangClient], master_addr: str = "127.0.0.1",
                 master_port: int | None = None, backend: str = "gloo",
                 group_name: str = "megatron_opd_weights", server_world_size: int = 1,
                 bucket_bytes: int = 64 << 20, timeout_s: float = 300.0,
                 pause_mode: str | None = "retract", reconnect_timeout_s: float = 0.0):
        from megatron_opd.serving.sglang_server import free_port

        self.clients, self.backend = clients, backend
        self.base_group_name = group_name
        # How long a publish that reached no server waits for them to answer again (a restart)
        # before giving up; 0: a failed publish raises its error (no reconnection).
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
        # One update group per server (see the module docstring); None: the server is out
        # (never joined, or failed an update) and rejoins at a publish once it answers.
        self.groups: list = [None] * len(clients)
        self.group_names = [self._name(i) for i in range(len(clients))]
        self._connected = False
        # Set to a dict to have each publish record where its time went (seconds, rank 0's
        # wall clock; bench/weight_sync.py prints them): see _Update.
        self.timings: dict | None = None
        self._stale: list = []  # groups of dropped servers, destroyed once their work ended
        self.dropped: list[str] = []  # servers dropped from an update (URL), for the record
        self._pool = ThreadPoolExecutor(max_workers=max(2, len(clients)))
        # one thread per server for its control and bucket requests: they reach it in order
        self._lanes = [ThreadPoolExecutor(max_workers=1) for _ in clients]

    def _name(self, i: int) -> str:
        name = self.base_group_name + (f"_r{self.reconnects}" if self.reconnects else "")
        return name if i == 0 else f"{name}_s{i}"

    # One server: the attributes callers knew (bench/_gpu_publish.py, tests)
    @property
    def group(self):
        return next((g for g in self.groups if g is not None), None)

    @group.setter
    def group(self, value) -> None:
        self.groups = [value] * len(self.clients)
        self._connected = value is not None

    @property
    def group_name(self) -> str:
        return self.group_names[0]

    @property
    def world_size(self) -> int:
        """Ranks of one server's update group: this process and the server's ranks."""
        return 1 + self.server_world_size

    def connect(self) -> None:
        """Form every server's update group (each joins from a thread while this process hosts
        its rendezvous)."""
        check_servers_for_mode(self.clients, self.pause_mode)
        for i in range(len(self.clients)):
            self._connect_one(i, self.master_port if i == 0 else None)
        self._connected = True

    def _connect_one(self, i: int, port: int | None = None) -> None:
        from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

        from megatron_opd.listeners import loopback_socket_env, tcp_store
        from megatron_opd.serving.sglang_server import free_port

        port = port or free_port(self.master_addr)
        name, c = self.group_names[i], self.clients[i]
        joined = self._pool.submit(c.init_weights_update_group, self.master_addr, port, 1,
                                   self.world_size, name, self.backend)
        # gloo/NCCL of this group listen on `lo` too when the rendezvous is on loopback
        os.environ.update(loopback_socket_env(self.master_addr))
        timeout = timedelta(seconds=self.timeout_s)
        # The rendezvous listens on master_addr only (loopback on one machine, the node's
        # address in a job), never on every interface as a plain TCPStore would.
        store = tcp_store(self.master_addr, port, self.world_size, is_master=True,
                          timeout=timeout)
        # Servers wrap the rendezvous store in PrefixStore(group_name); match it exactly.
        store = PrefixStore(name, store)
        group, _ = _new_process_group_helper(
            self.world_size, 0, [], Backend(self.backend), store, group_name=name,
            backend_options=None, timeout=timeout)
        _world.pg_group_ranks[group] = {r: r for r in range(self.world_size)}
        joined.result(timeout=self.timeout_s)
        self.groups[i] = group

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                flush_cache: bool = True) -> float:
        """Send every tensor; afterwards the servers answer with `weight_version == version`.
        Every server is paused and its update opened (HTTP round trips, in its own thread) while
        the first tensors are produced (on a parallel learner: gathered by every rank).

        A server that fails during the update is dropped from it and the others get the
        version; it rejoins (a new group, the full weights) at a later publish once it
        answers. Only when no server got the version does this reconnect and raise
        `PublishInterrupted`."""
        if not self._connected:
            raise RuntimeError("DistributedWeightPublisher.publish before connect()")
        t0 = time.time()
        self._rejoin(wait_s=0.0)
        source = _Source(named_tensors)
        try:
            if not any(g is not None for g in self.groups):
                raise SGLangError("no rollout server is in the update group")
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
        """Wait until every server answers (within reconnect_timeout_s), drop the old groups on
        every side, and form new ones on fresh rendezvous ports and group names."""
        for i, g in enumerate(self.groups):
            if g is not None:
                self._drop(i, None)
        self._rejoin(wait_s=self.reconnect_timeout_s, all_of_them=True)

    def _rejoin(self, wait_s: float, all_of_them: bool = False) -> None:
        """Servers out of the update that answer (within wait_s; all_of_them: every one must)
        get a new group; the others stay out."""
        out = [i for i, g in enumerate(self.groups) if g is None]
        if not out:
            return
        self._destroy_stale()
        back = []
        for i in out:
            c = self.clients[i]
            try:
                c.wait_ready(wait_s)
            except ServerUnavailable:
                if all_of_them:
                    raise
                continue
            try:  # a server that survived still holds its old group
                c.destroy_weights_update_group(self.group_names[i])
            except SGLangError:
                pass  # a restarted server has none
            back.append(i)
        if not back:
            return
        check_servers_for_mode([self.clients[i] for i in back], self.pause_mode)
        self.reconnects += 1
        for i in back:
            self.group_names[i] = self._name(i)
            self._connect_one(i)
            print(f"[weight_sync] {self.clients[i].url} joined the update group again "
                  f"({self.group_names[i]})", file=sys.stderr, flush=True)

    def _drop(self, i: int, works) -> None:
        """Server i is out of the update group (its group is destroyed once its works end)."""
        self._stale.append((self.groups[i], list(works or ())))
        self.groups[i] = None
        self._destroy_stale()

    def _destroy_stale(self) -> None:
        keep = []
        for group, works in self._stale:
            if all(w.is_completed() for w, _ in works):
                try:
                    torch.distributed.destroy_process_group(group)
                except Exception:
                    pass
            else:  # a hung peer: its work ends at the group's timeout
                keep.append((group, works))
        self._stale = keep

    def _send(self, source, version: int, flush_cache: bool) -> None:
        live = [i for i, g in enumerate(self.groups) if g is not None]
        flush = update_flushes_cache(self.pause_mode, flush_cache)
        u = _Update(self, live, version)
        t0 = time.perf_counter()
        try:
            if self.manifest is None:
                self._send_learning(source, u, flush)
            else:
                self._send_overlapped(source, u, flush)
            for i in live:  # (nothing to send: still report a failed opening)
                u.opened_ok(i, wait=True)
        finally:
            u.close()
            u.add("total_s", time.perf_counter() - t0)
        for i, e in u.errors.items():
            self._drop(i, u.works.get(i))
            self.dropped.append(self.clients[i].url)
            if u.ok:
                print(f"[weight_sync] {self.clients[i].url} failed during version {version} "
                      f"({e}); {len(u.ok)} other server(s) got it; it rejoins at a later "
                      "publish", file=sys.stderr, flush=True)
        if not u.ok or (u.errors and self.reconnect_timeout_s <= 0):
            raise u.first_error()  # (reconnect_timeout_s 0: any failure raises, as documented)

    def _send_learning(self, source, u: "_Update", flush: bool) -> None:
        """Bucket by bucket, each produced whole before it is announced; records the manifest."""
        manifest = []
        for bucket in _buckets(u.timed_iter(source), self.bucket_bytes):
            meta = [(n, _dtype_name(t), list(t.shape)) for n, t in bucket]
            u.announce(meta, flush)
            for _, t in bucket:
                u.broadcast(t.detach().contiguous())
            u.finish_bucket()
            manifest += meta
        self.manifest = manifest

    def _send_overlapped(self, source, u: "_Update", flush: bool) -> None:
        """Each bucket is announced from the manifest, then every tensor is broadcast
        asynchronously as soon as the stream yields it (the next one is produced meanwhile).
        Two buckets are in flight: bucket i+1 is announced (queued behind bucket i on each
        server), produced and broadcast while the servers still receive and load bucket i."""
        it = iter(source)
        buckets = list(_buckets(((m, (m[2], m[1])) for m in self.manifest),
                                self.bucket_bytes, nbytes=_meta_nbytes))
        for k, bucket in enumerate(buckets):
            meta = [m for m, _ in bucket]
            # the servers are paused until the last bucket is loaded: one flush, with it
            u.announce(meta, flush and k == len(buckets) - 1)
            for name, dtype, shape in meta:
                got = u.timed("produce_s", next, it, None)
                if got is None or got[0] != name or _dtype_name(got[1]) != dtype \
                        or list(got[1].shape) != shape:
                    self.manifest = None
                    raise RuntimeError(
                        f"weight stream departs from the first publish's at {name} "
                        f"{dtype}{shape}: got {_describe(got)}")
                u.broadcast(got[1].detach().contiguous())
            u.end_bucket()
            while len(u.buckets) > 1:
                u.finish_bucket(oldest=True)
        while u.buckets:
            u.finish_bucket(oldest=True)
        extra = u.timed("produce_s", next, it, None)
        if extra is not None:
            self.manifest = None
            raise RuntimeError(f"weight stream has more tensors than the first publish's: "
                               f"{_describe(extra)}")

    def close(self) -> None:
        for i, g in enumerate(self.groups):
            if g is not None:
                try:
                    self.clients[i].destroy_weights_update_group(self.group_names[i])
                except Exception:
                    pass  # the server may already be gone at shutdown
                torch.distributed.destroy_process_group(g)
                self.groups[i] = None
        self._destroy_stale()
        self._connected = False
        self._pool.shutdown(wait=False)
        for lane in self._lanes:
            lane.shutdown(wait=False)


class _Update:
    """One publish to the servers `live`: per server, its opening (pause, begin), its bucket
    requests (queued in its lane behind the opening), the broadcasts in its own group and
    its errors. A server that fails is dropped from the rest of the update; nothing waits
    on it again (a dead peer's broadcasts error out on their own).

    With `pub.timings` a dict, it is refilled with seconds per phase: produce_s (in the
    weights iterator: on a parallel learner, the gather), broadcast_s (issuing the async
    broadcasts), open_wait_s / finish_s / close_s (blocked on the servers: their opening,
    their bucket answers, end + continue), total_s; and, per server summed over servers (in
    their threads, overlapping the above): open_calls_s (pause + begin), update_calls_s
    (the bucket requests: receive, load, flush), close_calls_s (end + continue)."""

    def __init__(self, pub: DistributedWeightPublisher, live: list[int], version: int):
        self.pub, self.live, self.version = pub, live, version
        self.times = pub.timings
        if self.times is not None:
            self.times.clear()
            self.times.update(dict.fromkeys(
                ("produce_s", "broadcast_s", "open_wait_s", "finish_s", "close_s", "total_s",
                 "open_calls_s", "update_calls_s", "close_calls_s"), 0.0))
        self.errors: dict[int, BaseException] = {}
        self.paused: set[int] = set()
        self.begun: set[int] = set()
        self.works: dict[int, list] = {i: [] for i in live}
        self.backlog: dict[int, list] = {i: [] for i in live}  # produced before it opened
        self.buckets: list[dict] = []  # in flight: {server: HTTP future}
        self.opening = {i: pub._lanes[i].submit(self._open, i) for i in live}

    def add(self, key: str, dt: float) -> None:
        if self.times is not None:
            self.times[key] += dt  # (one writer per key at a time: float adds under the GIL)

    def timed(self, key: str, fn, *args):
        if self.times is None:
            return fn(*args)
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.times[key] += time.perf_counter() - t0

    def timed_iter(self, it):
        it = iter(it)
        while True:
            try:
                item = self.timed("produce_s", next, it)
            except StopIteration:
                return
            yield item

    def _open(self, i: int) -> None:
        t0 = time.perf_counter()
        try:
            self._open_calls(i)
        finally:
            self.add("open_calls_s", time.perf_counter() - t0)

    def _open_calls(self, i: int) -> None:
        c = self.pub.clients[i]
        paused = []
        try:
            pause_servers([c], self.pub.pause_mode, paused)
        finally:
            if paused:
                self.paused.add(i)
        c.begin_weight_update()
        self.begun.add(i)

    @property
    def ok(self) -> list[int]:
        return [i for i in self.live if i not in self.errors]

    def first_error(self) -> BaseException:
        return self.errors[min(self.errors)]

    def fail(self, i: int, e: BaseException) -> None:
        self.errors.setdefault(i, e)
        self.backlog[i] = []

    def opened_ok(self, i: int, wait: bool = False) -> bool | None:
        """True once server i is paused and its update begun; None while it is opening."""
        if i in self.errors:
            return False
        f = self.opening[i]
        if not wait and not f.done():
            return None
        try:
            f.result(timeout=self.pub.timeout_s)
            return True
        except Exception as e:
            self.fail(i, e)
            return False

    def announce(self, meta, flush: bool) -> None:
        """Every server starts receiving one bucket (its HTTP call returns once it is loaded),
        in its lane: after its opening, and only if that succeeded."""
        names, dtypes, shapes = (list(x) for x in zip(*meta))

        def request(i):
            if not self.opening[i].done() or self.opening[i].exception() is not None:
                raise _Failed("its update did not open")
            self.timed("update_calls_s", self.pub.clients[i].update_weights_from_distributed,
                       names, dtypes, shapes, self.pub.group_names[i], str(self.version), flush)
        self.buckets.append({i: self.pub._lanes[i].submit(request, i) for i in self.ok})

    def broadcast(self, t: torch.Tensor) -> None:
        """Send t to every server whose update is open (async); hold it for the others."""
        for i in self.ok:
            self.backlog[i].append(t)
            if self.opened_ok(i):
                self._flush(i)

    def _flush(self, i: int) -> None:
        t0 = time.perf_counter()
        group = self.pub.groups[i]
        for t in self.backlog[i]:
            self.works[i].append(
                (torch.distributed.broadcast(t, src=0, group=group, async_op=True), t))
        self.backlog[i] = []
        self.add("broadcast_s", time.perf_counter() - t0)

    def end_bucket(self) -> None:
        """The bucket is produced: a server still opening gets it once open."""
        for i in self.ok:
            if self.backlog[i] and self.timed("open_wait_s", self.opened_ok, i, True):
                self._flush(i)

    def finish_bucket(self, oldest: bool = False) -> None:
        """Wait for the oldest (or only) bucket in flight: its broadcasts, then every server's
        answer (received and loaded). A server that fails is dropped."""
        if not oldest:
            self.end_bucket()
        t0 = time.perf_counter()
        try:
            self._finish_bucket()
        finally:
            self.add("finish_s", time.perf_counter() - t0)

    def _finish_bucket(self) -> None:
        futures = self.buckets.pop(0)
        for i, f in futures.items():
            if i in self.errors:
                continue
            try:
                f.result(timeout=self.pub.timeout_s)
                # (answered: it received every tensor, so these broadcasts have ended)
                works, self.works[i] = self.works[i], []
                for w, _ in works:
                    w.wait()
            except Exception as e:
                self.opened_ok(i, wait=True)  # (its opening's error, if that is what failed)
                self.fail(i, e)

    def close(self) -> None:
        """Every server that was paused resumes and every opened update ends, even after a
        failure (a dead server's calls fail at once; their errors are not reported)."""
        t0 = time.perf_counter()
        for i in self.live:
            try:
                self.opening[i].result(timeout=self.pub.timeout_s)
            except Exception as e:
                self.fail(i, e)
        self.add("open_wait_s", time.perf_counter() - t0)

        def close_one(i) -> None:
            c = self.pub.clients[i]
            for done, call in ((self.begun, c.end_weight_update),
                               (self.paused, c.continue_generation)):
                if i in done:
                    try:
                        self.timed("close_calls_s", call)
                    except Exception as e:
                        self.fail(i, e)
        self.timed("close_s", lambda: list(self.pub._pool.map(close_one, self.live)))


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
