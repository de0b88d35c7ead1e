"""The `megatron-opd` command line.

Exit status: 0 done, 1 a run failed, 2 bad input refused before anything started (a bad
command line, config, path or run secret), 130 interrupted; errors print one line,
`megatron-opd: error: <what>, <fix>` (megatron_opd/errors.py, shared by every entry point;
`plan` also exits 1 when the layout does not fit)."""

from __future__ import annotations

import argparse
import json
import sys

from megatron_opd.config import load_config
from megatron_opd.errors import BadInput, Parser, guarded

CONFIG_HELP = "YAML config (required; e.g. configs/quickstart.yaml)"


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="megatron-opd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "run an asynchronous OPD run (all processes on this machine)"),
                        ("prepare", "make (or reuse) the digits environment's teacher and student init"),
                        ("precompute-teacher", "offline OPD: sample teacher.offline_samples "
                         "student rollouts, score them with the teacher once and store them "
                         "(reused when the store of this config exists)")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", help=CONFIG_HELP)
        sp.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotlist overrides, e.g. train.steps=20 run.dir=runs/x")
    kg = sub.add_parser("keygen", help="write a new run secret (32 random bytes, mode 0600) that "
                        "authenticates the messages between processes on different machines")
    kg.add_argument("--out", required=True, help="file to create")
    kg.add_argument("--force", action="store_true", help="replace an existing file")
    sub.add_parser("submit", help="submit the run to Slurm as one heterogeneous job (learner | "
                   "rollout | teacher nodes from cluster.*, sbatch options from slurm.*); "
                   "`megatron-opd submit --help` for its options", add_help=False)
    pl = sub.add_parser("plan", help="check the layout against cluster/parallel/model and "
                        "estimate per-GPU memory of the learner and the SGLang fleets (no GPU "
                        "needed); exit 0: fits, 1: does not fit, 2: config error")
    pl.add_argument("--config", help=CONFIG_HELP)
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                    help="prompt length to size for (default: the environment's longest prompt: "
                    "data.max_prompt_tokens for chat)")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides")
    return p


def _load(args):
    """The command's config; a command that runs or plans a run needs one named."""
    if args.config is None:
        raise BadInput(f"{args.command}: no --config given, pass --config FILE (e.g. "
                       f"`megatron-opd {args.command} --config configs/quickstart.yaml`)")
    return load_config(args.config, args.overrides)


def _plan(args) -> int:
    from megatron_opd.plan import format_plan, make_plan

    if args.prompt_tokens is not None and args.prompt_tokens < 1:
        raise BadInput(f"--prompt-tokens: must be >= 1, got {args.prompt_tokens}")
    cfg = _load(args)
    plan = make_plan(cfg, args.prompt_tokens)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan, args.config or ""))
    return 0 if plan["verdict"]["fits"] else 1


def _keygen(args) -> int:
    from megatron_opd.transport.auth import SecretFileError, write_secret

    try:
        path = write_secret(args.out, force=args.force)
    except SecretFileError as e:
        raise BadInput(f"keygen --out: {e}") from None
    print(f"megatron-opd: wrote a new run secret to {path} (mode 0600); give the same file "
          f"to every process of the run")
    return 0


def _prepare(args) -> int:
    from megatron_opd.envs import prepare_models
    from megatron_opd.launch.checks import check_writable_dir

    cfg = _load(args)
    check_writable_dir("run.cache_dir", cfg.run.cache_dir)  # where the models are made
    models = prepare_models(cfg, progress=cfg.logging.progress)
    print(json.dumps({"teacher": str(models.teacher_dir), "student_init": str(models.student_dir),
                      **{k: v for k, v in models.meta.items() if isinstance(v, dict)}}, indent=2))
    return 0


def _precompute_teacher(args) -> int:
    from megatron_opd.launch import precompute_teacher

    store = precompute_teacher(_load(args))
    m = store.manifest
    print(json.dumps({"store": str(store.path), **{k: m[k] for k in (
        "config_hash", "teacher_revision", "count", "top_k", "group_size")}}, indent=2))
    return 0


def _train(args) -> int:
    from megatron_opd.launch import train

    cfg = _load(args)  # a bad config fails here, before anything (the paths: in `train`)
    summary = train(cfg)
    print(json.dumps(summary, indent=2))
    print(f"megatron-opd: run artifacts in {cfg.run.dir}")
    return 0


COMMANDS = {"plan": _plan, "keygen": _keygen, "prepare": _prepare,
            "precompute-teacher": _precompute_teacher, "train": _train}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["submit"]:  # its own parser (megatron_opd/slurm/submit.py)
        from megatron_opd.slurm.submit import main as submit_main

        return submit_main(argv[1:])
    args = _parser().parse_args(argv)
    # keygen: a path it must not or cannot write is bad input (2, SecretFileError); another
    # OSError (a full disk ...) is a failed command (1)
    return guarded(lambda: COMMANDS[args.command](args),
                   failed=(OSError,) if args.command == "keygen" else ())


if __name__ == "__main__":
    sys.exit(main())
