"""Exactly-once across a learner crash, end to end with real processes (ISSUE 5).

`megatron-opd train` runs the quickstart pipeline. The learner is SIGKILLed in the middle of the
run (after a checkpoint, with trained steps after it); the launcher stops everything;
the same command on the same run directory resumes from the checkpoint. Then, counted by sample
id over the whole run (the learner's ledger): every accepted sample was trained exactly once in
the surviving history or is still in the spool (0 lost, 0 twice); the steps redone after the
checkpoint trained the same samples as before the crash and reproduce their losses exactly; the
final run has every step once.
(Server deaths mid-run, with the same count by id: tests/test_fleet.py kills a rollout server
behind the router; tests/test_server_faults.py restarts servers under in-flight requests and
weight publishes.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from megatron_opd.learner.spool import SampleSpool
from tests.test_e2e_quickstart import ROOT, _check_logs, _records, _train_cmd

pytestmark = pytest.mark.slow

STEPS, CKPT = 14, 5


def _ledger(run_dir):
    accepted, trained = [], {}
    for line in (run_dir / "ledger.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "accepted" in rec:
            accepted += rec["accepted"]
        else:
            trained[rec["step"]] = rec["trained"]
    return accepted, trained


def test_learner_sigkill_then_resume_trains_every_accepted_sample_exactly_once(tmp_path):
    run_dir = tmp_path / "run"
    cmd = _train_cmd(run_dir, f"train.steps={STEPS}", f"train.checkpoint_interval={CKPT}",
                     "eval.interval=100", "train.keep_checkpoints=1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = run_dir / "metrics.jsonl"

    def steps_done() -> int:
        return sum("train/loss" in line for line in metrics.read_text().splitlines()) \
            if metrics.exists() else 0

    def wait_for(cond) -> None:
        deadline = time.time() + 400
        while not cond():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)

    try:
        wait_for(lambda: steps_done() >= CKPT + 3)  # checkpoint at CKPT, then steps after it
        learner = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "megatron_opd.learner.main" in " ".join(p.cmdline()))
        learner.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "learner exited with code -9" in err, err[-2000:]
    before = {r["step"]: r for r in _records(run_dir) if "train/loss" in r}
    _, trained_before = _ledger(run_dir)
    killed_at = max(before) + 1
    assert killed_at > CKPT + 2 and (run_dir / "checkpoints" / "latest").read_text().strip() \
        == f"step_{CKPT:08d}"

    # the crash ends with the command that resumes it; run that (from another directory)
    hint = err.strip().splitlines()[-1]
    assert hint.startswith(f"resume it from its checkpoint at step {CKPT} with: cd "), hint
    resume = hint.split(" with: ", 1)[1]
    bindir = str(Path(sys.executable).parent)  # where `megatron-opd` is installed
    out = subprocess.run(["bash", "-c", resume], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PATH": bindir + os.pathsep +
                                           os.environ.get("PATH", "")})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    _check_logs(run_dir, out.stdout)  # lifecycle lines; no known warning, resume's included
    assert f"[learner] checkpoint loaded step={CKPT} " in \
        (run_dir / "logs" / "learner.log").read_text()
    records = [r for r in _records(run_dir) if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(STEPS))
    assert [r["weights/version"] for r in records] == list(range(1, STEPS + 1))
    # the redone steps trained the samples they trained before the crash, to the same losses
    accepted, trained = _ledger(run_dir)
    for step in range(CKPT, killed_at):
        assert trained[step] == trained_before[step], step
        assert records[step]["train/loss"] == pytest.approx(before[step]["train/loss"],
                                                            rel=1e-6, abs=1e-7), step
    # 0 lost, 0 trained twice, counted by id over the whole run
    counts = Counter(i for ids in trained.values() for i in ids)
    assert max(counts.values()) == 1
    # the spool keeps what the older kept checkpoint had not consumed (a fallback replays it):
    # untrained is what comes after the final checkpoint's cursor
    final = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    through = json.loads((final / "meta.json").read_text())["data_cursor"]["consumed_through"]
    leftover = {s.sample_id for _, s in SampleSpool(run_dir / "spool").pending(after=through)}
    kept = sorted((run_dir / "checkpoints").glob("step_????????"))
    if len(kept) > 1:  # what a fallback to the older checkpoint would replay is still there
        oldest = json.loads((kept[0] / "meta.json").read_text())["data_cursor"]
        held = {s.sample_id for _, s in
                SampleSpool(run_dir / "spool").pending(after=oldest["consumed_through"])}
        since = int(kept[0].name.split("_")[1])
        assert {i for step, ids in trained.items() if step >= since for i in ids} <= held
    assert not leftover & set(counts)
    assert set(accepted) == set(counts) | leftover
    assert len(accepted) == len(set(accepted))  # no sample was accepted twice either
