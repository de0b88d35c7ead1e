"""The learner's outside world: only global rank 0 talks to sockets and servers; tensors it
receives reach the other ranks by broadcast (never pickled)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megatron_opd import sample_fields
from megatron_opd.learner.batch import TrainBatch
from megatron_opd.transport import Sample, WeightsPublished

# From the field table (megatron_opd/sample_fields.py): every TrainBatch tensor that is always
# there -> (dtype, the batch dimensions that make its shape), sent in this order; then each
# optional one (routed_experts), announced by a flag and sent with its shape.
_BATCH_FIELDS = {f.batch_attr: (getattr(torch, f.batch), f.batch_shape)
                 for f in sample_fields.batch_fields() if not f.optional}
_OPTIONAL_FIELDS = {f.batch_attr: (getattr(torch, f.batch), f.batch_shape)
                    for f in sample_fields.batch_fields() if f.optional}
_DIMS = "".join(dict.fromkeys("".join(dims for _, dims in _BATCH_FIELDS.values())))  # "BLTK"


def broadcast_batch(batch: TrainBatch | None) -> TrainBatch:
    """Rank 0 passes its batch; every rank returns the same batch (tensors only: the sizes
    (B, L, T, K) go first, then each field in a fixed order)."""
    if dist.get_world_size() == 1:
        return batch
    shape = torch.zeros(len(_DIMS), dtype=torch.int64)
    if dist.get_rank() == 0:
        sizes = {}
        for name, (_, dims) in _BATCH_FIELDS.items():
            sizes.update(zip(dims, getattr(batch, name).shape))
        shape[:] = torch.tensor([sizes[d] for d in _DIMS])
    dist.broadcast(shape, src=0)
    sizes = dict(zip(_DIMS, shape.tolist()))
    out = {}
    for name, (dtype, dims) in _BATCH_FIELDS.items():
        if dist.get_rank() == 0:
            t = getattr(batch, name).to(dtype).contiguous()
        else:
            t = torch.empty([sizes[d] for d in dims], dtype=dtype)
        dist.broadcast(t, src=0)
        out[name] = t
    for name, (dtype, dims) in _OPTIONAL_FIELDS.items():
        t = getattr(batch, name) if dist.get_rank() == 0 else None
        if t is not None and t.dtype in _KEPT_DTYPES:
            dtype = t.dtype  # e.g. teacher_hidden in bfloat16: sent and kept as it is
        # 0: absent; else 1 + the index of its dtype
        code = torch.tensor([0 if t is None else 1 + _SENT_DTYPES.index(dtype)])
        dist.broadcast(code, src=0)
        if code.item() == 0:
            out[name] = None
            continue
        dtype = _SENT_DTYPES[code.item() - 1]
        out[name] = broadcast_tensor(None if t is None else t.to(dtype), len(dims), dtype)
    return TrainBatch(**out)


# An optional field's tensor already in one of these dtypes is broadcast as it is (not cast to
# its table dtype); the code sent before it names the dtype.
_KEPT_DTYPES = (torch.bfloat16,)
_SENT_DTYPES = tuple(dict.fromkeys([*(d for d, _ in _OPTIONAL_FIELDS.values()), *_KEPT_DTYPES]))


def broadcast_tensor(t: torch.Tensor | None, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank 0's tensor on every rank (shape sent first)."""
    if dist.get_world_size() == 1:
        return t
    shape = torch.zeros(ndim, dtype=torch.int64)
    if dist.get_rank() == 0:
        shape[:] = torch.tensor(t.shape)
    dist.broadcast(shape, src=0)
    buf = t.contiguous() if dist.get_rank() == 0 else torch.empty(shape.tolist(), dtype=dtype)
    # bfloat16 travels as its bytes (gloo has neither bfloat16 nor int16; uint8 everywhere)
    dist.broadcast(buf.view(torch.uint8) if dtype == torch.bfloat16 else buf, src=0)
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
