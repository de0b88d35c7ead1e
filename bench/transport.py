"""Sample channel throughput vs raw pyzmq multipart sends of the same bytes (issue 5).

    OMP_NUM_THREADS=1 .venv/bin/python bench/transport.py [--sizes 4K,64K,1M,16M]
        [--rounds 5] [--total-mb 128] [--credit 8] [--batch 64]

Two processes on this machine, real TCP on loopback. The receiver process binds five sockets:
a raw ZeroMQ ROUTER (baseline) and four `SampleServer`s (no MAC, HMAC-SHA256, Poly1305, keyed
BLAKE3). The sender process (this one) has a raw DEALER and one `SampleClient` per server
(`batch_max=--batch`, `batch_bytes` 1 MiB: samples under 1 MiB travel several to a message,
bigger ones alone). Same socket types (DEALER → ROUTER), same high-water marks (= the credit
window) on both paths.

One measurement: N samples of one payload size (N * size ~= --total-mb), timed from the first
send until the receiver has everything:
- raw: one `send_multipart(frames, copy=False)` per sample of the frames `encode(sample)`
  produced (the same bytes: header + tensor buffers), then an END message the receiver answers
  after counting N;
- channel modes: `SampleClient.send` (validate, encode, MAC, credit) → `SampleServer.recv`
  (size check, MAC, decode, validate, dedup, credit back) and `ack` of what one burst of
  `recv` calls returned (a learner acks a step's or a checkpoint's samples at once); timed until
  `wait_acked` returns.
Rounds interleave the modes (rotated order each round); the reported ratio is the median over
rounds of raw time / mode time measured in the same round (>= 0.8 is the goal: the channel
delivers at least 80 % of raw throughput).

Zero-copy is asserted, not assumed: on the send side every tensor of 64 KiB or more is handed to
ZeroMQ as a memoryview over the sample's own array memory (smaller parts are packed into one
frame: pyzmq copies frames under 64 KiB anyway); on the receive side the first sample of every
mode has its arrays inside the received `zmq.Frame` buffers (`np.shares_memory`). The script
exits 1 when a check fails. It also measures the MAC algorithms alone (in-process, 16 MiB) to
explain the cost of authentication. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np
import psutil
import zmq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_opd.transport import (  # noqa: E402
    Sample, SampleClient, SampleServer, encode, free_tcp_endpoint, generate_secret,
)
from megatron_opd.transport.zmq_link import PACK_BELOW  # noqa: E402

MODES = ("raw", "none", "hmac-sha256", "poly1305", "blake3")


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KMG" else s) * mult)


def make_payload(size: int, K: int = 32) -> Sample:
    """A Sample whose frames total about `size` bytes: teacher top-K ids + log-probs (8 bytes
    per token and K) plus the per-token arrays (21 bytes per token)."""
    T = max(1, round(size / (8 * K + 21)))
    rng = np.random.default_rng(T)
    return Sample(
        sample_id="x", group_id="g", prompt_ids=np.arange(16, dtype=np.int32),
        response_ids=rng.integers(0, 150_000, T).astype(np.int32),
        loss_mask=np.ones(T, dtype=np.uint8),
        behaviour_logprobs=-rng.random(T, dtype=np.float32),
        token_versions=np.zeros(T, dtype=np.int64),
        teacher_logprobs=-rng.random(T, dtype=np.float32),
        teacher_topk_ids=rng.integers(0, 150_000, (T, K)).astype(np.int32),
        teacher_topk_logprobs=-rng.random((T, K), dtype=np.float32))


def nbytes(frames) -> int:
    return sum(memoryview(f).nbytes for f in frames)


def tensors_of(s: Sample) -> list[np.ndarray]:
    return [getattr(s, n) for n in Sample.TENSORS if getattr(s, n) is not None]


def frame_of(arr: np.ndarray):
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) and isinstance(base.obj, zmq.Frame) else None


def received_zero_copy(s: Sample) -> bool:
    for arr in tensors_of(s):
        if arr.size == 0:
            continue
        f = frame_of(arr)
        if f is None or not np.shares_memory(arr, np.frombuffer(f.buffer, dtype=np.uint8)):
            return False
    return True


# ------------------------------------------------------------------------------- receiver
def serve(eps: dict, key: bytes, credit: int, conn, modes: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.ROUTER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVHWM, credit)
    raw.bind(eps["raw"])
    servers = {}
    for mode in modes[1:]:
        kw = {} if mode == "none" else {"secret": key, "mac": mode}
        servers[mode] = SampleServer(eps[mode], credit=credit, rcvhwm=credit,
                                     max_message_bytes=64 << 20, **kw)
    poller = zmq.Poller()
    poller.register(raw, zmq.POLLIN)
    for s in servers.values():
        poller.register(s.sock, zmq.POLLIN)
    checks, count = {}, 0
    conn.send("ready")
    while True:
        events = dict(poller.poll(50))
        if conn.poll():
            conn.recv()
            break
        if raw in events:
            while raw.poll(0):
                frames = raw.recv_multipart(copy=False)
                if len(frames) == 2 and frames[1].bytes == b"END":
                    raw.send_multipart([frames[0].bytes, str(count).encode()])
                    count = 0
                else:
                    count += 1
        for mode, srv in servers.items():
            if srv.sock in events:
                ids = []  # like a learner: take what is there, then ack it in one go
                while (s := srv.recv(timeout_ms=0)) is not None:
                    if mode not in checks:
                        checks[mode] = received_zero_copy(s)
                    ids.append(s.sample_id)
                srv.ack(ids)
    conn.send({"zero_copy_recv": checks,
               "server_stats": {m: {k: v for k, v in s.stats.items() if k != "session"}
                                for m, s in servers.items()}})


# --------------------------------------------------------------------------------- sender
def mac_speed(n_bytes: int = 16 << 20, reps: int = 5) -> dict:
    data, key = os.urandom(n_bytes), generate_secret()
    out = {"hmac-sha256": lambda: hmac.new(key, data, hashlib.sha256).digest(),
           "blake2b-keyed": lambda: hashlib.blake2b(data, key=key, digest_size=32).digest()}
    try:
        from blake3 import blake3
        out["blake3-keyed"] = lambda: blake3(data, key=key).digest()  # one thread, as used
        out["blake3-keyed-all-threads"] = lambda: blake3(data, key=key,
                                                         max_threads=blake3.AUTO).digest()
    except ImportError:
        pass
    try:
        from cryptography.hazmat.primitives.poly1305 import Poly1305
        out["poly1305"] = lambda: Poly1305.generate_tag(key, data)
    except ImportError:
        pass
    res = {}
    for name, f in out.items():
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        res[name] = round(n_bytes / statistics.median(ts) / 1e9, 3)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4K,64K,1M,16M")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--total-mb", type=float, default=128)
    ap.add_argument("--credit", type=int, default=128)  # transport.credit's default
    ap.add_argument("--batch", type=int, default=64, help="SampleClient batch_max")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    modes = ["raw", "none", "hmac-sha256"]
    for m, pkg in (("poly1305", "cryptography"), ("blake3", "blake3")):
        try:
            __import__(pkg)
            modes.append(m)
        except ImportError:
            print(f"{m}: not measured ({pkg} is not installed)")
    modes = tuple(modes)
    key = generate_secret()
    eps = {m: free_tcp_endpoint() for m in MODES}
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=serve, args=(eps, key, args.credit, child, modes))
    proc.start()
    assert parent.recv() == "ready"
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.SNDHWM, args.credit)
    raw.connect(eps["raw"])
    clients = {}
    for m in modes[1:]:
        kw = {} if m == "none" else {"secret": key, "mac": m}
        clients[m] = SampleClient(eps[m], sndhwm=args.credit, name=f"bench-{m}",
                                  batch_max=args.batch, batch_bytes=1 << 20, **kw)
    for m, c in clients.items():  # handshake
        deadline = time.time() + 10
        while c.credit == 0 and time.time() < deadline:
            c.poll(timeout_ms=20)
        assert c.credit > 0, f"{m}: no credit"

    failures, counter = [], [0]
    # send-side zero-copy: the frames given to ZeroMQ (a batch: [auth], index, packed, big
    # tensors) hold every tensor of >= 64 KiB as a view of the sample's own array
    probe = make_payload(1 << 20)
    for m, c in clients.items():
        frames = c._sealed_batch([encode(probe)])
        big_frames = frames[2:] if m == "none" else frames[3:]
        big = [a for a in tensors_of(probe) if a.nbytes >= PACK_BELOW]
        ok = len(big) == len(big_frames) >= 1 and all(
            isinstance(f, memoryview) and np.shares_memory(
                np.frombuffer(f, dtype=np.uint8), a.view(np.uint8).reshape(-1))
            for f, a in zip(big_frames, big))
        if not ok:
            failures.append(f"send-side copy in mode {m}")

    receiver = psutil.Process(proc.pid)

    def cpu_now() -> float:  # CPU seconds of both processes, every thread (ZeroMQ I/O included)
        t = receiver.cpu_times()
        return time.process_time() + t.user + t.system

    cpu_used = {}

    def run(mode: str, sample: Sample, n: int) -> float:
        c0 = cpu_now()
        dt = _run(mode, sample, n)
        cpu_used.setdefault(mode, []).append(cpu_now() - c0)
        return dt

    def _run(mode: str, sample: Sample, n: int) -> float:
        if mode == "raw":
            frames = encode(sample)
            t = time.perf_counter()
            for _ in range(n):
                raw.send_multipart(frames, copy=False)
            raw.send(b"END")
            got = int(raw.recv())
            dt = time.perf_counter() - t
            if got != n:
                failures.append(f"raw: {got} of {n} arrived")
            return dt
        c = clients[mode]
        batch = []  # made before the clock starts (they share the arrays): raw builds nothing
        for _ in range(n):
            counter[0] += 1
            batch.append(dataclasses.replace(sample, sample_id=f"b-{counter[0]:012d}"))
        t = time.perf_counter()
        for s in batch:
            if not c.send(s, timeout_ms=60_000):
                failures.append(f"{mode}: send timed out")
                return float("nan")
        if not c.wait_acked(120):
            failures.append(f"{mode}: not all acked")
        return time.perf_counter() - t

    results = {}
    for size in sizes:
        sample = make_payload(size)
        msg_bytes = nbytes(encode(sample))
        n = int(min(3000, max(12, args.total_mb * (1 << 20) / msg_bytes)))
        for m in modes:  # warm-up
            run(m, sample, max(2, n // 10))
        times = {m: [] for m in modes}
        cpu_used.clear()
        for r in range(args.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for m in order:
                times[m].append(run(m, sample, n))
        row = {"message_bytes": msg_bytes, "n": n}
        for m in modes:
            row[f"{m}_GBps"] = round(n * msg_bytes / statistics.median(times[m]) / 1e9, 3)
            # CPU seconds per GB moved (both processes) and cores busy while it ran
            row[f"{m}_cpu_s_per_GB"] = round(statistics.median(
                cpu_used[m][-args.rounds:]) / (n * msg_bytes / 1e9), 3)
            row[f"{m}_cores_busy"] = round(statistics.median(
                c / t for c, t in zip(cpu_used[m][-args.rounds:], times[m])), 2)
            if m != "raw":
                ratios = [tr / tm for tr, tm in zip(times["raw"], times[m])]
                row[f"{m}_ratio"] = round(statistics.median(ratios), 3)
                row[f"{m}_ratio_min_max"] = [round(min(ratios), 3), round(max(ratios), 3)]
        results[f"{size >> 10}K" if size < 1 << 20 else f"{size >> 20}M"] = row
        print(f"{size >> 10:>7} KiB  n={n:<5} raw {row['raw_GBps']:6.2f} GB/s  " + "  ".join(
            f"{m} {row[f'{m}_GBps']:5.2f} GB/s ({row[f'{m}_ratio']:.2f}x)" for m in modes[1:]),
            flush=True)

    parent.send("stop")
    info = parent.recv()
    proc.join(10)
    for m in modes[1:]:
        if not info["zero_copy_recv"].get(m):
            failures.append(f"receive-side copy in mode {m}")
        st = info["server_stats"][m]
        if st["rejected_total"] or st["duplicates"]:
            failures.append(f"{m}: server stats {st}")
    macs = mac_speed()
    print(f"MAC alone over 16 MiB (GB/s, one core): {macs}")
    # goal (issue 16): >= 0.8x raw for messages of 1 MiB and more, > 0.5x for smaller ones
    goal = {m: all(r[f"{m}_ratio"] >= (0.8 if r["message_bytes"] >= 1 << 20 else 0.5)
                   for r in results.values()) for m in modes[1:]}
    print("meets the goal (0.8x at >= 1 MiB, 0.5x below) at every size: "
          + ", ".join(f"{m}: {g}" for m, g in goal.items()))
    for c in clients.values():
        c.close()
    raw.close()
    out = {"bench": "transport", "credit": args.credit, "batch_max": args.batch,
           "rounds": args.rounds, "results": results,
           "mac_GBps_16MiB": macs, "meets_goal": goal,
           "zero_copy": {"send": not any("send-side" in f for f in failures),
                         "recv": info["zero_copy_recv"]},
           "failures": failures, "cpus": os.cpu_count(), "zmq": zmq.zmq_version(),
           "pyzmq": zmq.__version__}
    print(json.dumps(out))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
