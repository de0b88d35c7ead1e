"""The learner's batch: what `collate` builds from samples (teacher top-K, GRPO advantages, sampler
info, staleness), how it is cut into micro-batches, and that `broadcast_batch` hands every rank
the same tensors (two real gloo processes).

This file is also the torchrun worker of the broadcast test (`python -m torch.distributed.run
... tests/test_batch.py --out DIR`).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_opd import sample_fields
from megatron_opd.learner.batch import TrainBatch, collate
from megatron_opd.transport import Sample

PAD = 0
# (group id, reward, temperature, top_p) per sample: contiguous groups of 4, one group whose
# members are not adjacent, a lone sample and a group with equal rewards.
LAYOUT = [("a", 1.0, 1.0, 1.0), ("a", 0.0, 1.0, 1.0), ("a", 1.0, 1.0, 1.0), ("a", 1.0, 1.0, 1.0),
          ("b", 0.0, 0.7, 0.9), ("c", 1.0, 0.7, 0.9), ("b", 1.0, 0.7, 0.9), ("c", 0.0, 0.7, 0.9),
          ("d", 0.25, 1.3, 0.5), ("e", 1.0, 1.0, 1.0), ("e", 1.0, 1.0, 1.0), ("b", 0.5, 0.7, 0.9)]


def make_samples(K: int = 3, seed: int = 0, versions: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i, (gid, reward, temp, top_p) in enumerate(LAYOUT):
        P, T = int(rng.integers(2, 6)), int(rng.integers(1, 7))
        out.append(Sample(
            sample_id=f"s{i}", group_id=gid,
            prompt_ids=rng.integers(1, 30, P).astype(np.int32),
            response_ids=rng.integers(1, 30, T).astype(np.int32),
            loss_mask=(rng.random(T) > 0.2).astype(np.uint8),
            behaviour_logprobs=-rng.random(T).astype(np.float32),
            token_versions=np.full(T, versions, dtype=np.int64),
            teacher_logprobs=-rng.random(T).astype(np.float32),
            teacher_topk_ids=rng.integers(1, 30, (T, K)).astype(np.int32),
            teacher_topk_logprobs=-rng.random((T, K)).astype(np.float32) - 0.01,
            reward=reward, temperature=temp, top_p=top_p,
            teacher_temperature=1.0 if i % 3 else 1.25))
    return out


def reference_advantages(group_ids, rewards, eps=1e-6) -> np.ndarray:
    """Per group: (r - mean) / (population std + eps), float64, by a plain loop."""
    r = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(r)
    for g in set(group_ids):
        idx = [i for i, x in enumerate(group_ids) if x == g]
        mean = sum(r[i] for i in idx) / len(idx)
        std = (sum((r[i] - mean) ** 2 for i in idx) / len(idx)) ** 0.5
        for i in idx:
            out[i] = (r[i] - mean) / (std + eps)
    return out


@pytest.mark.parametrize("K", [3, 0])
def test_collate_teacher_topk_is_padded_with_id_0_and_logprob_0(K):
    samples = make_samples(K)
    batch, _ = collate(samples, PAD, step=0, max_staleness=2)
    T = max(s.num_tokens for s in samples)
    assert batch.teacher_topk_ids.shape == (len(samples), T, K)
    assert batch.teacher_topk_logprobs.shape == (len(samples), T, K)
    assert batch.teacher_topk_ids.dtype == torch.int64
    assert batch.teacher_topk_logprobs.dtype == torch.float32
    for b, s in enumerate(samples):
        n = s.num_tokens
        assert np.array_equal(batch.teacher_topk_ids[b, :n].numpy(), s.teacher_topk_ids)
        assert np.array_equal(batch.teacher_topk_logprobs[b, :n].numpy(), s.teacher_topk_logprobs)
        assert (batch.teacher_topk_ids[b, n:] == 0).all()
        assert (batch.teacher_topk_logprobs[b, n:] == 0.0).all()
        assert (batch.loss_mask[b, n:] == 0).all()  # padding is masked


def test_collate_rewards_group_advantages_and_sampler_info():
    samples = make_samples()
    batch, _ = collate(samples, PAD, step=0, max_staleness=2)
    gids, rewards = [x[0] for x in LAYOUT], [x[1] for x in LAYOUT]
    for name in ("rewards", "sample_advantages", "temperature", "top_p", "teacher_temperature"):
        t = getattr(batch, name)
        assert t.shape == (len(samples),) and t.dtype == torch.float32, name
    assert batch.rewards.tolist() == rewards
    ref = reference_advantages(gids, rewards)
    np.testing.assert_allclose(batch.sample_advantages.numpy(), ref, rtol=1e-6, atol=1e-6)
    # spot checks of the reference itself: the lone sample and the equal-reward group get 0,
    # group "a" (1, 0, 1, 1): mean 0.75, std sqrt(3)/4
    assert ref[8] == 0 and ref[9] == ref[10] == 0
    np.testing.assert_allclose(ref[1], -0.75 / (3 ** 0.5 / 4 + 1e-6))
    np.testing.assert_allclose(batch.temperature.numpy(), [x[2] for x in LAYOUT], rtol=1e-7)
    np.testing.assert_allclose(batch.top_p.numpy(), [x[3] for x in LAYOUT], rtol=1e-7)
    assert batch.teacher_temperature.tolist() == [s.teacher_temperature for s in samples]


def test_collate_staleness_bound_and_offline_mode_without_bound():
    samples = make_samples(versions=0)
    trainable = sum(int(s.loss_mask.sum()) for s in samples)
    live, report = collate(samples, PAD, step=10, max_staleness=2)
    assert live.loss_mask.sum() == 0 and report.dropped_tokens == trainable
    offline, report = collate(samples, PAD, step=10, max_staleness=None)
    assert report.dropped_tokens == 0 and report.tokens == trainable
    assert report.staleness_mean == 10.0 and report.staleness_max == 10
    for b, s in enumerate(samples):
        assert offline.loss_mask[b, :s.num_tokens].tolist() == s.loss_mask.tolist()


def test_collate_refuses_samples_with_different_topk_widths():
    samples = make_samples(K=3)[:2] + make_samples(K=2)[2:4]
    with pytest.raises(ValueError, match="top-K width"):
        collate(samples, PAD, step=0, max_staleness=2)


def test_split_microbatches_slices_every_field_on_the_batch_dimension():
    from megatron_opd.learner.train_step import split_microbatches

    batch, _ = collate(make_samples(K=3), PAD, step=0, max_staleness=2)
    fields = ("response_index", "teacher_topk_ids", "teacher_topk_logprobs", "rewards",
              "sample_advantages", "temperature", "top_p", "teacher_temperature")
    dp = 2
    micro = [mb for rank in range(dp) for mb in split_microbatches(
        batch, fields, SimpleNamespace(dp_size=dp, dp_rank=rank), micro_batch_size=3)]
    assert len(micro) == 4
    for name in fields:
        whole = torch.cat([mb.data[name] for mb in micro])
        assert torch.equal(whole, getattr(batch, name)), name
        assert micro[1].data[name].shape[0] == 3
    assert torch.equal(micro[2].data["sample_advantages"], batch.sample_advantages[6:9])


def test_broadcast_covers_every_batch_field():
    from megatron_opd.learner.io import _BATCH_FIELDS

    names = {f.name for f in dataclasses.fields(TrainBatch)}
    assert set(_BATCH_FIELDS) == names - {"routed_experts", "teacher_hidden"}  # optional: flagged


BROADCAST_KS = (3, 0)  # top-K support K; K = 0 also carries teacher hidden states (bf16 bits)


def _broadcast_samples(K: int) -> list[Sample]:
    samples = make_samples(K=K, seed=5)
    if K == 0:
        rng = np.random.default_rng(7)
        for s in samples:
            s.teacher_hidden = sample_fields.float32_to_bf16_bits(
                rng.standard_normal((len(s.response_ids), 6)))
    return samples


def test_bf16_hidden_states_stay_bf16_in_the_batch_and_exact():
    """teacher.hidden_dtype=bfloat16: the batch keeps bfloat16 (half of float32's memory and
    broadcast bytes), bit for bit; float32 samples (or a mix) give float32, exact for both."""
    samples = _broadcast_samples(0)
    batch, _ = collate(samples, PAD, step=0, max_staleness=2)
    h = batch.teacher_hidden
    assert h.dtype == torch.bfloat16 and h.shape == (len(samples), batch.response_ids.shape[1], 6)
    for b, s in enumerate(samples):
        n = len(s.response_ids)
        want = sample_fields.bf16_bits_to_float32(s.teacher_hidden)
        assert np.array_equal(h[b, :n].float().numpy(), want)
        assert not h[b, n:].float().any()  # padded with 0
    samples[0].teacher_hidden = sample_fields.bf16_bits_to_float32(samples[0].teacher_hidden)
    mixed, _ = collate(samples, PAD, step=0, max_staleness=2)
    assert mixed.teacher_hidden.dtype == torch.float32
    assert torch.equal(mixed.teacher_hidden, h.float())


def test_broadcast_batch_gives_every_rank_rank0s_batch(tmp_path):
    from megatron_opd.procs import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", __file__,
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for K in BROADCAST_KS:
        got = torch.load(tmp_path / f"rank1-k{K}.pt")
        want, _ = collate(_broadcast_samples(K), PAD, step=0, max_staleness=2)
        for f in dataclasses.fields(TrainBatch):
            a, b = getattr(want, f.name), got[f.name]
            if a is None:
                assert b is None, f.name
            else:
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) \
                        and torch.equal(a.nan_to_num(), b.nan_to_num()), (K, f.name)  # NaN: none
    assert got["teacher_hidden"].dtype == torch.bfloat16  # (K = 0, the last case)


def _worker(out: Path) -> None:
    import torch.distributed as dist

    from megatron_opd.learner.io import broadcast_batch

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for K in BROADCAST_KS:  # with a top-K support, and with none ([B, T, 0])
        batch = None  # only rank 0 has samples
        if rank == 0:
            batch, _ = collate(_broadcast_samples(K), PAD, step=0, max_staleness=2)
        got = broadcast_batch(batch)
        if rank == 1:
            torch.save({f.name: getattr(got, f.name) for f in dataclasses.fields(TrainBatch)},
                       out / f"rank1-k{K}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    _worker(ap.parse_args().out)
