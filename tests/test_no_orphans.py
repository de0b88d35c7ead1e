"""No orphans (issue 15): `megatron-opd train` killed with SIGKILL leaves no process of the run
alive: SGLang servers and their scheduler/detokenizer children, learner, orchestrator.

The launcher runs with a marker in its environment, which every process of the run inherits; a
process that escaped the launcher's tree (reparented, its own session) is still found by it.
The run is killed as soon as its servers, learner and orchestrator are up: no training is waited
for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from tests.test_e2e_quickstart import ROOT, _train_cmd

pytestmark = pytest.mark.slow

MARKER = "MEGATRON_OPD_TEST_RUN"


def marked(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries MARKER=tag, and their descendants (SGLang's
    scheduler and detokenizer retitle themselves, which overwrites their /proc environ)."""
    found: dict[int, psutil.Process] = {}
    for p in _environ_marked(tag):
        found[p.pid] = p
        try:
            found.update({c.pid: c for c in p.children(recursive=True)
                          if c.status() != psutil.STATUS_ZOMBIE})
        except psutil.Error:
            pass
    return list(found.values())


def _environ_marked(tag: str) -> list[psutil.Process]:
    out = []
    needle = f"{MARKER}={tag}".encode()
    for p in psutil.process_iter():
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


def cmdlines(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(" ".join(p.cmdline())[:160] or p.name())
        except psutil.Error:
            pass
    return out


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the launcher exited ({proc.returncode}) before {what}:\n"
                                 + proc.stdout.read()[-3000:])
        assert time.time() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(0.5)


def test_sigkill_of_the_launcher_leaves_no_process_of_the_run(tmp_path):
    tag = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(run_dir, "train.steps=1000"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, MARKER: tag, "OMP_NUM_THREADS": "1"})
    try:
        def up() -> bool:
            names = " ".join(cmdlines(marked(tag)))
            return (names.count("sglang::scheduler") + names.count("sglang::detokenizer") >= 4
                    and "megatron_opd.learner.main" in names
                    and "megatron_opd.orchestrator" in names)

        wait_for(up, 400, "servers, learner and orchestrator up", proc)
        before = marked(tag)  # the run's processes: none starts after this while it runs
        names = cmdlines(before)
        assert sum("sglang.launch_server" in n and "watchdog" not in n for n in names) == 2, names
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed_at = time.time()
        # every process of the run goes, the ones that left the launcher's tree included; none
        # is left a second after the last one went (a process seen while it exits, its command
        # line already gone, is not taken for a survivor)
        deadline = time.time() + 60
        while time.time() < deadline:
            if not marked(tag):
                time.sleep(1.0)
                if not marked(tag):
                    break
            time.sleep(0.2)
        survivors = marked(tag)
        assert not survivors, [(p.pid, p.ppid(), p.status(), cmdlines([p]),
                                round(p.create_time() - killed_at, 1)) for p in survivors]
        assert not [p for p in before if p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE], cmdlines(before)
    finally:
        for p in marked(tag):  # leave nothing behind on failure either
            try:
                p.kill()
            except psutil.Error:
                pass


# ---------------------------------------------------------------- the watchdog alone (fast)
GROUP = ("import subprocess, sys, time\n"
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
         "time.sleep(600)\n")  # a server with a child of its own (like SGLang's scheduler)
LAUNCHER = ("import sys, time\n"
            "from megatron_opd.procs import spawn_group\n"
            "p = spawn_group([sys.executable, '-m', 'megatron_opd.serving.watchdog', '--',\n"
            "                 sys.executable, '-c', sys.argv[1]], sys.argv[2])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(600)\n")


@pytest.mark.parametrize("fault", ["launcher_sigkill", "server_sigkill"])
def test_watchdog_takes_its_group_down(tmp_path, fault):
    """Killing the launcher takes the server and the server's child down; a server that dies
    takes its child down, and the watchdog exits the way the server did (-9)."""
    tag = uuid.uuid4().hex
    env = {**os.environ, MARKER: tag, "PYTHONPATH": str(ROOT)}
    if fault == "launcher_sigkill":
        launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, GROUP,
                                     str(tmp_path / "log")], env=env, stdout=subprocess.PIPE,
                                    text=True)
        launcher.stdout.readline()
        wait_for(lambda: len(marked(tag)) >= 4, 60, "launcher, watchdog, server, child")
        launcher.kill()
        launcher.wait()
    else:
        from megatron_opd.procs import spawn_group

        watchdog = spawn_group([sys.executable, "-m", "megatron_opd.serving.watchdog",
                                "--", sys.executable, "-c", GROUP], tmp_path / "log",
                               env)
        wait_for(lambda: len(marked(tag)) >= 3, 60, "watchdog, server, child")
        server = next(p for p in psutil.Process(watchdog.pid).children() if "-c" in p.cmdline())
        server.kill()
        assert watchdog.wait(timeout=30) == -signal.SIGKILL
    wait_for(lambda: not marked(tag), 30, "every process of the group gone")
