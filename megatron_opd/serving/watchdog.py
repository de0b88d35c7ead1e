"""The process that owns one SGLang server's process group, so nothing of it outlives the run.

    python -m megatron_opd.serving.watchdog [--grace S] -- <command ...>

The launcher starts this as the leader of a new process group (procs.spawn_group, with
PR_SET_PDEATHSIG), and this starts `command` (sglang.launch_server) in the same group. SGLang
forks a scheduler and a detokenizer, which set their own PR_SET_PDEATHSIG only once they run
(a window in which their parent can die unnoticed: the orphaned `sglang::detokenizer`). This
process watches both ends and, when either goes, kills every process of its group:

- the server's main process exits (crash, SIGKILL): the rest of the group is killed and this
  process exits the way the server did (same code, or killed by the same signal), so the
  launcher's supervisor sees the server's own exit status;
- the launcher disappears (SIGKILL: PR_SET_PDEATHSIG delivers SIGTERM here; or reparenting seen
  by polling getppid()), or SIGTERM/SIGINT arrives: SIGTERM to the group, `--grace` seconds for
  it to exit, then SIGKILL to whatever of the group is left. `--grace 0`: SIGKILL at once.

SGLang servers run with `--grace 0`: a server holds nothing to save, and SGLang 0.5.23 takes 6-10 s
to stop on SIGTERM (it drains, and when it sees its scheduler terminated its crash handler sleeps
5 s "to let GPU activity settle"), which every stop and restart of a run would wait for.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from megatron_opd.procs import die_with_parent, group_members

POLL_S = 0.2


def _kill_group(sig: int) -> None:
    """`sig` to every process of this group but this one."""
    me = os.getpid()
    for pid in group_members(os.getpgid(0)):
        if pid != me:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _group_empty(deadline: float) -> bool:
    me = os.getpid()
    while time.time() < deadline:
        if not [p for p in group_members(os.getpgid(0)) if p != me]:
            return True
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("watchdog: expected `-- <command ...>`")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="megatron_opd.serving.watchdog")
    p.add_argument("--grace", type=float, default=10.0)
    args = p.parse_args(argv[:split])
    command = argv[split + 1:]
    parent = os.getppid()
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    if parent == 1 or stop:  # the launcher died before we were ready to notice
        return 1
    # The server dies with this process even if this one is SIGKILLed (then the launcher's
    # stop_group of the group removes the rest).
    server = subprocess.Popen(command, preexec_fn=lambda: die_with_parent(signal.SIGKILL))
    while not stop and server.poll() is None and os.getppid() == parent:
        time.sleep(POLL_S)
    code = server.poll()
    if code is None:  # asked to stop, or the launcher is gone: take the group down
        if args.grace > 0:
            _kill_group(signal.SIGTERM)
        if not _group_empty(time.time() + args.grace):
            _kill_group(signal.SIGKILL)
        server.wait()
        return 128 + (stop[0] if stop else signal.SIGTERM)
    # The server exited by itself: its children (scheduler, detokenizer) go too.
    _kill_group(signal.SIGKILL)
    _group_empty(time.time() + 5.0)
    if code < 0:  # die by the same signal, so the supervisor reports the server's own status
        if -code != signal.SIGKILL:  # (SIGKILL's disposition cannot be set)
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main())
