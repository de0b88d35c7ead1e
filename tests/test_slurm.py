"""The Slurm launcher against a real Slurm: Debian's slurm-wlm on this machine (three virtual
nodes, one slurmd each, so the learner, rollout and teacher components of the heterogeneous job
each get a node, as on a cluster).

The CPU quickstart submitted through launchers/slurm/submit.sh, one heterogeneous job, gets
SIGUSR1 mid-run (what sbatch's --signal=B:USR1@N sends before the time limit): the learner
checkpoints, the job requeues itself, the restarted job resumes from that checkpoint and finishes;
every step is trained exactly once, no sample twice; metrics for every step, evaluation of the
final weights, checkpoint, per-component logs, the rendered script. (One run checks both the
plain submission and the preemption path: each sbatch run costs a minute of CI.)

`.ci/run` installs slurm-wlm and munge (MEGATRON_OPD_REQUIRE_SLURM=1 there: a missing Slurm
fails instead of skipping).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launchers" / "slurm"))
import local_cluster  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("slurmctld") is None and not Path(
            "/usr/sbin/slurmctld").exists():
        if os.environ.get("MEGATRON_OPD_REQUIRE_SLURM") == "1":
            pytest.fail("Slurm (slurm-wlm, munge) and root are required here")
        pytest.skip("needs root and Debian's slurm-wlm + munge (apt-get install slurm-wlm munge)")
    directory = tmp_path_factory.mktemp("slurm")
    conf = local_cluster.start(directory)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    yield env
    subprocess.run(["scancel", "--user=root"], env=env)
    time.sleep(1)
    local_cluster.stop(directory)


def _submit(env: dict, run_dir: Path, *overrides: str) -> str:
    cmd = [str(ROOT / "launchers/slurm/submit.sh"), "--config", str(ROOT / "configs/quickstart.yaml"),
           f"run.dir={run_dir}", f"run.cache_dir={ROOT / '.cache/megatron-opd'}",
           "logging.progress=false", "cluster.gpus_per_node=0", "slurm.time_limit=00:30:00",
           *overrides]
    out = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1]


def _job(env: dict, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True)
    first = out.stdout.splitlines()[0] if out.stdout.strip() else ""
    return dict(kv.split("=", 1) for kv in first.split() if "=" in kv)


def _wait(env: dict, job_id: str, cond, timeout: float, run_dir: Path, what: str) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(env, job_id)
        if cond(job):
            return job
        if job.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(2)
    raise AssertionError(f"job {job_id}: waiting for {what}, state {job.get('JobState')}\n"
                         + _logs(run_dir))


def _logs(run_dir: Path) -> str:
    out = []
    for log in sorted((run_dir / "logs").glob("*")):
        out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(out)


def _train_records(run_dir: Path) -> list[dict]:
    from megatron_opd.metrics import read_metrics  # the learner may be mid-line

    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if "train/loss" in r] if path.exists() else []


def test_quickstart_through_sbatch_is_preempted_requeued_and_completes(slurm, tmp_path):
    """The quickstart as one heterogeneous sbatch job (learner, rollout and teacher each on
    their own node); mid-run the batch shell gets the warning signal: the learner checkpoints,
    the job requeues itself, the second start resumes and completes the run."""
    run_dir, steps = tmp_path / "run", 24
    job_id = _submit(slurm, run_dir, f"train.steps={steps}", "eval.interval=1000")
    deadline = time.time() + 600
    while len(_train_records(run_dir)) < 6:  # mid-run
        assert time.time() < deadline, _logs(run_dir)
        assert _job(slurm, job_id).get("JobState") in ("PENDING", "RUNNING"), _logs(run_dir)
        time.sleep(1)
    # What sbatch's --signal=B:USR1@N delivers before the time limit: USR1 to the batch shell.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm, check=True)
    _wait(slurm, job_id, lambda j: j.get("Restarts") == "1" and j.get("JobState") == "PENDING",
          300, run_dir, "the requeue")
    preempted = json.loads((run_dir / "preempted.json").read_text())
    k = preempted["step"]
    assert 6 <= k < steps
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{k:08d}"
    # A requeued job waits out a begin-time delay (Slurm's default); the test does not.
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], env=slurm, check=True)
    job = _wait(slurm, job_id, lambda j: j.get("JobState") == "COMPLETED", 600, run_dir,
                "completion after the requeue")
    assert job["ExitCode"] == "0:0"
    out = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert "(start 2)" in out and f"checkpoint at step {k}; requeuing" in out, out
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert f"preempted: checkpoint at step {k} saved" in learner_log
    # The second start resumed from step k: every step trained exactly once over both starts,
    # versions continuous, and no sample trained twice.
    train = _train_records(run_dir)
    assert [r["step"] for r in train] == list(range(steps))
    assert [r["weights/version"] for r in train] == list(range(1, steps + 1))
    trained = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    ids = [i for r in trained if "trained" in r for i in r["trained"]]
    assert ids and len(ids) == len(set(ids)) == steps * 64
    # One heterogeneous job: learner, rollout and teacher each on their own node.
    assert (run_dir / "job.sbatch").read_text().count("#SBATCH hetjob") == 2
    assert "learner: n1, rollout: n2, teacher: n3" in out, out
    endpoints = {p.stem: json.loads(p.read_text()) for p in (run_dir / "endpoints").glob("*.json")}
    assert set(endpoints) == {"rollout-0", "teacher-0"}
    # The run's artifacts: final evaluation, checkpoint, summary, every process's log.
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["eval/version"] == steps
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_version"] == steps and summary["steps"] == steps
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    for name in ("learner.log", "orchestrator.log", "rollout-0.log", "teacher-0.log"):
        assert (run_dir / "logs" / name).stat().st_size > 0, name
    assert "[learner] precision" in learner_log
    assert json.loads((run_dir / "summary.json").read_text())["final_version"] == steps
