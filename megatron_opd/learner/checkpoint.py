"""The final checkpoint of a run: megatron dist checkpoint (model + optimizer) and an HF export.

Both are written into a temporary directory and renamed into place, so a crash mid-save never
leaves a half-written checkpoint where a good one is expected. (Exact resume: issue 3/5.)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch


def save_final_checkpoint(model, optimizer, spec, version: int, run_dir: Path,
                          tokenizer_dir: str) -> Path:
    from megatron.core import dist_checkpointing

    from megatron_opd.models.hf_mapping import save_hf_checkpoint

    final = Path(run_dir) / "checkpoints" / f"step_{version:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "megatron").mkdir(parents=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "megatron"))
    # Optimizer state of the plain torch optimizer (tensors only, loadable with weights_only=True).
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_hf_checkpoint(model, spec, tmp / "hf", tokenizer_dir=tokenizer_dir)
    (tmp / "meta.json").write_text(json.dumps({"version": version, "saved_at": time.time()}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final
