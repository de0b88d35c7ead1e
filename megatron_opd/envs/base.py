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
and this interface.

Multi-turn environments (`MultiTurnEnvironment`) add reset/step on the same prompt stream:
`reset(prompt)` opens an `Episode`; after each assistant turn `episode.step(turn_ids, reason)`
answers with a `Step`: the observation to append (tool output: tokens, or text the environment
tokenises once, on its own) or `done` with the verifier's reward. The rollout loop
(`megatron_opd/episodes.py`) owns the token sequence: it never re-tokenises earlier turns, masks
observation tokens from the loss and enforces `max_turns` / `max_response_tokens`.
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
    multi_turn = False  # True: a MultiTurnEnvironment (reset/step; episodes.py runs it)

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


# ----------------------------------------------------------------------------- multi-turn
@dataclass(frozen=True)
class Step:
    """The environment's answer to one assistant turn.

    `observation`: what follows the turn in the trajectory (tool output, an error message, the
    next user message): token ids, or text the environment's `encode_observation` tokenises; never
    empty unless `done`. `done`: the episode is over (the turn was a final answer); `reward` is
    then the verifier's outcome. `info`: JSON-able counters/notes merged into the sample's
    metadata (e.g. tool errors)."""
    observation: tuple[int, ...] | str = ()
    done: bool = False
    reward: float = 0.0
    info: dict = field(default_factory=dict, compare=False)


class Episode(ABC):
    """One rollout of a multi-turn environment from one prompt (its own state: episodes of a
    request run side by side)."""

    @abstractmethod
    def step(self, turn_ids: list[int], finish_reason: str) -> Step:
        """React to one assistant turn: its tokens (through the token that ended it) and why it
        ended ("stop": a stop id or a turn-end id such as a tool-call end; "length": the turn
        hit rollout.max_new_tokens). Must not raise on garbage: a malformed turn is an error
        observation (or the end of the episode)."""


class MultiTurnEnvironment(Environment):
    """An environment whose responses are several assistant turns with environment (tool)
    tokens between them. Every id in `turn_end_ids` ends an assistant turn without ending the
    episode's response (e.g. a tool-call end token); `special.stop_ids` still end it (eos)."""

    multi_turn = True
    turn_end_ids: tuple[int, ...] = ()
    max_turns: int = 4
    max_response_tokens: int = 256

    @abstractmethod
    def reset(self, prompt: EnvPrompt) -> Episode:
        """A new episode on `prompt` (the prompt's tokens are the trajectory's start)."""

    @abstractmethod
    def encode_observation(self, text: str) -> tuple[int, ...]:
        """Observation text as token ids (tokenised alone: earlier turns are never touched)."""
