"""Extra peak memory and time of the learner loading its HF init checkpoint: streamed vs old.

    OMP_NUM_THREADS=1 .venv/bin/python bench/learner_load_memory.py [--models 2x16,4x24,8x32]
        [--repeats 3] [--keep DIR]

For each model (`LAYERSxEXPERTS` of a Qwen3-MoE spec: vocab 8000 (padded to 8064 rows in
megatron), hidden 512, 8 heads / 4 KV heads of 64, experts of 512, top-2; about 140 / 350 /
860 MB of fp32 weights for the defaults) it writes a random HF checkpoint with `transformers`
(`hf_causal_lm_class(spec)(to_hf_config(spec))`, `save_pretrained` in 4 shards), then, each in a
fresh process, builds the learner's megatron model the way `learner/main.py` does (world size 1,
gloo: `install_megatron_cpu_compat()`, `init_distributed`, `transformer_config`,
`build_model_chunks`) and loads the checkpoint into it with
- `streamed`: `hf_mapping.load_hf_checkpoint(chunks, hf_dir, spec, groups)` (the learner's path:
  `_load_streamed`, one megatron tensor at a time through memory maps released after each),
- `old` (baseline, same run): what that call did before it streamed: every safetensors file into
  one dict (`convert.errors.load_safetensors`, i.e. `safetensors.torch.load_file`), then
  `hf_to_megatron(hf, spec, rows)` and
  `sharding.load_full_state(chunks, groups, state.__getitem__)`.

Extra peak = VmHWM after the load minus VmRSS just before it (the high-water mark is reset to
the current RSS by writing 5 to /proc/self/clear_refs after the model is built, so the build's
own transients do not count; glibc's mmap threshold is fixed at 256 KiB so freed buffers go back
to the kernel rather than being reused silently). `kept` = VmRSS after the load (its locals
freed) minus before. Time = wall time of the load call alone, median of `--repeats` loads in the
same process (the first one also gives the memory figures; page cache warm for all: the
checkpoint was just written).

Checks (the script exits 1 otherwise): after the streamed load every HF tensor the model exports
(`iter_hf_weights`) equals the checkpoint's bit for bit and covers all of it; the old path's
model state (parameters and buffers, padding rows included) is `torch.equal` to the streamed
one's, tensor by tensor.

Ratios: per model `old / streamed` extra peak and time; across models each path's extra peak at
the largest over the smallest model beside `model_size_ratio`. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MiB = 2 ** 20


def spec_for(layers: int, experts: int):
    from megatron_opd.models.spec import MoEModelSpec

    return MoEModelSpec(family="qwen3_moe", vocab_size=8000, hidden_size=512, num_layers=layers,
                        num_attention_heads=8, num_kv_heads=4, head_dim=64,
                        moe_ffn_hidden_size=512, num_experts=experts, moe_router_topk=2,
                        max_position_embeddings=256)


def write_hf(spec, out: Path, shards: int = 4) -> int:
    """Random fp32 HF checkpoint written by transformers in about `shards` files; its bytes."""
    import torch
    from transformers.utils import logging as hf_logging

    from megatron_opd.models.spec import hf_causal_lm_class, to_hf_config

    hf_logging.disable_progress_bar()

    torch.manual_seed(0)
    model = hf_causal_lm_class(spec)(to_hf_config(spec)).float()
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    shard_mb = size // shards // 10 ** 6 + 1
    model.save_pretrained(str(out), max_shard_size=f"{shard_mb}MB")
    del model
    gc.collect()
    return size


# ----------------------------------------------------------------------------- child side
def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _load_old(chunks, hf_dir: str, spec, groups) -> None:
    """load_hf_checkpoint(chunks, hf_dir, spec, groups) before it streamed (commit 33934c3^)."""
    from megatron_opd.convert.errors import load_safetensors
    from megatron_opd.models.hf_mapping import hf_to_megatron
    from megatron_opd.models.sharding import load_full_state
    from megatron_opd.models.spec import check_hf_expressible, padded_vocab_size

    check_hf_expressible(spec)
    hf = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        hf.update(load_safetensors(f))
    assert hf, hf_dir
    state = hf_to_megatron(hf, spec, padded_vocab_size(spec, groups.layout.tensor_parallel))
    load_full_state(chunks, groups, state.__getitem__)


def _model_state(chunks) -> dict:
    import torch

    return {f"{i}.{k}": v for i, c in enumerate(chunks) for k, v in c.state_dict().items()
            if isinstance(v, torch.Tensor)}


def child(mode: str, spec_json: str, hf_dir: str, ref: str, repeats: str) -> None:
    import torch

    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.models.hf_mapping import iter_hf_weights, load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_opd.models.spec import MoEModelSpec

    spec = MoEModelSpec(**json.loads(spec_json))
    repeats = int(repeats)
    layout = ParallelConfig()
    install_megatron_cpu_compat()  # the learner's order (learner/main.py: run_learner)
    groups = init_distributed(layout, seed=1234)
    config = transformer_config(spec, layout=layout)
    chunks = build_model_chunks(spec, config)
    model_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    gc.collect()
    build_hwm = _status("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before, hwm0 = _status("VmRSS"), _status("VmHWM")
    if hwm0 > before + 4 * MiB:
        raise SystemExit(f"clear_refs did not reset VmHWM ({hwm0} vs RSS {before})")
    load = load_hf_checkpoint if mode == "streamed" else _load_old
    t0 = time.perf_counter()
    load(chunks, hf_dir, spec, groups)
    seconds = [time.perf_counter() - t0]
    peak = _status("VmHWM")
    gc.collect()
    after = _status("VmRSS")
    for _ in range(repeats - 1):  # time only: the same load again into the same model
        t0 = time.perf_counter()
        load(chunks, hf_dir, spec, groups)
        seconds.append(time.perf_counter() - t0)
    out = {"mode": mode, "extra_peak": peak - before, "kept": after - before, "seconds": seconds,
           "rss_before": before, "peak": peak, "build_hwm": build_hwm, "model_bytes": model_bytes,
           "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    # ---- verification (after the measurement)
    with torch.no_grad():
        if mode == "streamed":
            from megatron_opd.convert.hf_io import LazyHFReader

            reader = LazyHFReader(hf_dir)
            seen = set()
            for name, t in iter_hf_weights(chunks, spec, groups):
                want = reader.get(name)
                if t.dtype != want.dtype or t.shape != want.shape or not torch.equal(t, want):
                    raise SystemExit(f"streamed: {name} differs from the checkpoint")
                seen.add(name)
                reader.release()
            if seen != set(reader.file_of):
                raise SystemExit(f"streamed: exported {len(seen)} tensors, checkpoint has "
                                 f"{len(reader.file_of)}")
            out["checked_hf_tensors"] = len(seen)
            torch.save(_model_state(chunks), ref)
        else:
            want = torch.load(ref, mmap=True, weights_only=True)
            have = _model_state(chunks)
            if set(have) != set(want):
                raise SystemExit(f"old vs streamed: state keys differ: "
                                 f"{sorted(set(have) ^ set(want))[:10]}")
            for k, v in have.items():
                if v.dtype != want[k].dtype or v.shape != want[k].shape \
                        or not torch.equal(v, want[k]):
                    raise SystemExit(f"old vs streamed: {k} is not bit-identical")
            out["checked_state_tensors"] = len(have)
    destroy_distributed()
    print(json.dumps(out))


def measure(mode: str, spec, hf: Path, ref: Path, repeats: int) -> dict:
    import dataclasses

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "MALLOC_TRIM_THRESHOLD_": str(256 * 1024)}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, __file__, "--child", mode,
                           json.dumps(dataclasses.asdict(spec)), str(hf), str(ref), str(repeats)],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(f"{mode} {hf.name}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}"
              f"{proc.stdout[-2000:]}", file=sys.stderr)
        raise SystemExit(1)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:7])
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="2x16,4x24,8x32", help="LAYERSxEXPERTS, comma-separated")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed loads per measurement (the first also measures memory)")
    ap.add_argument("--keep", help="work directory to keep, checkpoints included (default: a temporary one)")
    args = ap.parse_args()
    models = [tuple(int(x) for x in m.split("x")) for m in args.models.split(",")]
    work = Path(args.keep or tempfile.mkdtemp(prefix="learner_load_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    load1 = os.getloadavg()[0]
    rows = []
    try:
        for layers, experts in models:
            spec = spec_for(layers, experts)
            hf, ref = work / f"hf_{layers}x{experts}", work / f"ref_{layers}x{experts}.pt"
            t0 = time.time()
            size = write_hf(spec, hf)
            write_s = time.time() - t0
            row = {"model": f"{layers}x{experts}", "layers": layers, "experts": experts,
                   "hf_bytes": size,
                   "shards": len(list(hf.glob("*.safetensors"))), "write_s": round(write_s, 1)}
            for mode in ("streamed", "old"):  # streamed first: it writes the reference state
                m = measure(mode, spec, hf, ref, args.repeats)
                row["model_bytes"] = m["model_bytes"]
                row[mode] = {k: m[k] for k in ("extra_peak", "kept", "seconds", "rss_before",
                                               "peak", "build_hwm")}
                row[mode]["seconds"] = round(statistics.median(m["seconds"]), 3)
                row[mode]["seconds_all"] = [round(x, 3) for x in m["seconds"]]
                row[mode]["extra_over_model"] = round(m["extra_peak"] / m["model_bytes"], 3)
            row["old_over_streamed_peak"] = round(row["old"]["extra_peak"]
                                                  / row["streamed"]["extra_peak"], 2)
            row["old_over_streamed_time"] = round(row["old"]["seconds"]
                                                  / row["streamed"]["seconds"], 2)
            rows.append(row)
            print(f"{row['model']}: {size / MiB:.0f} MiB fp32 ({row['shards']} shards, written in "
                  f"{write_s:.0f} s): " + "; ".join(
                      f"{k} +{row[k]['extra_peak'] / MiB:.0f} MiB peak "
                      f"({row[k]['extra_over_model']}x model), kept "
                      f"{row[k]['kept'] / MiB:.0f} MiB, {row[k]['seconds']:.2f} s"
                      for k in ("streamed", "old")), flush=True)
            if not args.keep:
                shutil.rmtree(hf, ignore_errors=True)
                ref.unlink(missing_ok=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'model':>6} {'MiB':>6} | {'streamed +peak':>14} {'time s':>7} | "
          f"{'old +peak':>10} {'time s':>7} | {'old/str peak':>12} {'old/str time':>12}")
    for r in rows:
        s, o = r["streamed"], r["old"]
        print(f"{r['model']:>6} {r['model_bytes'] / MiB:6.0f} | {s['extra_peak'] / MiB:10.0f} MiB "
              f"{s['seconds']:7.2f} | {o['extra_peak'] / MiB:6.0f} MiB {o['seconds']:7.2f} | "
              f"{r['old_over_streamed_peak']:12.2f} {r['old_over_streamed_time']:12.2f}")
    summary = {"bench": "learner_load_memory", "bit_identical": True,
               "load_avg_1m": [round(load1, 2), round(os.getloadavg()[0], 2)],
               "total_s": round(time.time() - t_start, 1), "models": rows}
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        summary["model_size_ratio"] = round(b["model_bytes"] / a["model_bytes"], 2)
        summary["extra_peak_growth"] = {
            k: round(b[k]["extra_peak"] / a[k]["extra_peak"], 2) for k in ("streamed", "old")}
        summary["time_growth"] = {
            k: round(b[k]["seconds"] / a[k]["seconds"], 2) for k in ("streamed", "old")}
    summary["old_over_streamed_peak"] = {r["model"]: r["old_over_streamed_peak"] for r in rows}
    summary["old_over_streamed_time"] = {r["model"]: r["old_over_streamed_time"] for r in rows}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
