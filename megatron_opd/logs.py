"""Lifecycle lines a person reads in a process's log: one timestamped line per event (start,
layout, checkpoint saved/loaded, preemption, finish, crash with the command that resumes it)."""

from __future__ import annotations

import sys
import time


def event(source: str, what: str, **fields) -> None:
    """`2026-12-06T07:59:01Z [learner] checkpoint saved step=10 path=...` on stdout, flushed."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tail = "".join(f" {k}={v}" for k, v in fields.items())
    print(f"{stamp} [{source}] {what}{tail}", file=sys.stdout, flush=True)
