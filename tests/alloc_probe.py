"""Which large tensors a computation builds: the memory checks of the vocab-parallel statistics,
the evaluation KL and the hidden-state teacher share this probe (timing plays no part)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class Allocation:
    data_ptr: int
    nbytes: int  # of the storage
    dtype: torch.dtype
    op: str  # the aten op that returned it
    shape: tuple[int, ...]


class AllocationProbe(TorchDispatchMode):
    """Records every storage larger than `bound` bytes that an op returns, except the `inputs`'
    own storages, once per storage (in `big`, in order)."""

    def __init__(self, bound: int, inputs: list[torch.Tensor]):
        super().__init__()
        self.bound, self.big, self._seen = bound, [], set()
        self.skip = {t.untyped_storage().data_ptr() for t in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = (s.data_ptr(), s.nbytes())
                if s.nbytes() > self.bound and s.data_ptr() not in self.skip \
                        and key not in self._seen:
                    self._seen.add(key)
                    self.big.append(Allocation(*key, t.dtype, func.__name__, tuple(t.shape)))
        return out
