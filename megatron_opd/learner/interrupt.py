"""Interrupt sync, the learner's half (`correction.proximal=interrupt`; the orchestrator's half
and the protocol are in `megatron_opd/interrupt_sync.py`).

Just before the optimizer step that leads to replacing the fleet's weights (version v), the
learner still holds v (with `async.publish_lag = 0` they are the live weights; with a lag, the
snapshot ring that lagged publishing keeps anyway). Rank 0 sends `Interrupt(seq, v)` and waits
for the orchestrator's `PartialRollouts`; every rank then scores, in one collective forward
pass, the response tokens of version v in those rows and in the samples the learner received
but has not trained. Rank 0 keeps log pi_v(y_t) per sample id (`InterruptStore`) and writes it
into the batch that trains the sample (`TrainBatch.interrupt_logprobs`).

Invariants:
1. The store only ever holds log-probs of the version a token was sampled with, computed with
   the exact weights of that version (the same forward code and temperature convention as the
   training loss: `proximal.make_scorer`).
2. Tokens of the fleet's current version are not in the store yet (their interrupt has not
   happened): `ProximalPolicy` scores them at training time with the weights of that version.
3. Whatever is missing (a lost answer, a restarted learner) falls back to mu and is counted by
   `ProximalPolicy` (`offpolicy/proximal_fallback_fraction`), never guessed.
4. Memory: 4 bytes per stored token, for samples in flight only (entries leave when trained,
   or when older than the staleness window).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.transport import Interrupt, PartialRollouts, Sample


class InterruptStore:
    """Rank 0: sample id -> float32 [T] log pi_old (NaN where not scored), with the newest
    version put into each entry (to forget entries of samples that will never arrive)."""

    def __init__(self):
        self.rows: dict[str, np.ndarray] = {}
        self.newest: dict[str, int] = {}

    def put(self, key: str, logprobs: np.ndarray, versions: np.ndarray, version: int) -> int:
        """Keep `logprobs` where `versions == version`; returns how many tokens were stored."""
        n = len(versions)
        row = self.rows.get(key)
        if row is None or len(row) < n:
            grown = np.full(n, np.nan, dtype=np.float32)
            if row is not None:
                grown[:len(row)] = row
            row = self.rows[key] = grown
        take = np.asarray(versions) == version
        row[:n][take] = np.asarray(logprobs, dtype=np.float32)[:n][take]
        self.newest[key] = version
        return int(take.sum())

    def take(self, samples: list[Sample], width: int) -> torch.Tensor:
        """[B, width] float32 for a batch of `samples` (NaN where nothing is stored); their
        entries leave the store."""
        out = np.full((len(samples), width), np.nan, dtype=np.float32)
        for b, s in enumerate(samples):
            row = self.rows.pop(s.sample_id, None)
            self.newest.pop(s.sample_id, None)
            if row is not None:
                n = min(len(row), len(s.response_ids), width)
                out[b, :n] = row[:n]
        return torch.from_numpy(out)

    def forget_older_than(self, version: int) -> None:
        for key in [k for k, v in self.newest.items() if v < version]:
            self.rows.pop(key, None)
            self.newest.pop(key, None)

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows.values())


def await_partial_rollouts(receiver, control, seq: int, version: int,
                           timeout_s: float) -> PartialRollouts | None:
    """Rank 0: announce the interrupt (repeated every second: PUB/SUB drops messages to a
    subscriber that is joining) and wait for its answer; samples arriving meanwhile are queued
    by the receiver, in order, before the answer."""
    deadline = time.monotonic() + timeout_s
    announced = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() - announced >= 1.0:
            control.publish(Interrupt(seq=seq, version=version))
            announced = time.monotonic()
        receiver.poll(timeout_ms=50)
        for msg in list(receiver.partial_rollouts):
            if msg.interrupt == seq:
                receiver.partial_rollouts.remove(msg)
                return msg
    return None


def rows_to_score(answer: PartialRollouts | None, received: list[Sample],
                  version: int) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(key, prompt ids, response ids, versions) of every row holding a token of `version`:
    the samples received and not trained, then the orchestrator's rows (a key in both: the
    received sample wins, it is the longer)."""
    rows, seen = [], set()
    for s in received:
        if s.sample_id not in seen and (s.token_versions == version).any():
            seen.add(s.sample_id)
            rows.append((s.sample_id, s.prompt_ids, s.response_ids, s.token_versions))
    for key, p, r, v in (answer.rows() if answer is not None else []):
        if key not in seen and (v == version).any():
            seen.add(key)
            rows.append((key, p, r, v))
    return rows


def scoring_samples(rows, temperature: float, teacher_temperature: float,
                    top_k: int) -> list[Sample]:
    """Rows as Samples `collate` can batch (teacher fields are placeholders: the scoring pass
    reads only the tokens, their positions and the sampler's temperature)."""
    out = []
    for key, p, r, v in rows:
        n = len(r)
        out.append(Sample(
            sample_id=key, group_id=key, prompt_ids=np.asarray(p, np.int32),
            response_ids=np.asarray(r, np.int32), loss_mask=np.ones(n, np.uint8),
            behaviour_logprobs=np.zeros(n, np.float32),
            token_versions=np.asarray(v, np.int64), teacher_logprobs=np.zeros(n, np.float32),
            teacher_topk_ids=np.zeros((n, top_k), np.int32),
            teacher_topk_logprobs=np.zeros((n, top_k), np.float32),
            temperature=temperature, teacher_temperature=teacher_temperature))
    return out


def score_batch(batch, fields, groups, micro_batch_size: int, score, models) -> torch.Tensor:
    """Collective: log pi(y_t) [B, T] of a batch every rank holds (B a multiple of dp x micro),
    with `score(models, micro)`; every rank returns the whole [B, T]."""
    from megatron_opd.learner.train_step import split_microbatches

    micro = split_microbatches(batch, fields, groups, micro_batch_size)
    rows = score(models, micro)
    B, T = batch.response_ids.shape
    full = torch.zeros(B, T, dtype=torch.float64)
    count = torch.zeros(B, 1, dtype=torch.float64)
    base = groups.dp_rank * (B // groups.dp_size)
    for i, lp in rows.items():  # only ranks that compute the loss have rows
        r0 = base + i * micro_batch_size
        full[r0:r0 + lp.shape[0], :lp.shape[1]] += lp.double()
        count[r0:r0 + lp.shape[0]] += 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(full)
        dist.all_reduce(count)
    return (full / count.clamp_min(1)).to(torch.float32)


def pad_rows(samples: list, multiple: int) -> list:
    """Repeat the last sample until len is a multiple (the extra rows are discarded)."""
    extra = (-len(samples)) % multiple
    return samples + [samples[-1]] * extra


def interrupt_sync(io, proximal, score, groups, cfg, pad_id: int, fields: tuple[str, ...],
                   seq: int) -> dict[str, float]:
    """Collective, every rank, before the optimizer step whose weights replace the fleet's
    version: score the tokens of that version not trained yet (rank 0's `io` gathers them and
    keeps the result in `io.interrupts`). Returns rank 0's metrics."""
    from megatron_opd.learner.batch import collate
    from megatron_opd.learner.io import broadcast_batch

    t0 = time.perf_counter()
    version = proximal.fleet_version
    mbs = cfg.parallel.micro_batch_size
    count = torch.zeros(1, dtype=torch.int64)
    rows, answer, batch = [], None, None
    if io is not None:
        answer = await_partial_rollouts(io.receiver, io.control, seq, version,
                                        cfg.correction.interrupt_timeout_s)
        rows = rows_to_score(answer, [s for _, s in io.queue] + io.receiver.queued_samples(),
                             version)
        if rows:
            samples = scoring_samples(rows, cfg.rollout.temperature, cfg.teacher.temperature,
                                      cfg.teacher.top_k)
            batch, _ = collate(pad_rows(samples, groups.dp_size * mbs), pad_id, version, None)
        count[0] = len(rows)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(count, src=0)
    stored = 0
    if count.item():
        batch = broadcast_batch(batch)
        with proximal.holding(version):
            logprobs = score_batch(batch, fields, groups, mbs, score, proximal.ddp)
        for i, (key, _, response, versions) in enumerate(rows):  # rank 0 only has rows
            stored += io.interrupts.put(key, logprobs[i, :len(response)].numpy(), versions,
                                        version)
    if io is None:
        return {}
    io.interrupts.forget_older_than(version - cfg.async_.max_staleness - 1)
    return {"offpolicy/interrupt_answered": float(answer is not None),
            "offpolicy/interrupt_rows": float(len(rows)),
            "offpolicy/interrupt_unsent_rows": float(len(answer.keys) if answer else 0),
            "offpolicy/interrupt_tokens": float(stored),
            "offpolicy/interrupt_store_tokens": float(io.interrupts.tokens),
            # what this strategy holds: the store (float32 per token) and the lag's snapshots
            "offpolicy/extra_bytes": float(proximal.extra_bytes + 4 * io.interrupts.tokens),
            "time/interrupt_s": time.perf_counter() - t0}
