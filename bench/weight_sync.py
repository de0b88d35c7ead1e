"""Time to publish the student's weights from a parallel learner layout to a real SGLang server.

One SGLang server (CPU, float32) serves a small Qwen3-MoE. For each learner layout (world 1, TP2
with expert-TP 2, EP2, PP2; torchrun, gloo) the learner loads the same HF checkpoint, perturbs its
weights deterministically (a layout-specific change, so every layout's publish is visible on the
server) and measures, as the median of N after one warm-up:
- gather_s: every rank draining iter_hf_weights(chunks, spec, groups, dst=0) (the shards sent to
  rank 0, layer by layer; no server),
- publish_s: rank 0 publishing that iterator with DistributedWeightPublisher (pause, begin,
  update_weights_from_distributed per bucket + gloo broadcasts, end, continue; the gather runs
  inside, as in training; from the second publish on the publisher overlaps it with async
  broadcasts) while the other ranks drain it.
Baseline in the same run: raw_broadcast_s, a plain torch.distributed broadcast of the same
tensors (sizes, dtypes, order, buckets) from a sender process to one receiver process over gloo
on loopback, no SGLang, no gather (measured before each layout and at the end, as the load of a
shared machine drifts; raw_broadcast_s is the median of all those runs).
After each layout's timed publishes, the server's log-probs of a fixed sequence are checked
against transformers run on exactly the tensors the learner sent (|diff| < 1e-4) and must differ
from the original checkpoint's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/weight_sync.py [--n 9] [--bucket-mb 64]
        [--layouts world1,tp2,ep2] [--keep]

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

SPEC = MoEModelSpec(vocab_size=4096, hidden_size=256, num_layers=4, num_attention_heads=4,
                    num_kv_heads=2, head_dim=64, moe_ffn_hidden_size=256, num_experts=16,
                    moe_router_topk=2, max_position_embeddings=64)
LAYOUTS = {  # name: (processes, parallel config)
    "world1": (1, {}),
    "tp2": (2, dict(tensor_parallel=2, expert_tensor_parallel=2)),
    "ep2": (2, dict(expert_parallel=2)),
    "pp2": (2, dict(pipeline_parallel=2)),
}
SEQ = [1, 13, 4, 5, 6, 17, 600, 5, 4000, 2, 31, 77, 1024, 9]
START = 4
TOL = 1e-4  # fp32 on both sides (SGLang's torch-native attention sums in another order)


def build_checkpoint(path: Path) -> None:
    from transformers import Qwen3MoeForCausalLM

    from megatron_opd.tokenizer import SPECIALS, save_tokenizer

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(to_hf_config(SPEC)).float()
    with torch.no_grad():  # decisive routing: no near-tie top-2 that summation order could flip
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20.0)
    model.save_pretrained(path)
    save_tokenizer(path, list(SPECIALS) + [f"w{i}" for i in range(SPEC.vocab_size - len(SPECIALS))])


def reference_logprobs(model_dir: Path) -> np.ndarray:
    """transformers' log-probs of SEQ[j] for j >= START, from the weights in model_dir."""
    from transformers import Qwen3MoeForCausalLM

    m = Qwen3MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([SEQ])).logits[0].double(), -1)
    return np.array([lp[j - 1, SEQ[j]].item() for j in range(START, len(SEQ))])


def torchrun(nproc: int, args: list[str], log: Path, timeout: float = 600) -> None:
    from megatron_opd.procs import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKER), *args]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise RuntimeError(f"torchrun {' '.join(args[:2])} failed ({proc.returncode}):\n{tail}")


def _stats(ts: list[float]) -> str:
    return (f"median {statistics.median(ts) * 1e3:7.1f} ms (min {min(ts) * 1e3:.1f}, "
            f"max {max(ts) * 1e3:.1f}, n={len(ts)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=9, help="timed repetitions (after 1 warm-up)")
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if args.n < 1:
        ap.error("--n must be >= 1")
    bucket_bytes = int(args.bucket_mb * (1 << 20))
    names = args.layouts.split(",")

    from megatron_opd.procs import free_port
    from megatron_opd.serving.sglang_client import SGLangClient
    from megatron_opd.serving.sglang_server import SGLangServer

    t_all = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_weight_sync_"))
    hf = work / "hf"
    build_checkpoint(hf)
    base_ref = reference_logprobs(hf)
    common = ["--spec", json.dumps(dataclasses.asdict(SPEC)), "--hf", str(hf),
              "--repeats", str(args.n), "--bucket-bytes", str(bucket_bytes)]

    def raw(tag: str) -> dict:
        out = work / f"raw_{tag}.json"
        torchrun(2, ["--mode", "raw", *common, "--out", str(out)], work / f"raw_{tag}.log")
        return json.loads(out.read_text())

    server = SGLangServer("bench", str(hf), free_port(), str(work / "server.log"),
                          max_total_tokens=2048, threads=1, extra_args=("--weight-version", "0"))
    results: dict[str, dict] = {}
    try:
        t0 = time.time()
        server.start()
        server.wait_ready(300)
        print(f"SGLang server ready in {time.time() - t0:.0f} s ({server.url}, float32, CPU)",
              flush=True)
        client = SGLangClient(server.url)
        got = client.score([SEQ], start=[START])[0].logprobs
        print(f"server vs transformers on the checkpoint: max |dlogp| = "
              f"{np.abs(got - base_ref).max():.2e}", flush=True)

        raws = []

        def raw_run(tag: str) -> dict:
            r = raw(tag)
            raws.append(r)
            print(f"raw     gloo broadcast of {r['bytes'] / 2**20:.1f} MiB ({r['tensors']} "
                  f"tensors, {r['buckets']} bucket(s)) {_stats(r['raw_s'])}", flush=True)
            return r

        # raw before every layout and once at the end: the machine's load drifts
        for k, name in enumerate(names):
            raw_run(f"before_{name}")
            nproc, layout = LAYOUTS[name]
            out = work / f"{name}.json"
            torchrun(nproc, ["--mode", "layout", *common, "--out", str(out),
                             "--layout", json.dumps(layout), "--url", server.url,
                             "--group-name", f"bench_{name}", "--phase", str(1.0 + k),
                             "--version-base", str(100 * (k + 1))], work / f"{name}.log")
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
            res["same_order_as_world1"] = res["names"] == raws[0]["names"]
            ok = (res["check_max_abs_diff"] < TOL and res["change_vs_checkpoint"] > 100 * TOL
                  and res["served_version"] == str(res["final_version"])
                  and sorted(res["names"]) == sorted(raws[0]["names"]))
            res["check_ok"] = ok
            results[name] = res
            print(f"{name:7s} gather  {_stats(res['gather_s'])}", flush=True)
            ms = {k: f"{v * 1e3:.1f}" for k, v in res["breakdown"].items()}
            print(f"{name:7s} publish {_stats(res['publish_s'])}; medians: gather "
                  f"{ms['gather_in_publish_s']} + broadcast {ms['broadcast_s']} + server "
                  f"{ms['server_s']} ms (control calls {ms['control_calls_s']} ms; generation "
                  f"paused {ms['paused_s']} ms)", flush=True)
            print(f"{name:7s} check: max |server - transformers(sent)| = "
                  f"{res['check_max_abs_diff']:.1e} (tol {TOL:.0e}), change vs checkpoint "
                  f"{res['change_vs_checkpoint']:.2f}, served version {res['served_version']}, "
                  f"order {'=' if res['same_order_as_world1'] else '!='} world1 -> "
                  f"{'OK' if ok else 'FAILED'}", flush=True)
        raw_run("end")
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")

    raw_s = statistics.median([t for r in raws for t in r["raw_s"]])
    summary = {"bytes": raws[0]["bytes"], "raw_broadcast_s": round(raw_s, 5), "layouts": {}}
    for name, res in results.items():
        pub = statistics.median(res["publish_s"])
        summary["layouts"][name] = {
            "publish_s": round(pub, 5), "gather_s": round(statistics.median(res["gather_s"]), 5),
            "raw_broadcast_s": round(raw_s, 5), "ratio": round(pub / raw_s, 2),
            "breakdown_s": {k: round(v, 5) for k, v in res["breakdown"].items()},
            "check_ok": res["check_ok"]}
    summary.update(n=args.n, bucket_bytes=bucket_bytes, tensors=raws[0]["tensors"],
                   buckets=raws[0]["buckets"],
                   raw_broadcast_run_medians_s=[round(statistics.median(r["raw_s"]), 5)
                                                for r in raws],
                   wall_s=round(time.time() - t_all, 1))
    for name, v in summary["layouts"].items():
        print(f"{name:7s} publish / raw broadcast = {v['ratio']:.2f}x "
              f"(publish {v['publish_s'] * 1e3:.1f} ms, raw {raw_s * 1e3:.1f} ms, "
              f"gather {v['gather_s'] * 1e3:.1f} ms)")
    print(json.dumps(summary), flush=True)
    if not all(r["check_ok"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
