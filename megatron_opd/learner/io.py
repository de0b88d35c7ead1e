"""The learner's outside world: only global rank 0 talks to sockets and servers; tensors it
receives reach the other ranks by broadcast (never pickled)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megatron_opd.learner.batch import TrainBatch
from megatron_opd.transport import Sample, WeightsPublished

# Every tensor field of TrainBatch but routed_experts (optional, sent after): dtype and which of
# the batch dimensions (B, L, T, K) make its shape.
_BATCH_FIELDS = {
    "input_ids": (torch.int64, "BL"), "response_index": (torch.int64, "BT"),
    "response_ids": (torch.int64, "BT"), "loss_mask": (torch.float32, "BT"),
    "behaviour_logprobs": (torch.float32, "BT"), "teacher_logprobs": (torch.float32, "BT"),
    "token_versions": (torch.int64, "BT"), "teacher_topk_ids": (torch.int64, "BTK"),
    "teacher_topk_logprobs": (torch.float32, "BTK"), "rewards": (torch.float32, "B"),
    "sample_advantages": (torch.float32, "B"), "temperature": (torch.float32, "B"),
    "top_p": (torch.float32, "B"),
}


def broadcast_batch(batch: TrainBatch | None) -> TrainBatch:
    """Rank 0 passes its batch; every rank returns the same batch (tensors only: the sizes
    B, L, T, K go first, then each field in a fixed order)."""
    if dist.get_world_size() == 1:
        return batch
    shape = torch.zeros(4, dtype=torch.int64)
    if dist.get_rank() == 0:
        shape[:] = torch.tensor([*batch.input_ids.shape, batch.response_ids.shape[1],
                                 batch.teacher_topk_ids.shape[2]])
    dist.broadcast(shape, src=0)
    sizes = dict(zip("BLTK", shape.tolist()))
    out = {}
    for name, (dtype, dims) in _BATCH_FIELDS.items():
        if dist.get_rank() == 0:
            t = getattr(batch, name).to(dtype).contiguous()
        else:
            t = torch.empty([sizes[d] for d in dims], dtype=dtype)
        dist.broadcast(t, src=0)
        out[name] = t
    routed = batch.routed_experts if dist.get_rank() == 0 else None
    has = torch.tensor([routed is not None], dtype=torch.int64)
    dist.broadcast(has, src=0)
    out["routed_experts"] = broadcast_tensor(routed, 4, torch.int64) if has.item() else None
    return TrainBatch(**out)


def broadcast_tensor(t: torch.Tensor | None, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank 0's tensor on every rank (shape sent first)."""
    if dist.get_world_size() == 1:
        return t
    shape = torch.zeros(ndim, dtype=torch.int64)
    if dist.get_rank() == 0:
        shape[:] = torch.tensor(t.shape)
    dist.broadcast(shape, src=0)
    buf = t.contiguous() if dist.get_rank() == 0 else torch.empty(shape.tolist(), dtype=dtype)
    dist.broadcast(buf, src=0)
    return buf


def receive_samples(receiver, control, n: int, version: int) -> list[Sample]:
    """(Rank 0.) Block until n new samples arrived from the `SampleServer` (which drops ids it
    has accepted before); re-announce the version while waiting (PUB/SUB may have dropped it
    before the orchestrator subscribed)."""
    samples: list[Sample] = []
    last_announce = time.time()
    while len(samples) < n:
        msg = receiver.recv(timeout_ms=500)
        if msg is not None:
            samples.append(msg)
        if time.time() - last_announce > 2.0:
            control.publish(WeightsPublished(version=version, step=version, published_at=time.time()))
            last_announce = time.time()
    return samples
