"""Stop early, with a checkpoint, when the run is asked to (Slurm preemption warning).

The Slurm job driver turns its warning signal into the file `<run_dir>/preempt.request` (shared
filesystem, so every node sees it); a rank can also get SIGUSR1 directly. The learner asks
`requested()` at each step boundary, a collective so every rank takes the same decision, then
saves a checkpoint and exits; the driver requeues the job and the next start resumes from it.
SIGTERM keeps its default meaning (stop now): what was accepted is safe in the spool, and the
run resumes from the latest periodic checkpoint.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.logs import event

REQUEST_FILE = "preempt.request"  # written by the job driver
DONE_FILE = "preempted.json"  # written by rank 0 once the preemption checkpoint is saved


class PreemptionWatch:
    def __init__(self, run_dir: str | Path):
        self.request = Path(run_dir) / REQUEST_FILE
        self.done = Path(run_dir) / DONE_FILE
        self._signalled = False
        self._announced = False  # the request was logged
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def requested(self) -> bool:
        """True on every rank when any rank was signalled or the request file exists."""
        flag = torch.tensor([int(self._signalled or self.request.exists())], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        asked = bool(flag.item())
        if asked and not self._announced and (not dist.is_initialized() or dist.get_rank() == 0):
            event("learner", "preemption requested",
                  by="signal" if self._signalled else str(self.request))
            self._announced = True
        return asked

    def mark_done(self, step: int) -> None:
        tmp = self.done.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "time": time.time()}))
        tmp.replace(self.done)
        event("learner", "preempted: checkpoint saved, exiting", step=step)


def clear(run_dir: str | Path) -> None:
    """Forget an earlier preemption (called by the driver before the learner starts)."""
    for name in (REQUEST_FILE, DONE_FILE):
        (Path(run_dir) / name).unlink(missing_ok=True)


def was_preempted(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / DONE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
