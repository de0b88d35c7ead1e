"""Run directories: fresh, resumed (same config; only a few keys may change), finished (not run
again, nothing touched), repaired (a damaged latest checkpoint) or overwritten (every artifact)."""

from __future__ import annotations

import hashlib
import json

import pytest

from megatron_opd.cli import main
from megatron_opd.config import ConfigError, load_config
from megatron_opd.launch import prepare_run_dir
from megatron_opd.launch.rundir import RUN_DIRS, RUN_FILES, RunFinished
from megatron_opd.metrics import MetricsWriter


def _cfg(run_dir, *overrides):
    return load_config("configs/quickstart.yaml", [f"run.dir={run_dir}", *overrides])


def _fake_run(run_dir, cfg):
    prepare_run_dir(cfg)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(6)))
    _checkpoint(run_dir, 4)
    (run_dir / "spool").mkdir()


def _checkpoint(run_dir, step, files=None, latest=True):
    """A checkpoint directory as save_checkpoint leaves it: files, then meta.json with their
    sizes, then `latest`."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    (path / "megatron").mkdir(parents=True)
    files = files or {"megatron/__0_0.distcp": b"x" * 100, "megatron/.metadata": b"m" * 10}
    for rel, data in files.items():
        (path / rel).write_bytes(data)
    (path / "meta.json").write_text(json.dumps(
        {"step": step, "files": {rel: len(data) for rel, data in files.items()}}))
    if latest:
        (run_dir / "checkpoints" / "latest").write_text(path.name)
    return path


def _snapshot(run_dir):
    """Every path under run_dir with its mtime and, for files, a hash of its contents."""
    return {p.relative_to(run_dir).as_posix(): (p.stat().st_mtime_ns, p.is_dir() or
                                                  hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run_dir.rglob("*"))}


def _finished_run(run_dir, steps=6, checkpoint=True):
    cfg = _cfg(run_dir, f"train.steps={steps}", f"train.checkpoint={str(checkpoint).lower()}")
    prepare_run_dir(cfg)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n"
                                                   for s in range(steps + 1)))
    (run_dir / "summary.json").write_text(json.dumps({"steps": steps, "final_version": steps}))
    (run_dir / "ledger.jsonl").write_text('{"accepted": ["r-0"]}\n'
                                          '{"step": 0, "trained": ["r-0"]}\n')
    (run_dir / "logs" / "learner.log").write_text("done\n")
    if checkpoint:
        _checkpoint(run_dir, steps)
    return cfg


def test_resume_keeps_the_run_and_refuses_another_config(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _cfg(run))
    prepare_run_dir(_cfg(run, "train.steps=900"))  # more steps: allowed
    assert (run / "checkpoints" / "latest").is_file() and (run / "metrics.jsonl").is_file()
    with pytest.raises(ConfigError, match=r"^train\.lr: .*differing: train\.lr"):
        prepare_run_dir(_cfg(run, "train.lr=0.1"))


def test_overwrite_wipes_checkpoints_and_spool(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _cfg(run))
    prepare_run_dir(_cfg(run, "run.overwrite=true", "train.lr=0.1"))
    assert not (run / "checkpoints").exists() and not (run / "spool").exists()
    assert not (run / "metrics.jsonl").exists()


def test_metrics_without_checkpoint_are_not_silently_replaced(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(_cfg(run))
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(FileExistsError, match="run.overwrite=true"):
        prepare_run_dir(_cfg(run))


def test_resumed_metrics_drop_the_steps_being_redone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(6)) + '{"step": 6, "x"')
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=4)
    w.log(4, {"x": 40})
    w.close()
    assert [json.loads(line)["x"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 40]


def test_reading_metrics_while_the_learner_writes_skips_the_partial_last_line(tmp_path):
    from megatron_opd.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "train/lo')
    assert read_metrics(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"step": 1, "tra\n')
    with pytest.raises(json.JSONDecodeError):  # a complete but malformed line is an error
        read_metrics(path)


def test_a_finished_run_says_so_exits_0_and_touches_no_file(tmp_path, capsys):
    run = tmp_path / "run"
    _finished_run(run)
    before = _snapshot(run)
    argv = ["train", "--config", "configs/quickstart.yaml", f"run.dir={run}", "train.steps=6",
            "logging.progress=false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"run.dir: {run} holds a finished run (6 steps, train.steps=6): nothing to do" in out
    assert json.loads(out[out.index("{"):out.rindex("}") + 1]) == {"steps": 6, "final_version": 6}
    assert _snapshot(run) == before
    with pytest.raises(RunFinished):  # fewer steps than done: finished as well
        prepare_run_dir(_cfg(run, "train.steps=4"))
    assert _snapshot(run) == before


def test_a_finished_run_continues_only_when_train_steps_grew(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    with pytest.raises(ConfigError, match=r"^train\.lr: .*differing: train\.lr"):
        prepare_run_dir(_cfg(run, "train.steps=6", "train.lr=0.1"))  # another run, named
    assert prepare_run_dir(_cfg(run, "train.steps=9")) == run  # resumes from step 6
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"


def test_a_finished_run_without_checkpoints_is_finished_by_its_summary(tmp_path):
    run = tmp_path / "run"
    _finished_run(run, steps=5, checkpoint=False)
    with pytest.raises(RunFinished, match=r"\(5 steps, train\.steps=5\)"):
        prepare_run_dir(_cfg(run, "train.steps=5", "train.checkpoint=false"))
    with pytest.raises(FileExistsError, match="without a checkpoint to resume from"):
        prepare_run_dir(_cfg(run, "train.steps=8", "train.checkpoint=false"))


def test_overwrite_deletes_every_artifact_but_the_secret_and_slurm_files(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    for name in RUN_FILES:
        (run / name).write_text("old")
    for name in RUN_DIRS:
        (run / name).mkdir(exist_ok=True)
        (run / name / "old").write_text("old")
    kept = {"transport.key": "secret", "job.sbatch": "#!/bin/bash", "slurm_jobs.txt": "12\n",
            "logs/slurm-12.out": "job output"}
    for rel, text in kept.items():
        (run / rel).write_text(text)
    (run / "logs" / "rollout.log").write_text("old")
    (run / "logs" / "sub").mkdir()
    prepare_run_dir(_cfg(run, "run.overwrite=true", "train.steps=3"))
    left = {p.relative_to(run).as_posix() for p in run.rglob("*")}
    assert left == set(kept) | {"logs", "config.yaml"}
    assert all((run / rel).read_text() == text for rel, text in kept.items())
    assert "steps: 3" in (run / "config.yaml").read_text()


def test_a_fresh_learner_starts_a_new_ledger_and_a_resumed_one_drops_redone_steps(tmp_path):
    from megatron_opd.learner.spool import SampleLedger

    path = tmp_path / "ledger.jsonl"
    path.write_text('{"accepted": ["a"]}\n{"step": 0, "trained": ["a"]}\n{"step": 1, '
                    '"trained": ["b"]}\n')
    resumed = SampleLedger(path, resume_step=1)
    resumed.trained(1, ["c"])
    resumed.close()
    assert path.read_text().splitlines() == ['{"accepted": ["a"]}', '{"step": 0, "trained": ["a"]}',
                                             '{"step": 1, "trained": ["c"]}']
    fresh = SampleLedger(path)  # a run that does not resume: one run, one ledger
    fresh.trained(0, ["x"])
    fresh.close()
    assert path.read_text().splitlines() == ['{"step": 0, "trained": ["x"]}']


def test_a_damaged_latest_checkpoint_is_moved_aside_before_anything_starts(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(run, _cfg(run))
    _checkpoint(run, 6)
    with open(run / "checkpoints" / "step_00000006" / "megatron" / "__0_0.distcp", "r+b") as f:
        f.truncate(40)
    prepare_run_dir(_cfg(run))
    out = capsys.readouterr().out
    assert "checkpoint damaged, not resumed from" in out and "step_00000006" in out
    assert "step_00000006/megatron/__0_0.distcp truncated: 40 bytes, 100 at save" in out
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    assert (run / "checkpoints" / "step_00000006.damaged").is_dir()


def test_no_intact_checkpoint_is_refused_as_bad_input_naming_each(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(run, _cfg(run))
    (run / "checkpoints" / "step_00000004" / "megatron" / ".metadata").unlink()
    argv = ["train", "--config", "configs/quickstart.yaml", f"run.dir={run}",
            "logging.progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    ckpts = run / "checkpoints"
    assert err.startswith(f"megatron-opd: error: no intact checkpoint in {ckpts}: "
                          f"{ckpts / 'step_00000004' / 'megatron' / '.metadata'} missing; put an "
                          "intact one back, or start the run over with run.overwrite=true")
    assert "Traceback" not in err
