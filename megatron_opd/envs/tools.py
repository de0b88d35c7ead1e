"""Tools that run model-written input in a sandboxed subprocess: a time and a memory limit, no
file writes, no child processes, killed on timeout. A tool's failure is a `ToolResult` with an
error (the environment turns it into an observation); it never raises into the orchestrator.

The limits are set by the child itself (a prologue run before it reads its input), not by a
`preexec_fn`: the orchestrator has threads, and a fork with a Python callback is unsafe there.
The input is only read after the limits are on. The wall-clock timeout is the parent's (it kills
the child's whole process group); RLIMIT_CPU backs it up.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

# Runs first in the child: limits, then the tool's program (which reads stdin).
_PROLOGUE = """\
import resource as _r
_mem = {mem}
_r.setrlimit(_r.RLIMIT_AS, (_mem, _mem))
_r.setrlimit(_r.RLIMIT_CPU, ({cpu}, {cpu} + 1))
_r.setrlimit(_r.RLIMIT_FSIZE, (0, 0))
try:
    _r.setrlimit(_r.RLIMIT_NPROC, (0, 0))
except (ValueError, OSError):
    pass
del _r, _mem
"""

MAX_OUTPUT_CHARS = 2000  # of stdout kept for the observation


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    output: str  # the tool's stdout (ok) or a one-line error message a model can read
    error: str = ""  # "" | "timeout" | "memory" | "failed"


def run_sandboxed(program: str, stdin: str, *, timeout_s: float, memory_mb: int) -> ToolResult:
    """Run Python `program` (reading `stdin`) in a fresh isolated interpreter (-I -S: no
    site-packages, no environment) under the limits. Exit status 0: ok, stdout is the output.
    A non-zero exit: the program's last stderr line (or stdout, where it printed its own
    error) becomes the error message."""
    code = _PROLOGUE.format(mem=int(memory_mb) * 2**20, cpu=max(1, math.ceil(timeout_s))) + program
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={}, cwd="/", start_new_session=True)
    except OSError as e:  # e.g. no processes left: the tool failed, the run goes on
        return ToolResult(False, f"error: the tool could not start ({e.strerror})", "failed")
    try:
        out, err = proc.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        return ToolResult(False, f"error: time limit ({timeout_s:g} s) exceeded", "timeout")
    if proc.returncode == 0:
        return ToolResult(True, out.strip()[:MAX_OUTPUT_CHARS])
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return ToolResult(False, f"error: time limit ({timeout_s:g} s) exceeded", "timeout")
    if "MemoryError" in err:
        return ToolResult(False, f"error: memory limit ({memory_mb} MiB) exceeded", "memory")
    lines = [x for x in (out.strip().splitlines() or err.strip().splitlines()) if x.strip()]
    msg = lines[-1].strip() if lines else f"exit status {proc.returncode}"
    return ToolResult(False, msg if msg.startswith("error:") else f"error: {msg}"[:200], "failed")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only the tool's processes
    except ProcessLookupError:
        pass


# The calculator's program (runs under run_sandboxed): one integer/float expression on stdin,
# evaluated by walking its syntax tree; anything but numbers, + - * / // % ** and parentheses is
# an error. A huge power runs into the time or memory limit (that is what they are for).
CALCULATOR = r'''
import ast, sys
OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
       ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b,
       ast.Mod: lambda a, b: a % b, ast.Pow: lambda a, b: a ** b}
def ev(n):
    if isinstance(n, ast.Constant) and type(n.value) in (int, float):
        return n.value
    if isinstance(n, ast.BinOp) and type(n.op) in OPS:
        return OPS[type(n.op)](ev(n.left), ev(n.right))
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
        v = ev(n.operand)
        return -v if isinstance(n.op, ast.USub) else v
    raise ValueError("only numbers, + - * / // % ** and parentheses")
src = sys.stdin.read()
try:
    tree = ast.parse(src.strip(), mode="eval")
    print(ev(tree.body))
except MemoryError:
    raise
except SyntaxError:
    print("error: not an expression: " + repr(src.strip()[:60]))
    sys.exit(2)
except Exception as e:
    print("error: " + type(e).__name__ + ": " + str(e)[:100])
    sys.exit(2)
'''


def calculator(expression: str, *, timeout_s: float, memory_mb: int) -> ToolResult:
    """Evaluate an arithmetic expression in the sandbox."""
    if "\x00" in expression:
        return ToolResult(False, "error: not an expression", "failed")
    return run_sandboxed(CALCULATOR, expression, timeout_s=timeout_s, memory_mb=memory_mb)
