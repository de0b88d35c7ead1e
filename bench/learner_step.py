"""Throughput and MFU of one learner optimizer step, per precision, against a raw matmul baseline.

One step = forward + backward over all micro-batches + optimizer, through the production path
(`qwen3_moe.build_model_chunks`, `train_step.wrap_for_training`, `forward_backward`,
`optimizer_step`; megatron DDP + distributed optimizer, world of one). Each precision mode builds
a fresh model; the median over `--steps` timed steps (after `--warmup`) is reported.

Model FLOPs (what MFU counts; 2 FLOPs per multiply-add, backward = 2 x forward):

    N_active = L * [ h*(n_q + 2*n_kv)*d      QKV projection
                   + n_q*d*h                 attention output projection
                   + h*E                     router
                   + k * 3*h*f ]             the top-k experts only (SwiGLU: fc1 h->2f, fc2 f->h)
             + h*V                           output layer (the embedding lookup is free)
    FLOPs/token = 6 * N_active  +  6 * L * n_q * d * s
                                   (QK^T and AV: 2 matmuls x 2 FLOPs x n_q*d x s/2 causal average
                                    context, x3 for forward+backward)
    MFU = FLOPs/token * tokens/s / peak FLOP/s

(h hidden, L layers, n_q / n_kv query / KV heads, d head dim, E experts, k top-k, f expert FFN
size, V vocab, s sequence length; norms, softmax, routing and the loss are not counted.)

Peak FLOP/s: `--peak-tflops`, else on NVIDIA GPUs the dense (no sparsity) datasheet figure for
H100/H200 (bf16 for bf16 modes, fp8 for FP8 modes), else - on CPU - the rate of the baseline
matmul measured in this run in the mode's dtype (then MFU = the ratio below).

Baseline, in the same run just before and after each mode: a plain `torch.matmul` of n x n
matrices in the mode's dtype (FP8 modes: `torch._scaled_mm` in e4m3 when it runs, else bf16)
repeated so that it does the same FLOPs as one learner step (n <= 2048 on CPU, 8192 on GPU).
Printed ratio = learner achieved FLOP/s / raw matmul FLOP/s.

Modes: float32, bfloat16 (megatron local layer spec; on CPU); bfloat16-te (TE layer spec, no
FP8), fp8-delayed, fp8-tensorwise, fp8-blockwise, fp8-mxfp8 (TE layer spec; GPU + Transformer
Engine). Modes that cannot run here are printed as SKIPPED with the reason. Last line: one JSON
object with every figure and ratio.

    .venv/bin/python bench/learner_step.py                      # CPU: tiny model, < 2 min
    python bench/learner_step.py --preset a3b-8l --precisions auto   # GPU: bf16 vs FP8 recipes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_opd.models.precision import (FP8_RECIPES, PrecisionConfig,  # noqa: E402
                                           detect_environment, fp8_unavailable_reason, resolve)
from megatron_opd.models.spec import MoEModelSpec  # noqa: E402

PRESETS = {
    # CPU default: a few seconds per mode.
    "tiny": dict(spec=dict(vocab_size=1024, hidden_size=128, num_layers=2, num_attention_heads=4,
                           num_kv_heads=2, head_dim=32, moe_ffn_hidden_size=128, num_experts=8,
                           moe_router_topk=2, max_position_embeddings=4096),
                 seq_len=256, batch_size=8, micro_batch_size=4),
    # GPU: Qwen3-30B-A3B layer shapes, 8 of its 48 layers (~2.6B params, fits one 80 GB GPU).
    "a3b-8l": dict(spec=dict(vocab_size=32768, hidden_size=2048, num_layers=8,
                             num_attention_heads=32, num_kv_heads=4, head_dim=128,
                             moe_ffn_hidden_size=768, num_experts=64, moe_router_topk=8,
                             max_position_embeddings=8192),
                   seq_len=4096, batch_size=8, micro_batch_size=1),
}

MODES = {
    "float32": (PrecisionConfig(params_dtype="float32"), False),
    "bfloat16": (PrecisionConfig(params_dtype="bfloat16"), False),
    "bfloat16-te": (PrecisionConfig(params_dtype="bfloat16"), True),
    **{f"fp8-{r}": (PrecisionConfig(params_dtype="bfloat16", fp8=r), True) for r in FP8_RECIPES},
}

# Dense (no sparsity) peak TFLOP/s per GPU, NVIDIA datasheets (the sparse figures halved).
# Matched against torch.cuda.get_device_name() in this order.
PEAK_TFLOPS = [
    ("H200 NVL", {"bfloat16": 835.5, "fp8": 1670.5}),
    ("H200", {"bfloat16": 989.4, "fp8": 1978.9}),
    ("H100 NVL", {"bfloat16": 835.5, "fp8": 1670.5}),
    ("H100 PCIe", {"bfloat16": 756.5, "fp8": 1513.0}),
    ("H100", {"bfloat16": 989.4, "fp8": 1978.9}),  # SXM ("NVIDIA H100 80GB HBM3")
]


# ------------------------------------------------------------------ FLOPs
def model_flops(spec: MoEModelSpec, seq_len: int) -> dict:
    h, L, d = spec.hidden_size, spec.num_layers, spec.head_dim
    nq, nkv, E, k, f, V = (spec.num_attention_heads, spec.num_kv_heads, spec.num_experts,
                           spec.moe_router_topk, spec.moe_ffn_hidden_size, spec.vocab_size)
    attn = h * (nq + 2 * nkv) * d + nq * d * h
    active = L * (attn + h * E + k * 3 * h * f) + h * V
    total = L * (attn + h * E + E * 3 * h * f) + h * V * (1 if spec.tie_word_embeddings else 2)
    per_token = 6 * active + 6 * L * nq * d * seq_len
    return {"active_params": active, "total_params": total, "flops_per_token": per_token}


def peak_for(mode: str, device_name: str | None, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-tflops"
    if device_name is None:
        return None, "measured"  # filled in from the baseline
    kind = "fp8" if mode.startswith("fp8-") else "bfloat16" if "bfloat16" in mode else None
    for key, peaks in PEAK_TFLOPS:
        if key in device_name and kind in peaks:
            return peaks[kind], f"datasheet {key} {kind} dense"
    return None, f"no table entry for {device_name!r} {mode} (pass --peak-tflops)"


# ------------------------------------------------------------------ timing
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_baseline(dtype: str, flops: float, on_gpu: bool, samples: int = 5) -> dict:
    """Achieved TFLOP/s of `repeats` n x n matmuls totalling ~`flops`."""
    cap = 8192 if on_gpu else 2048
    n = int(min(cap, max(64, round((flops / 2) ** (1 / 3)))))
    n = max(64, n // 16 * 16)
    repeats = max(1, round(flops / (2 * n ** 3)))
    device = "cuda" if on_gpu else "cpu"
    if dtype == "fp8":
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major
        one = torch.ones((), device=device)
        fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        fn = lambda: torch.matmul(a, b)  # noqa: E731
    fn()
    fn()
    sync()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"dtype": dtype, "n": n, "repeats": repeats, "flops": 2 * n ** 3 * repeats,
            "seconds": times}


def _rate(b: dict) -> float:
    return b["flops"] / statistics.median(b["seconds"]) / 1e12


# ------------------------------------------------------------------ one precision mode
def _build_te_chunks(spec, config, resolved, use_te: bool) -> list:
    """qwen3_moe.build_model_chunks with the layer spec chosen by the precision (TE for FP8).
    World of one: one chunk holding the whole pipeline."""
    from megatron.core.models.gpt import GPTModel

    from megatron_opd.models.precision import gpt_layer_spec

    layer_spec = gpt_layer_spec(resolved, spec.num_experts, use_te=use_te)
    return [GPTModel(
        config=config, transformer_layer_spec=layer_spec, vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_position_embeddings, pre_process=True, post_process=True,
        parallel_output=True, share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope", rotary_base=int(spec.rope_theta), rotary_percent=1.0)]


def _gpu_shims() -> None:
    """train_step.forward_backward builds its attention mask / positions on the CPU and sums
    the reported losses into CPU tensors (all-reduced over the data-parallel group): fine on CPU,
    not yet on GPU. Until it is device-aware: inputs are moved to the GPU by a forward pre-hook
    (see run_mode), the reports are moved to the CPU, and the process group runs gloo for CPU
    tensors and NCCL for CUDA ones."""
    from megatron_opd.learner import train_step

    if getattr(train_step._reduce_metrics, "_bench_shim", False):
        return
    original = train_step._reduce_metrics

    def reduce_on_cpu(reduced, groups):
        cpu = [{k: tuple(torch.as_tensor(x).detach().cpu() for x in v) for k, v in r.items()}
               for r in reduced]
        return original(cpu, groups)

    reduce_on_cpu._bench_shim = True
    train_step._reduce_metrics = reduce_on_cpu


def run_mode(mode: str, spec, args, groups, env, flops_per_step: float) -> dict:
    from megatron_opd.config import ParallelConfig, TrainConfig
    from megatron_opd.learner.train_step import (MicroBatch, forward_backward, optimizer_step,
                                                 wrap_for_training)
    from megatron_opd.learner.vocab_parallel import vocab_parallel_token_stats
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config

    pc, use_te = MODES[mode]
    resolved = resolve(pc, env.cuda_capability, env.te_version, cuda_version=env.cuda_version,
                       te_error=env.te_error)
    on_gpu = env.cuda_capability is not None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    if (args.micro_batch_size * args.seq_len) % resolved.alignment:
        raise ValueError(f"micro-batch tokens {args.micro_batch_size} x {args.seq_len} must be a "
                         f"multiple of {resolved.alignment} for {mode}")
    layout = ParallelConfig(micro_batch_size=args.micro_batch_size)
    config = transformer_config(spec, layout=layout, **resolved.transformer_config_kwargs())
    chunks = (_build_te_chunks(spec, config, resolved, use_te) if use_te
              else build_model_chunks(spec, config))
    if on_gpu:
        for c in chunks:
            c.cuda(torch.cuda.current_device())
            c.register_forward_pre_hook(
                lambda m, a: tuple(x.cuda(non_blocking=True) if torch.is_tensor(x) else x for x in a))
    total = args.warmup + args.steps
    train = TrainConfig(steps=total + 1, lr=1e-4, warmup_steps=0, grad_clip=1.0)
    ddp, optimizer, scheduler = wrap_for_training(chunks, train, groups)
    device = "cuda" if on_gpu else "cpu"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (args.batch_size, args.seq_len), generator=g)
    targets = torch.randint(0, spec.vocab_size, (args.batch_size, args.seq_len), generator=g)
    mbs = args.micro_batch_size
    micro = [MicroBatch(ids[i:i + mbs].to(device), {"targets": targets[i:i + mbs].to(device)})
             for i in range(0, args.batch_size, mbs)]

    def loss_fn(logits, mb):
        lp = vocab_parallel_token_stats(logits, mb.data["targets"], group=groups.tp).logprobs
        return -lp.sum(), torch.tensor(lp.numel(), device=lp.device), {}

    times, losses, stepped = [], [], []
    for step in range(total):
        sync()
        t0 = time.perf_counter()
        loss, tokens, _ = forward_backward(ddp, micro, loss_fn, groups)
        ok, _ = optimizer_step(optimizer, scheduler, loss)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
        stepped.append(ok)
    peak_mem = torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else None
    del ddp, optimizer, scheduler, chunks
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    med = statistics.median(times)
    return {"status": "ok", "precision": resolved.describe(), "te_layer_spec": use_te,
            "step_s_median": med, "step_s_min": min(times), "step_s": times,
            "tokens_per_step": tokens, "tokens_per_s": tokens / med,
            "achieved_tflops": flops_per_step / med / 1e12,
            "loss_first": losses[0], "loss_last": losses[-1], "all_steps_applied": all(stepped),
            "peak_gpu_mem_gib": peak_mem}


def skip_reason(mode: str, env) -> str | None:
    pc, use_te = MODES[mode]
    if pc.fp8 is not None:
        return fp8_unavailable_reason(pc.fp8, env.cuda_capability, env.te_version,
                                      env.cuda_version, env.te_error)
    if use_te:
        if env.cuda_capability is None:
            return "no CUDA GPU (the TE layer spec needs one)"
        if env.te_version is None:
            return f"Transformer Engine is not usable: {env.te_error}" if env.te_error \
                else "Transformer Engine is not installed"
    return None


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--precisions", default="auto",
                    help=f"comma list of {list(MODES)} or 'auto' (CPU: float32,bfloat16; GPU: "
                         f"bfloat16 and the TE modes); modes that cannot run are reported skipped")
    for key in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
                "moe_ffn_hidden_size", "num_experts", "moe_router_topk", "vocab_size"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s for MFU (default: datasheet on H100/H200, measured matmul on CPU)")
    args = ap.parse_args()

    preset = PRESETS[args.preset]
    spec_kw = dict(preset["spec"])
    for key in list(spec_kw) + ["vocab_size"]:
        if getattr(args, key, None) is not None:
            spec_kw[key] = getattr(args, key)
    for key in ("seq_len", "batch_size", "micro_batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    spec_kw["max_position_embeddings"] = max(spec_kw["max_position_embeddings"], args.seq_len)
    spec = MoEModelSpec(**spec_kw)
    spec.validate()
    if args.batch_size % args.micro_batch_size:
        ap.error("--batch-size must be a multiple of --micro-batch-size")

    t_start = time.perf_counter()
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import init_distributed

    env = detect_environment()
    on_gpu = env.cuda_capability is not None
    install_megatron_cpu_compat()  # nothing is patched when CUDA is present
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _gpu_shims()
        groups = init_distributed(ParallelConfig(), seed=0, backend="cpu:gloo,cuda:nccl")
        device_name = torch.cuda.get_device_name()
        device = f"{device_name} (sm_{env.cuda_capability[0]}{env.cuda_capability[1]}, CUDA {env.cuda_version})"
    else:
        groups = init_distributed(ParallelConfig(), seed=0)
        device_name = None
        device = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"

    if args.precisions == "auto":
        wanted = (["bfloat16", "bfloat16-te", *[f"fp8-{r}" for r in FP8_RECIPES]] if on_gpu
                  else ["float32", "bfloat16", "bfloat16-te", *[f"fp8-{r}" for r in FP8_RECIPES]])
    else:
        wanted = [m.strip() for m in args.precisions.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in MODES]
        if unknown:
            ap.error(f"unknown precisions {unknown}; known: {list(MODES)}")

    fl = model_flops(spec, args.seq_len)
    tokens = args.batch_size * args.seq_len
    flops_per_step = fl["flops_per_token"] * tokens
    print(f"device: {device}")
    print(f"torch {torch.__version__}, Transformer Engine: {env.te_version or env.te_error or 'not installed'}")
    print(f"model: {spec_kw}; seq {args.seq_len}, batch {args.batch_size} "
          f"(micro-batches of {args.micro_batch_size}), {tokens} tokens/step")
    print(f"params: {fl['total_params'] / 1e6:.2f}M total, {fl['active_params'] / 1e6:.2f}M active; "
          f"{fl['flops_per_token'] / 1e6:.2f} MFLOP/token, {flops_per_step / 1e9:.2f} GFLOP/step")

    modes: dict[str, dict] = {}
    for mode in wanted:
        reason = skip_reason(mode, env)
        if reason is not None:
            modes[mode] = {"status": "skipped", "reason": reason}
            print(f"SKIPPED {mode}: {reason}")
            continue
        base_dtype = "fp8" if mode.startswith("fp8-") else MODES[mode][0].params_dtype
        baseline_note = None
        try:
            before = matmul_baseline(base_dtype, flops_per_step, on_gpu)
        except Exception as e:  # torch._scaled_mm missing / unsupported here
            baseline_note = f"fp8 matmul baseline failed ({type(e).__name__}: {e}); bf16 used"
            base_dtype = "bfloat16"
            before = matmul_baseline(base_dtype, flops_per_step, on_gpu)
        try:
            result = run_mode(mode, spec, args, groups, env, flops_per_step)
        except Exception as e:
            modes[mode] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            print(f"FAILED {mode}: {type(e).__name__}: {e}")
            continue
        after = matmul_baseline(base_dtype, flops_per_step, on_gpu)
        baseline = dict(before, seconds=before["seconds"] + after["seconds"])
        matmul_tflops = _rate(baseline)
        peak, source = peak_for(mode, device_name, args.peak_tflops)
        if peak is None and device_name is None:
            peak, source = matmul_tflops, (f"measured: torch.matmul {base_dtype} "
                                           f"{baseline['n']}x{baseline['n']} in this run")
        result.update(
            baseline={"dtype": base_dtype, "n": baseline["n"], "repeats": baseline["repeats"],
                      "tflops": matmul_tflops, "note": baseline_note},
            learner_over_matmul=result["achieved_tflops"] / matmul_tflops,
            peak_tflops=peak, peak_source=source,
            mfu=result["achieved_tflops"] / peak if peak else None)
        modes[mode] = result
        mfu = f"{result['mfu'] * 100:.2f}%" if result["mfu"] is not None else f"n/a ({source})"
        print(f"{mode:>15}: step {result['step_s_median'] * 1e3:8.1f} ms (min {result['step_s_min'] * 1e3:.1f}), "
              f"{result['tokens_per_s']:10.0f} tok/s, {result['achieved_tflops'] * 1e3:8.2f} GFLOP/s | "
              f"matmul {base_dtype} n={baseline['n']}x{baseline['repeats']}: {matmul_tflops * 1e3:8.2f} GFLOP/s "
              f"| learner/matmul {result['learner_over_matmul']:.3f} | MFU {mfu} | "
              f"loss {result['loss_first']:.3f}->{result['loss_last']:.3f}"
              + ("" if result["all_steps_applied"] else " | SOME STEPS SKIPPED"))

    ok = {m: r for m, r in modes.items() if r["status"] == "ok"}
    ratios = {}
    for a, b in (("bfloat16", "float32"), ("bfloat16-te", "bfloat16"),
                 *[(f"fp8-{r}", "bfloat16-te") for r in FP8_RECIPES]):
        if a in ok and b in ok:
            ratios[f"tokens_per_s {a}/{b}"] = ok[a]["tokens_per_s"] / ok[b]["tokens_per_s"]
    for m, r in ok.items():
        ratios[f"learner/matmul {m}"] = r["learner_over_matmul"]
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.3f}")
    skipped = {m: r["reason"] for m, r in modes.items() if r["status"] == "skipped"}
    print(f"ran: {sorted(ok)}; skipped: {sorted(skipped)}; failed: "
          f"{sorted(m for m, r in modes.items() if r['status'] == 'failed')}; "
          f"wall {time.perf_counter() - t_start:.1f} s")
    print(json.dumps({
        "bench": "learner_step", "device": device, "torch": torch.__version__,
        "te_version": env.te_version, "te_error": env.te_error,
        "model": {**spec_kw, "seq_len": args.seq_len, "batch_size": args.batch_size,
                  "micro_batch_size": args.micro_batch_size, **fl,
                  "tokens_per_step": tokens, "flops_per_step": flops_per_step},
        "steps": args.steps, "warmup": args.warmup, "modes": modes, "skipped": skipped,
        "ratios": ratios}))


if __name__ == "__main__":
    main()
