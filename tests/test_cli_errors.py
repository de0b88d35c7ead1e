"""Bad input at the real command line: exit status 2, one line `megatron-opd: error: <what>,
<fix>` on stderr, no traceback, and nothing written or started (issue 14 item 5)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs/quickstart.yaml")


def cli(*args, cwd=None):
    """`megatron-opd ARGS` as a user runs it (the console script's module), in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_opd.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd or ROOT, env=env)


def refused(out, message):
    """Exit 2 with exactly one line, `megatron-opd: error: <message>`."""
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert out.stderr == f"megatron-opd: error: {message}\n", out.stderr
    assert ", " in message  # <what>, <fix>


def tree(path: Path) -> dict:
    """Every entry below `path` with its mode and size (what a command must leave alone)."""
    return {str(p.relative_to(path)): (p.stat().st_mode, p.stat().st_size)
            for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("command", ["train", "plan", "prepare", "precompute-teacher"])
def test_a_command_without_config_is_refused(command, tmp_path):
    out = cli(command, f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    refused(out, f"{command}: no --config given, pass --config FILE (e.g. `megatron-opd "
                 f"{command} --config configs/quickstart.yaml`)")
    assert tree(tmp_path) == {}


def test_submit_without_config_is_refused(tmp_path):
    refused(cli("submit", "--dry-run", cwd=tmp_path),
            "submit: no --config given, pass --config FILE (e.g. `megatron-opd submit "
            "--config configs/my-run.yaml --dry-run`)")


def test_config_naming_a_directory_is_refused(tmp_path):
    refused(cli("train", "--config", tmp_path),
            f"config error: --config: {tmp_path} is a directory, give a YAML config file in it "
            "(e.g. configs/quickstart.yaml)")
    refused(cli("plan", "--config", tmp_path / "none.yaml"),
            f"config error: config file not found: {tmp_path / 'none.yaml'}, give a YAML config "
            "(e.g. configs/quickstart.yaml)")


def test_a_run_dir_that_is_a_file_or_below_one_is_refused(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    refused(cli("train", "--config", QUICKSTART, f"run.dir={a_file}"),
            f"config error: run.dir: {a_file} is a file, not a directory, give a directory path")
    refused(cli("train", "--config", QUICKSTART, f"run.dir={a_file / 'run'}"),
            f"config error: run.dir: cannot make {a_file / 'run'}: {a_file} is a file, not a "
            "directory, give a directory path")
    refused(cli("train", "--config", QUICKSTART, "run.dir="),
            "config error: run.dir: must not be empty, give a directory")
    assert a_file.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["a-file"]


def _unwritable_dir(tmp_path) -> Path:
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o500)
    if not os.access(d, os.W_OK):
        return d
    if not os.access("/proc/sys", os.W_OK):  # root writes anywhere, except a read-only mount
        return Path("/proc/sys")
    pytest.skip("no directory this user cannot write")


def test_an_unwritable_run_dir_is_refused(tmp_path):
    locked = _unwritable_dir(tmp_path)
    try:
        refused(cli("train", "--config", QUICKSTART, f"run.dir={locked / 'run'}"),
                f"config error: run.dir: {locked} is not writable, give a directory you can "
                "write (or change its permissions)")
        assert not (locked / "run").exists()
    finally:
        (tmp_path / "locked").chmod(0o700)


def _key(path: Path, mode: int) -> Path:
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    return path


def test_a_readable_secret_is_refused_before_anything_starts(tmp_path):
    """transport.secret_file, and the run's own key in run.dir, checked by preflight: no run
    directory is made, no server started."""
    key = _key(tmp_path / "run.key", 0o644)
    run = tmp_path / "run"
    refused(cli("train", "--config", QUICKSTART, f"run.dir={run}", f"transport.secret_file={key}"),
            f"config error: transport.secret_file: run secret {key} has mode 0644: group/other "
            f"users can read it, run `chmod 600 {key}` (and consider making a new secret)")
    assert not run.exists()
    refused(cli("train", "--config", QUICKSTART, f"run.dir={run}",
                f"transport.secret_file={tmp_path / 'none.key'}"),
            f"config error: transport.secret_file: {tmp_path / 'none.key'} does not exist, fix "
            "the path (or leave it empty: one made for the run)")
    run.mkdir()
    own = _key(run / "transport.key", 0o640)
    before = tree(run)
    refused(cli("train", "--config", QUICKSTART, f"run.dir={run}"),
            f"config error: run.dir: run secret {own} has mode 0640: group/other users can read "
            f"it, run `chmod 600 {own}` (and consider making a new secret)")
    assert tree(run) == before


def test_keygen_refuses_a_directory_and_leaves_no_temporary_file(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    refused(cli("keygen", "--out", d, "--force"),
            f"keygen --out: {d} is a directory, give a file path (e.g. {d / 'run.key'})")
    refused(cli("keygen", "--out", d), f"keygen --out: {d} is a directory, give a file path "
                                       f"(e.g. {d / 'run.key'})")
    assert tree(tmp_path) == {"keys": (d.stat().st_mode, d.stat().st_size)}


def test_keygen_refuses_an_existing_file_and_a_missing_directory(tmp_path):
    old = _key(tmp_path / "run.key", 0o600)
    data = old.read_bytes()
    refused(cli("keygen", "--out", old), f"keygen --out: {old} exists, pass --force to replace it")
    assert old.read_bytes() == data
    refused(cli("keygen", "--out", tmp_path / "no" / "run.key"),
            f"keygen --out: {tmp_path / 'no'} is not a directory, create it first (or give "
            "another path)")
    assert sorted(os.listdir(tmp_path)) == ["run.key"]
    out = cli("keygen", "--out", old, "--force")  # the good path still works
    assert out.returncode == 0 and old.read_bytes() != data
    assert stat.S_IMODE(old.stat().st_mode) == 0o600 and sorted(os.listdir(tmp_path)) == ["run.key"]


def test_keygen_into_an_unwritable_directory_is_refused(tmp_path):
    locked = _unwritable_dir(tmp_path)
    try:
        refused(cli("keygen", "--out", locked / "run.key"),
                f"keygen --out: {locked} is not writable, give a path in a directory you can "
                "write")
    finally:
        (tmp_path / "locked").chmod(0o700)


@pytest.mark.parametrize("args, message", [
    (["bogus"], "argument command: invalid choice: 'bogus' (choose from 'train', 'prepare', "
                "'precompute-teacher', 'keygen', 'submit', 'plan'), see `megatron-opd --help`"),
    (["keygen"], "the following arguments are required: --out, see `megatron-opd keygen --help`"),
    (["plan", "--config", QUICKSTART, "--prompt-tokens", "x"],
     "argument --prompt-tokens: invalid int value: 'x', see `megatron-opd plan --help`"),
    (["plan", "--config", QUICKSTART, "--prompt-tokens", "0"],
     "--prompt-tokens: must be >= 1, got 0"),
    (["submit", "--config", QUICKSTART, "--dry-runn"],
     "unrecognized arguments: --dry-runn, see `megatron-opd submit --help`"),
])
def test_a_bad_command_line_is_refused_in_the_one_style(args, message):
    refused(cli(*args), message)


def test_bad_config_values_are_refused_at_the_command_line(tmp_path):
    for override, message in [
            ("train.weight_decay=-1", "train.weight_decay: must be >= 0, got -1.0"),
            ("train.warmup_steps=-1", "train.warmup_steps: must be >= 0, got -1")]:
        refused(cli("train", "--config", QUICKSTART, f"run.dir={tmp_path / 'run'}", override),
                f"config error: {message}")
    assert not (tmp_path / "run").exists()


def test_prepare_refuses_a_cache_dir_it_cannot_make(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    refused(cli("prepare", "--config", QUICKSTART, f"run.cache_dir={a_file}"),
            f"config error: run.cache_dir: {a_file} is a file, not a directory, give a directory "
            "path")
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_bad_yaml_and_bad_overrides_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [\n")
    out = cli("plan", "--config", bad)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"megatron-opd: error: config error: {bad}: not valid YAML (")
    assert out.stderr.endswith("), fix the file\n")
    refused(cli("plan", "--config", QUICKSTART, "steps"),
            "config error: override 'steps': expected key=value, e.g. train.steps=20")
    out = cli("plan", "--config", QUICKSTART, "train.steps=[")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("megatron-opd: error: config error: train.steps: cannot parse "
                                 "value '[' as YAML (") and out.stderr.endswith("), quote it\n")
