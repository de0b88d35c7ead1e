"""One error style and one set of exit statuses for every entry point (`megatron-opd train |
prepare | precompute-teacher | plan | keygen | submit`, the Slurm job driver).

An error the user can act on ends in one line on stderr, `megatron-opd: error: <what>, <fix>`
(the tail of a dead process's log follows it), and the exit status says its kind:

- 2 `BAD_INPUT`: a command line, config, file or machine refused before anything starts
  (`config error: <key>: ...` for the config and the paths it names, checked by
  `launch.checks.preflight`; a precision this machine cannot run; a run directory that holds
  another run; a bad checkpoint file; a run secret readable by others; a missing `--config` or
  an unknown option: `Parser`);
- 1 `FAILED`: a run (or a step toward it: a server, `sbatch`, the offline store) failed; a
  process that died is named, with the last lines of its log;
- 130 `INTERRUPTED`: Ctrl-C or SIGTERM (scancel, preemption without warning); every process of
  the run was stopped.

Anything else is a bug and keeps its traceback. Imports nothing heavy: an exception class of a
module that was never imported cannot have been raised, so kinds are looked up in `sys.modules`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

OK, FAILED, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130
PREFIX = "megatron-opd: error: "


class RunFailed(RuntimeError):
    """A run, or a step toward one, failed; the message says what and where to look."""


class ProcessDied(RunFailed):
    """A process of the run died (the message names it and shows the tail of its log)."""


class Terminated(Exception):
    """SIGTERM (e.g. scancel / preemption) turned into an exception so cleanup runs."""


class RunDirTaken(FileExistsError):
    """`run.dir` holds another run and nothing to resume: refused before anything starts."""


class BadInput(ValueError):
    """The command line or a file it names is refused (not a config key): the message says
    what and how to fix it."""


class Parser(argparse.ArgumentParser):
    """argparse in the one error style: a bad command line is `megatron-opd: error: <what>, see
    `<prog> --help`` and exit status 2 (sub-commands' parsers inherit it)."""

    def error(self, message: str):  # argparse's hook; never returns
        self.exit(BAD_INPUT, f"{PREFIX}{message}, see `{self.prog} --help`\n")


# (module, class name, kind, shown as a config error): looked up only if the module is loaded.
_KINDS = (
    ("megatron_opd.config", "ConfigError", BAD_INPUT, True),
    ("megatron_opd.models.precision", "PrecisionError", BAD_INPUT, True),  # e.g. FP8, no TE
    ("megatron_opd.convert.errors", "BadCheckpoint", BAD_INPUT, False),
    ("megatron_opd.transport.auth", "SecretFileError", BAD_INPUT, False),  # transport.secret_file
    ("megatron_opd.offline_store", "StoreError", FAILED, False),
    ("megatron_opd.serving.sglang_server", "ServerStartError", FAILED, False),
)


def classify(e: BaseException) -> tuple[int, str] | None:
    """(exit status, message without the prefix) of a known kind of error; None for a bug."""
    if isinstance(e, (KeyboardInterrupt, Terminated)):
        return INTERRUPTED, "interrupted; all processes stopped"
    if isinstance(e, RunDirTaken):
        return BAD_INPUT, f"config error: {e}"
    if isinstance(e, BadInput):
        return BAD_INPUT, str(e)
    if isinstance(e, RunFailed):
        return FAILED, str(e)
    for module, name, code, config in _KINDS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return code, f"config error: {e}" if config else str(e)
    return None


def report(code: int, message: str) -> int:
    """Print `megatron-opd: error: <message>` to stderr; return `code`."""
    print(PREFIX + message, file=sys.stderr, flush=True)
    return code


def guarded(body: Callable[[], int], *, failed: tuple[type[BaseException], ...] = (),
            interrupted_note: str = "") -> int:
    """`body()`'s exit status, or the status and one-line message of a known error kind.
    `failed`: further exception types that mean `FAILED` at this entry point (e.g. OSError for
    keygen); `interrupted_note` is appended to the interruption message."""
    try:
        return body()
    except BaseException as e:  # noqa: BLE001 (unknown kinds are re-raised below)
        known = classify(e)
        if known is None and isinstance(e, failed):
            known = FAILED, str(e)
        if known is None:
            raise
        code, message = known
        if code == INTERRUPTED and interrupted_note:
            message += f" {interrupted_note}"
        return report(code, message)
