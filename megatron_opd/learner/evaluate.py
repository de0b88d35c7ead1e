"""Held-out evaluation of the current policy: task accuracy, reverse KL to the teacher, and the
decoded completions a person can read.

Generation (global rank 0, the rollout server: it serves exactly the learner's latest version):
one greedy completion per held-out prompt (what accuracy scores, where the environment has a
verifier) and one sampled at temperature 1, top-p 1 (the student's own distribution pi).

Reproducible: prompt i is sampled with its own seed, `prompt_seed(seed, i)` (`seed` =
run.seed + version), so the same weights evaluated again give the same completions and the same
figures, and prompts do not share noise. The server must honour `sampling_seed`: the CPU compat
makes SGLang 0.5.23 do so (megatron_opd/compat/sglang_cpu.py); on GPUs SGLang reads it only
under --enable-deterministic-inference (docs/fault-tolerance.md, "Evaluation is reproducible").

Reverse KL(pi || q) on the sampled responses, token mean over all their tokens. Every rank runs
the learner's forward pass (any layout, vocab-sharded logits); per response token:
- k1 = log pi(y) - log q(y) and k3 = (r - 1) - log r, r = q(y)/pi(y): unbiased estimators of the
  KL at that position (ALGORITHMS.md §1). They need only log q of the sampled tokens (teacher
  scoring with top_k = 0) and log pi(y) from `vocab_parallel_token_stats`: time and memory do not
  grow with V beyond the student's own forward pass.
- the exact full-vocabulary KL, only when vocab_size <= exact_kl_max_vocab: the teacher returns
  its whole vocabulary as top-K and a [rows, T, V] tensor is built (small vocabularies only).
`eval/reverse_kl` is the exact value where it was computed (`eval/reverse_kl_method` = 0) and the
k3 estimate otherwise (method = 1). k1 and k3 are reported in both modes with standard errors.

Standard errors: responses (not tokens) are the independent units, tokens of one response are
correlated, so the SE is that of a ratio estimator over responses. With S_i the sum of k over
response i, n_i its tokens, m responses with n_i > 0 and N = sum n_i, the estimate is
K = sum S_i / N and  SE = sqrt(m / (m - 1) * sum_i (S_i - K n_i)^2) / N  (0 when m < 2).

Logits columns at ids >= vocab_size (megatron pads the vocabulary to a multiple of TP) are absent:
probability 0 and out of every normaliser; teacher log-probs are never read beyond vocab_size.
Sampled tokens with ids >= vocab_size (not real tokens) are left out of the KL and counted in
`eval/kl_out_of_vocab_tokens`.

Completions go to `<samples_dir>/eval-<version>.jsonl`, one object per prompt, written atomically.

Evaluation while training asynchronously: the learner publishes and then evaluates in the same
thread, so its requests reach servers that finished the update; generation keeps running beside
them (evaluation is a few dozen requests among the orchestrator's, no pause: measured in
docs/benchmarks.md). What would still make a completion come from other weights (a rollout
server restarted with its initial weights and not yet republished, a publish that overlaps
evaluation) is caught here, not assumed away: every completion must carry the evaluated
version on every token (SGLang's `weight_version` and `weight_versions` spans); those that do
not are requested again (the per-prompt seeds give the same completion on the right weights),
up to `VERSION_ATTEMPTS` rounds, and an evaluation that still cannot get them raises
`EvalVersionError` on every rank rather than report figures of other weights (the caller
can publish again, reconnecting a restarted server, and evaluate again).
`eval/redone_completions` counts the re-requests; `eval/served_version_ok` is 1 whenever
figures are reported; `eval/generate_s` and `eval/time_s` time the rollout part and the whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.learner.io import broadcast_tensor
from megatron_opd.learner.losses import EVAL_KL_COLUMNS, eval_kl_fn
from megatron_opd.learner.train_step import MicroBatch, forward_backward

# eval/reverse_kl_method
METHOD_EXACT = 0.0  # full-vocabulary KL (vocab_size <= exact_kl_max_vocab)
METHOD_K3 = 1.0  # the sampled k3 estimate

# Rounds of re-requests for completions from other weights, and the pause before each (a
# restarted server is being republished, or a publish is finishing).
VERSION_ATTEMPTS = 3
VERSION_RETRY_S = 1.0


class EvalVersionError(RuntimeError):
    """Completions of the evaluated version could not be had from the rollout fleet."""


@torch.no_grad()
def evaluate(ddp, groups, env, prompts, rollout, teacher, version: int, vocab_size: int,
             max_new_tokens: int, seed: int, micro_batch_size: int, samples_dir: Path | None,
             exact_kl_max_vocab: int = 4096) -> dict[str, float]:
    """Every rank calls it; `rollout`, `teacher` (SGLang clients) and `samples_dir` are used on
    global rank 0 only (None elsewhere). Returns the eval/ metrics (KL ones on every rank, the
    generation ones on rank 0)."""
    exact = vocab_size <= exact_kl_max_vocab
    out: dict[str, float] = {}
    tensors = gen = None
    refused = ""
    if dist.get_rank() == 0:
        t0 = time.perf_counter()
        try:
            gen = generate_eval(env, prompts, rollout, max_new_tokens, seed, version=version)
        except EvalVersionError as e:
            refused = str(e)
    # every rank raises together (the others would wait in the broadcasts below)
    if _any_rank0(bool(refused)):
        raise EvalVersionError(refused or f"evaluation of version {version}: the rollout fleet "
                               "served other weights (rank 0 has the details)")
    if dist.get_rank() == 0:
        t_gen = time.perf_counter() - t0
        # generate_eval refused completions of other weights: this holds by construction
        served_ok = not off_version(gen["greedy"] + gen["sampled"], version)
        responses = [list(s.output_ids) for s in gen["sampled"]]
        out = {"eval/version": float(version), "eval/served_version_ok": float(served_ok),
               "eval/redone_completions": float(gen["redone"]), "eval/generate_s": t_gen,
               "eval/response_len": float(np.mean([len(r) for r in responses])) if responses
               else 0.0}
        if env.has_verifier:
            out["eval/accuracy"] = float(np.mean(gen["greedy_reward"])) if prompts else 0.0
        tensors = kl_inputs([list(p.token_ids) for p in prompts], responses, teacher, vocab_size,
                            env.special.pad, micro_batch_size, exact)
    names = ["input_ids", "response_index", "response_ids", "loss_mask", "teacher_logprobs"]
    dims = [2, 2, 2, 2, 2]
    dtypes = [torch.int64, torch.int64, torch.int64, torch.float32, torch.float32]
    if exact:
        names, dims = names + ["teacher_full_logprobs"], dims + [3]
        dtypes = dtypes + [torch.float32]
    data = {n: broadcast_tensor(tensors[n] if tensors else None, k, dt)
            for n, k, dt in zip(names, dims, dtypes)}
    table = score_responses(ddp, groups, data, vocab_size, exact, micro_batch_size)
    out.update(kl_metrics(table, exact))
    if dist.get_rank() == 0:
        n_oov = int(tensors["out_of_vocab"])
        out["eval/kl_out_of_vocab_tokens"] = float(n_oov)
        if samples_dir is not None:
            records = eval_records(env, prompts, gen, table, version, exact)
            write_jsonl_atomic(Path(samples_dir) / f"eval-{version}.jsonl", records)
        out["eval/time_s"] = time.perf_counter() - t0  # generation, teacher scoring, forward
    return out


def _any_rank0(flag: bool) -> bool:
    """Rank 0's flag on every rank."""
    if dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of held-out prompt `index` in the evaluation seeded `seed`: 62 bits of a
    hash of both (distinct prompts and evaluations get unrelated seeds)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def off_version(results, version: int) -> list[int]:
    """Indices of the completions not made entirely by weights `version`: the version the
    server reported at the end, or any token's (SGLang's spans), differs."""
    return [i for i, r in enumerate(results)
            if int(r.weight_version) != version
            or any(int(v) != version for v in np.asarray(r.token_versions).tolist())]


def generate_at_version(rollout, ids: list[list[int]], params: dict | list[dict], version: int,
                        attempts: int = VERSION_ATTEMPTS, retry_s: float = VERSION_RETRY_S
                        ) -> tuple[list, int]:
    """(Rank 0.) `rollout.generate(ids, params)` whose every completion is of weights
    `version`: completions of other weights are requested again (after `retry_s`), at most
    `attempts` rounds. Returns (completions, how many were re-requested); raises
    EvalVersionError when some still come from other weights."""
    per_prompt = isinstance(params, list)
    results = list(rollout.generate(ids, params, return_logprob=False))
    redone = 0
    for _ in range(attempts):
        bad = off_version(results, version)
        if not bad:
            return results, redone
        time.sleep(retry_s)
        again = rollout.generate([ids[i] for i in bad],
                                 [params[i] for i in bad] if per_prompt else params,
                                 return_logprob=False)
        for i, r in zip(bad, again):
            results[i] = r
        redone += len(bad)
    bad = off_version(results, version)
    if bad:
        served = sorted({int(results[i].weight_version) for i in bad} |
                        {int(v) for i in bad for v in np.asarray(results[i].token_versions)})
        raise EvalVersionError(
            f"evaluation of version {version}: {len(bad)} of {len(ids)} completions still came "
            f"from weights {served} after {attempts} re-requests (a rollout server restarted and "
            "not republished?); no figures of other weights are reported")
    return results, redone


def generate_eval(env, prompts, rollout, max_new_tokens: int, seed: int,
                  version: int | None = None) -> dict:
    """(Rank 0.) Greedy and temperature-1 completions of every prompt, with the verifier's
    rewards where the environment has one. The sampled ones are seeded per prompt
    (`prompt_seed`): the same weights and `seed` give the same completions. With `version`,
    every completion is of those weights (`generate_at_version`); `redone` counts re-requests."""
    ids = [list(p.token_ids) for p in prompts]
    stop = [int(s) for s in env.special.stop_ids]
    if not ids:
        return {"greedy": [], "sampled": [], "greedy_reward": [], "sampled_reward": [],
                "redone": 0}

    def generate(params):
        if version is None:
            return rollout.generate(ids, params, return_logprob=False), 0
        return generate_at_version(rollout, ids, params, version)

    greedy, redone_g = generate({"temperature": 0.0, "max_new_tokens": max_new_tokens,
                                 "stop_token_ids": stop})
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                "max_new_tokens": max_new_tokens, "stop_token_ids": stop}
    # one sampling_params per prompt: SGLang takes a list for a batch
    sampled, redone_s = generate([{**sampling, "sampling_seed": prompt_seed(seed, i)}
                                  for i in range(len(ids))])
    gen = {"greedy": greedy, "sampled": sampled, "greedy_reward": None, "sampled_reward": None,
           "redone": redone_g + redone_s}
    if env.has_verifier:
        gen["greedy_reward"] = [float(env.reward(p, g.output_ids)) for p, g in zip(prompts, greedy)]
        gen["sampled_reward"] = [float(env.reward(p, s.output_ids))
                                 for p, s in zip(prompts, sampled)]
    return gen


def kl_inputs(prompts: list[list[int]], responses: list[list[int]], teacher, vocab_size: int,
              pad: int, mbs: int, exact: bool) -> dict:
    """(Rank 0.) Right-padded ids [rows, L]; per response token [rows, T]: the position that
    predicts it, its id, mask, and the teacher's log q(y_t) (scored with top_k = 0, or the whole
    vocabulary as top-K when `exact`, which adds `teacher_full_logprobs` [rows, T, vocab_size]).
    Rows are padded to a multiple of the micro-batch size (pipeline stages need equal shapes);
    `out_of_vocab` counts sampled ids >= vocab_size (masked out)."""
    n = len(prompts)
    rows = max(1, -(-n // mbs)) * mbs
    L = max([len(p) + len(r) for p, r in zip(prompts, responses)] + [2])
    T = max([len(r) for r in responses] + [1])
    ids = torch.full((rows, L), pad, dtype=torch.long)
    index = torch.zeros(rows, T, dtype=torch.long)
    resp = torch.zeros(rows, T, dtype=torch.long)
    mask = torch.zeros(rows, T)
    logq = torch.zeros(rows, T)
    full = torch.full((rows, T, vocab_size), -torch.inf) if exact else None
    keep = [i for i, r in enumerate(responses) if r]
    scores = teacher.score([prompts[i] + responses[i] for i in keep],
                           start=[len(prompts[i]) for i in keep],
                           top_k=vocab_size if exact else 0) if keep else []
    oov = 0
    for i in range(n):
        ids[i, :len(prompts[i]) + len(responses[i])] = torch.tensor(prompts[i] + responses[i])
    for i, sc in zip(keep, scores):
        P, r = len(prompts[i]), torch.tensor(responses[i], dtype=torch.long)
        m = r.numel()
        valid = r < vocab_size
        oov += int((~valid).sum())
        index[i, :m] = torch.arange(P - 1, P - 1 + m)
        resp[i, :m] = torch.where(valid, r, torch.zeros_like(r))
        mask[i, :m] = valid.float()
        logq[i, :m] = torch.as_tensor(np.asarray(sc.logprobs, dtype=np.float32))
        if exact:
            tid = torch.as_tensor(np.asarray(sc.topk_ids), dtype=torch.long)
            tlp = torch.as_tensor(np.asarray(sc.topk_logprobs, dtype=np.float32))
            # a teacher with a larger (padded) vocabulary: its ids >= vocab_size go to a spare
            # column that is dropped
            tid = torch.where(tid < vocab_size, tid, torch.full_like(tid, vocab_size))
            row = torch.full((m, vocab_size + 1), -torch.inf)
            row.scatter_(1, tid, tlp)
            row = row[:, :vocab_size]
            full[i, :m] = row
    out = {"input_ids": ids, "response_index": index, "response_ids": resp, "loss_mask": mask,
           "teacher_logprobs": logq, "out_of_vocab": oov}
    if exact:
        out["teacher_full_logprobs"] = full
    return out


def score_responses(ddp, groups, data: dict, vocab_size: int, exact: bool, mbs: int
                    ) -> torch.Tensor:
    """Every rank: the forward pass over all rows (each data-parallel rank scores the whole small
    set), returning the float64 [rows, 4] table of EVAL_KL_COLUMNS on every rank (one rank of the
    last stage reports it; one all-reduce over the world shares it)."""
    names = [n for n in data if n != "input_ids"]
    micro = [MicroBatch(data["input_ids"][i:i + mbs], {n: data[n][i:i + mbs] for n in names})
             for i in range(0, data["input_ids"].shape[0], mbs)]
    rows_out: dict[int, torch.Tensor] = {}
    forward_backward(ddp, micro, eval_kl_fn(groups.tp, groups.tp_rank, vocab_size, exact=exact,
                                            rows_out=rows_out), groups, forward_only=True)
    table = torch.zeros(data["input_ids"].shape[0], len(EVAL_KL_COLUMNS), dtype=torch.float64)
    reporter = groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0
    if reporter:
        for i, t in rows_out.items():
            table[i * mbs:i * mbs + t.shape[0]] = t
    if dist.get_world_size() > 1:
        dist.all_reduce(table)
    return table


def ratio_mean_se(sums, counts) -> tuple[float, float]:
    """Token mean sum(S_i) / sum(n_i) over responses and its standard error with responses as
    the independent units (see the module docstring); (0, 0) without tokens."""
    s = np.asarray(sums, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    used = n > 0
    s, n = s[used], n[used]
    total = n.sum()
    if total == 0:
        return 0.0, 0.0
    mean = s.sum() / total
    m = s.size
    if m < 2:
        return float(mean), 0.0
    with np.errstate(invalid="ignore"):
        se = math.sqrt(m / (m - 1) * float(np.sum((s - mean * n) ** 2))) / total
    return float(mean), float(se)


def kl_metrics(table: torch.Tensor, exact: bool) -> dict[str, float]:
    """eval/reverse_kl* from the per-response table (EVAL_KL_COLUMNS)."""
    t = table.numpy()
    n = t[:, 2]
    k1, k1_se = ratio_mean_se(t[:, 0], n)
    k3, k3_se = ratio_mean_se(t[:, 1], n)
    out = {"eval/reverse_kl_k1": k1, "eval/reverse_kl_k1_se": k1_se,
           "eval/reverse_kl_k3": k3, "eval/reverse_kl_k3_se": k3_se,
           "eval/kl_tokens": float(n.sum())}
    if exact:
        out["eval/reverse_kl"] = ratio_mean_se(t[:, 3], n)[0]
        out["eval/reverse_kl_method"] = METHOD_EXACT
    else:
        out["eval/reverse_kl"] = k3
        out["eval/reverse_kl_method"] = METHOD_K3
    return out


def _num(x: float):
    """A JSON-safe float: non-finite values as the strings "inf", "-inf", "nan"."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _completion(env, g, reward) -> dict:
    rec = {"text": env.decode(g.output_ids), "token_ids": [int(t) for t in g.output_ids],
           "finish_reason": g.finish_reason, "weight_version": int(g.weight_version)}
    if reward is not None:
        rec["reward"] = reward
    return rec


def eval_records(env, prompts, gen: dict, table: torch.Tensor, version: int, exact: bool
                 ) -> list[dict]:
    """(Rank 0.) One JSON-able object per held-out prompt: the prompt, its greedy completion
    (what accuracy scores) and its sampled one with the per-sample KL sums (EVAL_KL_COLUMNS)."""
    recs = []
    for i, p in enumerate(prompts):
        greedy = _completion(env, gen["greedy"][i],
                             None if gen["greedy_reward"] is None else gen["greedy_reward"][i])
        sampled = _completion(env, gen["sampled"][i],
                              None if gen["sampled_reward"] is None else gen["sampled_reward"][i])
        k1, k3, n, kl = (float(x) for x in table[i].tolist())
        sampled.update({"k1_sum": _num(k1), "k3_sum": _num(k3), "kl_tokens": int(n)})
        if exact:
            sampled["exact_kl_sum"] = _num(kl)
        rec = {"version": int(version), "index": i, "source": p.source,
               "prompt": env.decode(p.token_ids), "prompt_token_ids": [int(t) for t in p.token_ids]}
        if p.label is not None:
            rec["label"] = p.label
        rec.update({"greedy": greedy, "sampled": sampled})
        recs.append(rec)
    return recs


def write_jsonl_atomic(path: Path, records: list[dict]) -> Path:
    """Write one JSON object per line to `path` atomically: a temporary file in the same
    directory, fsynced, then renamed over `path`; on any error nothing is left behind and an
    existing `path` is unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
