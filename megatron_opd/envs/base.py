"""The environment interface: what a run trains on, seen from the rest of the pipeline.

An environment owns
- the prompt streams: an endless, deterministic training stream and a fixed held-out set. A
  training prompt's `position` in its stream is its identity: the orchestrator names it
  `<run>-<position>`, so the same config yields the same prompt for the same id after any restart
  (that is how a resumed run trains no prompt twice and skips none), and a resumed stream starts
  at a position without regenerating what comes before it;
- the special ids (pad, eos and every stop id) the servers and the learner use;
- the per-token loss mask of a response (environment/tool tokens are 0);
- an optional verifier reward and per-sample metadata (JSON-able, travels with the sample);
- decoding, so people can read what the student says.

Nothing outside `megatron_opd/envs/` names a concrete environment: callers use `make_env(cfg)`
and this interface. Multi-turn tool environments will add reset/step on top of the same prompt
stream and masks (a trajectory is then the exact token sequence with tool tokens masked).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class EnvPrompt:
    """One prompt as token ids, ready for /generate."""
    token_ids: tuple[int, ...]
    source: str  # where it came from, stable across restarts (dataset row id, digit op ...)
    label: str | None = None  # reference answer for a verifier, when the data has one
    # stable id in the training stream (increasing; a position may be skipped, e.g. a prompt
    # dropped as too long); -1 for held-out prompts
    position: int = -1
    metadata: dict = field(default_factory=dict, compare=False)  # JSON-able, carried to samples


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    eos: int
    stop_ids: tuple[int, ...]  # every id that ends a response (eos first)
    bos: int | None = None


class Environment(ABC):
    """A single-turn environment (prompt in, one response out)."""

    name: str
    special: SpecialIds

    @abstractmethod
    def train_prompts(self, start: int = 0) -> Iterator[EnvPrompt]:
        """The training stream from position `start` on: endless (or ends when the data's epochs
        do), deterministic for a config, never yielding a held-out prompt; positions increase."""

    @abstractmethod
    def eval_prompts(self) -> list[EnvPrompt]:
        """The held-out prompts, fixed for a config."""

    def loss_mask(self, prompt: EnvPrompt, response_ids) -> np.ndarray:
        """uint8 per response token: 1 trains. Single-turn: every generated token trains."""
        return np.ones(len(response_ids), dtype=np.uint8)

    @property
    def has_verifier(self) -> bool:
        return False

    def reward(self, prompt: EnvPrompt, response_ids) -> float:
        """The verifier's outcome for one response (0.0 where there is no verifier)."""
        return 0.0

    @abstractmethod
    def decode(self, ids) -> str:
        """Token ids as text a person can read."""

    def stats(self) -> dict[str, float]:
        """Counters of the data pipeline (dropped prompts, skipped rows ...) for the metrics."""
        return {}
