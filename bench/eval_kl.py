"""Held-out reverse-KL evaluation: time and peak memory of the sampled k1/k3 path vs the old
exact path (teacher top-K = whole vocabulary, a [rows, T, V] tensor), at several vocab sizes.

    OMP_NUM_THREADS=2 .venv/bin/python bench/eval_kl.py [--vocabs 4096,32000,152064] [--rows 8]
        [--prompt 32] [--T 128] [--repeats 5] [--exact-budget-gb 4]

What is measured, from the student's logits [rows, P + T, V] (fp32, the learner's forward output,
allocated before the baseline is taken) to the per-response KL table:
- `old_exact`: the pre-issue-12 code (copied below from git history): the teacher's answers with
  top-K = V ([T, V] ids + log-probs per response, as the client would hold them: a lower bound,
  the real cost of parsing 2V JSON numbers per position is far larger and not counted), scattered
  into [rows, T, V] log-probs, then the exact KL of the gathered [rows, T, V] student logits.
- `sampled`: `evaluate.kl_inputs` (teacher top_k = 0: one log-prob per token) and
  `losses.eval_kl_fn(exact=False)` (log pi(y) via vocab_parallel_token_stats, chunked).
- `exact_new` (only where V <= 4096, the default exact_kl_max_vocab): the exact mode of the new
  code (both the table and k1/k3).
Each (path, V) runs in a fresh subprocess: `extra_peak_mb` = peak RSS - RSS once the logits exist;
`time_s` = median (and `time_min_s` the minimum) of `repeats` runs after one warm-up. The
responses are uniform random ids (not drawn from pi): the KL values are only checksums. On a
shared 2-core machine timings move with other jobs: compare the minima too. The old path is
skipped where its estimated footprint (rows*T*V*32 bytes) exceeds --exact-budget-gb, and the
output says so. Ratios: old / sampled (median and min times, extra peak memory).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Teacher:
    """Stub of SGLangClient.score: log q of the scored tokens, and top-K = V when asked (ids and
    log-probs arrays of [T, V] per response, what the client would build from the JSON)."""

    def __init__(self, vocab: int):
        g = np.random.default_rng(0)
        x = g.normal(size=vocab).astype(np.float32)
        self.row = x - np.log(np.exp(x.astype(np.float64)).sum()).astype(np.float32)
        self.ids = np.arange(vocab, dtype=np.int32)

    def score(self, input_ids, *, start, top_k=0):
        from megatron_opd.serving.sglang_client import ScoreResult

        out = []
        for x, s in zip(input_ids, start):
            n = len(x) - s
            lp = self.row[np.asarray(x[s:])]
            if top_k:
                out.append(ScoreResult(lp, np.tile(self.ids[:top_k], (n, 1)),
                                       np.tile(self.row[:top_k], (n, 1))))
            else:
                none = np.zeros((n, 0), np.int32)
                out.append(ScoreResult(lp, none, none.astype(np.float32)))
        return out


# ------------------------------------------------------------------ the old code (git 3b87531)
def _old_kl_inputs(prompts, responses, teacher, vocab_size: int, pad: int, mbs: int) -> dict:
    n = len(prompts)
    rows = -(-n // mbs) * mbs
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    T = max(1, max(len(r) for r in responses))
    ids = torch.full((rows, L), pad, dtype=torch.long)
    index = torch.zeros(rows, T, dtype=torch.long)
    mask = torch.zeros(rows, T)
    logq = torch.zeros(rows, T, vocab_size)
    keep = [i for i, r in enumerate(responses) if r]
    scores = teacher.score([prompts[i] + responses[i] for i in keep],
                           start=[len(prompts[i]) for i in keep], top_k=vocab_size) if keep else []
    for i, sc in zip(keep, scores):
        P, m = len(prompts[i]), len(responses[i])
        ids[i, :P + m] = torch.tensor(prompts[i] + responses[i])
        index[i, :m] = torch.arange(P - 1, P - 1 + m)
        mask[i, :m] = 1.0
        row = torch.full((m, vocab_size), -torch.inf)
        row.scatter_(1, torch.as_tensor(sc.topk_ids, dtype=torch.long),
                     torch.as_tensor(sc.topk_logprobs, dtype=torch.float32))
        logq[i, :m] = row
    return {"input_ids": ids, "response_index": index, "loss_mask": mask,
            "teacher_full_logprobs": logq}


def _old_reverse_kl(logits, d):
    from megatron_opd.learner.losses import response_logits
    from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats

    z = response_logits(logits, d["response_index"]).float()
    stats = vocab_parallel_token_stats(z, torch.zeros_like(d["response_index"]))
    logp = z - stats.logsumexp.unsqueeze(-1)
    logq = d["teacher_full_logprobs"][..., 0:z.shape[-1]]
    p = logp.exp()
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    mask = d["loss_mask"]
    return (kl * mask).sum() / mask.sum()


# ------------------------------------------------------------------ one measurement (child)
def child(path: str, vocab: int, rows: int, P: int, T: int, repeats: int) -> dict:
    from megatron_opd.learner.evaluate import kl_inputs
    from megatron_opd.learner.losses import eval_kl_fn
    from megatron_opd.learner.train_step import MicroBatch

    torch.manual_seed(0)
    g = np.random.default_rng(1)
    prompts = [g.integers(0, vocab, P).tolist() for _ in range(rows)]
    responses = [g.integers(0, vocab, T).tolist() for _ in range(rows)]
    teacher = _Teacher(vocab)
    logits = torch.randn(rows, P + T, vocab)  # the student's forward output
    base = _rss_mb()
    base_peak = _peak_mb()
    times = []
    result = None
    for rep in range(repeats + 1):  # the first run warms up (in the peak, not in the times)
        x = logits.clone() if path != "old_exact" else logits  # the new path masks in place
        t0 = time.perf_counter()
        with torch.no_grad():
            if path == "old_exact":
                d = _old_kl_inputs(prompts, responses, teacher, vocab, 0, rows)
                result = float(_old_reverse_kl(x, d))
            else:
                exact = path == "exact_new"
                d = kl_inputs(prompts, responses, teacher, vocab, 0, rows, exact)
                out: dict = {}
                fn = eval_kl_fn(None, 0, vocab, exact=exact, rows_out=out)
                fn(x, MicroBatch(d["input_ids"], {k: v for k, v in d.items()
                                                  if isinstance(v, torch.Tensor)}))
                t = out[0]
                result = float((t[:, 3] if exact else t[:, 1]).sum() / t[:, 2].sum())
        if rep:
            times.append(time.perf_counter() - t0)
        del d, x
    # the clone of the logits (new path, in-place masking) is not part of the method: subtract it
    clone_mb = 0 if path == "old_exact" else logits.numel() * 4 / 2**20
    peak = max(_peak_mb(), base_peak)
    return {"path": path, "vocab": vocab, "time_s": float(np.median(times)),
            "time_min_s": float(np.min(times)),
            "extra_peak_mb": max(0.0, peak - base - clone_mb),
            "logits_mb": logits.numel() * 4 / 2**20, "checksum": result}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocabs", default="4096,32000,152064")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--exact-budget-gb", type=float, default=4.0)
    ap.add_argument("--child", nargs=2, metavar=("PATH", "VOCAB"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.rows, a.prompt, a.T, a.repeats)))
        return
    results, skipped = {}, {}
    for v in [int(x) for x in a.vocabs.split(",")]:
        paths = ["sampled"]
        est_gb = a.rows * a.T * v * 32 / 2**30
        if est_gb <= a.exact_budget_gb:
            paths.insert(0, "old_exact")
        else:
            skipped[v] = (f"old exact path skipped: ~{est_gb:.1f} GB estimated "
                          f"(rows*T*V*32 B) > --exact-budget-gb {a.exact_budget_gb}")
            print(f"V={v}: {skipped[v]}", flush=True)
        if v <= 4096:
            paths.append("exact_new")
        for p in paths:
            cmd = [sys.executable, __file__, "--child", p, str(v), "--rows", str(a.rows),
                   "--prompt", str(a.prompt), "--T", str(a.T), "--repeats", str(a.repeats)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                          cwd=REPO).stdout.strip().splitlines()[-1])
            results[(p, v)] = r
            print(f"V={v:>7} {p:>10}: time {r['time_s'] * 1e3:8.1f} ms (min "
                  f"{r['time_min_s'] * 1e3:.1f})  extra peak {r['extra_peak_mb']:8.1f} MB  "
                  f"(logits {r['logits_mb']:.0f} MB)",
                  flush=True)
    summary = {"rows": a.rows, "prompt": a.prompt, "T": a.T, "repeats": a.repeats, "sizes": {}}
    for v in sorted({v for _, v in results}):
        s = {p: {k: results[(p, v)][k] for k in ("time_s", "time_min_s", "extra_peak_mb")}
             for p in ("old_exact", "sampled", "exact_new") if (p, v) in results}
        s["logits_mb"] = results[("sampled", v)]["logits_mb"]
        if ("old_exact", v) in results:
            o, n = results[("old_exact", v)], results[("sampled", v)]
            s["time_ratio_old_over_sampled"] = o["time_s"] / n["time_s"]
            s["time_min_ratio_old_over_sampled"] = o["time_min_s"] / n["time_min_s"]
            s["extra_peak_ratio_old_over_sampled"] = (o["extra_peak_mb"]
                                                      / max(n["extra_peak_mb"], 1.0))
            print(f"V={v}: old exact / sampled: time x{s['time_ratio_old_over_sampled']:.1f}, "
                  f"(min x{s['time_min_ratio_old_over_sampled']:.1f}), "
                  f"extra peak memory x{s['extra_peak_ratio_old_over_sampled']:.1f}", flush=True)
        if v in skipped:
            s["old_exact_skipped"] = skipped[v]
        summary["sizes"][str(v)] = s
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
