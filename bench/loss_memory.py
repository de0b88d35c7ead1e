"""Peak extra memory and time of each objective's loss (forward + backward) at vocab 152k, as
ratios of one fp32 cross-entropy pass over the same logits measured in the same run (issue 4).

Goal (issue 4): every objective <= 1.25x the cross-entropy's peak extra memory and <= 1.5x its time.

What one measurement is: logits [1, T, V] (V = 152064, Qwen3; `--dtype`, requires_grad) and the
micro-batch data exist already; the measured window is forward + backward w.r.t. the logits:

    baseline   F.cross_entropy(logits.view(-1, V).float(), targets, reduction="sum"), then
               autograd.grad w.r.t. the logits (for float32 logits `.float()` is the same tensor)
    candidate  objective_loss_fn(cfg)(logits, MicroBatch(input_ids, data)) -> loss_sum, then
               autograd.grad(loss_sum, logits), as the training step runs it
               (response_index = arange(T): the response covers every logit row, so both sides
               read exactly the same [T, V] logits)

Peak extra memory = peak during the window minus what was allocated just before it (the logits,
the inputs and anything else alive are excluded; the gradient the window returns is included).

- CPU: peak resident set size. Before the window, writing "5" to /proc/self/clear_refs resets the
  kernel's high-water mark VmHWM to the current VmRSS; after it, VmHWM - VmRSS(before) is the
  peak. glibc is told (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the worker's
  environment) to serve every block >= 256 KiB with mmap and give freed memory back, so what a
  previous run freed is not silently reused (the RSS after each window is checked to come back
  to its level before: `leftover_bytes`). Validated in every worker: a window that allocates and
  fills a 1 GiB tensor must report 1 GiB within 3 %, else the script exits 1.
- CUDA: torch.cuda.reset_peak_memory_stats() before, torch.cuda.max_memory_allocated() -
  torch.cuda.memory_allocated(before) after (same 1 GiB check).

Time: wall time of the window (CUDA: synchronised), median over `--repeats` rounds after one
warm-up round. Each sequence length runs in a fresh worker process; inside it the rounds
interleave the baseline and the candidates (round r: baseline, then the candidates rotated by r;
one more baseline at the end), so drift of a shared machine hits both sides. Ratios are
median(candidate) / median(baseline) (time) and median peak / median baseline peak (memory).

Objectives (megatron_opd/objectives/compose.py, default knobs, teacher top-K = 32, log_entropy on
as by default): sampled_token_opd, lsm, aopd, vopd (support=topk), grpo_opd, tip (sampled_token_opd
with token_selection.method=tip), and opd_no_entropy (sampled_token_opd with log_entropy=false,
to show what the entropy metric costs). Not run: offline_opd (the same math and statistics as
sampled_token_opd), vopd support=full (needs the teacher's whole 152k distribution per token:
teacher.top_k = vocab_size; not a 152k-vocab use case).

    OMP_NUM_THREADS=2 .venv/bin/python bench/loss_memory.py          # 2 idle cores: ~9 min
    .venv/bin/python bench/loss_memory.py --lengths 512,2048 --repeats 5 --objectives lsm,aopd
    python bench/loss_memory.py --dtype bfloat16 --lengths 4096,8192,16384   # GPU

Human-readable table on stdout, progress on stderr; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 152064  # Qwen3
TOP_K = 32
GOAL_MEM, GOAL_TIME = 1.25, 1.5
BASELINE = "cross_entropy_fp32"
OBJECTIVES = ("sampled_token_opd", "lsm", "aopd", "vopd_topk", "grpo_opd", "tip",
              "opd_no_entropy")
SKIPPED = {
    "offline_opd": "same math and statistics as sampled_token_opd (only the teacher's data source "
                   "differs): see sampled_token_opd",
    "vopd_full": "needs the teacher's whole distribution per token (teacher.top_k = vocab_size, "
                 "a [T, 152064] teacher tensor): not a 152k-vocab use case",
}
GIB = 1 << 30
# glibc: every block >= 256 KiB from mmap, freed memory returned (fixed: no dynamic threshold)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 << 10), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}


def objective_config(name: str):
    from megatron_opd.config import ObjectiveConfig

    cfg = ObjectiveConfig(terms=["sampled_token_opd"])
    if name == "sampled_token_opd":
        pass
    elif name in ("lsm", "aopd", "grpo_opd"):
        cfg.terms = [name]
    elif name == "vopd_topk":
        cfg.terms = ["vopd"]
        cfg.vopd.support = "topk"
    elif name == "tip":
        cfg.token_selection.method = "tip"
    elif name == "opd_no_entropy":
        cfg.log_entropy = False
    else:
        raise SystemExit(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return cfg


# ----------------------------------------------------------------------------------- memory probes

class CpuMemory:
    """Peak RSS over a window: VmHWM reset through /proc/self/clear_refs."""

    kind = "cpu_rss_vmhwm"

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def start(self) -> int:
        gc.collect()
        before = self._status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        if self._status("VmHWM") > self._status("VmRSS") + (8 << 20):
            raise RuntimeError("writing 5 to /proc/self/clear_refs did not reset VmHWM")
        return before

    def sync(self) -> None:
        pass

    def peak(self, before: int) -> int:
        return self._status("VmHWM") - before

    def current(self) -> int:
        gc.collect()
        return self._status("VmRSS")


class CudaMemory:
    """Peak allocated bytes of the caching allocator over a window."""

    kind = "cuda_max_memory_allocated"

    def __init__(self, torch):
        self.torch = torch

    def start(self) -> int:
        gc.collect()
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        return self.torch.cuda.memory_allocated()

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def peak(self, before: int) -> int:
        self.torch.cuda.synchronize()
        return self.torch.cuda.max_memory_allocated() - before

    def current(self) -> int:
        gc.collect()
        return self.torch.cuda.memory_allocated()


def allocator_peak(torch, fn) -> int:
    """CPU: peak of the bytes held by torch's allocator over `fn()` (the result freed inside),
    relative to before: the profiler's memory events (+bytes per allocation, -bytes per free) in
    time order, summed. Like CUDA's max_memory_allocated it counts a buffer when it is allocated,
    touched or not (RSS counts pages when first written)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = top = 0
    for e in events:
        cur += e.nbytes()
        top = max(top, cur)
    return top


# ------------------------------------------------------------------------------------------ worker

def make_inputs(torch, n_tokens: int, dtype, device, temperature: float, seed: int = 0):
    """Logits [1, T, V] and the micro-batch data of `tests/test_objective_library.py::_batch`, at
    realistic values: behaviour log-probs = the current ones + noise (ratios near 1), teacher
    log-probs near them, distinct top-K ids per token."""
    from megatron_opd.learner.train_step import MicroBatch

    g = torch.Generator(device=device).manual_seed(seed)
    t, v, k = n_tokens, VOCAB, TOP_K
    logits = torch.empty(1, t, v, dtype=dtype, device=device)
    for s in range(0, t, 1024):  # chunked: no full-size float32 temporary for bf16
        e = min(s + 1024, t)
        logits[0, s:e] = torch.randn(e - s, v, generator=g, device=device) * 2
    resp = torch.randint(0, v, (1, t), generator=g, device=device)
    with torch.no_grad():
        lp = torch.empty(1, t, device=device)
        for s in range(0, t, 1024):
            e = min(s + 1024, t)
            ls = torch.log_softmax(logits[0, s:e].float() / temperature, -1)
            lp[0, s:e] = ls.gather(-1, resp[0, s:e, None]).squeeze(-1)
            del ls
    noise = lambda scale: scale * torch.randn(1, t, generator=g, device=device)  # noqa: E731
    base = torch.randint(0, v, (1, t, 1), generator=g, device=device)
    topk_ids = (base + torch.arange(k, device=device) * (v // k)) % v  # distinct per token
    topk_lp = torch.log_softmax(torch.randn(1, t, k, generator=g, device=device) * 2, -1)
    topk_lp = topk_lp.sort(-1, descending=True).values - 0.05
    data = {
        "response_index": torch.arange(t, device=device)[None].clone(),
        "response_ids": resp,
        "loss_mask": torch.ones(1, t, device=device),
        "behaviour_logprobs": lp + noise(0.1),
        "teacher_logprobs": lp + noise(0.5),
        "temperature": torch.full((1,), temperature, device=device),
        "teacher_temperature": torch.ones(1, device=device),
        "teacher_topk_ids": topk_ids,
        "teacher_topk_logprobs": topk_lp,
        "sample_advantages": torch.randn(1, generator=g, device=device),
    }
    mb = MicroBatch(input_ids=resp.clone(), data=data)
    logits.requires_grad_(True)
    return logits, mb


def run_worker(args) -> None:
    import torch
    import torch.nn.functional as F

    from megatron_opd.learner.losses import objective_fields, objective_loss_fn

    hashes = code_hashes()  # the code this worker imported (others may edit it meanwhile)
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    mem = CudaMemory(torch) if cuda else CpuMemory()
    dtype = getattr(torch, args.dtype)
    t = args.length

    def log(msg):
        print(f"[loss_memory T={t}] {msg}", file=sys.stderr, flush=True)

    # validation of the memory probes: a window in which a 1 GiB tensor is allocated, filled and
    # freed again (a transient buffer, as inside a loss) must report a 1 GiB peak
    def probe_window():
        x = torch.ones(GIB // 4, dtype=torch.float32, device=device)
        del x

    torch.ones(1, device=device)  # lazy init outside the window
    before = mem.start()
    probe_window()
    mem.sync()
    probe = mem.peak(before)
    probe_ok = abs(probe - GIB) <= 0.03 * GIB
    log(f"memory probe: transient 1 GiB tensor -> {probe / GIB:.3f} GiB ({mem.kind})")
    alloc_probe = None
    if not cuda:
        alloc_probe = allocator_peak(torch, probe_window)
        probe_ok &= abs(alloc_probe - GIB) <= 0.03 * GIB
        log(f"allocator probe: transient 1 GiB tensor -> {alloc_probe / GIB:.3f} GiB")

    logits, mb = make_inputs(torch, t, dtype, device, args.temperature)
    v = logits.shape[-1]
    targets = mb.data["response_ids"].reshape(-1)

    def baseline():
        loss = F.cross_entropy(logits.view(-1, v).float(), targets, reduction="sum")
        (g,) = torch.autograd.grad(loss, logits)
        return g

    cases = {BASELINE: baseline}
    for name in args.objectives:
        cfg = objective_config(name)
        fields = objective_fields(cfg)
        missing = [f for f in fields if f not in mb.data]
        if missing:
            raise SystemExit(f"{name}: micro-batch lacks {missing}")
        sub = copy.copy(mb)
        sub.data = {f: mb.data[f] for f in fields}  # only what the objective declares it reads
        fn = objective_loss_fn(cfg, None)

        def candidate(fn=fn, sub=sub):
            loss_sum, _n, _metrics = fn(logits, sub)
            (g,) = torch.autograd.grad(loss_sum, logits)
            return g
        cases[name] = candidate

    times = {c: [] for c in cases}
    peaks = {c: [] for c in cases}
    leftover = {c: [] for c in cases}

    def measure(name, record):
        before = mem.start()
        t0 = time.perf_counter()
        out = cases[name]()
        mem.sync()
        dt = time.perf_counter() - t0
        peak = mem.peak(before)
        del out
        left = mem.current() - before
        if record:
            times[name].append(dt)
            peaks[name].append(peak)
            leftover[name].append(left)
        log(f"{'' if record else 'warm-up '}{name}: {dt:.3f} s, peak extra {peak / GIB:.3f} GiB, "
            f"leftover {left / 2**20:.1f} MiB")

    cands = list(args.objectives)
    for name in [BASELINE] + cands:  # warm-up round
        measure(name, record=False)
    for r in range(args.repeats):
        rot = cands[r % len(cands):] + cands[:r % len(cands)] if cands else []
        for name in [BASELINE] + rot:
            measure(name, record=True)
    measure(BASELINE, record=True)

    alloc_peaks = {}
    if not cuda:  # one more, untimed, run per case under the profiler: allocator-level peak
        for name in cases:
            alloc_peaks[name] = allocator_peak(torch, lambda name=name: cases[name]())
            log(f"{name}: allocator peak extra {alloc_peaks[name] / GIB:.3f} GiB")

    out = {"tokens": t, "code_sha256": hashes,
           "logits_bytes": logits.numel() * logits.element_size(),
           "probe_bytes": probe, "alloc_probe_bytes": alloc_probe, "probe_ok": probe_ok,
           "memory_method": mem.kind, "times_s": times, "peak_extra_bytes": peaks,
           "alloc_peak_extra_bytes": alloc_peaks, "leftover_bytes": leftover}
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------ parent

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="512,1024,2048,4096",
                   help="comma-separated numbers of response tokens T (logits [1, T, 152064])")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--objectives", default=",".join(OBJECTIVES),
                   help=f"comma-separated subset of {','.join(OBJECTIVES)}")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the logits (the baseline always computes in float32)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampler temperature in the micro-batch (1.0: no scaling, as configs use)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.objectives = [o for o in args.objectives.split(",") if o]
    for o in args.objectives:
        objective_config(o)  # fail early on unknown names
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.worker:
        run_worker(args)
        return 0

    lengths = [int(x) for x in args.lengths.split(",") if x]
    env = dict(os.environ, **MALLOC_ENV)
    results = []
    t_start = time.time()
    for t in lengths:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--length", str(t),
               "--repeats", str(args.repeats), "--objectives", ",".join(args.objectives),
               "--dtype", args.dtype, "--temperature", str(args.temperature)]
        if args.cpu:
            cmd.append("--cpu")
        print(f"[loss_memory] T={t}: worker starting", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"[loss_memory] T={t}: worker failed (rc {proc.returncode})", file=sys.stderr)
            print(proc.stdout, file=sys.stderr)
            return 1
        results.append(json.loads(lines[-1][len("RESULT "):]))

    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    rows, summary = [], {}
    all_meet, probes_ok = True, all(r["probe_ok"] for r in results)
    for r in results:
        t = r["tokens"]
        ap = r["alloc_peak_extra_bytes"]
        ce_t = statistics.median(r["times_s"][BASELINE])
        ce_tmin = min(r["times_s"][BASELINE])
        ce_m = statistics.median(r["peak_extra_bytes"][BASELINE])
        ce_a = ap.get(BASELINE)
        entry = {"logits_bytes": r["logits_bytes"], "probe_bytes": r["probe_bytes"],
                 "alloc_probe_bytes": r["alloc_probe_bytes"],
                 BASELINE: {"time_s": ce_t, "time_min_s": ce_tmin, "peak_extra_bytes": ce_m,
                            "alloc_peak_extra_bytes": ce_a, "times_s": r["times_s"][BASELINE],
                            "peak_extra_bytes_all": r["peak_extra_bytes"][BASELINE],
                            "leftover_bytes_max": max(r["leftover_bytes"][BASELINE])}}
        rows.append((BASELINE, t, ce_t, 1.0, 1.0, ce_m, 1.0, ce_a, 1.0 if ce_a else None, ""))
        for name in args.objectives:
            ts, ms = r["times_s"][name], r["peak_extra_bytes"][name]
            tm, mm = statistics.median(ts), statistics.median(ms)
            tr, mr, trmin = tm / ce_t, mm / ce_m, min(ts) / ce_tmin
            am = ap.get(name)
            ar = am / ce_a if am is not None and ce_a else None
            mem_ratio = mr if ar is None else max(mr, ar)
            ok_t, ok_m = tr <= GOAL_TIME, mem_ratio <= GOAL_MEM
            all_meet &= ok_t and ok_m
            entry[name] = {"time_s": tm, "time_ratio": tr, "time_ratio_min": trmin,
                           "peak_extra_bytes": mm, "mem_ratio": mr,
                           "alloc_peak_extra_bytes": am, "alloc_mem_ratio": ar,
                           "meets_time": ok_t, "meets_mem": ok_m, "meets_goal": ok_t and ok_m,
                           "times_s": ts, "peak_extra_bytes_all": ms,
                           "leftover_bytes_max": max(r["leftover_bytes"][name])}
            miss = [w for w, ok in (("mem", ok_m), ("time", ok_t)) if not ok]
            rows.append((name, t, tm, tr, trmin, mm, mr, am, ar,
                         "yes" if ok_t and ok_m else "NO (" + ",".join(miss) + ")"))
        summary[str(t)] = entry

    hashes = results[0]["code_sha256"]
    if any(r["code_sha256"] != hashes for r in results):
        hashes = {str(r["tokens"]): r["code_sha256"] for r in results}
        print("WARNING: the code under test changed between lengths (sha256 per length in the "
              "JSON): rerun for comparable figures", file=sys.stderr)
    print(f"loss_memory: vocab {VOCAB}, logits [1, T, V] {args.dtype}, teacher top-K {TOP_K}, "
          f"temperature {args.temperature}, {'CUDA' if cuda else 'CPU'} "
          f"({torch.get_num_threads()} threads), {args.repeats} rounds; goal mem <= {GOAL_MEM}x, "
          f"time <= {GOAL_TIME}x of {BASELINE}")
    print(f"memory: {results[0]['memory_method']}"
          + ("" if cuda else " (rss) and torch allocator events (alloc)")
          + "; probe (transient 1 GiB tensor): " + ", ".join(
              f"T={r['tokens']}: {r['probe_bytes'] / GIB:.3f}"
              + ("" if r["alloc_probe_bytes"] is None else f"/{r['alloc_probe_bytes'] / GIB:.3f}")
              + " GiB" for r in results))
    hdr = (f"{'objective':<18} {'T':>5} {'time_s':>8} {'time_x':>7} {'min_x':>6} "
           f"{'rss_GiB':>8} {'rss_x':>6} {'alloc_GiB':>9} {'alloc_x':>7}  meets goal")
    print(hdr)
    print("-" * len(hdr))
    last_t = None
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for name, t, tm, tr, trmin, mm, mr, am, ar, meets in rows:
        if last_t is not None and t != last_t:
            print()
        last_t = t
        print(f"{name:<18} {t:>5} {tm:>8.3f} {tr:>7.2f} {trmin:>6.2f} {mm / GIB:>8.3f} {mr:>6.2f} "
              f"{fmt(None if am is None else am / GIB, '>9.3f')} {fmt(ar, '>7.2f')}  {meets}")
    print("time_x: median / median of the baseline; min_x: min / min; rss_x, alloc_x: peak extra "
          "memory / the baseline's (meets: time_x and the larger memory ratio)")
    for k, why in SKIPPED.items():
        print(f"skipped {k}: {why}")
    print(json.dumps({
        "bench": "loss_memory", "vocab": VOCAB, "top_k": TOP_K, "dtype": args.dtype,
        "temperature": args.temperature, "device": "cuda" if cuda else "cpu",
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "repeats": args.repeats, "baseline": BASELINE,
        "memory_method": results[0]["memory_method"], "memory_probe_ok": probes_ok,
        "goal": {"mem_ratio_max": GOAL_MEM, "time_ratio_max": GOAL_TIME},
        "all_meet_goal": all_meet, "skipped": SKIPPED, "code_sha256": hashes,
        "host": platform.node(), "torch": torch.__version__,
        "wall_s": round(time.time() - t_start, 1), "results": summary}))
    return 0 if probes_ok else 1


def code_hashes() -> dict[str, str]:
    """Which version of the code under test was measured (the working tree, committed or not)."""
    import hashlib

    out = {}
    for rel in ("megatron_opd/learner/losses.py", "megatron_opd/learner/vocab_parallel.py",
                "megatron_opd/objectives/compose.py"):
        out[rel] = hashlib.sha256((ROOT / rel).read_bytes()).hexdigest()[:12]
    return out


if __name__ == "__main__":
    sys.exit(main())
