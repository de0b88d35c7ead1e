"""Fidelity study: the CPU pipeline on the digits task under controlled staleness, several seeds
per config, mean and spread of the held-out reverse KL and accuracy (docs/fidelity.md).

Each (config, seed) is one `megatron-opd train --config configs/quickstart.yaml <overrides>
run.seed=S run.dir=<out>/<config>/seed<S> train.steps=N eval.interval=E` run, one after the
other (the machine has two cores; parallel runs would only fight over them). A run whose
`summary.json` exists is skipped, so an interrupted study resumes; a run dir without it is a
broken run and is started again from scratch. A config that the config loader refuses (e.g.
`correction.proximal=interrupt`, not built) costs nothing and is listed as refused with the
loader's message.

Controlled staleness k: `async.max_staleness=k async.publish_lag=k`. The learner publishes the
weights of version v - k after step v, so every trained token is exactly k versions old;
k = 0 is synchronous OPD.

    .venv/bin/python tools/fidelity.py --grid full|mini|quickstart [--seeds 0,1,2] [--steps N]
        [--eval-interval E] [--out DIR] [--only NAME,...] [--aggregate-only] [--cache-dir DIR]

Writes `<out>/fidelity.json` (per run and per config figures, curves), `<out>/table.md`,
`<out>/curves.png` (eval KL per config over seeds) and `<out>/seeds.png` (per config, each seed's
eval KL with its standard error and its training batches' KL). Each run's own output is in
`<out>/<config>/seed<S>.log`. The last line printed is one JSON object with the study's figures.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs/quickstart.yaml"

# The weak student of the AOPD comparison: 80 SFT steps give 0.16-0.30 held-out greedy accuracy
# over seeds 0-2 (the quickstart's 140 give 0.44-0.48).
WEAK_STUDENT_STEPS = 80


def staleness(k: int) -> list[str]:
    """Every token trained exactly k versions after the version that generated it."""
    return [f"async.max_staleness={k}", f"async.publish_lag={k}"]


def proximal(name: str, k: int) -> list[str]:
    return staleness(k) + [f"correction.proximal={name}"]


LSM = ["objective.terms=[lsm]", "teacher.top_k=8"]  # top-8 of a 32-token vocabulary
AOPD = ["objective.terms=[aopd]", "teacher.top_k=8"]
WEAK = [f"prepare.student_steps={WEAK_STUDENT_STEPS}"]

# The full study evaluates on 128 held-out prompts: with the quickstart's 64, two evaluations of
# the same weights differ by ~0.1 nats at KL 2 and one evaluation's standard error is 10-20% of
# the KL (docs/fidelity.md); 128 cost ~1 s more per evaluation (and their own prepare per seed).
EVAL_128 = ["env.num_eval_prompts=128"]


def with_study_eval(configs: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: EVAL_128 + overrides for name, overrides in configs.items()}


# Grids are data: config name -> overrides on top of configs/quickstart.yaml.
GRIDS: dict[str, dict[str, list[str]]] = {
    "full": with_study_eval({
        "sync": staleness(0),
        "naive-k2": proximal("behaviour", 2),
        "naive-k4": proximal("behaviour", 4),
        "naive-k8": proximal("behaviour", 8),
        "snapshot-k4": proximal("snapshot", 4),
        "replica-k4": proximal("replica", 4),
        "interrupt-k4": proximal("interrupt", 4),
        "ewma-k2": proximal("ewma", 2),
        "ewma-k4": proximal("ewma", 4),
        "ewma-k8": proximal("ewma", 8),
        # why EWMA diverged at k = 8 (docs/fidelity.md): without resets, and with a cooldown
        "ewma-k8-noreset": proximal("ewma", 8) + ["correction.ewma_reset_tau=0"],
        "ewma-k8-cooldown": proximal("ewma", 8) + ["correction.ewma_reset_cooldown=8"],
        "fopd-k4": proximal("behaviour", 4) + ["correction.freshness=downweight"],
        "lsm-sync": staleness(0) + LSM,
        "weak-opd-sync": staleness(0) + WEAK,
        "weak-aopd-sync": staleness(0) + WEAK + AOPD,
    }),
    "mini": {  # what CI runs: two configs, one seed, a few steps
        "sync": staleness(0),
        "naive-k2": proximal("behaviour", 2),
    },
    "quickstart": {"quickstart": []},  # the README's command as it is (issue 13 item 6)
    # the same with the learning rate decayed to 0 (cosine): is the late KL rise the constant LR?
    "quickstart-cosine": {"quickstart-cosine": ["train.lr_decay_style=cosine"]},
}

# Per grid: seeds, steps, eval interval. The full study's size is measured in docs/fidelity.md:
# ~2.6 min per 150-step run with start-up on this 2-core machine, 13 configs x 3 seeds + the
# prepares of new seeds and of the weak student fit in about two hours.
DEFAULTS = {
    "full": {"seeds": [0, 1, 2], "steps": 150, "eval_interval": 25},
    "mini": {"seeds": [0], "steps": 4, "eval_interval": 2},
    "quickstart": {"seeds": [0, 1, 2], "steps": 500, "eval_interval": 50},
    "quickstart-cosine": {"seeds": [0, 1, 2], "steps": 500, "eval_interval": 50},
}

# Run plumbing, not science: no progress bar in the logs, no checkpoint to write.
PLUMBING = ["logging.progress=false", "train.checkpoint=false"]


# ------------------------------------------------------------------ running
def refusal(overrides: list[str]) -> str | None:
    """The config loader's message when it refuses these overrides (nothing would start)."""
    sys.path.insert(0, str(ROOT))
    from megatron_opd.config import ConfigError, load_config

    try:
        load_config(BASE_CONFIG, overrides)
    except ConfigError as e:
        return str(e)
    return None


def train_command(overrides: list[str], seed: int, run_dir: Path, steps: int, eval_interval: int,
                  cache_dir: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_opd.cli", "train", "--config", str(BASE_CONFIG),
            *overrides, f"run.seed={seed}", f"run.dir={run_dir}", f"train.steps={steps}",
            f"eval.interval={eval_interval}", f"run.cache_dir={cache_dir}", *PLUMBING]


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def run_study(grid: dict[str, list[str]], seeds: list[int], steps: int, eval_interval: int,
              out: Path, cache_dir: Path) -> dict:
    """Run every (config, seed) not finished yet; returns counts and the refused configs."""
    todo, refused = [], {}
    for name, overrides in grid.items():
        why = refusal(overrides)
        if why is not None:
            refused[name] = why
            print(f"[fidelity] {name}: refused by the config loader: {why}", flush=True)
            continue
    # seed-major: an interrupted study has every config at the same number of seeds
    todo = [(name, seed) for seed in seeds for name in grid
            if name not in refused and not finished(out / name / f"seed{seed}")]
    total = sum(1 for name in grid if name not in refused) * len(seeds)
    print(f"[fidelity] {total - len(todo)} of {total} runs already finished, {len(todo)} to run",
          flush=True)
    t_start, failed = time.time(), []
    for i, (name, seed) in enumerate(todo, 1):
        run_dir = out / name / f"seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a broken earlier attempt: start clean
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = out / name / f"seed{seed}.log"
        cmd = train_command(grid[name], seed, run_dir, steps, eval_interval, cache_dir)
        # the code the run used (git HEAD, "-dirty" with local changes): read back when aggregating
        (out / name / f"seed{seed}.source").write_text(f"{source_revision()}\n")
        t0 = time.time()
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n\n")
            f.flush()
            code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        took, elapsed = time.time() - t0, time.time() - t_start
        eta = elapsed / i * (len(todo) - i)  # mean of this session's runs x what is left
        status = "done" if code == 0 else f"FAILED (exit {code}, see {log})"
        if code != 0:
            failed.append(f"{name}/seed{seed}")
        print(f"[fidelity] {i}/{len(todo)} {name} seed{seed}: {status} in {took:.0f} s "
              f"(elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)", flush=True)
    return {"ran": len(todo), "skipped": total - len(todo), "failed": failed, "refused": refused,
            "run_seconds": time.time() - t_start}


# ------------------------------------------------------------------ reading runs
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ratio_se(sums: list[float], counts: list[float]) -> float:
    """Standard error of sum(sums) / sum(counts) with responses as the independent units (the
    estimator of megatron_opd/learner/evaluate.py, recomputed here from the eval samples)."""
    m, total = len(sums), sum(counts)
    if m < 2 or total <= 0:
        return 0.0
    mean = sum(sums) / total
    return math.sqrt(m / (m - 1) * sum((s - mean * n) ** 2 for s, n in zip(sums, counts))) / total


def eval_kl_se(run_dir: Path, version: int) -> float | None:
    """SE of the exact held-out KL at one evaluation, from its per-response sums."""
    path = run_dir / "samples" / f"eval-{version}.jsonl"
    if not path.is_file():
        return None
    rows = [r["sampled"] for r in read_jsonl(path)]
    if not rows or "exact_kl_sum" not in rows[0]:
        return None
    return ratio_se([float(r["exact_kl_sum"]) for r in rows], [r["kl_tokens"] for r in rows])


def read_run(run_dir: Path) -> dict:
    """One finished run: its evaluation curve and the figures the study compares."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    evals: dict[int, dict] = {}
    for r in records:  # every line repeats the latest evaluation; keep a version's first one
        # (under async.publish_lag = k an evaluation measures the fleet's version v - k, so
        # version 0 is evaluated again at v = k; the final weights are evaluated last)
        if r.get("eval/version") is not None:
            evals.setdefault(int(r["eval/version"]), r)
    versions = sorted(evals)
    kl = [evals[v]["eval/reverse_kl"] for v in versions]
    acc = [evals[v].get("eval/accuracy") for v in versions]
    i_min = min(range(len(kl)), key=kl.__getitem__)
    train = [r for r in records if "train/loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    # the training batches' reverse-KL samples, 20-step means: ~20x the eval's responses, so a
    # check on whether an eval-to-eval change is the policy or the evaluation's noise
    chunks = [train[i:i + 20] for i in range(0, len(train), 20)]
    train_kl = [(sum(r["step"] for r in c) / len(c), sum(r["train/kl_sample"] for r in c) / len(c))
                for c in chunks if all("train/kl_sample" in r for r in c)]
    return {
        "versions": versions, "kl": kl, "accuracy": acc,
        "kl_se": [eval_kl_se(run_dir, v) for v in versions],
        "train_kl_steps": [x for x, _ in train_kl], "train_kl": [y for _, y in train_kl],
        "kl_initial": kl[0], "kl_final": records[-1]["eval/reverse_kl"],
        "acc_initial": acc[0], "acc_final": records[-1].get("eval/accuracy"),
        # the last three evaluations: a final figure with a third of one evaluation's noise
        "kl_last3": sum(kl[-3:]) / len(kl[-3:]),
        "kl_min": kl[i_min], "kl_min_version": versions[i_min],
        "staleness_mean": (sum(r["samples/staleness_mean"] for r in train) / len(train)
                           if train else None),
        "total_seconds": summary.get("total_seconds"),
        "train_seconds": summary.get("train_seconds"),
        "source": (source.read_text().strip()
                   if (source := run_dir.with_suffix(".source")).is_file() else None),
    }


# ------------------------------------------------------------------ aggregating
def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


FIGURES = ("kl_initial", "kl_final", "kl_last3", "kl_min", "acc_initial", "acc_final",
           "staleness_mean", "total_seconds")


def aggregate_config(runs: dict[int, dict]) -> dict:
    agg = {}
    for key in FIGURES:
        vals = [r[key] for r in runs.values() if r[key] is not None]
        if vals:
            agg[key] = spread(vals)
    # the curve over seeds, at the versions every seed evaluated
    common = sorted(set.intersection(*(set(r["versions"]) for r in runs.values())))
    per_seed = [[r["kl"][r["versions"].index(v)] for r in runs.values()] for v in common]
    curve = {"versions": common, "kl_mean": [sum(p) / len(p) for p in per_seed],
             "kl_min": [min(p) for p in per_seed], "kl_max": [max(p) for p in per_seed]}
    i = min(range(len(common)), key=curve["kl_mean"].__getitem__)
    agg["mean_curve_min"] = {"kl": curve["kl_mean"][i], "version": common[i]}
    return {"aggregate": agg, "curve": curve}


def aggregate(grid: dict[str, list[str]], seeds: list[int], out: Path, study: dict) -> dict:
    configs = {}
    for name, overrides in grid.items():
        entry: dict = {"overrides": overrides}
        if name in study.get("refused", {}):
            entry.update(status="refused", reason=study["refused"][name])
        else:
            runs = {s: read_run(out / name / f"seed{s}") for s in seeds
                    if finished(out / name / f"seed{s}")}
            entry["status"] = "ok" if len(runs) == len(seeds) else f"{len(runs)}/{len(seeds)} seeds"
            entry["runs"] = {str(s): r for s, r in runs.items()}
            if runs:
                entry.update(aggregate_config(runs))
        configs[name] = entry
    return configs


# Each config is compared with a reference run on the *same seed* (same prepared models, same
# prompts): seeds differ far more than configs do (sync's final KL spans 1.3-1.9 over seeds),
# so paired differences are what tells configs apart. Default reference: sync.
REFERENCE = {"weak-aopd-sync": "weak-opd-sync"}


def paired_differences(configs: dict, default_reference: str = "sync") -> dict:
    """config -> {reference, seeds, eval_kl_last3, train_kl_last}: spreads over the seeds both
    finished of (config - reference) in the mean of the last three evaluations and in the
    training batches' KL over the last 20 steps (~20x the eval's responses)."""
    out = {}
    for name, c in configs.items():
        ref = REFERENCE.get(name, default_reference)
        if ref == name or ref not in configs or not c.get("runs"):
            continue
        ref_runs = configs[ref].get("runs", {})
        seeds = sorted(set(c["runs"]) & set(ref_runs), key=int)
        if not seeds:
            continue
        diff = lambda f: spread([f(c["runs"][s]) - f(ref_runs[s]) for s in seeds])  # noqa: E731
        out[name] = {"reference": ref, "seeds": [int(s) for s in seeds],
                     "eval_kl_last3": diff(lambda r: r["kl_last3"]),
                     "train_kl_last": diff(lambda r: r["train_kl"][-1])}
    return out


def paired_markdown(paired: dict) -> str:
    lines = ["| config | minus (same seed) | seeds | Δ eval KL, mean of last 3 evals | "
             "Δ training-batch KL, last 20 steps |", "|---|---|---|---|---|"]
    for name, p in paired.items():
        lines.append(f"| {name} | {p['reference']} | {','.join(map(str, p['seeds']))} | "
                     f"{fmt(p, 'eval_kl_last3')} | {fmt(p, 'train_kl_last')} |")
    return "\n".join(lines) + ("\n\nNegative: lower KL than the reference on the same seed "
                               "(better). mean ± sample std [min–max] over seeds.\n")


# ------------------------------------------------------------------ writing
def fmt(agg: dict, key: str, digits: int = 3) -> str:
    if key not in agg:
        return "–"
    a = agg[key]
    if a["n"] == 1:
        return f"{a['mean']:.{digits}f}"
    return (f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f} "
            f"[{a['min']:.{digits}f}–{a['max']:.{digits}f}]")


def table_markdown(configs: dict) -> str:
    lines = ["| config | overrides | seeds | KL initial | KL final | KL mean of last 3 evals | "
             "KL min of mean curve (version) | accuracy initial | accuracy final | "
             "mean staleness |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in configs.items():
        over = " ".join(f"`{o}`" for o in c["overrides"]) or "(none)"
        if c["status"] == "refused":
            lines.append(f"| {name} | {over} | – | not built / refused: {c['reason']} "
                         "| | | | | | |")
            continue
        agg = c.get("aggregate", {})
        bottom = (f"{agg['mean_curve_min']['kl']:.3f} ({agg['mean_curve_min']['version']})"
                  if "mean_curve_min" in agg else "–")
        lines.append(f"| {name} | {over} | {len(c.get('runs', {}))} ({c['status']}) | "
                     f"{fmt(agg, 'kl_initial')} | {fmt(agg, 'kl_final')} | "
                     f"{fmt(agg, 'kl_last3')} | "
                     f"{bottom} | {fmt(agg, 'acc_initial')} | {fmt(agg, 'acc_final')} | "
                     f"{fmt(agg, 'staleness_mean', 2)} |")
    legend = ("Values: mean ± sample std [min–max] over seeds. KL: held-out reverse "
              "KL(student ‖ teacher), nats/token; accuracy: held-out greedy exact match.")
    return "\n".join(lines) + "\n\n" + legend + "\n"


def plot_curves(configs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20")
    for i, (name, c) in enumerate(configs.items()):
        if "curve" not in c:
            continue
        cur, color = c["curve"], colors(i % 20)
        ax.plot(cur["versions"], cur["kl_mean"], color=color, label=f"{name} (n={len(c['runs'])})")
        ax.fill_between(cur["versions"], cur["kl_min"], cur["kl_max"], color=color, alpha=0.15)
    ax.set_xlabel("policy version (learner step)")
    ax.set_ylabel("held-out reverse KL, nats/token")
    ax.set_title("eval KL: mean over seeds, shaded min–max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_seeds(configs: dict, path: Path) -> None:
    """One panel per config: every seed's eval KL with its standard error, and the 20-step means
    of its training batches' KL samples (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(n, c) for n, c in configs.items() if c.get("runs")]
    if not shown:
        return
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    size = (7.5, 4.8) if len(shown) == 1 else (4.2 * cols, 3.3 * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    for ax, (name, c) in zip(axes.flat, shown):
        for j, (seed, r) in enumerate(c["runs"].items()):
            color = f"C{j}"
            se = [e if e is not None else 0.0 for e in r["kl_se"]]
            ax.errorbar(r["versions"], r["kl"], yerr=se, color=color, marker="o", ms=3,
                        capsize=2, label=f"seed {seed} eval ± SE")
            ax.plot(r["train_kl_steps"], r["train_kl"], color=color, ls="--", lw=0.8,
                    label=f"seed {seed} training batches")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("version", fontsize=8)
        ax.set_ylabel("reverse KL, nats/token", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def source_revision() -> str | None:
    """The commit the runs' code came from (+ "-dirty" with uncommitted changes to it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "megatron_opd", "configs"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full")
    ap.add_argument("--seeds", help="comma-separated (default: the grid's)")
    ap.add_argument("--steps", type=int, help="train.steps per run (default: the grid's)")
    ap.add_argument("--eval-interval", type=int, help="eval.interval (default: the grid's)")
    ap.add_argument("--out", help="default: runs/fidelity-<grid>")
    ap.add_argument("--only", help="comma-separated config names of the grid")
    ap.add_argument("--aggregate-only", action="store_true", help="read finished runs, run none")
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache/megatron-opd"),
                    help="run.cache_dir: prepared models shared by every run")
    args = ap.parse_args(argv)

    defaults = DEFAULTS[args.grid]
    grid = GRIDS[args.grid]
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in grid]
        if unknown:
            ap.error(f"--only: not in grid {args.grid}: {unknown}; known: {list(grid)}")
        grid = {n: grid[n] for n in names}
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else defaults["seeds"]
    steps = args.steps or defaults["steps"]
    eval_interval = args.eval_interval or defaults["eval_interval"]
    out = Path(args.out or ROOT / "runs" / f"fidelity-{args.grid}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    # one study per out dir: a second one would take the first's unfinished run for a broken one
    # and delete it under its feet (--aggregate-only only reads runs: it may look at a live study)
    lock = open(out / ".lock", "w")
    try:
        if not args.aggregate_only:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"[fidelity] another study is running in {out}; wait for it or use another --out",
              file=sys.stderr)
        return 2

    if args.aggregate_only:
        refused = {n: why for n, o in grid.items() if (why := refusal(o)) is not None}
        study = {"ran": 0, "skipped": 0, "failed": [], "refused": refused, "run_seconds": 0.0}
    else:
        study = run_study(grid, seeds, steps, eval_interval, out, Path(args.cache_dir).resolve())
    configs = aggregate(grid, seeds, out, study)
    result = {"grid": args.grid, "seeds": seeds, "steps": steps, "eval_interval": eval_interval,
              "base_config": str(BASE_CONFIG.relative_to(ROOT)),
              "sources": sorted({str(r["source"]) for c in configs.values()
                                 for r in c.get("runs", {}).values()}),
              "configs": configs}
    (out / "fidelity.json").write_text(json.dumps(result, indent=1))
    paired = paired_differences(configs)
    result["paired"] = paired
    (out / "fidelity.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(table_markdown(configs) + "\n" + paired_markdown(paired))
    plot_curves(configs, out / "curves.png")
    plot_seeds(configs, out / "seeds.png")
    print(table_markdown(configs))
    print(paired_markdown(paired))

    figures = {name: {k: c["aggregate"][k]["mean"] for k in ("kl_final", "kl_last3", "acc_final")
                      if k in c.get("aggregate", {})} | {"status": c["status"]}
               for name, c in configs.items()}
    print(json.dumps({"grid": args.grid, "out": str(out), "seeds": seeds, "steps": steps,
                      "ran": study["ran"], "skipped": study["skipped"], "failed": study["failed"],
                      "runs_read": sum(len(c.get("runs", {})) for c in configs.values()),
                      "refused": sorted(study["refused"]),
                      "run_seconds": round(study["run_seconds"], 1), "configs": figures}))
    return 1 if study["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
