"""Multi-turn rollouts, token in / token out: episodes of a `MultiTurnEnvironment` run side by
side, one /generate call per assistant turn for all running episodes.

The trajectory is the exact token sequence the model saw and produced. Each turn's `input_ids`
are the prompt followed by every token so far (earlier turns as sampled, observations as the
environment's tokens): nothing is re-tokenised, so turn k's input is a prefix of turn k+1's. A
turn ends on a stop id, on one of the environment's `turn_end_ids` (a tool-call end), or at its
token budget; the environment's `step` then ends the episode or returns an observation, whose
tokens are appended.

The response (every token after the prompt) carries, per token:
- assistant tokens: loss mask 1, the sampler's log-prob and the policy version that sampled it
  (from the server, through continuations across weight updates);
- observation (tool / environment) tokens: loss mask 0, behaviour log-prob 0.0 (the
  environment emits them with certainty: log 1) and the version of the assistant token before
  them (the context they were appended to). So the sample's invariants hold (log-probs <= 0,
  versions non-decreasing) and the learner neither trains them (mask 0) nor counts them as
  stale (its staleness filter and statistics read masked-in tokens only).

An episode ends when the environment says done, after `env.max_turns` turns, or when the next
turn or observation would pass `env.max_response_tokens` (then the observation is not appended:
a trajectory may end with a tool call whose result it never saw; reward 0, `truncated` in the
metadata).

`generate(inputs, params, keys, prefixes)` is passed in: one result per input (list of token
ids), never finished by "abort" (the caller's generate continues aborted requests:
serving/resume.py or interrupt sync), optional `stale_kv` flags; or None once generation stopped
(the run is shutting down). `keys[i]` is the episode's sample id and `prefixes[i]` its (prompt,
response so far, versions so far): interrupt sync registers partial rows under them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from megatron_opd.envs.base import EnvPrompt, MultiTurnEnvironment, Step

ENV_LOGPROB = 0.0  # behaviour log-prob of an environment token: emitted with certainty
MAX_PARALLEL_STEPS = 8  # episodes of one request whose env steps (tool calls) run at once

GenerateFn = Callable[[list[list[int]], list[dict], list[str], list[tuple]], "list | None"]


@dataclass
class Trajectory:
    """One episode; named like GenerateResult's fields where they mean the same."""
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)  # the response: every token after the prompt
    loss_mask: list[int] = field(default_factory=list)  # 1 assistant, 0 environment
    output_logprobs: list[float] = field(default_factory=list)
    token_versions: list[int] = field(default_factory=list)
    turns: list[tuple[int, int]] = field(default_factory=list)  # assistant spans [start, end)
    finish_reason: str = ""  # the last turn's ("stop", "length") or "max_turns" / "max_tokens"
    reward: float = 0.0
    done: bool = False
    stale_kv: bool = False  # some turn was decoded on KV of older weights (pause_mode=in_place)
    info: dict = field(default_factory=dict)  # the environment's last Step.info
    # R3: the experts per input position [P + T - 1, layers, top_k], from the last turn's call
    # (its input is the whole episode before its own tokens: the rollout engine's routing of
    # every position; earlier turns' positions as computed then where its prefix cache kept them)
    routed_experts: np.ndarray | None = None

    def arrays(self):
        """(loss_mask uint8, behaviour log-probs float32, versions int64)"""
        return (np.asarray(self.loss_mask, np.uint8), np.asarray(self.output_logprobs, np.float32),
                np.asarray(self.token_versions, np.int64))

    @property
    def metadata(self) -> dict:
        out = {"turns": len(self.turns), **self.info}
        if self.finish_reason in ("max_turns", "max_tokens"):
            out["truncated"] = self.finish_reason
        if self.stale_kv:
            out["stale_kv"] = True
        return out

    def add_turn(self, res) -> None:
        start = len(self.output_ids)
        self.output_ids += [int(t) for t in res.output_ids]
        self.loss_mask += [1] * len(res.output_ids)
        self.output_logprobs += [float(x) for x in res.output_logprobs]
        self.token_versions += [int(v) for v in res.token_versions]
        self.turns.append((start, len(self.output_ids)))
        self.stale_kv |= bool(getattr(res, "stale_kv", False))
        self.routed_experts = getattr(res, "routed_experts", None)

    def add_observation(self, ids: tuple[int, ...]) -> None:
        version = self.token_versions[-1]  # a turn always comes before
        self.output_ids += list(ids)
        self.loss_mask += [0] * len(ids)
        self.output_logprobs += [ENV_LOGPROB] * len(ids)
        self.token_versions += [version] * len(ids)


def run_episodes(env: MultiTurnEnvironment, prompts: list[EnvPrompt], generate: GenerateFn,
                 sampling_params: dict, keys: list[str] | None = None) -> list[Trajectory] | None:
    """One trajectory per prompt (repeat a prompt for a group), or None when `generate` stopped.
    `sampling_params` as for a single turn: its max_new_tokens bounds each turn, its
    stop_token_ids are extended with the environment's turn-end ids. `keys`: the sample ids."""
    keys = [str(i) for i in range(len(prompts))] if keys is None else list(keys)
    per_turn = int(sampling_params["max_new_tokens"])
    stops = list(dict.fromkeys([*sampling_params.get("stop_token_ids", []),
                                *env.special.stop_ids, *env.turn_end_ids]))
    trajs = [Trajectory(prompt_ids=[int(t) for t in p.token_ids]) for p in prompts]
    episodes = [env.reset(p) for p in prompts]
    active = list(range(len(prompts)))
    while active:
        params, inputs, prefixes = [], [], []
        for i in active:
            t = trajs[i]
            inputs.append(t.prompt_ids + t.output_ids)
            prefixes.append((t.prompt_ids, list(t.output_ids), np.asarray(t.token_versions,
                                                                           np.int64)))
            params.append({**sampling_params, "stop_token_ids": stops,
                           "max_new_tokens": min(per_turn,
                                                 env.max_response_tokens - len(t.output_ids))})
        results = generate(inputs, params, [keys[i] for i in active], prefixes)
        if results is None:
            return None
        if len(results) != len(active):
            raise RuntimeError(f"generate: {len(results)} results for {len(active)} inputs")
        for res in results:
            if res.finish_reason == "abort":
                raise RuntimeError("generate returned an aborted turn: the generate function "
                                   "must continue aborted requests (serving/resume.py)")
            if not res.output_ids:
                raise RuntimeError("generate returned an empty turn")
        # the episodes' tools run side by side (a tool call is a subprocess: up to its timeout)
        with ThreadPoolExecutor(max_workers=min(len(active), MAX_PARALLEL_STEPS)) as pool:
            steps = list(pool.map(lambda a: episodes[a[0]].step(list(a[1].output_ids),
                                                                a[1].finish_reason),
                                  zip(active, results)))
        active = [i for i, res, step in zip(active, results, steps)
                  if _advance(env, trajs[i], res, step)]
    for t in trajs:
        rows = len(t.prompt_ids) + len(t.output_ids) - 1
        if t.routed_experts is not None and len(t.routed_experts) != rows:
            raise RuntimeError(f"routed experts: {len(t.routed_experts)} rows for a trajectory "
                               f"of {rows + 1} tokens (expected {rows})")
    return trajs


def _advance(env: MultiTurnEnvironment, t: Trajectory, res, step: Step) -> bool:
    """Append one turn and the environment's answer to it. True: the episode goes on."""
    t.add_turn(res)
    t.info = dict(step.info)
    if step.done:
        t.done, t.reward, t.finish_reason = True, float(step.reward), res.finish_reason
        return False
    if len(t.turns) >= env.max_turns:
        t.finish_reason = "max_turns"
        return False
    obs = step.observation
    ids = env.encode_observation(obs) if isinstance(obs, str) else tuple(int(x) for x in obs)
    if not ids:
        raise ValueError(f"{env.name}: an empty observation for a turn that did not end the "
                         "episode (Step.observation must hold tokens unless done)")
    # room for the observation and at least one more assistant token
    if len(t.output_ids) + len(ids) >= env.max_response_tokens:
        t.finish_reason = "max_tokens"
        return False
    t.add_observation(ids)
    return True
