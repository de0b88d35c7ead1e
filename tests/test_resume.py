"""Checkpoints: a run SIGKILLed mid-training resumes to exactly the uninterrupted run's losses;
a checkpoint loads under another layout; a kill during a save leaves the previous checkpoint
loadable; a truncated latest checkpoint is named and the run resumes from the one before it;
a non-finite step is skipped and counted without touching the weights.
Real torchrun processes, real megatron optimizer and dist_checkpointing, gloo on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_opd.models.spec import to_hf_config
from megatron_opd.procs import free_port
from tests.test_layouts import SPEC

WORKER = Path(__file__).parent / "workers" / "train_worker.py"
STEPS = 6


def _cmd(tmp: Path, nproc: int, layout: dict, ckpt: str, log: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", str(WORKER), "--layout", json.dumps(layout),
            "--spec", json.dumps(dataclasses.asdict(SPEC)), "--hf", str(tmp / "hf"),
            "--ckpt", str(tmp / ckpt), "--steps-log", str(tmp / log), "--steps", str(STEPS),
            *extra]


def run(tmp: Path, *args, nproc: int = 1, layout: dict | None = None, expect_kill=False,
        poll=False):
    """Run a training worker in its own process group; the group is killed once the worker
    exits (a crashed rank's multiprocessing helpers would otherwise outlive it and hold its
    output open, as they would without a scheduler to clean up)."""
    layout = layout or {"micro_batch_size": 4}
    out = tmp / f"{args[1]}.out"
    with open(out, "a") as f:
        proc = subprocess.Popen(_cmd(tmp, nproc, layout, *args),
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    if poll:
        return proc
    proc.wait(timeout=300)
    _kill_group(proc)
    _kill_worker_groups(tmp / args[1])
    if not expect_kill:
        assert proc.returncode == 0, out.read_text()[-4000:]
    return proc


def _kill_group(proc) -> None:
    """SIGKILL torchrun and every process below it (its workers run in sessions of their own)."""
    from tests.net_listeners import kill_tree

    kill_tree(proc.pid)


def _kill_worker_groups(log: Path) -> None:
    for f in log.parent.glob(f"{log.name}.pgid.*"):
        try:
            os.killpg(int(f.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def steps(tmp: Path, log: str) -> dict[int, dict]:
    lines = [json.loads(x) for x in (tmp / log).read_text().splitlines()]
    return {d["step"]: d for d in lines}  # a resumed step overwrites the killed run's line


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    from transformers import Qwen3MoeForCausalLM

    tmp = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    hf = Qwen3MoeForCausalLM(to_hf_config(SPEC)).float()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.weight.mul_(40.0)  # decisive routing (see test_layouts)
    hf.save_pretrained(tmp / "hf")
    run(tmp, "ckpt_a", "a.jsonl", "--save-every", "3")
    return tmp


def test_resume_after_sigkill_reproduces_losses_exactly(tmp):
    ref = steps(tmp, "a.jsonl")
    run(tmp, "ckpt_b", "b.jsonl", "--save-every", "3", "--kill-after-step", "4",
        expect_kill=True)
    assert (tmp / "ckpt_b" / "latest").read_text() == "step_00000003"
    assert max(steps(tmp, "b.jsonl")) == 4  # killed after step 4, before saving again
    run(tmp, "ckpt_b", "b.jsonl", "--resume")
    got = steps(tmp, "b.jsonl")
    for s in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "lr", "param_sum_rank0", "version"):
            assert got[s][key] == ref[s][key], (s, key, got[s][key], ref[s][key])


@pytest.mark.parametrize("name,nproc,layout", [
    ("tp2", 2, {"micro_batch_size": 4, "tensor_parallel": 2, "expert_tensor_parallel": 2}),
    ("pp2", 2, {"micro_batch_size": 2, "pipeline_parallel": 2}),
])
def test_checkpoint_loads_under_another_layout(tmp, name, nproc, layout):
    ref = steps(tmp, "a.jsonl")
    ckpt = tmp / f"ckpt_{name}"
    # Start from the one-process run's step-3 checkpoint, resumed under `layout`.
    subprocess.run(["cp", "-r", str(tmp / "ckpt_a"), str(ckpt)], check=True)
    (ckpt / "latest").write_text("step_00000003")
    run(tmp, ckpt.name, f"{name}.jsonl", "--resume", nproc=nproc, layout=layout)
    got = steps(tmp, f"{name}.jsonl")
    assert sorted(got) == [4, 5, 6]
    for s in (4, 5, 6):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), (name, s)
        assert got[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-12)
        assert got[s]["version"] == ref[s]["version"]


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp):
    ckpt = tmp / "ckpt_c"
    proc = run(tmp, "ckpt_c", "c.jsonl", "--save-every", "1", poll=True)
    killed_mid_save = False
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in ckpt.glob("step_*.tmp") if p.name != "step_00000001.tmp"]
        if partial:  # a save (not the first) is being written: crash now
            _kill_group(proc)
            killed_mid_save = True
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    _kill_group(proc)
    _kill_worker_groups(tmp / "c.jsonl")
    assert killed_mid_save, "the worker finished before a save could be interrupted"
    latest = (ckpt / "latest").read_text()
    assert (ckpt / latest / "meta.json").is_file()
    done = json.loads((ckpt / latest / "meta.json").read_text())["step"]
    run(tmp, "ckpt_c", "c_resumed.jsonl", "--resume")
    ref, got = steps(tmp, "a.jsonl"), steps(tmp, "c_resumed.jsonl")
    assert sorted(got) == list(range(done + 1, STEPS + 1))
    for s in got:
        assert got[s]["loss"] == ref[s]["loss"], s


def test_non_finite_step_is_skipped_counted_and_changes_nothing(tmp):
    run(tmp, "ckpt_nan", "nan.jsonl", "--nan-at-step", "2")
    got = steps(tmp, "nan.jsonl")
    assert got[3]["stepped"] is False and got[3]["skipped"] == 1
    assert got[3]["version"] == got[2]["version"] == 2
    assert got[3]["param_sum_rank0"] == got[2]["param_sum_rank0"]  # weights untouched
    assert all(got[s]["stepped"] for s in (1, 2, 4, 5, 6))
    assert got[6]["version"] == 5


def _copy_damaged(tmp: Path, name: str, *damaged_steps: int) -> tuple[Path, dict]:
    """A copy of the one-process run's checkpoints (steps 3 and 6) with the first `.distcp` of
    each of `damaged_steps` cut to half its size; returns it and {step: (file, recorded size)}."""
    ckpt = tmp / name
    shutil.copytree(tmp / "ckpt_a", ckpt)
    cut = {}
    for step in damaged_steps:
        distcp = sorted((ckpt / f"step_{step:08d}" / "megatron").glob("*.distcp"))[0]
        size = distcp.stat().st_size
        with open(distcp, "r+b") as f:
            f.truncate(size // 2)
        cut[step] = (distcp.relative_to(ckpt / f"step_{step:08d}").as_posix(), size)
    return ckpt, cut


def test_meta_records_the_size_of_every_file(tmp):
    step = tmp / "ckpt_a" / "step_00000006"
    files = json.loads((step / "meta.json").read_text())["files"]
    on_disk = {f.relative_to(step).as_posix(): f.stat().st_size for f in step.rglob("*")
               if f.is_file() and f.name != "meta.json"}
    assert files == on_disk and any(k.endswith(".distcp") for k in files)


def test_truncated_latest_checkpoint_is_named_and_the_previous_one_resumed(tmp):
    ref = steps(tmp, "a.jsonl")
    ckpt, cut = _copy_damaged(tmp, "ckpt_cut", 6)
    assert (ckpt / "latest").read_text() == "step_00000006"
    run(tmp, ckpt.name, "cut.jsonl", "--resume")
    got = steps(tmp, "cut.jsonl")
    assert sorted(got) == [4, 5, 6]  # resumed from step 3, not from the damaged step 6
    for s in got:
        assert got[s]["loss"] == ref[s]["loss"], s
    out = (tmp / "cut.jsonl.out").read_text()
    rel, size = cut[6]
    assert re.search(rf"\[learner\] checkpoint damaged, not resumed from path=(\S*)/step_00000006 "
                     rf"problem='\1/step_00000006/{re.escape(rel)} truncated: {size // 2} bytes, "
                     rf"{size} at save'", out), out
    assert re.search(r"\[learner\] resuming from an older checkpoint path=\S*/step_00000003 "
                     r"skipped=step_00000006", out), out
    assert re.search(r"\[learner\] checkpoint loaded step=3 path=\S*/step_00000003", out), out


def test_launcher_moves_damaged_checkpoints_aside_and_repoints_latest(tmp):
    from megatron_opd.learner.checkpoint import latest_checkpoint, repair_latest

    ckpt, _ = _copy_damaged(tmp, "ckpt_repair", 6)
    assert latest_checkpoint(ckpt) == ckpt / "step_00000003"  # reading changes nothing
    assert (ckpt / "latest").read_text() == "step_00000006"
    assert repair_latest(ckpt) == ckpt / "step_00000003"
    assert (ckpt / "latest").read_text() == "step_00000003"  # what the orchestrator reads
    assert (ckpt / "step_00000006.damaged").is_dir() and not (ckpt / "step_00000006").exists()
    assert repair_latest(ckpt) == ckpt / "step_00000003"  # nothing left to repair


def test_no_intact_checkpoint_is_an_error_naming_each(tmp):
    from megatron_opd.learner.checkpoint import CheckpointError, latest_checkpoint

    ckpt, cut = _copy_damaged(tmp, "ckpt_all_cut", 3)
    (ckpt / "step_00000006" / "rng" / "rank0.pt").unlink()
    rel, size = cut[3]
    with pytest.raises(CheckpointError) as e:
        latest_checkpoint(ckpt)
    assert str(e.value) == (
        f"no intact checkpoint in {ckpt}: {ckpt}/step_00000006/rng/rank0.pt missing; "
        f"{ckpt}/step_00000003/{rel} truncated: {size // 2} bytes, {size} at save; put an intact "
        "one back, or start the run over with run.overwrite=true")
