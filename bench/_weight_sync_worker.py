"""One rank of bench/weight_sync.py (started by torchrun; not meant to be run by hand).

--mode layout: build the student under --layout, load the HF checkpoint, perturb every weight
  deterministically (elementwise, so shards stay consistent), then time, alternately,
  - gather: every rank drains iter_hf_weights(chunks, spec, groups, dst=0) (full tensors on
    rank 0 only, what a publish gathers),
  - publish: rank 0 streams that iterator to the SGLang server through a
    DistributedWeightPublisher while the other ranks drain the iterator (rank 0 also splits its
    publish time, see _Breakdown),
  and finally publish once more keeping the tensors, so the parent can check the server against
  transformers on exactly what was sent (rank 0 writes them with the timings).
--mode raw: 2 ranks, no SGLang, no gather: rank 0 broadcasts the same tensors (same sizes,
  dtypes, order and buckets as a publish) to rank 1 over gloo on loopback; rank 1 receives like
  SGLang does (fresh buffers, async broadcasts, wait) and acknowledges each bucket.
Timing loops start every iteration with a barrier of the learner world; times are rank 0's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _timed(fn, n: int) -> list[float]:
    """1 warm-up, then n timed runs, each after a barrier."""
    out = []
    for i in range(n + 1):
        dist.barrier()
        t0 = time.perf_counter()
        fn(i)
        if i:
            out.append(time.perf_counter() - t0)
    return out


def perturb_(chunks, phase: float, scale: float) -> None:
    """w <- w + scale * sin(997 w + phase), elementwise: any shard of the full tensor is perturbed
    exactly as that part of the full tensor would be."""
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                p.add_(torch.sin(p * 997.0 + phase), alpha=scale)


def run_layout(args, spec) -> None:
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.models.hf_mapping import iter_hf_weights, load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config

    install_megatron_cpu_compat()
    layout = ParallelConfig(**json.loads(args.layout))
    groups = init_distributed(layout, seed=0)
    rank0 = groups.rank == 0
    chunks = build_model_chunks(spec, transformer_config(spec, layout=layout))
    load_hf_checkpoint(chunks, args.hf, spec, groups)
    perturb_(chunks, args.phase, args.scale)

    def drain():  # the gather a publish runs: full tensors on global rank 0 only
        for _ in iter_hf_weights(chunks, spec, groups, dst=0):
            pass

    pub = breakdown = None
    if rank0:
        from megatron_opd.serving.sglang_client import SGLangClient
        from megatron_opd.weight_sync import DistributedWeightPublisher

        client = SGLangClient(args.url, timeout=600)
        pub = DistributedWeightPublisher([client], backend="gloo", group_name=args.group_name,
                                         bucket_bytes=args.bucket_bytes)
        pub.connect()
        breakdown = _Breakdown(client)

    def publish(i):
        weights = iter_hf_weights(chunks, spec, groups, dst=0)
        if not rank0:
            return drain()
        breakdown.start()
        pub.publish(breakdown.wrap(weights), version=args.version_base + i)
        breakdown.stop()

    # gather and publish alternate, so that both see the same (shared, noisy) machine
    gather, publish_s = [], []
    for i in range(args.repeats + 1):
        for fn, times in ((lambda: drain(), gather), (lambda: publish(i), publish_s)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if i:  # 0 is the warm-up
                times.append(time.perf_counter() - t0)

    # One more publish, keeping what was sent: the parent checks the server against it.
    dist.barrier()
    if rank0:
        sent = {}

        def keep(named):
            for n, t in named:
                sent[n] = t.clone()
                yield n, t

        final_version = args.version_base + args.repeats + 1
        pub.publish(keep(iter_hf_weights(chunks, spec, groups, dst=0)), version=final_version)
        served_version = client.weight_version()
        pub.close()
        from safetensors.torch import save_file

        save_file(sent, args.out + ".safetensors")
        Path(args.out).write_text(json.dumps({
            "gather_s": gather, "publish_s": publish_s, "breakdown": breakdown.medians(),
            "names": list(sent), "final_version": final_version,
            "served_version": served_version}))
    else:
        drain()
    destroy_distributed()


class _Breakdown:
    """Splits rank 0's publish time: gather_in_publish_s (producing tensors, inside the
    iterator), broadcast_s (in torch.distributed.broadcast calls, sender side; the overlapped
    publisher's broadcasts are asynchronous, so this is mostly queuing them) and server_s (the
    rest: waiting for broadcasts to finish and for the server's HTTP answers, i.e. control calls
    not hidden behind the gather and each bucket's receive + load + flush). Also control_calls_s: the summed duration of the
    pause/begin/end/continue calls (some may overlap the gather), and paused_s: from the start of
    pause_generation to the end of continue_generation (generation is stopped meanwhile)."""

    CONTROL = ("pause_generation", "begin_weight_update", "end_weight_update",
               "continue_generation")

    def __init__(self, client):
        self.runs: list[dict] = []
        self.cur: dict | None = None
        for name in self.CONTROL:
            setattr(client, name, self._timer(getattr(client, name), "control_calls_s", name))
        # weight_sync looks torch.distributed.broadcast up at each call
        dist.broadcast = self._timer(dist.broadcast, "broadcast_s")

    def _timer(self, fn, key, name=""):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                t1 = time.perf_counter()
                if self.cur is not None:
                    self.cur[key] += t1 - t0
                    if name == "pause_generation":
                        self.cur["_paused_from"] = t0
                    elif name == "continue_generation":
                        self.cur["paused_s"] = t1 - self.cur.pop("_paused_from")
        return wrapped

    def start(self):
        self.cur = {"gather_in_publish_s": 0.0, "broadcast_s": 0.0, "control_calls_s": 0.0,
                    "paused_s": 0.0, "_t0": time.perf_counter()}

    def stop(self):
        c, self.cur = self.cur, None
        c["total_s"] = time.perf_counter() - c.pop("_t0")
        c["server_s"] = c["total_s"] - c["gather_in_publish_s"] - c["broadcast_s"]
        self.runs.append(c)

    def wrap(self, named):
        it = iter(named)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.cur["gather_in_publish_s"] += time.perf_counter() - t0
            yield item

    def medians(self) -> dict:
        # the first run is the warm-up
        return {k: statistics.median(r[k] for r in self.runs[1:]) for k in self.runs[0]}


def run_raw(args, spec) -> None:
    from safetensors.torch import load_file

    from megatron_opd.models.hf_mapping import hf_to_megatron, megatron_to_hf
    from megatron_opd.weight_sync import _buckets

    dist.init_process_group("gloo")
    assert dist.get_world_size() == 2, "raw mode is one sender and one receiver"
    rank = dist.get_rank()
    hf = {}
    for f in sorted(Path(args.hf).glob("*.safetensors")):
        hf.update(load_file(str(f)))
    # exactly the tensors, order and buckets of a publish
    named = [(n, t.contiguous()) for n, t in megatron_to_hf(hf_to_megatron(hf, spec), spec).items()]
    buckets = list(_buckets(named, args.bucket_bytes))

    def send(_i):
        for bucket in buckets:
            for _, t in bucket:
                dist.broadcast(t, src=0)
            dist.barrier()  # the receiver has the whole bucket

    def receive(_i):
        for bucket in buckets:
            bufs = [torch.empty(t.shape, dtype=t.dtype) for _, t in bucket]
            for h in [dist.broadcast(b, src=0, async_op=True) for b in bufs]:
                h.wait()
            dist.barrier()

    times = _timed(send if rank == 0 else receive, args.repeats)
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "raw_s": times, "bytes": sum(t.numel() * t.element_size() for _, t in named),
            "tensors": len(named), "buckets": len(buckets), "names": [n for n, _ in named]}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("layout", "raw"), required=True)
    ap.add_argument("--spec", required=True)  # JSON of MoEModelSpec fields
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-bytes", type=int, default=64 << 20)
    ap.add_argument("--layout", default="{}")  # JSON of config.ParallelConfig fields
    ap.add_argument("--url", default="")
    ap.add_argument("--group-name", default="bench_weights")
    ap.add_argument("--phase", type=float, default=0.0)
    ap.add_argument("--scale", type=float, default=0.02)
    ap.add_argument("--version-base", type=int, default=1)
    args = ap.parse_args()

    from megatron_opd.models.spec import MoEModelSpec

    spec = MoEModelSpec(**json.loads(args.spec))
    (run_raw if args.mode == "raw" else run_layout)(args, spec)


if __name__ == "__main__":
    main()
