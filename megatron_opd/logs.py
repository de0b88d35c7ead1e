"""What a person reads in a run's logs.

- `event(source, what, **fields)`: one timestamped lifecycle line (start, layout, checkpoint
  saved/loaded, preemption, finish, crash with the command that resumes it);
- `KNOWN_WARNINGS`, `KNOWN_LOG_RECORDS` / `quiet_known_warnings()`: the third-party warnings
  (and log records) every run prints and no one can act on, listed once here with why each is
  harmless, filtered by each process at its start (the learner, the SGLang servers through
  compat/sglang_site). A warning not listed here still shows.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from dataclasses import dataclass


def event(source: str, what: str, **fields) -> None:
    """`2026-12-06T07:59:01Z [learner] checkpoint saved step=10 path=...` on stdout, flushed."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tail = "".join(f" {k}={v}" for k, v in fields.items())
    print(f"{stamp} [{source}] {what}{tail}", file=sys.stdout, flush=True)


@dataclass(frozen=True)
class KnownWarning:
    category: type[Warning]
    message: str  # regular expression matched at the start of the message (case-insensitive)
    why: str  # why it is harmless here: the reason it may be hidden


KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    # megatron-core 0.16.1 (learner; SGLang imports it too)
    KnownWarning(UserWarning, r"Transformer Engine and Apex are not installed",
                 "CPU environments have neither by design (docs/environment.md); megatron-core's "
                 "local optimizer and multi-tensor paths are the ones the tests check"),
    KnownWarning(UserWarning, r"Apex is not installed\. Falling back to Torch Norm",
                 "the torch norm is the one the learner is tested with (logits vs transformers)"),
    KnownWarning(UserWarning, r"full scope is deprecated",
                 "megatron-core's TransformerConfig warns about its own default cuda_graph_scope; "
                 "megatron-opd sets no CUDA graph scope"),
    KnownWarning(FutureWarning,
                 r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                 r"deprecated",
                 "megatron-core's distributed optimizer calls the collectives torch 2.13 renamed; "
                 "they still work, nothing here calls them"),
    KnownWarning(FutureWarning, r"`load_state_dict` is deprecated and will be removed in future "
                                r"versions\. Please use `load` instead",
                 "megatron-core's dist_checkpointing loads with torch's older name on resume; "
                 "torch 2.13 still provides it (the resume tests check the loaded state)"),
    KnownWarning(FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
                 "megatron-core's checkpoint format is built on ShardedTensor; torch 2.13 still "
                 "reads and writes it"),
    # SGLang 0.5.23 (server logs)
    KnownWarning(UserWarning, r"'python -m sglang\.launch_server' is still supported",
                 "the launcher starts servers with `python -m sglang.launch_server` on purpose: "
                 "its arguments are what the tests pin"),
    KnownWarning(UserWarning, r"Only CUDA, HIP and XPU support AWQ",
                 "SGLang imports every quantization method at start; no run quantizes with AWQ"),
    KnownWarning(UserWarning, r"Only CUDA, MUSA and NPU support GGUF",
                 "as for AWQ: imported, never used"),
    KnownWarning(UserWarning, r"Triton is not supported on current platform",
                 "CPU servers run torch_native attention; SGLang's Triton kernels are not used"),
    # FastAPI (a FastAPIDeprecationWarning: matched as any Warning, fastapi is not imported here)
    KnownWarning(Warning, r"ORJSONResponse is deprecated",
                 "SGLang's HTTP server answers with ORJSONResponse; FastAPI still serves it"),
)


@dataclass(frozen=True)
class KnownLogRecord:
    logger: str  # the logger that emits it
    message: str  # regular expression matched at the start of its message
    why: str  # why its traceback may be dropped (the one line stays)


KNOWN_LOG_RECORDS: tuple[KnownLogRecord, ...] = (
    KnownLogRecord("sglang.srt.entrypoints.http_server", r"post-warmup freeze_gc failed",
                   "with --skip-server-warmup SGLang 0.5.23 asks its own HTTP server to freeze "
                   "the garbage collector before that server accepts connections; the request "
                   "is refused (a ~70-line traceback) and the server serves normally"),
)


class _WithoutTraceback(logging.Filter):
    """Keeps a known record as one line: its traceback dropped, a note of why."""

    def __init__(self, known: KnownLogRecord):
        super().__init__()
        self.known = known

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and re.match(self.known.message, record.getMessage()):
            record.exc_info, record.exc_text = None, None
            record.msg = f"{record.getMessage()} (known, harmless: megatron_opd/logs.py)"
            record.args = ()
        return True


def quiet_known_warnings() -> None:
    """Hide the warnings of KNOWN_WARNINGS and the tracebacks of KNOWN_LOG_RECORDS in this
    process (call once, at its start)."""
    for w in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=w.message, category=w.category)
    for r in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(r.logger)
        if not any(isinstance(f, _WithoutTraceback) and f.known == r for f in logger.filters):
            logger.addFilter(_WithoutTraceback(r))
