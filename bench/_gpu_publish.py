"""The sending end of the GPU suite's weight-sync check (bench/gpu_suite.py part 3; not meant to
be run by hand).

Builds the Qwen3-30B-A3B slice (bf16, world of one, megatron-core; --layers of them) and
publishes its Hugging Face weights (`iter_hf_weights`: the real names, shapes, dtypes and order
SGLang receives, expert gate/up fused on the fly) with the learner's `DistributedWeightPublisher`
to the receiver process (bench/_gpu_receiver.py) over NCCL (gloo in the dry run), bucketed as the
real config's weight_sync.bucket_mb says. Times, as medians of --repeats after one warm-up:
- produce_s: draining iter_hf_weights alone (what a publish has to produce),
- publish_s: a whole publish (pause, begin, per bucket an HTTP announce + broadcasts, end,
  continue; the first publish learns the manifest, later ones overlap production and sending),
- raw_s: the baseline, a plain torch.distributed broadcast of the same tensors (same sizes,
  dtypes, order and buckets, already produced) into fresh buffers on the receiver, which
  acknowledges each bucket; no HTTP.
Then one more publish whose tensors are checksummed as they are sent; the receiver's checksums of
what it holds must match for every name (dry run: also an exact comparison of the tensors).
Writes one JSON object to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--url", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout-s", type=float, default=120.0)
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from _gpu_common import DRY_SHAPES, GPU_SHAPES, checksum, slice_config, with_layers

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.models.hf_mapping import iter_hf_weights
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_opd.serving.sglang_client import SGLangClient
    from megatron_opd.weight_sync import DistributedWeightPublisher, _buckets

    t_start = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    install_megatron_cpu_compat()  # nothing on a GPU
    groups = init_distributed(ParallelConfig(), seed=0)
    cfg = with_layers(slice_config(args.dry_run, DRY_SHAPES if args.dry_run else GPU_SHAPES),
                      args.layers)
    spec = cfg.model
    model = build_model_chunks(spec, transformer_config(spec, torch.bfloat16,
                                                        layout=ParallelConfig()))[0]
    if on_gpu:
        model.cuda()
    bucket_bytes = int(cfg.weight_sync.bucket_mb * 2 ** 20)
    backend = "nccl" if on_gpu else "gloo"

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def weights():
        return iter_hf_weights(model, spec)

    client = SGLangClient(args.url, timeout=args.timeout_s)
    pub = DistributedWeightPublisher([client], backend=backend, group_name="gpu_suite",
                                     bucket_bytes=bucket_bytes, timeout_s=args.timeout_s,
                                     pause_mode="retract")
    pub.connect()

    def timed(fn, n):
        out = []
        for i in range(n + 1):  # 0 is the warm-up
            sync()
            t0 = time.perf_counter()
            fn(i)
            sync()
            if i:
                out.append(time.perf_counter() - t0)
        return out

    produce_s = timed(lambda i: [None for _ in weights()], args.repeats)
    publish_s = timed(lambda i: pub.publish(weights(), version=1 + i), args.repeats)

    # the baseline: the same tensors, already produced, broadcast bucket by bucket
    named = [(n, t.clone()) for n, t in weights()]
    buckets = list(_buckets(named, bucket_bytes))
    manifest = [[[str(t.dtype).removeprefix("torch."), list(t.shape)] for _, t in b]
                for b in buckets]
    client._check(client._post("raw_receive", {"group_name": pub.group_name,
                                                "buckets": manifest,
                                                "repeats": args.repeats + 1}), "raw_receive")
    ack = torch.zeros(1, device="cuda" if on_gpu else "cpu")

    def raw(_i):
        for bucket in buckets:
            for work in [dist.broadcast(t, src=0, group=pub.group, async_op=True)
                         for _, t in bucket]:
                work.wait()
            dist.broadcast(ack, src=1, group=pub.group)
            ack.item()  # the host waits for the acknowledgement

    raw_s = timed(raw, args.repeats)
    client._check(client._post("raw_status", {"timeout_s": args.timeout_s}), "raw_status")

    # the check: one more publish, checksummed (and in the dry run kept) as it is sent
    final = args.repeats + 2
    sent_sums, kept = {}, {}

    def watched():
        for n, t in weights():
            sent_sums[n] = checksum(t)
            if args.dry_run:
                kept[n] = t.clone()
            yield n, t

    pub.publish(watched(), version=final)
    got = client._post("weights_checksum", {})
    served_version = client.weight_version()
    mismatched = sorted(n for n in sent_sums if got["checksums"].get(n) != sent_sums[n])
    missing = sorted(set(sent_sums) - set(got["checksums"]))
    exact = None
    if args.dry_run:
        from safetensors.torch import load_file

        dump = str(Path(args.out).with_suffix(".received.safetensors"))
        client._check(client._post("dump_weights", {"path": dump}), "dump_weights")
        received = load_file(dump)
        exact = (set(received) == set(kept)
                 and all(torch.equal(received[n], kept[n]) for n in kept))
        Path(dump).unlink()
    pub.close()
    destroy_distributed()

    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    med = {k: statistics.median(v) for k, v in
           (("produce_s", produce_s), ("publish_s", publish_s), ("raw_s", raw_s))}
    Path(args.out).write_text(json.dumps({
        "backend": backend, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "layers": args.layers, "bytes": nbytes, "tensors": len(named), "buckets": len(buckets),
        "bucket_bytes": bucket_bytes, "dtypes": sorted({str(t.dtype) for _, t in named}),
        "total_params": sum(t.numel() for _, t in named),
        "names": [n for n, _ in named],
        "produce_s": produce_s, "publish_s": publish_s, "raw_s": raw_s,
        **{k + "_median": v for k, v in med.items()},
        "publish_over_raw": med["publish_s"] / med["raw_s"],
        "raw_gb_per_s": nbytes / med["raw_s"] / 1e9,
        "publish_gb_per_s": nbytes / med["publish_s"] / 1e9,
        "final_version": final, "served_version": served_version,
        "checksums_match": not mismatched and not missing and len(sent_sums) == len(named),
        "mismatched": mismatched[:10], "missing": missing[:10],
        "received_equal_sent_exact": exact,
        "wall_s": time.perf_counter() - t_start}))


if __name__ == "__main__":
    main()
