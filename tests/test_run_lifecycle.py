"""A run directory's lifecycle end to end, with `megatron-opd train` as a user runs it (real
SGLang servers, learner, orchestrator):

1. a short run finishes;
2. the same command again says the run is finished, exits 0 and changes no file (contents,
   mtimes, the directory listing);
3. a larger `train.steps` continues it from its final checkpoint: every step once;
4. `run.overwrite=true` with a shorter run starts every artifact afresh: the ledger describes
   that run alone (each step once, no sample id trained twice, every accepted id once), and no
   file of the old run is left but the run secret.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter

import pytest

from megatron_opd.learner.spool import SampleSpool
from tests.test_e2e_quickstart import _records, _run, _train_cmd

pytestmark = pytest.mark.slow


def _snapshot(run_dir):
    return {p.relative_to(run_dir).as_posix(): (p.stat().st_mtime_ns, p.is_dir() or
                                                  hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run_dir.rglob("*"))}


def _ledger(run_dir):
    accepted, trained = [], []
    for line in (run_dir / "ledger.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "accepted" in rec:
            accepted += rec["accepted"]
        else:
            trained.append((rec["step"], rec["trained"]))
    return accepted, trained


def _audit(run_dir, steps: int) -> None:
    """The run's records describe one run of `steps` steps, each sample trained at most once."""
    accepted, trained = _ledger(run_dir)
    assert [s for s, _ in trained] == list(range(steps))  # every step once, in order
    counts = Counter(i for _, ids in trained for i in ids)
    assert max(counts.values()) == 1  # no id trained twice
    assert len(accepted) == len(set(accepted))  # none accepted twice
    leftover = {s.sample_id for _, s in SampleSpool(run_dir / "spool").pending(after=-1)}
    assert set(accepted) == set(counts) | leftover  # trained, or still spooled
    train = [r["step"] for r in _records(run_dir) if "train/loss" in r]
    assert train == list(range(steps))


def test_finished_run_is_not_rerun_grows_on_more_steps_and_overwrite_starts_afresh(tmp_path):
    run_dir = tmp_path / "run"
    base = ("eval.interval=100", "rollout.prompts_per_request=4", "train.batch_size=16")

    def train(*overrides, timeout=600):
        out = _run(_train_cmd(run_dir, *base, *overrides), timeout=timeout)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        return out

    train("train.steps=3")
    _audit(run_dir, 3)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3

    # 2. the same command: finished, said, exit 0, nothing touched
    before = _snapshot(run_dir)
    out = train("train.steps=3", timeout=120)
    assert f"run.dir: {run_dir} holds a finished run (3 steps, train.steps=3): nothing to do" \
        in out.stdout
    assert json.loads(out.stdout[out.stdout.index("{"):out.stdout.rindex("}") + 1]) == \
        json.loads((run_dir / "summary.json").read_text())
    assert _snapshot(run_dir) == before

    # 3. more steps: the run continues from its final checkpoint
    train("train.steps=4")
    _audit(run_dir, 4)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"

    # 4. overwritten by a shorter run: one run's records, nothing of the old one left
    secret = (run_dir / "transport.key").read_bytes()
    time.sleep(0.01)  # the new run's files are created (ctime) later than this
    t_overwrite = time.time_ns()
    train("train.steps=2", "run.overwrite=true")
    _audit(run_dir, 2)
    # ctime, not mtime: the HF export copies the init's tokenizer files with their mtimes
    old = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")
           if p.is_file() and p.stat().st_ctime_ns < t_overwrite]
    assert old == ["transport.key"] and (run_dir / "transport.key").read_bytes() == secret
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["latest", "step_00000002"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == \
        ["eval-0.jsonl", "eval-2.jsonl"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
