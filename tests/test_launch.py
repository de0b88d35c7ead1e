"""The one launch path's shared pieces (no servers started): fleets, the learner's torchrun line
and the checks are computed once for the embedded launcher and the Slurm driver, and every entry
point reports errors with one message style and one set of exit statuses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron_opd import errors
from megatron_opd.cli import main as cli_main
from megatron_opd.config import ConfigError, load_config
from megatron_opd.launch import (LocalSite, SlurmSite, fleet_specs, make_servers,
                                 prepare_run_dir, torchrun_command)

ROOT = Path(__file__).resolve().parents[1]
HET_ENV = {"SLURM_JOB_NODELIST_HET_GROUP_0": "n1", "SLURM_JOB_NODELIST_HET_GROUP_1": "n2",
           "SLURM_JOB_NODELIST_HET_GROUP_2": "n3"}


def _cfg(*overrides: str):
    return load_config(ROOT / "configs/quickstart.yaml", list(overrides))


class Models:
    teacher_dir, student_dir = Path("/m/teacher"), Path("/m/student")


def test_one_machine_fleets_are_one_server_per_role_named_by_role():
    specs = fleet_specs(_cfg("train.routing_replay=r3"), Models)
    (teacher,), (rollout,) = specs["teacher"], specs["rollout"]
    assert (teacher.name, teacher.model_dir, teacher.extra_args) == ("teacher", "/m/teacher", ())
    assert (rollout.name, rollout.model_dir) == ("rollout", "/m/student")
    assert rollout.extra_args == ("--weight-version", "0") and rollout.world_size == 1
    assert rollout.routed_experts and not teacher.routed_experts
    assert not fleet_specs(_cfg(), Models)["rollout"][0].routed_experts


def test_gpu_fleets_place_disjoint_gpus_per_node():
    cfg = _cfg("cluster.gpus_per_node=8", "parallel.world_size=8",
               "cluster.teacher.gpus_per_server=4", "cluster.rollout.gpus_per_server=2",
               "parallel.micro_batch_size=8")
    specs = fleet_specs(cfg, Models, {"teacher": 1, "rollout": 2}, 8)
    assert [s.gpu_ids for s in specs["teacher"]] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [s.name for s in specs["rollout"]] == [f"rollout-{i}" for i in range(8)]
    assert [s.node for s in specs["rollout"]] == [0] * 4 + [1] * 4
    assert specs["rollout"][5].extra_args == ("--tp-size", "2", "--base-gpu-id", "2",
                                              "--weight-version", "0")
    assert specs["rollout"][0].world_size == 2


def test_local_and_slurm_sites_start_the_same_servers(tmp_path):
    """Both sites turn the same specs into servers: the SGLang arguments are equal, only the
    placement (port here vs srun + endpoint file there) and the names differ."""
    cfg = _cfg("train.routing_replay=r3", "server.threads=1")
    local = make_servers(cfg, Models, tmp_path)
    slurm = make_servers(cfg, Models, tmp_path, SlurmSite(cfg, tmp_path, HET_ENV))
    for role in ("teacher", "rollout"):
        (a,), (b,) = local[role], slurm[role]
        assert (a.name, b.name) == (role, f"{role}-0")
        assert a.server_args() == b.server_args() and a.threads == b.threads == 1
        assert a.log_path == str(tmp_path / f"{role}.log")
        assert b.log_path == str(tmp_path / f"{role}-0.log")
    assert "--enable-return-routed-experts" in local["rollout"][0].server_args()


def test_one_torchrun_line_for_both_sites(tmp_path):
    local = LocalSite().learner_command(_cfg("parallel.world_size=2",
                                             "parallel.micro_batch_size=8"), tmp_path)
    port = next(a for a in local if a.startswith("--master-port=")).split("=")[1]
    assert local == torchrun_command(1, 2, 0, "127.0.0.1", int(port), tmp_path)
    assert LocalSite().learner_command(_cfg(), tmp_path) == [
        sys.executable, "-m", "megatron_opd.learner.main", "--run-dir", str(tmp_path)]
    # Slurm: one srun task per learner node runs node_launch, which execs the same line
    cfg = _cfg("cluster.learner_nodes=2", "parallel.world_size=4", "parallel.micro_batch_size=8",
               "slurm.heterogeneous=false")
    site = SlurmSite(cfg, tmp_path, {"SLURM_JOB_NODELIST": "n[1-4]"})
    cmd = site.learner_command(cfg, tmp_path)
    assert cmd[:1] == ["srun"] and "--nodelist=n1,n2" in cmd
    launch = cmd[cmd.index("megatron_opd.slurm.node_launch") + 1:]
    assert launch[:2] == ["--nnodes=2", "--nproc-per-node=2"]


def test_error_kinds_map_to_one_style_and_status(capsys):
    from megatron_opd.models.precision import PrecisionError

    cases = [(ConfigError("train.steps: must be > 0"), 2, "config error: train.steps: "),
             (PrecisionError("precision.fp8: no GPU"), 2, "config error: precision.fp8: "),
             (errors.RunDirTaken("run.dir: x"), 2, "config error: run.dir: x"),
             (errors.ProcessDied("learner exited with code -9"), 1, "learner exited with code -9"),
             (errors.RunFailed("sbatch refused"), 1, "sbatch refused"),
             (KeyboardInterrupt(), 130, "interrupted; all processes stopped"),
             (errors.Terminated("signal 15"), 130, "interrupted; all processes stopped")]
    for exc, code, message in cases:
        def body(exc=exc):
            raise exc

        assert errors.guarded(body) == code
        err = capsys.readouterr().err
        assert err.startswith("megatron-opd: error: " + message) and err.count("\n") == 1, err
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        errors.guarded(lambda: 1 // 0)
    assert errors.guarded(lambda: (_ for _ in ()).throw(OSError("disk")), failed=(OSError,)) == 1


def test_train_refuses_a_taken_run_dir_as_bad_input(tmp_path, capsys):
    run = tmp_path / "run"
    prepare_run_dir(_cfg(f"run.dir={run}"))
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    assert cli_main(["train", "--config", str(ROOT / "configs/quickstart.yaml"),
                     f"run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-opd: error: config error: run.dir: ") and "overwrite" in err


def test_slurm_driver_refuses_before_anything_starts(tmp_path, monkeypatch, capsys):
    """The job driver checks what `train` checks, the learner's precision included (it runs on
    the first learner node), and reports like every entry point."""
    from megatron_opd.slurm.job import main as job_main

    cfg = _cfg(f"run.dir={tmp_path}", "precision.params_dtype=bfloat16",
               "precision.fp8=blockwise")
    prepare_run_dir(cfg)
    for k, v in HET_ENV.items():
        monkeypatch.setenv(k, v)
    assert job_main(["--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-opd: error: config error: precision.fp8"), err
    assert not (tmp_path / "wiring.json").exists() and not (tmp_path / "endpoints").exists()
    monkeypatch.delenv("SLURM_JOB_NODELIST_HET_GROUP_2")
    assert job_main(["--run-dir", str(tmp_path)]) == 1
    assert "SLURM_JOB_NODELIST_HET_GROUP_2 is not set" in capsys.readouterr().err


def test_submit_reports_like_every_entry_point(tmp_path, capsys):
    from megatron_opd.slurm.submit import main as submit_main

    assert submit_main(["--config", str(ROOT / "configs/quickstart.yaml"),
                        f"run.dir={tmp_path / 'x'}", "cluster.gpus_per_node=8", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(
        "megatron-opd: error: config error: parallel.world_size: ")
    assert submit_main(["--config", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_num_servers_makes_a_fleet_per_role_and_slurm_fills_its_nodes():
    specs = fleet_specs(_cfg("rollout.num_servers=3", "teacher.num_servers=2"), Models)
    assert [s.name for s in specs["rollout"]] == ["rollout-0", "rollout-1", "rollout-2"]
    assert [s.name for s in specs["teacher"]] == ["teacher-0", "teacher-1"]
    assert all(s.extra_args == ("--weight-version", "0") for s in specs["rollout"])
    assert len({s.name for s in specs["rollout"]}) == 3
    nodes = {"teacher": 1, "rollout": 2}
    assert len(fleet_specs(_cfg(), Models, nodes)["rollout"]) == 2  # 1: fill the nodes
    assert len(fleet_specs(_cfg("rollout.num_servers=2"), Models, nodes)["rollout"]) == 2
    with pytest.raises(ConfigError, match=r"^rollout.num_servers: the Slurm job runs 2 rollout"):
        fleet_specs(_cfg("rollout.num_servers=3"), Models, nodes)


def test_servers_started_at_once_get_distinct_ports(tmp_path):
    """HTTP and torch.distributed ports of every server of a fleet differ (SGLang would pick
    its torch.distributed port itself, at random)."""
    servers = make_servers(_cfg("rollout.num_servers=4", "teacher.num_servers=4"), Models,
                           tmp_path)
    ports = []
    for s in servers["rollout"] + servers["teacher"]:
        cmd = s.command()
        assert cmd[1:6] == ["-m", "megatron_opd.serving.watchdog", "--grace", "0", "--"]
        ports += [int(cmd[cmd.index("--port") + 1]), int(cmd[cmd.index("--nccl-port") + 1])]
    assert len(ports) == len(set(ports)) == 16


def test_wiring_endpoints_are_the_router_or_every_server():
    from megatron_opd.wiring import RunWiring

    w = RunWiring(run_dir="r", rollout_urls=["http://a:1", "http://a:2"],
                  teacher_urls=["http://a:3"], samples_endpoint="", control_endpoint="",
                  teacher_dir="", student_dir="")
    assert w.rollout_endpoint() == ["http://a:1", "http://a:2"]
    assert w.teacher_endpoint() == ["http://a:3"]
    w.rollout_router_url = "http://a:9"
    assert w.rollout_endpoint() == ["http://a:9"] and w.rollout_urls == ["http://a:1", "http://a:2"]


def test_wiring_clients_go_through_the_router_when_there_is_one():
    from megatron_opd.config import ServerConfig
    from megatron_opd.serving.router import RoutedClient
    from megatron_opd.serving.sglang_client import SGLangClient
    from megatron_opd.wiring import RunWiring

    w = RunWiring(run_dir="r", rollout_urls=["http://a:1", "http://a:2"],
                  teacher_urls=["http://a:3"], samples_endpoint="", control_endpoint="",
                  teacher_dir="", student_dir="", rollout_router_url="http://a:9")
    rollout, teacher = w.rollout_client(ServerConfig()), w.teacher_client(ServerConfig())
    assert isinstance(rollout, RoutedClient) and rollout.urls == ["http://a:9"]
    assert type(teacher) is SGLangClient and teacher.urls == ["http://a:3"]
    assert rollout.retry_timeout_s == teacher.retry_timeout_s > 0


def test_fleet_probe_reads_sglang_counters():
    from megatron_opd.serving.sglang_server import _counter

    text = ("# TYPE sglang:generation_tokens_total counter\n"
            'sglang:generation_tokens_total{engine_type="unified",is_streaming="false"} 32.0\n'
            'sglang:generation_tokens_total_created{engine_type="unified"} 1.7e9\n'
            'sglang:generation_tokens_total{engine_type="unified",is_streaming="true"} 8.0\n'
            "sglang:prompt_tokens_total 16.0\n")
    assert _counter(text, "sglang:generation_tokens_total") == 40.0
    assert _counter(text, "sglang:prompt_tokens_total") == 16.0
    assert _counter("", "sglang:generation_tokens_total") == 0.0


TWO_TEACHERS = ["teacher.route_by=column", "teacher.route_column=domain",
                "teacher.teachers=[{name: math, revision: m1, num_servers: 3},"
                " {name: prose, revision: p1, init: /m/prose}]"]


def test_several_teachers_fill_a_slurm_jobs_teacher_slots_in_order(tmp_path):
    """In a Slurm job the named teachers take the teacher nodes' server slots in config order
    (math: 3 servers, prose: 1 on 2 nodes x 2 servers of 4 GPUs); each server is placed on its
    slot's node and GPUs, and the slots must be filled exactly."""
    cfg = _cfg(*TWO_TEACHERS, "cluster.gpus_per_node=8", "cluster.teacher.gpus_per_server=4",
               "parallel.world_size=8", "parallel.micro_batch_size=8")
    specs = fleet_specs(cfg, Models, {"teacher": 2, "rollout": 1}, 8)["teacher"]
    assert [(s.name, s.teacher, s.node, s.gpu_ids) for s in specs] == [
        ("teacher-math-0", "math", 0, (0, 1, 2, 3)), ("teacher-math-1", "math", 0, (4, 5, 6, 7)),
        ("teacher-math-2", "math", 1, (0, 1, 2, 3)), ("teacher-prose", "prose", 1, (4, 5, 6, 7))]
    assert [s.model_dir for s in specs] == [str(Models.teacher_dir)] * 3 + ["/m/prose"]
    assert specs[3].extra_args == ("--tp-size", "4", "--base-gpu-id", "4")
    # one machine: every teacher here, no GPU placement
    local = fleet_specs(_cfg(*TWO_TEACHERS), Models)["teacher"]
    assert [(s.name, s.node, s.gpu_ids, s.extra_args) for s in local] == [
        (f"teacher-math-{i}", 0, (), ()) for i in range(3)] + [("teacher-prose", 0, (), ())]
    # the Slurm site starts each teacher through srun on its slot's node (CPU: one per node)
    one_each = [*TWO_TEACHERS[:2], "teacher.teachers=[{name: math, revision: m1},"
                " {name: prose, revision: p1}]", "cluster.teacher.nodes=2",
                "slurm.heterogeneous=false"]
    cfg = _cfg(*one_each)
    site = SlurmSite(cfg, tmp_path, {"SLURM_JOB_NODELIST": "l1,r1,t[1-2]"})
    servers = make_servers(cfg, Models, tmp_path, site)["teacher"]
    assert [(s.name, s.launch_prefix[s.launch_prefix.index("--nodelist=" + h)])
            for s, h in zip(servers, ("t1", "t2"))] == \
        [("teacher-math", "--nodelist=t1"), ("teacher-prose", "--nodelist=t2")]
    # a job whose slots the teachers do not fill is refused before it is submitted, and
    # where the fleets are made, naming the key
    from megatron_opd.config import validate_cluster_fit

    validate_cluster_fit(cfg)
    with pytest.raises(ConfigError, match=r"^teacher.teachers: the Slurm job runs 2 teacher "
                                          r"server\(s\) .* add up to 4; make them add up to 2"):
        validate_cluster_fit(_cfg(*TWO_TEACHERS, "cluster.teacher.nodes=2"))
    with pytest.raises(ConfigError, match=r"^teacher.teachers: the Slurm job runs 4 teacher "
                                          r"server\(s\) .* add up to 3; make them add up to 4"):
        fleet_specs(load_config(ROOT / "configs/quickstart.yaml", [
            *TWO_TEACHERS[:2], "teacher.teachers=[{name: math, revision: m1, num_servers: 2},"
            " {name: prose, revision: p1}]", "cluster.gpus_per_node=8",
            "cluster.teacher.gpus_per_server=4", "parallel.world_size=8",
            "parallel.micro_batch_size=8"]), Models, {"teacher": 2, "rollout": 1}, 8)
