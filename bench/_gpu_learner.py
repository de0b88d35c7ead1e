"""The learner step of the GPU suite (bench/gpu_suite.py parts 2 and 4; not meant to be run by
hand): a Qwen3-30B-A3B slice (the real config's hidden size, experts, top-k, FFN and vocabulary
sizes) with as many layers as plan's memory model fits on this device, trained for a few steps
through the production path (bench/learner_step.py's `run_mode`: build_model_chunks,
wrap_for_training = megatron DDP + distributed optimizer, forward_backward, optimizer_step),
world of one, per precision mode. Writes one JSON object to --out.

--dry-run: CPU, the dry spec (bench/_gpu_common.py), gloo, the megatron CPU stand-ins (the
suite hides the GPUs from it, so install_megatron_cpu_compat applies them; on a GPU it applies
nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default="bfloat16")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-layers", type=int, default=None, help="cap the layer search (wall time)")
    args = ap.parse_args()

    import torch

    from _gpu_common import (DRY_SHAPES, GPU_MEMORY_FRACTION, GPU_SHAPES, layers_that_fit,
                             model_flops, slice_config, with_layers)
    from learner_step import _rate, matmul_baseline, peak_for, run_mode, skip_reason

    from megatron_opd.compat.megatron_cpu import install_megatron_compat, install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.gpu_metrics import GpuMetrics
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.models.precision import detect_environment

    t0 = time.perf_counter()
    shapes = DRY_SHAPES if args.dry_run else GPU_SHAPES
    env = detect_environment()
    on_gpu = env.cuda_capability is not None
    if args.dry_run and on_gpu:
        raise SystemExit("--dry-run must not see a GPU (gpu_suite.py hides them)")
    patched = install_megatron_cpu_compat()  # [] on a GPU: no CPU stand-in there
    # on a GPU without Transformer Engine, the one device-independent patch (the learner's own
    # install_megatron_compat applies it too): what this run needed is reported
    without_te = [] if not on_gpu else install_megatron_compat()
    groups = init_distributed(ParallelConfig(), seed=0)
    if on_gpu:
        device_name = torch.cuda.get_device_name()
        # plan is an estimate: keep a margin rather than lose the run to an OOM
        memory = torch.cuda.get_device_properties(0).total_memory * GPU_MEMORY_FRACTION
    else:
        device_name, memory = None, shapes.memory_gib * 2 ** 30
    cap = min(shapes.max_layers, args.max_layers or shapes.max_layers)
    cfg = slice_config(args.dry_run, shapes)
    full_layers = cfg.model.num_layers
    layers, tried = layers_that_fit(cfg, shapes.seq_len, memory, cap)
    if layers == 0:
        raise SystemExit(f"not one layer fits {memory / 2 ** 30:.1f} GiB: {tried}")
    cfg = with_layers(cfg, layers)
    spec = cfg.model
    flops = model_flops(spec, shapes.seq_len)
    tokens = shapes.batch_size * shapes.seq_len
    flops_per_step = flops["flops_per_token"] * tokens
    run_args = types.SimpleNamespace(seq_len=shapes.seq_len, batch_size=shapes.batch_size,
                                     micro_batch_size=shapes.micro_batch_size,
                                     steps=args.steps, warmup=args.warmup)
    from megatron_opd.plan import learner_memory

    plan_gib = learner_memory(cfg, shapes.seq_len)["total"] / 2 ** 30
    print(f"device: {device_name or 'cpu'}; {layers} of {full_layers} "
          f"A3B layers fit {memory / 2 ** 30:.1f} GiB by plan ({plan_gib:.1f} GiB estimated); "
          f"{flops['total_params'] / 1e9:.3f}B params, {flops['active_params'] / 1e9:.3f}B "
          f"active; {tokens} tokens/step", flush=True)

    modes = {}
    metrics = GpuMetrics()
    for mode in [m for m in args.modes.split(",") if m]:
        reason = skip_reason(mode, env)
        if reason is not None:
            modes[mode] = {"status": "skipped", "reason": reason}
            print(f"SKIPPED {mode}: {reason}", flush=True)
            continue
        base_dtype = "fp8" if mode.startswith("fp8-") else \
            ("bfloat16" if "bfloat16" in mode else "float32")
        try:
            before = matmul_baseline(base_dtype, flops_per_step, on_gpu)
        except Exception as e:  # torch._scaled_mm refused here
            print(f"fp8 matmul baseline failed ({type(e).__name__}: {e}); bf16 used", flush=True)
            base_dtype = "bfloat16"
            before = matmul_baseline(base_dtype, flops_per_step, on_gpu)
        try:
            result = run_mode(mode, spec, run_args, groups, env, flops_per_step)
        except Exception as e:
            modes[mode] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                           "out_of_memory": isinstance(e, torch.cuda.OutOfMemoryError)}
            print(f"FAILED {mode}: {type(e).__name__}: {e}", flush=True)
            del e  # (its traceback holds the model)
            if on_gpu:
                torch.cuda.empty_cache()
            continue
        gpu_now = metrics.sample()  # just after the timed steps: utilisation, power, memory
        after = matmul_baseline(base_dtype, flops_per_step, on_gpu)
        matmul_tflops = _rate(dict(before, seconds=before["seconds"] + after["seconds"]))
        peak, source = peak_for(mode, device_name, None)
        if peak is None and device_name is None:
            peak, source = matmul_tflops, f"measured: torch.matmul {base_dtype} in this run"
        med = result["step_s_median"]
        out = {
            "status": "ok", "precision": result["precision"],
            "step_s_median": med, "step_s": result["step_s"],
            "tokens_per_step": result["tokens_per_step"], "tokens_per_s": result["tokens_per_s"],
            "achieved_tflops": result["achieved_tflops"], "peak_tflops": peak,
            "peak_source": source, "mfu": result["achieved_tflops"] / peak if peak else None,
            "matmul_tflops": matmul_tflops, "matmul_dtype": base_dtype,
            "learner_over_matmul": result["achieved_tflops"] / matmul_tflops,
            "loss_first": result["loss_first"], "loss_last": result["loss_last"],
            "losses_finite": all(math.isfinite(x) for x in (result["loss_first"], result["loss_last"])),
            "all_steps_applied": result["all_steps_applied"],
            "peak_gpu_mem_gib": result["peak_gpu_mem_gib"], "gpu_metrics": gpu_now}
        modes[mode] = out
        mfu = f"{out['mfu'] * 100:.2f} %" if out["mfu"] is not None else "n/a"
        print(f"{mode}: step {med * 1e3:.1f} ms (median of {len(result['step_s'])}), "
              f"{out['tokens_per_s']:.0f} tokens/s, {out['achieved_tflops']:.4g} TFLOP/s, MFU {mfu} "
              f"({source}); raw matmul {matmul_tflops:.4g} TFLOP/s, learner/matmul "
              f"{out['learner_over_matmul']:.3f}; loss {out['loss_first']:.3f} -> "
              f"{out['loss_last']:.3f}; peak memory "
              f"{out['peak_gpu_mem_gib'] if out['peak_gpu_mem_gib'] is None else round(out['peak_gpu_mem_gib'], 1)}"
              f" GiB (plan {plan_gib:.1f})", flush=True)
    metrics.close()
    destroy_distributed()
    ok = {m: r for m, r in modes.items() if r["status"] == "ok"}
    ratios = {f"tokens_per_s {m}/bfloat16-te": r["tokens_per_s"] / ok["bfloat16-te"]["tokens_per_s"]
              for m, r in ok.items() if m.startswith("fp8-") and "bfloat16-te" in ok}
    Path(args.out).write_text(json.dumps({
        "device": device_name or "cpu", "dry_run": args.dry_run,
        "cpu_compat_patches": patched, "patches_without_te": without_te,
        "backend": "cpu:gloo,cuda:nccl" if on_gpu else "gloo",
        "te_version": env.te_version, "te_error": env.te_error,
        "memory_gib": memory / 2 ** 30,  # what the layer search planned for
        "memory_fraction": GPU_MEMORY_FRACTION if on_gpu else None, "layers": layers, "layers_full_model": full_layers, "layer_search": tried,
        "plan_estimate_gib": plan_gib,
        "model": {k: getattr(spec, k) for k in (
            "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
            "head_dim", "moe_ffn_hidden_size", "num_experts", "moe_router_topk",
            "tie_word_embeddings")},
        "seq_len": shapes.seq_len, "batch_size": shapes.batch_size,
        "micro_batch_size": shapes.micro_batch_size, "tokens_per_step": tokens,
        **flops, "flops_per_step": flops_per_step, "modes": modes, "ratios": ratios,
        "steps": args.steps, "warmup": args.warmup,
        "wall_s": time.perf_counter() - t0}))
    if not ok and any(r["status"] == "failed" for r in modes.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
