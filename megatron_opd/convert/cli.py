"""`tools/convert_checkpoint.py {hf-to-megatron,megatron-to-hf}`: argument parsing, the model
spec, the layout; a layout of more than one rank re-runs this under torchrun. Bad input of any
kind (arguments, configs, files) ends in one line `megatron-opd: error: <what>, <fix>` and exit
status 2, with nothing partial written."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="convert_checkpoint.py", description=(
        "Convert between Hugging Face checkpoints and the learner's megatron dist checkpoints "
        "(Qwen3-MoE, Mixtral), a few layers at a time. See docs/checkpoints.md."))
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF safetensors -> weights-only learner checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    a.add_argument("--out", required=True, help="checkpoints directory to write (e.g. "
                   "<run.dir>/checkpoints): gets step_00000000/ and latest")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="parameter dtype of the checkpoint (the learner's params dtype)")
    b = sub.add_parser("megatron-to-hf", help="learner / converted checkpoint -> HF directory")
    b.add_argument("--ckpt", required=True, help="checkpoints directory (uses `latest`), a "
                   "step_<N> directory or its megatron/ directory")
    b.add_argument("--out", required=True, help="HF directory to write")
    b.add_argument("--hf-config", help="the HF model directory (or its config.json) the "
                   "checkpoint descends from: the model spec, and config.json / generation "
                   "config / tokenizer carried into --out; default: what the checkpoint's "
                   "meta.json records, else its run's config.yaml (model:, init.student)")
    b.add_argument("--tokenizer", help="directory whose tokenizer files are copied to --out")
    b.add_argument("--dtype", choices=sorted(DTYPES), help="HF tensor dtype (default: stored)")
    for p in (a, b):
        p.add_argument("--family", choices=["qwen3_moe", "mixtral"],
                       help="assert the model family (refuse a checkpoint of another)")
        p.add_argument("--config", help="a run config YAML: take parallel.* (the layout) from "
                       "it; its model: must agree with the checkpoint's")
        p.add_argument("--tensor-parallel", "--tp", type=int, help="TP of the conversion")
        p.add_argument("--pipeline-parallel", "--pp", type=int)
        p.add_argument("--virtual-pipeline-parallel", "--vpp", type=int)
        p.add_argument("--expert-parallel", "--ep", type=int)
        p.add_argument("--expert-tensor-parallel", "--etp", type=int)
        p.add_argument("--world-size", type=int, help="ranks (default: the smallest the layout "
                       "needs); more than 1 runs under torchrun")
        p.add_argument("--layers-per-group", type=int, default=1,
                       help="layers converted (held in memory) at a time")
        p.add_argument("--no-progress", action="store_true")
    return ap


_NOT_ARCHITECTURE = ("bos_token_id", "eos_token_id", "pad_token_id", "make_vocab_size_divisible_by")
_LAYOUT_FLAGS = ("tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel",
                 "expert_parallel", "expert_tensor_parallel")


def _layout(args, spec):
    from math import lcm

    from megatron_opd.config import ParallelConfig, load_config, validate_parallel

    layout = ParallelConfig()
    if args.config:
        cfg = load_config(args.config)
        layout = cfg.parallel
        mine, theirs = dataclasses.asdict(spec), dataclasses.asdict(cfg.model)
        differ = [k for k in mine if k not in _NOT_ARCHITECTURE and mine[k] != theirs[k]]
        if differ:
            raise ValueError(f"--config {args.config}: model.{differ[0]} = "
                             f"{theirs[differ[0]]!r} but the checkpoint has "
                             f"{mine[differ[0]]!r}, pass the run config of this model")
    changes = {k: getattr(args, k) for k in _LAYOUT_FLAGS if getattr(args, k) is not None}
    layout = dataclasses.replace(layout, **changes)
    need = lcm(layout.tensor_parallel * layout.pipeline_parallel,
               layout.expert_tensor_parallel * layout.expert_parallel * layout.pipeline_parallel)
    world = args.world_size or (layout.world_size if args.config and not changes else need)
    layout = dataclasses.replace(layout, world_size=world)
    try:
        validate_parallel(layout, spec)
    except ValueError as e:
        raise ValueError(f"layout: {e}") from None
    return layout


def _spec(args):
    from megatron_opd.convert.convert import spec_of_checkpoint
    from megatron_opd.convert.hf_config import read_config_json, spec_from_hf_config

    if args.command == "hf-to-megatron":
        spec = spec_from_hf_config(read_config_json(args.hf), f"--hf {args.hf}/config.json")
    elif args.hf_config:
        spec = spec_from_hf_config(read_config_json(args.hf_config), f"--hf-config {args.hf_config}")
    else:
        spec = spec_of_checkpoint(args.ckpt)
        if spec is None:
            raise ValueError(f"--ckpt {args.ckpt}: records no model spec (no meta.json `model`, "
                             f"no run config.yaml), pass --hf-config")
    if args.family and spec.family != args.family:
        raise ValueError(f"--family {args.family}: the checkpoint is a {spec.family} model, "
                         f"drop --family or pick the right checkpoint")
    if args.config:  # megatron-only padding of the vocabulary: the run's choice
        from megatron_opd.config import load_config

        spec = dataclasses.replace(spec, make_vocab_size_divisible_by=load_config(
            args.config).model.make_vocab_size_divisible_by)
    return spec


def _check_inputs(args, spec) -> None:
    """The input files, before any rank starts (so a bad file is one line and exit 2 even when
    the conversion would run under torchrun): safetensors headers and tensor names / shapes,
    or the dist checkpoint's files and the source config / tokenizer carried into the export."""
    if args.command == "hf-to-megatron":
        from megatron_opd.convert.hf_io import LazyHFReader

        LazyHFReader(args.hf).check(spec)
        return
    from megatron_opd.convert.convert import resolve_megatron_dir, source_of_checkpoint
    from megatron_opd.convert.dcp import check_files
    from megatron_opd.convert.hf_export import HFSource, export_config, tokenizer_files

    check_files(resolve_megatron_dir(args.ckpt))
    source = HFSource.from_path(args.hf_config) if args.hf_config else \
        source_of_checkpoint(args.ckpt)
    export_config(spec, DTYPES[args.dtype] if args.dtype else torch.float32, source)
    if args.tokenizer:
        tokenizer_files(args.tokenizer)


def _error(e: BaseException) -> int:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"megatron-opd: error: {msg}", file=sys.stderr)
    return 2


# input errors: the CLI prints them on one line and exits 2 (BadCheckpoint is a ValueError)
_INPUT_ERRORS = (KeyError, ValueError, FileNotFoundError)


def _relaunch(world: int, argv: list[str]) -> int:
    from megatron_opd.procs import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
           f"--master-port={free_port()}", "-m", "megatron_opd.convert.cli", *argv]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        spec = _spec(args)
        layout = _layout(args, spec)
        _check_inputs(args, spec)
    except _INPUT_ERRORS as e:
        return _error(e)
    under_torchrun = "RANK" in os.environ
    if layout.world_size > 1 and not under_torchrun:
        return _relaunch(layout.world_size, argv)
    if under_torchrun and int(os.environ["WORLD_SIZE"]) != layout.world_size:
        return _error(ValueError(f"--world-size: the layout needs {layout.world_size} ranks, "
                                 f"torchrun started {os.environ['WORLD_SIZE']}"))
    return run(args, spec, layout)


def run(args, spec, layout) -> int:
    from megatron_opd.compat.megatron_cpu import install_megatron_compat
    from megatron_opd.convert import convert
    from megatron_opd.convert.hf_export import HFSource
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed

    install_megatron_compat()
    groups = init_distributed(layout, seed=0)
    try:
        if args.command == "hf-to-megatron":
            path = convert.hf_to_megatron(args.hf, args.out, spec, groups,
                                          dtype=DTYPES[args.dtype],
                                          layers_per_group=args.layers_per_group,
                                          progress=not args.no_progress)
        else:
            path = convert.megatron_to_hf(args.ckpt, args.out, spec, groups,
                                          dtype=DTYPES[args.dtype] if args.dtype else None,
                                          layers_per_group=args.layers_per_group,
                                          tokenizer_dir=args.tokenizer,
                                          progress=not args.no_progress,
                                          source=(HFSource.from_path(args.hf_config)
                                                  if args.hf_config else None))
    except _INPUT_ERRORS as e:
        if groups.rank == 0:  # every rank raises the same input error: print it once
            _error(e)
        return 2
    finally:
        destroy_distributed()
    if groups.rank == 0:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # dist_checkpointing spawns helpers: keep the guard
    sys.exit(main())
