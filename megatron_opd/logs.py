"""What a person reads in a run's logs.

- `event(source, what, **fields)`: one timestamped lifecycle line (start, layout, checkpoint
  saved/loaded, preemption, finish, crash with the command that resumes it);
- `KNOWN_WARNINGS` / `quiet_known_warnings()`: the third-party warnings every run prints and no
  one can act on, listed once here with why each is harmless, filtered by each process at its
  start (the learner, the SGLang servers through compat/sglang_site). A warning not listed
  here still shows.
"""

from __future__ import annotations

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
)


def quiet_known_warnings() -> None:
    """Hide the warnings of KNOWN_WARNINGS in this process (call once, at its start)."""
    for w in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=w.message, category=w.category)
