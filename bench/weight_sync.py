"""Time to publish the student's weights from a parallel learner layout to a real SGLang server.

One SGLang server (CPU, float32) per weight set serves a Qwen3-MoE: `small` (hidden 256,
59 MiB, one 64 MiB bucket) and `large` (hidden 512, ~4x the bytes, several buckets; real models
are GBs, so this is closer to the bandwidth-bound regime the 1.5x goal is about). For each
learner layout (world 1, TP2 with expert-TP 2, EP2, PP2; torchrun, gloo) the learner loads the
same HF checkpoint, perturbs its weights deterministically (a layout-specific change, so every
layout's publish is visible on the server) and measures, N times after one warm-up, in turn:
- gather_s: every rank draining iter_hf_weights(chunks, spec, groups, dst=0) (the shards sent to
  rank 0, layer by layer; no server),
- raw_broadcast_s (the baseline, beside every publish): rank 0 broadcasting the checkpoint's
  tensors (same sizes, dtypes, order and buckets) over gloo on loopback to one receiver
  process that receives like SGLang does and acknowledges each bucket; no SGLang, no gather,
- publish_s: rank 0 publishing that iterator with DistributedWeightPublisher (pause, begin,
  update_weights_from_distributed per bucket + gloo broadcasts, end, continue; the gather runs
  inside, as in training; from the second publish on the publisher overlaps it with async
  broadcasts) while the other ranks drain it; with the publisher's phase timings.
Reported: the median of the paired ratios publish_i / raw_i and the ratio of the medians.
After each layout's timed publishes, the server's log-probs of a fixed sequence are checked
against transformers run on exactly the tensors the learner sent (|diff| < 1e-4) and must differ
from the original checkpoint's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/weight_sync.py [--n 9] [--bucket-mb 64]
        [--layouts world1,tp2,ep2,pp2] [--sizes small,large] [--keep]

Human-readable lines first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORKER = Path(__file__).resolve().parent / "_weight_sync_worker.py"

from megatron_opd.models.spec import MoEModelSpec, to_hf_config  # noqa: E402

SIZES = {  # name: the student (same family; large: ~4x the bytes, several buckets)
    "small": MoEModelSpec(vocab_size=4096, hidden_size=256, num_layers=4, num_attention_heads=4,
                          num_kv_heads=2, head_dim=64, moe_ffn_hidden_size=256, num_experts=16,
                          moe_router_topk=2, max_position_embeddings=64),
    "large": MoEModelSpec(vocab_size=4096, hidden_size=512, num_layers=4, num_attention_heads=8,
                          num_kv_heads=2, head_dim=64, moe_ffn_hidden_size=512, num_experts=16,
                          moe_router_topk=2, max_position_embeddings=64),
}
LAYOUTS = {  # name: (processes, parallel config)
    "world1": (1, {}),
    "tp2": (2, dict(tensor_parallel=2, expert_tensor_parallel=2)),
    "ep2": (2, dict(expert_parallel=2)),
    "pp2": (2, dict(pipeline_parallel=2)),
}
SEQ = [1, 13, 4, 5, 6, 17, 600, 5, 4000, 2, 31, 77, 1024, 9]
START = 4
TOL = 1e-4  # fp32 on both sides (SGLang's torch-native attention sums in another order)


def build_checkpoint(path: Path, spec: MoEModelSpec) -> None:
    from transformers import Qwen3MoeForCausalLM

    from megatron_opd.tokenizer import SPECIALS, save_tokenizer

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(to_hf_config(spec)).float()
    with torch.no_grad():  # decisive routing: no near-tie top-2 that summation order could flip
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20.0)
    model.save_pretrained(path)
    save_tokenizer(path, list(SPECIALS) + [f"w{i}" for i in range(spec.vocab_size - len(SPECIALS))])


def reference_logprobs(model_dir: Path) -> np.ndarray:
    """transformers' log-probs of SEQ[j] for j >= START, from the weights in model_dir."""
    from transformers import Qwen3MoeForCausalLM

    m = Qwen3MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([SEQ])).logits[0].double(), -1)
    return np.array([lp[j - 1, SEQ[j]].item() for j in range(START, len(SEQ))])


def torchrun(nproc: int, args: list[str], log: Path, raw_args: list[str],
             timeout: float = 600) -> None:
    """The layout's ranks under torchrun, and beside them the raw baseline's receiver."""
    from megatron_opd.procs import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKER), *args]
    with open(log, "w") as f, open(str(log) + ".raw", "w") as rf:
        receiver = subprocess.Popen([sys.executable, str(WORKER), *raw_args], env=env,
                                    stdout=rf, stderr=subprocess.STDOUT)
        try:
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            receiver.wait(timeout=60)
        finally:
            if receiver.poll() is None:
                receiver.kill()
    if proc.returncode != 0 or receiver.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise RuntimeError(f"torchrun {' '.join(args[:2])} failed ({proc.returncode}, receiver "
                           f"{receiver.returncode}):\n{tail}")


def _stats(ts: list[float]) -> str:
    return (f"median {statistics.median(ts) * 1e3:7.1f} ms (min {min(ts) * 1e3:.1f}, "
            f"max {max(ts) * 1e3:.1f}, n={len(ts)})")


PHASES = ("produce_s", "broadcast_s", "open_wait_s", "finish_s", "close_s", "open_calls_s",
          "update_calls_s", "close_calls_s")


def run_size(size: str, names: list[str], args, work: Path) -> dict:
    """One SGLang server with the `size` student; every layout in turn (own torchrun)."""
    from megatron_opd.procs import free_port
    from megatron_opd.serving.sglang_client import SGLangClient
    from megatron_opd.serving.sglang_server import SGLangServer

    spec = SIZES[size]
    work = work / size
    hf = work / "hf"
    build_checkpoint(hf, spec)
    base_ref = reference_logprobs(hf)
    common = ["--spec", json.dumps(dataclasses.asdict(spec)), "--hf", str(hf),
              "--repeats", str(args.n), "--bucket-bytes", str(int(args.bucket_mb * (1 << 20))),
              "--publisher-file", str(Path(args.publisher_file).resolve()) if args.publisher_file
              else ""]
    server = SGLangServer(f"bench-{size}", str(hf), free_port(), str(work / "server.log"),
                          max_total_tokens=2048, threads=1, extra_args=("--weight-version", "0"))
    results: dict[str, dict] = {}
    try:
        t0 = time.time()
        server.start()
        server.wait_ready(300)
        print(f"[{size}] SGLang server ready in {time.time() - t0:.0f} s ({server.url}, "
              "float32, CPU)", flush=True)
        client = SGLangClient(server.url)
        got = client.score([SEQ], start=[START])[0].logprobs
        print(f"[{size}] server vs transformers on the checkpoint: max |dlogp| = "
              f"{np.abs(got - base_ref).max():.2e}", flush=True)
        for k, name in enumerate(names):
            nproc, layout = LAYOUTS[name]
            out = work / f"{name}.json"
            raw_port = free_port()
            torchrun(nproc, ["--mode", "layout", *common, "--out", str(out),
                             "--raw-port", str(raw_port),
                             "--layout", json.dumps(layout), "--url", server.url,
                             "--group-name", f"bench_{size}_{name}", "--phase", str(1.0 + k),
                             "--version-base", str(100 * (k + 1))], work / f"{name}.log",
                     ["--mode", "raw-recv", *common, "--raw-port", str(raw_port)])
            res = json.loads(out.read_text())
            # check: the server now serves exactly what the learner sent
            sent = work / f"{name}_sent"
            sent.mkdir()
            shutil.copy2(hf / "config.json", sent / "config.json")
            shutil.move(str(out) + ".safetensors", sent / "model.safetensors")
            ref = reference_logprobs(sent)
            served = client.score([SEQ], start=[START])[0].logprobs
            res["check_max_abs_diff"] = float(np.abs(served - ref).max())
            res["change_vs_checkpoint"] = float(np.abs(served - base_ref).max())
            res["same_order_as_world1"] = res["names"] == res["raw_names"]
            ok = (res["check_max_abs_diff"] < TOL and res["change_vs_checkpoint"] > 100 * TOL
                  and res["served_version"] == str(res["final_version"])
                  and sorted(res["names"]) == sorted(res["raw_names"]))
            res["check_ok"] = ok
            res["paired_ratios"] = [p / r for p, r in zip(res["publish_s"], res["raw_s"])]
            res["phase_medians_s"] = {k: statistics.median(ph.get(k, 0.0) for ph in res["phases"])
                                      for k in PHASES}  # (all 0: a publisher without timings)
            results[name] = res
            print(f"[{size}] {name:7s} raw     {_stats(res['raw_s'])} ({res['bytes'] / 2**20:.1f}"
                  f" MiB, {res['tensors']} tensors, {res['buckets']} bucket(s))", flush=True)
            print(f"[{size}] {name:7s} gather  {_stats(res['gather_s'])}", flush=True)
            print(f"[{size}] {name:7s} publish {_stats(res['publish_s'])}", flush=True)
            ms = {k: f"{v * 1e3:.1f}" for k, v in res["phase_medians_s"].items()}
            print(f"[{size}] {name:7s} phases (medians, ms): rank 0 in the stream (gather) "
                  f"{ms['produce_s']}, issuing broadcasts {ms['broadcast_s']}, waiting for the "
                  f"server: opening {ms['open_wait_s']}, buckets {ms['finish_s']}, end+continue "
                  f"{ms['close_s']}; server calls (their threads): pause+begin "
                  f"{ms['open_calls_s']}, buckets {ms['update_calls_s']}, end+continue "
                  f"{ms['close_calls_s']}; a flush alone "
                  f"{statistics.median(res['flush_s']) * 1e3:.1f}", flush=True)
            print(f"[{size}] {name:7s} check: max |server - transformers(sent)| = "
                  f"{res['check_max_abs_diff']:.1e} (tol {TOL:.0e}), change vs checkpoint "
                  f"{res['change_vs_checkpoint']:.2f}, served version {res['served_version']}, "
                  f"order {'=' if res['same_order_as_world1'] else '!='} world1 -> "
                  f"{'OK' if ok else 'FAILED'}", flush=True)
    finally:
        server.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=9, help="timed repetitions (after 1 warm-up)")
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--publisher-file", default="",
                    help="publish with the DistributedWeightPublisher of this weight_sync.py "
                         "(e.g. an older version, to compare)")
    args = ap.parse_args()
    if args.n < 1:
        ap.error("--n must be >= 1")
    names = args.layouts.split(",")
    sizes = args.sizes.split(",")
    for x, known in ((names, LAYOUTS), (sizes, SIZES)):
        if any(v not in known for v in x):
            ap.error(f"unknown {x}: choose from {list(known)}")

    t_all = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_weight_sync_"))
    results = {}
    try:
        for size in sizes:
            results[size] = run_size(size, names, args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")

    summary = {"n": args.n, "bucket_bytes": int(args.bucket_mb * (1 << 20)), "sizes": {}}
    for size, res in results.items():
        first = next(iter(res.values()))
        out = summary["sizes"][size] = {"bytes": first["bytes"], "tensors": first["tensors"],
                                        "buckets": first["buckets"], "layouts": {}}
        for name, r in res.items():
            pub, raw = statistics.median(r["publish_s"]), statistics.median(r["raw_s"])
            out["layouts"][name] = {
                "publish_s": round(pub, 5), "raw_broadcast_s": round(raw, 5),
                "gather_s": round(statistics.median(r["gather_s"]), 5),
                "ratio_of_medians": round(pub / raw, 3),
                "median_paired_ratio": round(statistics.median(r["paired_ratios"]), 3),
                "phases_s": {k: round(v, 5) for k, v in r["phase_medians_s"].items()},
                "flush_s": round(statistics.median(r["flush_s"]), 5),
                "check_ok": r["check_ok"]}
            v = out["layouts"][name]
            print(f"[{size}] {name:7s} publish / raw broadcast: median of paired ratios "
                  f"{v['median_paired_ratio']:.2f}x, ratio of medians {v['ratio_of_medians']:.2f}x "
                  f"(publish {pub * 1e3:.1f} ms, raw {raw * 1e3:.1f} ms, "
                  f"gather {v['gather_s'] * 1e3:.1f} ms)")
    summary["wall_s"] = round(time.time() - t_all, 1)
    print(json.dumps(summary), flush=True)
    if not all(r["check_ok"] for res in results.values() for r in res.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
