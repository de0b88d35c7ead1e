"""Teacher signals (issue 16): bytes per token of each signal, and the learner-side cost of the
hidden-state teacher's exact full-vocabulary KL at a 152k vocabulary against one fp32
cross-entropy pass over materialised logits, measured in the same run.

Bytes per token (per response token, the teacher's payload in a sample; wire dtypes from
megatron_opd/sample_fields.py): sampled = log q(y_t) (float32); top-K (K = 32) = K ids + K
log-probs + the sampled log-prob; hidden = d values in bfloat16 (float32 with
teacher.hidden_dtype=float32) for d of each real-scale config's teacher (configs/*.yaml:
teacher.model.hidden_size); full = V float32 log-probs.

Learner side (V = 152064, Qwen3's padded vocabulary; N tokens and hidden size d CPU-sized):

    baseline   F.cross_entropy(logits [N, V] fp32 (requires_grad), targets, reduction="sum"),
               then autograd.grad w.r.t. the logits: the cheapest loss on materialised logits
    fused      fused_hidden_kl(student hidden [N, d], student head [V, d], teacher hidden [N, d],
               teacher head [V, d]) reverse KL, summed; autograd.grad w.r.t. the student's hidden
               and head (both output heads fused: no [N, V] tensor exists)
    logits     hidden_teacher_kl(the baseline's logits, teacher hidden, teacher head): the
               teacher's head fused, the student's logits given (what the learner runs today,
               megatron's output layer having made the logits)
    unfused    the same reverse KL the plain way: both heads' [N, V] logits materialised
               (2 products), log_softmax of each, the KL, autograd.grad w.r.t. the student's
               hidden and head (2 more products): the path the fused one replaces, matmuls
               included. `fused_over_unfused_time` / `_mem` compare like with like; the issue's
               baseline does no matmul at all, so at a real d (4096) its ratio is bounded by
               the 6 fused products on any device (docs/benchmarks.md)

Peak extra memory: CPU peak RSS over the window minus RSS before it (VmHWM reset through
/proc/self/clear_refs; glibc told to mmap and return every block >= 256 KiB, as in
bench/loss_memory.py, whose probe this reuses, validated on a transient 1 GiB tensor); it includes
the gradients the window returns. `hidden_kl_mem_ratio` = fused peak / bytes of one fp32 [N, V]
tensor (goal <= 0.25); `hidden_kl_time_ratio` = median fused time / median baseline time (goal
<= 1.5). Rounds interleave baseline, fused and logits; medians after one warm-up round. The time of
the fused path's matrix products alone (6 [N, d] x [d, V] products: 2 forward, 4 backward) is
measured too (`matmul_s`), which is what bounds the ratio on a CPU.

    OMP_NUM_THREADS=2 .venv/bin/python bench/teacher_signal.py                # ~1-2 min
    .venv/bin/python bench/teacher_signal.py --tokens 4096 --hidden 128 --chunk 128 --repeats 3

Human-readable lines on stdout, progress on stderr; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VOCAB = 152064
TOP_K = 32
GOAL_TIME, GOAL_MEM = 1.5, 0.25
GIB = 1 << 30
REAL_CONFIGS = ("configs/qwen3-30b-a3b-from-qwen3-235b-a22b.yaml",
                "configs/mixtral-8x7b-from-mixtral-8x22b.yaml")


def bytes_per_token() -> dict:
    import numpy as np
    import yaml

    from megatron_opd.sample_fields import FIELDS

    wire = {f.name: np.dtype(f.wire[0]).itemsize for f in FIELDS if f.wire}
    sampled = wire["teacher_logprobs"]
    topk = TOP_K * (wire["teacher_topk_ids"] + wire["teacher_topk_logprobs"]) + sampled
    out = {"sampled": sampled, f"topk{TOP_K}": topk, "teachers": {}}
    for path in REAL_CONFIGS:
        cfg = yaml.safe_load((ROOT / path).read_text())
        t = cfg["teacher"]["model"]
        d, v = int(t["hidden_size"]), int(t["vocab_size"])
        out["teachers"][Path(path).stem] = {
            "hidden_size": d, "vocab_size": v, "hidden_bf16": 2 * d, "hidden_fp32": 4 * d,
            "full_logits_fp32": 4 * v, "hidden_over_topk": round(2 * d / topk, 1),
            "full_over_hidden": round(4 * v / (2 * d), 1)}
    return out


def run_worker(args) -> None:
    import torch
    import torch.nn.functional as F

    from loss_memory import CpuMemory
    from megatron_opd.learner.hidden_teacher import TeacherHead, fused_hidden_kl, hidden_teacher_kl

    torch.manual_seed(0)
    n, v, d, chunk = args.tokens, VOCAB, args.hidden, args.chunk
    mem = CpuMemory()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    before = mem.start()
    x = torch.ones(GIB // 4)
    x.add_(1)
    del x
    probe = mem.peak(before)
    if abs(probe - GIB) > 0.03 * GIB:
        log(f"memory probe failed: transient 1 GiB tensor -> {probe / GIB:.3f} GiB")
        sys.exit(1)
    # a peaked teacher and a student near it (realistic KL magnitudes)
    wt = torch.randn(v, d) / d ** 0.5
    ht = 3 * torch.randn(n, d)
    ws = (wt + 0.3 * torch.randn(v, d) / d ** 0.5).requires_grad_()
    hs = (ht + 0.5 * torch.randn(n, d)).requires_grad_()
    head = TeacherHead(weight=wt, vocab_size=v)
    with torch.no_grad():
        logits = torch.empty(n, v)
        for s in range(0, n, 256):
            logits[s:s + 256] = hs[s:s + 256] @ ws.T
    logits.requires_grad_()
    targets = torch.randint(0, v, (n,))

    def baseline():
        loss = F.cross_entropy(logits, targets, reduction="sum")
        return torch.autograd.grad(loss, logits)

    def fused():
        return torch.autograd.grad(
            fused_hidden_kl(hs, ws, ht, head, chunk_tokens=chunk).sum(), [hs, ws])

    def from_logits():
        return torch.autograd.grad(
            hidden_teacher_kl(logits, ht, head, chunk_tokens=chunk).sum(), logits)

    def unfused():
        lp = torch.log_softmax(hs @ ws.T, -1)
        with torch.no_grad():
            lq = torch.log_softmax(ht @ wt.T, -1)
        kl = (lp.exp() * (lp - lq)).sum()
        return torch.autograd.grad(kl, [hs, ws])

    def matmuls():  # the fused path's 6 products alone, in the same chunks
        h_, w_ = hs.detach(), ws.detach()
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h_[s:e] @ w_.T  # forward: student and teacher blocks
            ht[s:e] @ wt.T
            blk = h_[s:e] @ w_.T  # backward: both blocks again, then the two gradients
            ht[s:e] @ wt.T
            blk @ w_
            blk.T @ h_[s:e]
        return None

    cases = {"baseline": baseline, "fused": fused, "logits": from_logits, "unfused": unfused,
             "matmul": matmuls}
    times: dict = {k: [] for k in cases}
    peaks: dict = {k: [] for k in cases}
    for r in range(args.repeats + 1):
        for name, fn in cases.items():
            b = mem.start()
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            pk = mem.peak(b)
            del out
            log(f"{'warm-up ' if r == 0 else ''}{name}: {dt:.3f} s, peak extra {pk / GIB:.3f} GiB")
            if r:
                times[name].append(dt)
                peaks[name].append(pk)
    # the value itself, against an fp64 reference on a few tokens (a wrong fast kernel is no result)
    with torch.no_grad():
        sel = slice(0, 8)
        kl = fused_hidden_kl(hs.detach()[sel], ws.detach(), ht[sel], head, chunk_tokens=chunk)
        lp = torch.log_softmax((hs.detach()[sel] @ ws.detach().T).double(), -1)
        lq = torch.log_softmax((ht[sel] @ wt.T).double(), -1)
        ref = (lp.exp() * (lp - lq)).sum(-1)
        err = float((kl.double() - ref).abs().max())
    med = {k: statistics.median(t) for k, t in times.items()}
    pk = {k: statistics.median(p) for k, p in peaks.items()}
    logits_bytes = n * v * 4
    print(json.dumps({
        "tokens": n, "hidden": d, "vocab": v, "chunk_tokens": chunk,
        "threads": torch.get_num_threads(), "probe_gib": round(probe / GIB, 3),
        "median_s": {k: round(t, 4) for k, t in med.items()},
        "min_max_s": {k: [round(min(t), 4), round(max(t), 4)] for k, t in times.items()},
        "peak_extra_bytes": pk, "logits_bytes": logits_bytes,
        "mean_reverse_kl": float(ref.mean()), "max_abs_err_vs_fp64": err,
    }), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(args)
        return 0
    from loss_memory import MALLOC_ENV

    bpt = bytes_per_token()
    env = dict(os.environ, **MALLOC_ENV)
    proc = subprocess.run([sys.executable, __file__, "--worker", "--tokens", str(args.tokens),
                           "--hidden", str(args.hidden), "--chunk", str(args.chunk),
                           "--repeats", str(args.repeats)], env=env, stdout=subprocess.PIPE,
                          text=True)
    if proc.returncode:
        return proc.returncode
    w = json.loads(proc.stdout.strip().splitlines()[-1])
    med, pk = w["median_s"], w["peak_extra_bytes"]
    time_ratio = med["fused"] / med["baseline"]
    mem_ratio = pk["fused"] / w["logits_bytes"]
    logits_time_ratio = med["logits"] / med["baseline"]
    logits_mem_ratio = pk["logits"] / w["logits_bytes"]
    matmul_ratio = med["matmul"] / med["baseline"]
    print(f"bytes per token: sampled {bpt['sampled']}, top-{TOP_K} {bpt[f'topk{TOP_K}']}")
    for name, t in bpt["teachers"].items():
        print(f"  {name}: hidden d={t['hidden_size']} bf16 {t['hidden_bf16']} "
              f"({t['hidden_over_topk']}x top-K), full logits V={t['vocab_size']} "
              f"{t['full_logits_fp32']} ({t['full_over_hidden']}x hidden)")
    print(f"learner side, V={w['vocab']}, N={w['tokens']}, d={w['hidden']}, chunk "
          f"{w['chunk_tokens']}, {w['threads']} threads:")
    for k in ("baseline", "fused", "logits", "unfused", "matmul"):
        print(f"  {k:<9} {med[k]:8.3f} s  ({w['min_max_s'][k][0]:.3f}-{w['min_max_s'][k][1]:.3f})"
              f"  peak extra {pk[k] / GIB:6.3f} GiB  time x{med[k] / med['baseline']:.2f}  "
              f"mem x{pk[k] / w['logits_bytes']:.3f} of one fp32 [N, V]")
    print(f"  max |KL - fp64 reference| = {w['max_abs_err_vs_fp64']:.2e} "
          f"(mean reverse KL {w['mean_reverse_kl']:.3f})")
    print(json.dumps({
        "bench": "teacher_signal", "bytes_per_token": bpt,
        "hidden_kl_time_ratio": round(time_ratio, 3), "hidden_kl_mem_ratio": round(mem_ratio, 3),
        "time_goal_met": time_ratio <= GOAL_TIME, "mem_goal_met": mem_ratio <= GOAL_MEM,
        "logits_path_time_ratio": round(logits_time_ratio, 3),
        "logits_path_mem_ratio": round(logits_mem_ratio, 3),
        "fused_matmuls_time_ratio": round(matmul_ratio, 3),
        "fused_over_unfused_time": round(med["fused"] / med["unfused"], 3),
        "fused_over_unfused_mem": round(pk["fused"] / max(pk["unfused"], 1), 3), "worker": w}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
