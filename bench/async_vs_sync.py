"""What asynchrony buys: samples/s of the real CPU pipeline, synchronous vs asynchronous, under
long-tailed generation lengths, in one run.

Modes (same config otherwise, both `megatron-opd train` runs through the embedded launcher:
real SGLang rollout and teacher servers on CPU, ZeroMQ, the megatron learner):

- synchronous: `async.max_staleness=0`. The orchestrator's admission lets a sample start only
  while `started + 1 <= (version + 1) * batch_size`, so the samples of step s start only once
  the weights of step s - 1 are published (version s), and the learner blocks in `next_batch`
  until all batch_size of them arrived: generation and training strictly alternate, and every
  batch waits for its longest response.
- asynchronous: `async.max_staleness=S`, by default S = 2 and S = 4 (one run each). Up to
  (S + 1) x batch_size samples are in flight; generation of later batches runs while the
  learner trains and publishes, and a batch is whatever finished first. S = 2 is the smallest
  window that holds a batch being trained, one being generated and one of long responses
  still decoding; S = 4 shows what more room buys. Measured (docs/benchmarks.md): the learner
  becomes the bottleneck, the orchestrator runs the whole window ahead (mean staleness ~ S),
  and the early tokens of the long responses end up more than S versions old and are masked
  (`dropped_stale_fraction`, 20-28 % of the tokens at either S): hence both samples/s
  and trained tokens/s are reported.

Long-tailed lengths without a change to the pipeline: the student (and teacher) is a real
Qwen3-MoE Hugging Face checkpoint written here whose outputs are a designed Markov chain. Its
attention and expert output projections are zero, so the hidden state at a position is the
final-normed embedding of that position's token (one-hot embeddings), and lm_head sets the
next-token logits per current token: after the prompt's last token (the chat template's
"assistant\\n") it picks a countdown token c_L with probability p(L) ∝ L^-alpha, then
c_L -> c_{L-1} -> ... -> c_1 -> <eos> with a logit margin of 40 (deterministic in practice).
A response therefore has exactly L + 1 tokens with L drawn from a discrete power law on
[1, max_len]: most responses are short, a few are about 10x the mean. The compute per token is
that of any model of this size (every layer still runs); the learner's tiny lr keeps the chain
intact over the run (checked: `chain_intact_fraction` of the evaluations' sampled completions,
the first and the last evaluation included).

Reported per mode, over the steps after `--warmup` (the last step, which runs the final
evaluation, is excluded): samples/s = batch_size x steps / their wall time (sum of the
learner's `time/step_s`), step time, learner idle (waiting for samples), weight sync time,
trained and generated tokens/s (response tokens of the trained samples, without and with those
masked as too stale), staleness, evaluations (count, completions requested again because they
came from other weights, generation time). Baseline (same run): the synchronous mode.
`speedup` = best async / sync samples/s (`trained_token_speedups` beside it). Bounds printed
beside it: the synchronous step split into waiting (generation + scoring of the batch: `gen`)
and the rest (`train`: forward, backward, optimizer, publish), the ideal overlap
(gen + train) / max(gen, train), and how much of the machine the other jobs took (load).

`--eval-impact`: what a held-out evaluation costs generation, on one rollout server under the
asynchronous load (`eval_impact`).

    flock /tmp/opd-heavy.lock env OMP_NUM_THREADS=1 .venv/bin/python bench/async_vs_sync.py \
        [--steps 40] [--warmup 8] [--batch-size 32] [--staleness 2,4] [--alpha 1.5]
        [--max-len 94] [--eval-interval N] [--rollout-servers N] [--eval-impact]

About 5 minutes on 2 cores for the defaults, 2 more with --eval-impact. Last line: one JSON
object.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARGIN = 40.0  # logit of the chain's next token over every other (e^-40: never deviates)


# ----------------------------------------------------------------------------- the lengths
def length_pmf(max_len: int, alpha: float) -> np.ndarray:
    """p(L) for L = 1..max_len, proportional to L^-alpha (index L - 1)."""
    L = np.arange(1, max_len + 1, dtype=np.float64)
    p = L ** -alpha
    return p / p.sum()


def expected_batch_max(pmf: np.ndarray, n: int) -> float:
    """E[max of n independent draws] of L (1-based support of `pmf`): sum_L P(max >= L)."""
    cdf = np.cumsum(pmf)
    below = np.concatenate([[0.0], cdf[:-1]])  # P(L' < L) for L = 1..max
    return float(np.sum(1.0 - below ** n))


def chain_logits(vocab: int, chain: list[int], start: int, eos: int, pmf: np.ndarray,
                 margin: float = MARGIN) -> np.ndarray:
    """[vocab (current token), vocab (next token)] logits of the designed Markov chain.
    chain[k - 1] is the countdown token c_k (k = 1..len(chain)): c_k -> c_{k-1}, c_1 -> eos;
    after `start`, c_L with probability pmf[L - 1]. Every other transition: logit 0."""
    if len(pmf) != len(chain):
        raise ValueError(f"pmf has {len(pmf)} lengths for a chain of {len(chain)} tokens")
    if start in chain or eos in chain:
        raise ValueError("the start and eos tokens must not be countdown tokens")
    logits = np.zeros((vocab, vocab))
    for k in range(2, len(chain) + 1):
        logits[chain[k - 1], chain[k - 2]] = margin
    logits[chain[0], eos] = margin
    logp = np.log(pmf)
    logits[start, chain] = margin + logp - logp.max()
    return logits


def make_long_tail_model(out_dir: Path, max_len: int, alpha: float, hidden: int = 128,
                         num_layers: int = 2) -> tuple[Path, np.ndarray]:
    """A Qwen3-MoE HF checkpoint (the tests' character tokenizer with ChatML) whose responses
    have L + 1 tokens, L ~ length_pmf(max_len, alpha). Returns (dir, pmf)."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.hf_fixtures import make_char_tokenizer, make_hf_moe

    tok = make_char_tokenizer(out_dir / "tokenizer")
    model = make_hf_moe(out_dir / "model", "qwen3_moe", tok, hidden_size=hidden,
                        num_layers=num_layers, max_position_embeddings=512)
    cfg = json.loads((model / "config.json").read_text())
    vocab, eos = cfg["vocab_size"], cfg["eos_token_id"]
    if hidden < vocab:
        raise ValueError(f"hidden {hidden} must be >= vocab {vocab} (one-hot embeddings)")
    newline = 95  # the character tokenizer's "\n": the chat template's last prompt token
    chain = [i for i in range(max_len + 1) if i != newline][:max_len]
    pmf = length_pmf(max_len, alpha)
    logits = torch.tensor(chain_logits(vocab, chain, newline, eos, pmf), dtype=torch.float32)
    files = sorted(model.glob("*.safetensors"))
    for f in files:
        state = load_file(str(f))
        for name, t in state.items():
            if name.endswith("o_proj.weight") or "down_proj" in name:
                state[name] = torch.zeros_like(t)  # layers add nothing to the residual
            elif name == "model.embed_tokens.weight":
                state[name] = torch.eye(vocab, hidden)  # one-hot: RMS-normed to sqrt(hidden)
            elif name == "lm_head.weight":
                # logits = W h, h = sqrt(hidden) e_x: W[y, x] = logit(x -> y) / sqrt(hidden)
                w = torch.zeros(vocab, hidden)
                w[:, :vocab] = logits.T / hidden ** 0.5
                state[name] = w
        save_file(state, str(f), metadata={"format": "pt"})
    return model, pmf


# ----------------------------------------------------------------------------- the runs
def write_config(path: Path, root: Path, model: Path, args, staleness: int, run_dir: Path) -> Path:
    """The bench's config: the chat environment on the long-tail model (student and teacher),
    one prompt per /generate call (a finished response frees its slot at once) and enough
    worker threads to fill the largest window, the same in both modes."""
    inflight = (max(args.staleness) + 1) * args.batch_size
    cfg = {
        "run": {"name": f"async-bench-s{staleness}", "dir": str(run_dir), "seed": 0},
        "env": {"name": "chat", "num_eval_prompts": args.eval_prompts, "verifier": "none"},
        "data": {"train": str(root / "train.jsonl"), "prompt_key": "messages",
                 "apply_chat_template": True, "max_prompt_tokens": 128},
        "init": {"student": str(model), "teacher": str(model)},
        "rollout": {"temperature": 1.0, "max_new_tokens": args.max_len + 2,
                    "prompts_per_request": 1, "max_inflight_requests": inflight,
                    "num_servers": args.rollout_servers},
        "teacher": {"top_k": 0, "revision": "bench-teacher"},
        "async": {"max_staleness": staleness},
        "parallel": {"micro_batch_size": args.micro_batch_size},
        # lr small enough that the chain survives training (Adam moves a weight ~lr per step)
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": 1e-7,
                  "warmup_steps": 0, "checkpoint_interval": 0, "checkpoint": False},
        "objective": {"terms": ["sampled_token_opd"]},
        # default: the first and last evaluation only (both outside the timed steps)
        "eval": {"interval": args.eval_interval},
        "server": {"max_total_tokens": 32768},
        "logging": {"progress": False, "tensorboard": False},
        "cluster": {"gpus_per_node": 0},
    }
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_mode(config: Path, timeout: float) -> tuple[float, str]:
    """`megatron-opd train --config config`; on a timeout every descendant is killed (SGLang
    servers run in their own sessions). Returns (wall seconds, combined output tail)."""
    import psutil

    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", "train", "--config",
                             str(config)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        out, _ = proc.communicate()
        raise SystemExit(f"async_vs_sync: {config} timed out after {timeout:.0f} s\n{out[-4000:]}")
    if proc.returncode != 0:
        raise SystemExit(f"async_vs_sync: {config} failed ({proc.returncode})\n{out[-6000:]}")
    return time.time() - t0, out


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r]


def eval_lengths(run_dir: Path, chain_next: dict[int, int], eos: int) -> tuple[list[int], float]:
    """Lengths of the evaluations' sampled completions (temperature 1: the same chain as
    training samples) and the fraction that follow the chain exactly (c_L .. c_1, eos): the
    first evaluation is of the init, the last of the trained weights."""
    lengths, ok = [], 0
    for f in sorted((run_dir / "samples").glob("eval-*.jsonl")):
        for line in f.read_text().splitlines():
            ids = json.loads(line)["sampled"]["token_ids"]
            lengths.append(len(ids))
            ok += bool(ids) and all(chain_next.get(a) == b for a, b in zip(ids, ids[1:])) \
                and ids[-1] == eos
    return lengths, ok / max(1, len(lengths))


def summarize(records: list[dict], warmup: int, batch_size: int) -> dict:
    """Steady-state figures over the steps after `warmup`, the last (final evaluation) left out."""
    rs = records[warmup:-1]
    if not rs:
        raise SystemExit(f"async_vs_sync: no step after --warmup {warmup} (raise --steps)")
    wall = sum(r["time/step_s"] for r in rs)
    wait = sum(r["time/wait_samples_s"] for r in rs)
    sync = sum(r["time/weight_sync_s"] for r in rs)
    tokens = sum(r["train/tokens"] for r in rs)
    dropped = records[-2]["samples/dropped_stale_tokens"] - \
        (records[warmup - 1]["samples/dropped_stale_tokens"] if warmup else 0)
    return {
        "samples_per_s": batch_size * len(rs) / wall,
        "steps": len(rs), "wall_s": wall,
        "step_s_median": statistics.median(r["time/step_s"] for r in rs),
        # the learner idle, waiting for its batch (sync: generation + scoring of the batch)
        "wait_s_per_step": wait / len(rs),
        "weight_sync_s_per_step": sync / len(rs),
        # forward, backward, optimizer, logging: the step without waiting and publishing
        "train_s_per_step": (wall - wait - sync) / len(rs),
        "learner_idle_fraction": wait / wall,
        # kept = trained; dropped = masked as older than max_staleness (generated, wasted)
        "trained_tokens_per_s": tokens / wall,
        "generated_tokens_per_s": (tokens + dropped) / wall,
        "response_len_mean": (tokens + dropped) / (batch_size * len(rs)),
        "staleness_mean": statistics.fmean(r["samples/staleness_mean"] for r in rs),
        "staleness_max": max(r["samples/staleness_max"] for r in rs),
        "dropped_stale_fraction": dropped / max(1.0, tokens + dropped),
    }


# ----------------------------------------------------------------------------- evaluation's cost
class _BenchEnv:
    """What `generate_eval` reads of an environment: stop ids, no verifier."""

    def __init__(self, eos: int):
        from megatron_opd.envs.base import SpecialIds

        self.special = SpecialIds(pad=96, eos=eos, stop_ids=(eos,))
        self.has_verifier = False


def _tokens_in(spans: list[tuple[float, float, int]], a: float, b: float) -> float:
    """Tokens generated in [a, b], each request's tokens spread evenly over its lifetime."""
    total = 0.0
    for t0, t1, n in spans:
        overlap = min(b, t1) - max(a, t0)
        if overlap > 0:
            total += n * overlap / max(t1 - t0, 1e-9)
    return total


def eval_impact(model: Path, root: Path, args) -> dict:
    """One rollout server on the long-tail model under an orchestrator-like load (one prompt
    per /generate, `(S + 1) x batch` requests in flight, return_logprob); the production
    `generate_eval` (greedy + seeded temperature-1 completions of `--eval-prompts` held-out
    prompts, every completion checked for the evaluated version) runs back to back in windows
    alternating with quiet ones (`--evals` rounds of `--window` s each). Generation tokens/s
    of the load while evaluating over that of the quiet window before it; the evaluation's
    duration, alone (before the load starts) and under load."""
    import threading

    from megatron_opd.learner.evaluate import generate_eval
    from megatron_opd.procs import free_port
    from megatron_opd.serving.sglang_client import SGLangClient
    from megatron_opd.serving.sglang_server import SGLangServer

    eos = json.loads((model / "config.json").read_text())["eos_token_id"]
    server = SGLangServer("rollout", str(model), free_port(), str(root / "eval-server.log"),
                          max_total_tokens=32768, threads=1,
                          extra_args=("--weight-version", "0"))
    server.start()
    try:
        server.wait_ready(300)
        client = SGLangClient(server.url)
        env = _BenchEnv(eos)
        rng = np.random.default_rng(1)
        # chat-shaped prompts: <|im_start|> + characters + "\n" (the chain's start token)
        prompt = lambda: [97] + rng.integers(0, 90, int(rng.integers(10, 30))).tolist() + [95]
        from megatron_opd.envs.base import EnvPrompt

        held_out = [EnvPrompt(tuple(prompt()), source="eval") for _ in range(args.eval_prompts)]
        params = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.max_len + 2,
                  "stop_token_ids": [eos]}
        spans: list[tuple[float, float, int]] = []
        stop = threading.Event()

        def load() -> None:
            local = np.random.default_rng(threading.get_ident() % 2**32)
            while not stop.is_set():
                ids = [97] + local.integers(0, 90, int(local.integers(10, 30))).tolist() + [95]
                t0 = time.perf_counter()
                r = client.generate([ids], params, return_logprob=True)[0]
                spans.append((t0, time.perf_counter(), len(r.output_ids)))

        def run_evals(n: int) -> list[float]:
            out = []
            for k in range(n):
                t0 = time.perf_counter()
                gen = generate_eval(env, held_out, client, args.max_len + 2, seed=k, version=0)
                assert gen["redone"] == 0
                out.append(time.perf_counter() - t0)
            return out

        run_evals(1)  # warm-up (first seeded requests)
        alone = run_evals(args.evals)
        workers = [threading.Thread(target=load, daemon=True)
                   for _ in range((max(args.staleness) + 1) * args.batch_size)]
        for w in workers:
            w.start()
        time.sleep(args.window)  # warm-up of the load: not measured
        # alternating windows (a shared machine's load drifts): quiet, then evaluations
        # back to back for as long, `--evals` rounds; tokens/s of the load in each
        quiet, during, loaded = [], [], []
        for _ in range(args.evals):
            a = time.perf_counter()
            time.sleep(args.window)
            b = time.perf_counter()
            while time.perf_counter() - b < args.window:
                loaded += run_evals(1)
            c = time.perf_counter()
            quiet.append(_tokens_in(spans, a, b) / (b - a))
            during.append(_tokens_in(spans, b, c) / (c - b))
        stop.set()
        for w in workers:
            w.join(timeout=60)
        ratios = [d / q for d, q in zip(during, quiet)]
        return {"eval_s_alone": statistics.median(alone),
                "eval_s_under_load": statistics.median(loaded), "evals_under_load": len(loaded),
                "gen_tokens_per_s_quiet": quiet, "gen_tokens_per_s_during_eval": during,
                "gen_ratio_during_eval": statistics.median(ratios), "gen_ratios": ratios,
                "eval_prompts": args.eval_prompts, "load_requests_in_flight": len(workers)}
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--staleness", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4],
                    help="asynchronous modes to run (comma-separated async.max_staleness)")
    ap.add_argument("--alpha", type=float, default=1.5)
    ap.add_argument("--max-len", type=int, default=94)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=420.0, help="per mode")
    ap.add_argument("--keep", default="", help="directory to keep the runs in (default: temp)")
    ap.add_argument("--eval-interval", type=int, default=100000,
                    help="eval.interval of the runs (evaluations inside the timed steps)")
    ap.add_argument("--rollout-servers", type=int, default=1,
                    help="rollout.num_servers (behind the config's server.router)")
    ap.add_argument("--eval-impact", action="store_true",
                    help="also measure what a held-out evaluation costs generation (one server)")
    ap.add_argument("--evals", type=int, default=3, help="--eval-impact rounds")
    ap.add_argument("--window", type=float, default=10.0, help="--eval-impact windows, s")
    ap.add_argument("--skip-modes", action="store_true", help="only --eval-impact")
    args = ap.parse_args()
    if any(s < 1 for s in args.staleness):
        raise SystemExit("async_vs_sync: --staleness: asynchronous modes need >= 1 (0 is the "
                         "synchronous baseline, always run)")
    import tempfile

    from tests.hf_fixtures import write_chat_prompts

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="async-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    model, pmf = make_long_tail_model(root / "lt", args.max_len, args.alpha)
    write_chat_prompts(root / "train.jsonl", None, n=4000, seed=0)
    mcfg = json.loads((model / "config.json").read_text())
    eos = mcfg["eos_token_id"]
    chain = [i for i in range(args.max_len + 1) if i != 95][:args.max_len]
    chain_next = {chain[k]: chain[k - 1] for k in range(1, len(chain))} | {chain[0]: eos}
    mean_len = float(np.sum(np.arange(1, args.max_len + 1) * pmf)) + 1
    emax = expected_batch_max(pmf, args.batch_size) + 1
    print(f"lengths: L + 1, p(L) ~ L^-{args.alpha} on [1, {args.max_len}]: mean {mean_len:.1f}, "
          f"median {int(np.searchsorted(np.cumsum(pmf), 0.5)) + 2}, expected longest of a batch "
          f"of {args.batch_size}: {emax:.1f} ({emax / mean_len:.1f}x the mean)", flush=True)
    summary = {"lengths": {"alpha": args.alpha, "max_len": args.max_len, "mean": mean_len,
                           "expected_batch_max": emax},
               "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
               "cpus": os.cpu_count()}
    if not args.skip_modes:
        summary = {**compare_modes(root, model, args, chain_next, eos), **summary}
    if args.eval_impact:
        load_before = os.getloadavg()[0]
        ev = eval_impact(model, root, args)
        ev["load_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        print(f"evaluation ({ev['eval_prompts']} prompts, greedy + sampled): "
              f"{ev['eval_s_alone']:.2f} s alone, {ev['eval_s_under_load']:.2f} s under load "
              f"({ev['load_requests_in_flight']} generation requests in flight); generation "
              f"tokens/s while evaluating / in the quiet window before: x"
              f"{ev['gen_ratio_during_eval']:.2f} (median of "
              + ", ".join(f"{r:.2f}" for r in ev["gen_ratios"]) + ")", flush=True)
        summary["eval"] = ev
    print(json.dumps(summary))


def compare_modes(root: Path, model: Path, args, chain_next: dict[int, int], eos: int) -> dict:
    """The synchronous run, then each asynchronous one; figures and the speedup."""
    modes = [("sync", 0)] + [(f"async_s{s}", s) for s in args.staleness]
    results, load = {}, {}
    for name, s in modes:
        run_dir = root / f"run-{name}"
        config = write_config(root / f"{name}.yaml", root, model, args, s, run_dir)
        load_before = os.getloadavg()[0]
        wall, _ = run_mode(config, args.timeout)
        load[name] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        res = summarize(step_records(run_dir), args.warmup, args.batch_size)
        lengths, intact = eval_lengths(run_dir, chain_next, eos)
        evals = [r for r in (json.loads(x) for x in
                             (run_dir / "metrics.jsonl").read_text().splitlines())
                 if "eval/generate_s" in r]
        evals = list({r["eval/version"]: r for r in evals}.values())  # one record per eval
        res.update({"evaluations": len(evals),
                    "eval_redone_completions": sum(r["eval/redone_completions"] for r in evals),
                    "eval_served_version_ok": min(r["eval/served_version_ok"] for r in evals),
                    "eval_generate_s_median": statistics.median(r["eval/generate_s"]
                                                                for r in evals)})
        res.update({"run_wall_s": wall, "eval_response_len_mean": statistics.fmean(lengths),
                    "chain_intact_fraction": intact, "load_1min_before_after": load[name]})
        results[name] = res
        print(f"{name:>9} (max_staleness {s}): {res['samples_per_s']:.2f} samples/s, step "
              f"{res['step_s_median']:.2f} s median (wait {res['wait_s_per_step']:.2f} + train "
              f"{res['train_s_per_step']:.2f} + publish {res['weight_sync_s_per_step']:.2f} s), "
              f"learner idle {res['learner_idle_fraction']:.0%}, "
              f"{res['trained_tokens_per_s']:.0f} trained tokens/s (responses of "
              f"{res['response_len_mean']:.1f} tokens), staleness mean "
              f"{res['staleness_mean']:.2f} max {res['staleness_max']}, dropped stale "
              f"{res['dropped_stale_fraction']:.1%}; whole run {wall:.0f} s, load "
              f"{load[name][0]} -> {load[name][1]}", flush=True)
    base = results["sync"]
    gen, train = base["wait_s_per_step"], base["train_s_per_step"] + base["weight_sync_s_per_step"]
    bound = (gen + train) / max(gen, train)
    best = max((n for n, _ in modes[1:]), key=lambda n: results[n]["samples_per_s"])
    speedup = results[best]["samples_per_s"] / base["samples_per_s"]
    print(f"speedup {best} / sync: {speedup:.2f}x; synchronous step = generation+scoring "
          f"{gen:.2f} s + training+publishing {train:.2f} s: perfect overlap would give "
          f"{bound:.2f}x", flush=True)
    return {"sync_samples_per_s": base["samples_per_s"],
            "async_samples_per_s": results[best]["samples_per_s"], "speedup": speedup,
            "async_mode": best, "overlap_bound": bound,
            "speedups": {n: results[n]["samples_per_s"] / base["samples_per_s"]
                         for n, _ in modes[1:]},
            # the same ratio for trained tokens (what survives the staleness mask)
            "trained_token_speedups": {n: results[n]["trained_tokens_per_s"]
                                       / base["trained_tokens_per_s"] for n, _ in modes[1:]},
            "modes": results}


if __name__ == "__main__":
    main()
