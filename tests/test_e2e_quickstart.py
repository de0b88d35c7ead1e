"""End to end: a shortened quickstart with real SGLang servers, ZeroMQ and the megatron learner.

Runs `megatron-opd train` as a user would and checks what it produced: the held-out reverse KL
to the teacher falls, policy versions advance, rollouts carry the new versions, artifacts exist;
while it runs, no process of the run listens beyond loopback; its logs carry the lifecycle lines
and none of the known third-party warnings. Then the same run directory's lifecycle: rerun when
finished (nothing touched), continued with more steps, overwritten.
Other runs kill a process mid-run and check the launcher names it and leaves no orphans, and run
a two-rank learner with routing replay through the whole pipeline.
"""

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.ledger import assert_exactly_once
from tests.net_listeners import is_loopback, listeners, process_tree

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS = 150
SHORT_RUN = (f"train.steps={STEPS}", "eval.interval=75")


def _train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megatron_opd.cli", "train", "--config",
            str(ROOT / "configs/quickstart.yaml"), f"run.dir={run_dir}",
            f"run.cache_dir={ROOT / '.cache/megatron-opd'}", "logging.progress=false", *overrides]


def _run(cmd: list[str], timeout: float, watch=None,
         every: float = 2.0) -> subprocess.CompletedProcess:
    """subprocess.run, but a timeout kills every descendant too (SGLang servers run in their own
    sessions; an orphaned scheduler would spin on a core for the rest of the suite).
    `watch(pid)` is called every `every` seconds while the command runs."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=every if watch else timeout)
            break
        except subprocess.TimeoutExpired:
            if time.time() < deadline and watch is not None:
                watch(proc.pid)
                continue
        for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout:.0f} s:\n{out[-3000:]}\n{err[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class ListenerWatch:
    """Every TCP listening socket of a process tree, sampled while it runs (/proc/net/tcp{,6}
    and the processes' fds): (address, port) -> the process's command line."""

    def __init__(self):
        self.seen: dict[tuple[str, int], str] = {}

    def __call__(self, pid: int) -> None:
        for addr, port, owner in listeners(process_tree(pid)):
            if (addr, port) not in self.seen:
                try:
                    self.seen[addr, port] = " ".join(psutil.Process(owner).cmdline())[:150]
                except psutil.NoSuchProcess:
                    self.seen[addr, port] = str(owner)


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1].strip("/"))


def _check_logs(run_dir: Path, launcher_out: str) -> None:
    """The learner's log: its lifecycle lines, timestamped, and none of the known third-party
    warnings (megatron_opd/logs.py); the servers' logs: neither those warnings nor the ~20 kB
    server_args line."""
    from megatron_opd.logs import KNOWN_WARNINGS

    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "
    learner = (run_dir / "logs" / "learner.log").read_text()
    for what in ("start", "layout", "checkpoint saved step=", "finished step="):
        assert re.search(stamp + r"\[learner\] " + re.escape(what), learner, re.M), (what, learner[-3000:])
    for what in ("start", "servers ready", "finished"):
        assert re.search(stamp + r"\[launcher\] " + what, launcher_out, re.M), (what, launcher_out)
    for log in ("learner", "rollout", "teacher"):
        text = (run_dir / "logs" / f"{log}.log").read_text()
        for w in KNOWN_WARNINGS:
            hit = re.search(rf"{w.category.__name__}: {w.message}", text, re.I)
            assert hit is None, (log, w.message, text[max(0, hit.start() - 300):hit.end() + 300])
        longest = max(text.splitlines(), key=len)
        assert len(longest) < 1000, (log, longest[:300])


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One finished short quickstart run, shared: the learning checks read it, then the
    lifecycle test continues and overwrites it (a launch saved; it runs last in this module)."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    t0 = time.time()
    watch = ListenerWatch()
    out = _run(_train_cmd(run_dir, *SHORT_RUN), timeout=900, watch=watch)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    print(f"short run took {time.time() - t0:.0f} s")
    return run_dir, out, watch


def test_short_async_opd_run_learns(short_run):
    run_dir, out, watch = short_run
    # Nothing of the run listened beyond loopback (issue 14 item 6; docs/security.md), and
    # what was watched is the run: its servers, sockets and weight-sync rendezvous are there.
    beyond = {k: v for k, v in watch.seen.items() if not is_loopback(k[0])}
    assert not beyond, beyond
    wiring = json.loads((run_dir / "wiring.json").read_text())
    ports = {port for _, port in watch.seen}
    for endpoint in (wiring["samples_endpoint"], wiring["control_endpoint"],
                     *wiring["rollout_urls"], *wiring["teacher_urls"]):
        assert _port(endpoint) in ports, (endpoint, watch.seen)
    assert wiring["weight_sync_master_port"] in ports, watch.seen
    _check_logs(run_dir, out.stdout)
    records = _records(run_dir)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(STEPS))
    for r in train:  # every record carries what a user plots
        for key in ("train/loss", "eval/reverse_kl", "eval/accuracy", "samples/staleness_mean",
                    "weights/version"):
            assert r[key] is not None, key
    # Versions advance by one per optimizer step, and rollouts come back with the new versions.
    assert [r["weights/version"] for r in train] == list(range(1, STEPS + 1))
    assert train[-1]["samples/version_max"] >= STEPS - 3
    assert all(r["samples/staleness_max"] <= 2 for r in train)  # async.max_staleness
    evals = {r["eval/version"]: r for r in records}
    assert all(r["eval/served_version_ok"] == 1.0 for r in evals.values())
    # Learning: held-out reverse KL(student || teacher) falls.
    kl0, kl1 = evals[0]["eval/reverse_kl"], records[-1]["eval/reverse_kl"]
    assert records[-1]["eval/version"] == STEPS
    assert kl1 < 0.75 * kl0, (kl0, kl1)  # 0.56 at 150 steps measured; 500 steps reach < 0.5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_version"] == STEPS
    for name in ("config.yaml", "curves.png", "summary.json", "wiring.json"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == f"step_{STEPS:08d}"
    assert (ckpt / "hf" / "model.safetensors").is_file() and (ckpt / "megatron").is_dir()


def process_cmdlines(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(" ".join(p.cmdline()))
        except psutil.Error:  # exited meanwhile
            pass
    return out


@pytest.mark.parametrize("fault", ["kill_orchestrator", "ctrl_c"])
def test_a_dying_process_or_ctrl_c_stops_every_process(tmp_path, fault):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(run_dir, "train.steps=1000"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the launcher starts the learner and the orchestrator once its servers are ready:
        # with both there, every process of the run is (no training is waited for)
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, proc.communicate()
            descendants = psutil.Process(proc.pid).children(recursive=True)
            names = " ".join(process_cmdlines(descendants))
            if "megatron_opd.learner.main" in names and "megatron_opd.orchestrator" in names:
                break
            assert time.time() < deadline, names
            time.sleep(0.5)
        assert len(descendants) >= 6  # 2 servers (+ their children), learner, orchestrator
        if fault == "ctrl_c":
            proc.send_signal(signal.SIGINT)
        else:
            victim = next(p for p in descendants
                          if "megatron_opd.orchestrator" in " ".join(p.cmdline()))
            victim.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if fault == "ctrl_c":
        assert proc.returncode == 130 and "interrupted" in err
    else:
        assert proc.returncode == 1
        assert "orchestrator exited with code -9" in err
        assert "last lines of" in err
    time.sleep(1)
    alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]


def test_parallel_learner_in_the_full_pipeline(tmp_path):
    """The same run with a two-rank learner (EP2, dense layers data-parallel) and routing replay
    R3: torchrun ranks force the experts SGLang chose; rank 0 gathers the experts from both
    ranks and publishes them every step. The objective composes sampled-token OPD with LSM on
    the teacher's top-8 over groups of 2 responses per prompt, so top-K log-probs, groups and
    sampler settings cross every process boundary (SGLang -> orchestrator -> ZeroMQ -> rank 0
    -> broadcast -> micro-batches of both ranks)."""
    run_dir = tmp_path / "run"
    steps = 20
    watch = ListenerWatch()
    out = _run(_train_cmd(run_dir, f"train.steps={steps}", "eval.interval=10",
                          "parallel.world_size=2", "parallel.expert_parallel=2",
                          "train.checkpoint_interval=10", "train.routing_replay=r3",
                          "teacher.top_k=8", "objective.terms=[sampled_token_opd,lsm]",
                          "rollout.group_size=2"), timeout=900, watch=watch)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    # torchrun's rendezvous store (compat/torchrun.py) and both ranks' groups: loopback only
    assert watch.seen and not {k: v for k, v in watch.seen.items() if not is_loopback(k[0])}
    assert any("megatron_opd.compat.torchrun" in v for v in watch.seen.values()), watch.seen
    train = [r for r in _records(run_dir) if "train/loss" in r]
    # both terms trained; the total is their sum (weights 1); the top-8 of the sharp teacher
    # holds nearly all its mass (the renormalisation divides by it)
    for r in train:
        assert r["train/loss"] == pytest.approx(
            r["train/sampled_token_opd/loss"] + r["train/lsm/loss"], rel=1e-4, abs=1e-5)
        assert 0.9 < r["train/lsm/lsm_teacher_mass"] <= 1.0 + 1e-6
        assert r["train/lsm/loss"] > 0
    assert [r["weights/version"] for r in train] == list(range(1, steps + 1))
    assert all(r["samples/with_routed_experts"] == 1.0 for r in train)
    evals = {r["eval/version"]: r for r in _records(run_dir)}
    assert set(evals) == {0, 10, 20}
    assert all(r["eval/served_version_ok"] == 1.0 for r in evals.values())
    # Step 0 trains on version-0 samples with version-0 weights: with the rollout's experts
    # forced at the right positions, the learner reproduces SGLang's log-probs (fp32 both).
    assert train[0]["train/mismatch_abs"] < 1e-5
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{steps:08d}"
    assert (ckpts / f"step_{10:08d}" / "meta.json").is_file()


# --- the run directory's lifecycle, on the short run above (it runs last: it changes the run) ---

def _snapshot(run_dir):
    return {p.relative_to(run_dir).as_posix(): (p.stat().st_mtime_ns, p.is_dir() or
                                                  hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run_dir.rglob("*"))}


def _audit(run_dir, steps: int) -> None:
    """The run's records describe one run of `steps` steps, each sample trained at most once."""
    assert_exactly_once(run_dir, steps)
    train = [r["step"] for r in _records(run_dir) if "train/loss" in r]
    assert train == list(range(steps))


def test_finished_run_is_not_rerun_grows_on_more_steps_and_overwrite_starts_afresh(short_run):
    """The run directory's lifecycle with `megatron-opd train` as a user runs it:
    1. the short run finished (the fixture);
    2. the same command again says the run is finished, exits 0 and changes no file (contents,
       mtimes, the directory listing);
    3. a larger `train.steps` continues it from its final checkpoint: every step once;
    4. `run.overwrite=true` with a shorter run starts every artifact afresh: the ledger describes
       that run alone (each step once, no sample id trained twice, every accepted id once), and
       no file of the old run is left but the run secret."""
    run_dir = short_run[0]

    def train(*overrides, timeout=600):
        out = _run(_train_cmd(run_dir, *SHORT_RUN, *overrides), timeout=timeout)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        return out

    _audit(run_dir, STEPS)
    # 2. the same command: finished, said, exit 0, nothing touched
    before = _snapshot(run_dir)
    out = train(timeout=120)
    assert f"run.dir: {run_dir} holds a finished run ({STEPS} steps, train.steps={STEPS}): " \
        "nothing to do" in out.stdout
    assert json.loads(out.stdout[out.stdout.index("{"):out.stdout.rindex("}") + 1]) == \
        json.loads((run_dir / "summary.json").read_text())
    assert _snapshot(run_dir) == before

    # 3. more steps: the run continues from its final checkpoint
    train(f"train.steps={STEPS + 1}")
    _audit(run_dir, STEPS + 1)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS + 1
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS + 1:08d}"

    # 4. overwritten by a shorter run: one run's records, nothing of the old one left
    secret = (run_dir / "transport.key").read_bytes()
    time.sleep(0.01)  # the new run's files are created (ctime) later than this
    t_overwrite = time.time_ns()
    train("train.steps=2", "eval.interval=100", "run.overwrite=true")
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
