"""Peak memory of checkpoint conversion vs model size (docs/checkpoints.md).

    OMP_NUM_THREADS=1 .venv/bin/python bench/convert_memory.py [--layers 2,8] [--keep DIR]

Writes random Qwen3-MoE HF checkpoints (one safetensors file per layer, written a layer at a time)
whose layers all have the same size, so only the layer count changes the model size; then, each
in a fresh process, measures peak RSS (VmHWM) of
- `hf-to-megatron` and `megatron-to-hf` (tools/convert_checkpoint.py, one layer per group),
- baseline, same run: the non-streaming way, `safetensors.load_file` of every file plus
  `hf_mapping.hf_to_megatron` (what `load_hf_checkpoint` does),
- a fixed-cost reference: the streaming converters on a 1-layer model (imports, megatron).
growth = peak - the fixed-cost peak of the same converter, set against the bytes the model has
beyond the 1-layer one (`extra_bytes`). Ratios: growth / extra bytes (a converter that holds the
whole model: >= 1; a streaming one: ~0) and streaming growth / baseline growth. dist_checkpointing writes files from forked helper
processes: their peak (`writer_peak`, RUSAGE_CHILDREN) is reported beside the converter's.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spec_for(layers: int):
    from megatron_opd.models.spec import MoEModelSpec

    return MoEModelSpec(family="qwen3_moe", vocab_size=8192, hidden_size=512, num_layers=layers,
                        num_attention_heads=8, num_kv_heads=4, head_dim=64,
                        moe_ffn_hidden_size=512, num_experts=16, moe_router_topk=2,
                        max_position_embeddings=256)


def write_random_hf(spec, out: Path) -> int:
    """Random fp32 HF checkpoint, one file per layer (+ one for the rest); returns its bytes."""
    import torch
    from safetensors.torch import save_file

    from megatron_opd.convert.hf_io import expected_hf_shapes
    from megatron_opd.models.spec import to_hf_config

    out.mkdir(parents=True)
    to_hf_config(spec).save_pretrained(str(out))
    shapes = expected_hf_shapes(spec)
    g = torch.Generator().manual_seed(0)
    total, weight_map = 0, {}
    for i in range(-1, spec.num_layers):
        names = [n for n in shapes if (n.startswith(f"model.layers.{i}.") if i >= 0
                                       else not n.startswith("model.layers."))]
        fname = f"model-{i + 2:05d}.safetensors"
        tensors = {n: torch.randn(shapes[n], generator=g) * 0.02 for n in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({n: fname for n in names})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


# ----------------------------------------------------------------------------- child side
def _vmhwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def child(argv: list[str]) -> None:
    if argv[0] == "naive":
        from safetensors.torch import load_file

        from megatron_opd.convert.hf_config import read_config_json, spec_from_hf_config
        from megatron_opd.models.hf_mapping import hf_to_megatron

        spec = spec_from_hf_config(read_config_json(argv[1]))
        hf = {}
        for f in sorted(Path(argv[1]).glob("*.safetensors")):
            hf.update(load_file(str(f)))
        state = hf_to_megatron(hf, spec)
        assert len(state) > 0
        rc = 0
    else:
        from megatron_opd.convert.cli import main

        rc = main(argv + ["--no-progress"])
    writer = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"peak": _vmhwm(), "writer_peak": writer, "rc": rc}))


def measure(*argv: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"{argv}: failed\n{proc.stderr[-3000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got["rc"] != 0:
        raise SystemExit(f"{argv}: exit {got['rc']}\n{proc.stderr[-3000:]}")
    return got


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="2,8", help="layer counts of the measured models")
    ap.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="convert_memory_"))
    MiB = 2 ** 20
    results = {}
    try:
        fixed = {}
        size1 = write_random_hf(spec_for(1), work / "hf_1")
        fixed["hf_to_megatron"] = measure("hf-to-megatron", "--hf", str(work / "hf_1"),
                                          "--out", str(work / "ck_1"))
        fixed["megatron_to_hf"] = measure("megatron-to-hf", "--ckpt", str(work / "ck_1"),
                                          "--out", str(work / "back_1"))
        fixed["naive"] = measure("naive", str(work / "hf_1"))
        print("fixed cost (1-layer model): " + ", ".join(
            f"{k} {v['peak'] / MiB:.0f} MiB" for k, v in fixed.items()), flush=True)
        for n in [int(x) for x in args.layers.split(",")]:
            hf, ck, back = work / f"hf_{n}", work / f"ck_{n}", work / f"back_{n}"
            size = write_random_hf(spec_for(n), hf)
            row = {"layers": n, "model_bytes": size, "extra_bytes": size - size1}
            for key, argv in [("hf_to_megatron", ("hf-to-megatron", "--hf", str(hf), "--out",
                                                  str(ck))),
                              ("megatron_to_hf", ("megatron-to-hf", "--ckpt", str(ck), "--out",
                                                  str(back))),
                              ("naive", ("naive", str(hf)))]:
                m = measure(*argv)
                growth = m["peak"] - fixed[key]["peak"]
                row[key] = {"peak_bytes": m["peak"], "growth_bytes": growth,
                            "writer_peak_bytes": m["writer_peak"],
                            "growth_over_extra": round(growth / (size - size1), 3)}
            for key in ("hf_to_megatron", "megatron_to_hf"):
                row[key]["growth_over_naive"] = round(
                    row[key]["growth_bytes"] / row["naive"]["growth_bytes"], 3)
            results[n] = row
            print(f"{n} layers, model {size / MiB:.0f} MiB ({(size - size1) / MiB:.0f} MiB more "
                  f"than 1 layer): " + "; ".join(
                f"{k} peak {row[k]['peak_bytes'] / MiB:.0f} MiB, growth "
                f"{row[k]['growth_bytes'] / MiB:.0f} MiB = {row[k]['growth_over_extra']}x extra"
                + (f" = {row[k]['growth_over_naive']}x naive" if k != "naive" else "")
                for k in ("hf_to_megatron", "megatron_to_hf", "naive")), flush=True)
            shutil.rmtree(ck, ignore_errors=True)
            shutil.rmtree(back, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ns = sorted(results)
    summary = {"bench": "convert_memory", "fixed_peak_bytes": {k: v["peak"] for k, v in
                                                               fixed.items()},
               "models": [results[n] for n in ns]}
    if len(ns) >= 2:
        a, b = results[ns[0]], results[ns[-1]]
        summary["model_size_ratio"] = round(b["model_bytes"] / a["model_bytes"], 2)
        # the model grows model_size_ratio-fold; a streaming converter's peak should not
        summary["peak_ratio"] = {k: round(b[k]["peak_bytes"] / a[k]["peak_bytes"], 3)
                                 for k in ("hf_to_megatron", "megatron_to_hf", "naive")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
