"""Run directories: fresh, resumed (same config; only a few keys may change) or overwritten."""

from __future__ import annotations

import json

import pytest

from megatron_opd.config import ConfigError, load_config
from megatron_opd.launch import prepare_run_dir
from megatron_opd.metrics import MetricsWriter


def _cfg(run_dir, *overrides):
    return load_config("configs/quickstart.yaml", [f"run.dir={run_dir}", *overrides])


def _fake_run(run_dir, cfg):
    prepare_run_dir(cfg)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(6)))
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000004")
    (run_dir / "spool").mkdir()


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
