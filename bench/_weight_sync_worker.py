"""One rank of bench/weight_sync.py (started by torchrun; not meant to be run by hand).

--mode layout: build the student under --layout, load the HF checkpoint, perturb every weight
  deterministically (elementwise, so shards stay consistent), then time, in turn, each
  iteration:
  - gather: every rank drains iter_hf_weights(chunks, spec, groups, dst=0) (full tensors on
    rank 0 only, what a publish gathers),
  - raw: rank 0 broadcasts the checkpoint's tensors (same sizes, dtypes, order and buckets as
    a publish) over gloo on loopback to the --mode raw-recv process, which receives like
    SGLang does (fresh buffers, async broadcasts, wait) and acknowledges each bucket: no
    SGLang, no gather (the baseline, measured next to each publish),
  - publish: rank 0 streams that iterator to the SGLang server through a
    DistributedWeightPublisher while the other ranks drain the iterator (rank 0 also records
    the publisher's phase timings, DistributedWeightPublisher.timings),
  and finally publish once more keeping the tensors, so the parent can check the server against
  transformers on exactly what was sent (rank 0 writes them with the timings).
--mode raw-recv: one plain process (not torchrun), the receiving end of the raw baseline.
Timing loops start every iteration with a barrier of the learner world; times are rank 0's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


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

    pub = raw = None
    phases: list[dict] = []
    if rank0:
        from megatron_opd.serving.sglang_client import SGLangClient
        from megatron_opd.weight_sync import DistributedWeightPublisher

        if args.publisher_file:  # another version of weight_sync.py, to compare (A/B)
            import importlib.util

            mod_spec = importlib.util.spec_from_file_location("weight_sync_alt",
                                                              args.publisher_file)
            mod = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(mod)
            DistributedWeightPublisher = mod.DistributedWeightPublisher  # noqa: N806
        raw = _RawSender(args, spec)
        client = SGLangClient(args.url, timeout=600)
        pub = DistributedWeightPublisher([client], backend="gloo", group_name=args.group_name,
                                         bucket_bytes=args.bucket_bytes)
        pub.connect()
        pub.timings = {}

    def publish(i):
        weights = iter_hf_weights(chunks, spec, groups, dst=0)
        if not rank0:
            return drain()
        pub.publish(weights, version=args.version_base + i)
        if i:
            phases.append(dict(pub.timings))

    def raw_round():
        if rank0:
            raw.send()

    # gather, raw and publish take turns, so that each publish has a raw broadcast beside it
    # on the same (shared, noisy) machine
    gather, raw_s, publish_s = [], [], []
    for i in range(args.repeats + 1):
        for fn, times in ((lambda: drain(), gather), (raw_round, raw_s),
                          (lambda: publish(i), publish_s)):
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
        raw.close()
        # a flush alone (the one publish asks for with its last bucket)
        flush_s = []
        for _ in range(5):
            t0 = time.perf_counter()
            # (POST directly: SGLang answers /flush_cache in plain text, which
            # SGLangClient.flush_cache fails to parse as JSON)
            client._session.post(f"{client.url}/flush_cache", timeout=60).raise_for_status()
            flush_s.append(time.perf_counter() - t0)
        from safetensors.torch import save_file

        save_file(sent, args.out + ".safetensors")
        Path(args.out).write_text(json.dumps({
            "gather_s": gather, "raw_s": raw_s, "publish_s": publish_s,
            "phases": phases, "flush_s": flush_s, "names": list(sent),
            "raw_names": raw.names, "bytes": raw.nbytes, "tensors": len(raw.names),
            "buckets": len(raw.buckets), "final_version": final_version,
            "served_version": served_version}))
    else:
        drain()
    destroy_distributed()


def _raw_tensors(args, spec):
    """Exactly the tensors, order and buckets of a publish, from the HF checkpoint."""
    from safetensors.torch import load_file

    from megatron_opd.models.hf_mapping import hf_to_megatron, megatron_to_hf
    from megatron_opd.weight_sync import _buckets

    hf = {}
    for f in sorted(Path(args.hf).glob("*.safetensors")):
        hf.update(load_file(str(f)))
    named = [(n, t.contiguous()) for n, t in megatron_to_hf(hf_to_megatron(hf, spec), spec).items()]
    return named, list(_buckets(named, args.bucket_bytes))


def _raw_group(port: int, rank: int):
    """A two-rank gloo group (rank 0 hosts the rendezvous), formed as the publisher forms an
    update group, outside the learner's world."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    from megatron_opd.listeners import loopback_socket_env, tcp_store

    os.environ.update(loopback_socket_env("127.0.0.1"))
    timeout = timedelta(seconds=600)
    store = PrefixStore("raw", tcp_store("127.0.0.1", port, 2, is_master=rank == 0,
                                         timeout=timeout))
    group, _ = _new_process_group_helper(2, rank, [], Backend("gloo"), store, group_name="raw",
                                         backend_options=None, timeout=timeout)
    _world.pg_group_ranks[group] = {0: 0, 1: 1}
    return group


class _RawSender:
    def __init__(self, args, spec):
        named, self.buckets = _raw_tensors(args, spec)
        self.names = [n for n, _ in named]
        self.nbytes = sum(t.numel() * t.element_size() for _, t in named)
        self.group = _raw_group(args.raw_port, 0)

    def send(self) -> None:
        for bucket in self.buckets:
            for _, t in bucket:
                dist.broadcast(t, src=0, group=self.group)
            dist.barrier(group=self.group)  # the receiver has the whole bucket

    def close(self) -> None:
        dist.destroy_process_group(self.group)


def run_raw_recv(args, spec) -> None:
    """The receiving end of the raw baseline: --repeats + 1 rounds (the warm-up too)."""
    _, buckets = _raw_tensors(args, spec)
    group = _raw_group(args.raw_port, 1)
    for _ in range(args.repeats + 1):
        for bucket in buckets:
            bufs = [torch.empty(t.shape, dtype=t.dtype) for _, t in bucket]
            for h in [dist.broadcast(b, src=0, group=group, async_op=True) for b in bufs]:
                h.wait()
            dist.barrier(group=group)
    dist.destroy_process_group(group)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("layout", "raw-recv"), required=True)
    ap.add_argument("--spec", required=True)  # JSON of MoEModelSpec fields
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", default="")
    ap.add_argument("--raw-port", type=int, required=True)
    ap.add_argument("--publisher-file", default="")
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
    (run_raw_recv if args.mode == "raw-recv" else run_layout)(args, spec)


if __name__ == "__main__":
    main()
