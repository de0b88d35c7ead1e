"""Child processes of a run: ports, process groups, log tails (shared by every launcher)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: str | Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """preexec_fn: PR_SET_PDEATHSIG, so a child gets `sig` if its launcher is SIGKILLed."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))
    except OSError:
        pass


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of process group `pgid` (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # fields after the command (which may hold spaces): state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(name))
    return out


def spawn_group(args: list[str], log_path: str | Path, env: dict | None = None) -> subprocess.Popen:
    """Start `args` as the leader of a new process group, stdout+stderr appended to log_path."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, preexec_fn=die_with_parent)


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the whole group, wait, then SIGKILL whatever of the group is left (no orphans),
    and wait until the group is gone (a member that outlived its leader included)."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10.0
    while group_members(proc.pid) and time.time() < deadline:
        _signal_group(proc.pid, signal.SIGKILL)
        time.sleep(0.05)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
