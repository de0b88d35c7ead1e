"""The sbatch script and the in-job placement, derived from the config (no Slurm needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd.config import ConfigError, load_config, validate_cluster_fit
from megatron_opd.launch import make_servers, torchrun_command
from megatron_opd.slurm.script import render

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    return load_config(ROOT / "configs/quickstart.yaml", list(overrides))


def _sbatch_lines(script: str) -> list[list[str]]:
    """#SBATCH options per het component (split at `#SBATCH hetjob`)."""
    parts: list[list[str]] = [[]]
    for line in script.splitlines():
        if line == "#SBATCH hetjob":
            parts.append([])
        elif line.startswith("#SBATCH "):
            parts[-1].append(line.split(" ", 1)[1])
    return parts


def test_gpu_script_has_one_component_per_role_with_the_configured_nodes(tmp_path):
    cfg = _cfg("cluster.gpus_per_node=8", "cluster.learner_nodes=4", "parallel.world_size=32",
               "cluster.rollout.nodes=3", "cluster.teacher.nodes=2", "slurm.partition=gpu",
               "slurm.account=team", "slurm.time_limit=04:00:00", "slurm.preempt_signal_s=600",
               "slurm.extra_sbatch=[--constraint=h100]", "slurm.env=[NCCL_DEBUG=WARN]",
               "slurm.setup=[module load cuda]", "train.batch_size=256")
    validate_cluster_fit(cfg)
    script = render(cfg, tmp_path / "run", tmp_path, "/venv/bin/python")
    learner, rollout, teacher = _sbatch_lines(script)
    for opts, nodes in ((learner, 4), (rollout, 3), (teacher, 2)):
        assert f"--nodes={nodes}" in opts and "--gpus-per-node=8" in opts
        assert "--exclusive" in opts and "--partition=gpu" in opts
    # job-wide options once, on the first component
    for opt in ("--account=team", "--time=04:00:00", "--requeue", "--signal=B:USR1@600",
                "--constraint=h100", f"--chdir={tmp_path.resolve()}"):
        assert opt in learner and opt not in rollout + teacher, opt
    body = script.split("set -euo pipefail", 1)[1]
    assert body.index("module load cuda") < body.index("export NCCL_DEBUG=WARN") < body.index("exec")
    assert body.strip().endswith(f"exec /venv/bin/python -m megatron_opd.slurm.job --run-dir "
                                 f"{(tmp_path / 'run').resolve()}")


def test_one_allocation_when_not_heterogeneous(tmp_path):
    cfg = _cfg("cluster.gpus_per_node=0", "cluster.rollout.nodes=2", "slurm.heterogeneous=false",
               "slurm.requeue=false", "slurm.preempt_signal_s=0")
    (only,) = _sbatch_lines(render(cfg, tmp_path / "run", tmp_path, "python"))
    assert "--nodes=4" in only and "--no-requeue" in only
    assert not any(o.startswith("--signal") or o.startswith("--gpus") for o in only)


def test_cluster_fit_and_slurm_keys_are_checked_by_name():
    with pytest.raises(ConfigError, match=r"^parallel.world_size: must equal cluster.learner_nodes"):
        validate_cluster_fit(_cfg("cluster.gpus_per_node=8", "cluster.learner_nodes=2"))
    with pytest.raises(ConfigError, match=r"^cluster.rollout.gpus_per_server: must divide"):
        _cfg("cluster.gpus_per_node=8", "cluster.rollout.gpus_per_server=3")
    with pytest.raises(ConfigError, match=r"^slurm.env\[0\]: must be KEY=VALUE"):
        _cfg("slurm.env=[NCCL_DEBUG]")
    with pytest.raises(ConfigError, match=r"^slurm.extra_sbatch\[0\]"):
        _cfg("slurm.extra_sbatch=[constraint=h100]")


def test_node_launch_gives_each_node_its_rank_under_a_static_rendezvous():
    cmd = torchrun_command(4, 8, 2, "10.0.0.1", 29500, "/runs/x")
    assert cmd[:3] == [sys.executable, "-m", "megatron_opd.compat.torchrun"]  # torchrun, store on master-addr
    for arg in ("--nnodes=4", "--nproc-per-node=8", "--node-rank=2", "--master-addr=10.0.0.1",
                "--master-port=29500"):
        assert arg in cmd
    assert not any(a.startswith("--rdzv") for a in cmd)  # c10d would hand out ranks by arrival
    assert cmd[-4:] == ["-m", "megatron_opd.learner.main", "--run-dir", "/runs/x"]


def test_slurm_node_lists_expand_like_scontrol():
    from megatron_opd.slurm.nodes import hostnames

    assert hostnames("gpu[01-03,07],big01") == ["gpu01", "gpu02", "gpu03", "gpu07", "big01"]
    assert hostnames("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    assert hostnames("n1") == ["n1"]


def test_roles_take_their_nodes_in_order(tmp_path):
    from megatron_opd.launch import SlurmSite
    from megatron_opd.slurm.nodes import role_hosts

    het = _cfg("cluster.rollout.nodes=2")
    env = {"SLURM_JOB_NODELIST_HET_GROUP_0": "gpu01", "SLURM_JOB_NODELIST_HET_GROUP_1":
           "gpu[07-08]", "SLURM_JOB_NODELIST_HET_GROUP_2": "big01"}
    assert role_hosts(het, env) == {"learner": ["gpu01"], "rollout": ["gpu07", "gpu08"],
                                    "teacher": ["big01"]}
    flat = _cfg("cluster.rollout.nodes=2", "slurm.heterogeneous=false")
    assert role_hosts(flat, {"SLURM_JOB_NODELIST": "n[1-4]"}) == {
        "learner": ["n1"], "rollout": ["n2", "n3"], "teacher": ["n4"]}
    with pytest.raises(RuntimeError, match=r"teacher 0 node\(s\), the config asks for 1"):
        role_hosts(flat, {"SLURM_JOB_NODELIST": "n[1-3]"})
    # servers: one per node on CPU nodes, srun'd onto their node of their het group
    site = SlurmSite(het, tmp_path, env)

    class Prepared:
        teacher_dir, student_dir = tmp_path / "t", tmp_path / "s"

    fleets = make_servers(het, Prepared, tmp_path, site)
    assert [s.name for s in fleets["rollout"]] == ["rollout-0", "rollout-1"]
    cmd = fleets["rollout"][1].command()
    assert cmd[:2] == ["srun", "--het-group=1"] and "--nodelist=gpu08" in cmd
    assert cmd[cmd.index("--") + 1:][:2] == ["--model-path", str(tmp_path / "s")]
    assert "--weight-version" in cmd and "--weight-version" not in fleets["teacher"][0].command()
    # GPU nodes: gpus_per_node / gpus_per_server servers per node on disjoint GPUs
    gpu = _cfg("cluster.gpus_per_node=8", "parallel.world_size=8", "cluster.rollout.nodes=2",
               "cluster.teacher.gpus_per_server=4", "parallel.micro_batch_size=8")
    fleets = make_servers(gpu, Prepared, tmp_path, SlurmSite(gpu, tmp_path, env))
    assert len(fleets["teacher"]) == 2 and len(fleets["rollout"]) == 16
    t1 = fleets["teacher"][1].command()
    assert t1[t1.index("--tp-size") + 1] == "4" and t1[t1.index("--base-gpu-id") + 1] == "4"


def _tree(path):
    return {str(p.relative_to(path)): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


def test_submit_dry_run_writes_nothing_in_the_run_dir(tmp_path):
    """`submit --dry-run` prints the script rendered for run.dir and touches nothing there (no
    config, script or secret); its copy of the job's files goes to a temporary directory it
    names (under $TMPDIR)."""
    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}

    def dry(*overrides):
        return subprocess.run([sys.executable, "-m", "megatron_opd.cli", "submit", "--config",
                               str(ROOT / "configs/quickstart.yaml"), f"run.dir={run_dir}",
                               *overrides, "--dry-run"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)

    out = dry("run.overwrite=true")
    assert out.returncode == 0, out.stderr
    assert not run_dir.exists()
    (named,) = tmp.iterdir()
    assert out.stderr == (f"megatron-opd: dry run: nothing written in {run_dir} and nothing "
                          f"submitted; the job's config.yaml and job.sbatch are in {named}\n")
    assert sorted(p.name for p in named.iterdir()) == ["config.yaml", "job.sbatch"]
    assert "#SBATCH hetjob" in out.stdout
    assert (named / "job.sbatch").read_text() == out.stdout.rstrip("\n") + "\n"
    assert f"--run-dir {run_dir}" in out.stdout and str(named) not in out.stdout
    saved = load_config(named / "config.yaml")
    assert saved.run.overwrite is False  # a requeued job must never wipe what it resumes from
    # a run directory that exists (a run to resume, even with another config) stays as it was
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("old: config\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    before = _tree(run_dir)
    assert dry("train.steps=3").returncode == 0
    assert _tree(run_dir) == before
    bad = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "submit", "--config",
                          str(ROOT / "configs/quickstart.yaml"), f"run.dir={tmp_path / 'x'}",
                          "cluster.gpus_per_node=8", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "parallel.world_size" in bad.stderr
    assert not (tmp_path / "x").exists() and len(list(tmp.iterdir())) == 2
