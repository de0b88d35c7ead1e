"""Interrupt sync, the orchestrator's half (`correction.proximal=interrupt`; ALGORITHMS.md §6,
docs/off-policy.md). The learner's half is `learner/interrupt.py`.

Before the learner replaces the fleet's weights (version v), it sends `Interrupt(seq, v)`. Here:
1. the gate closes: no worker starts a new /generate call;
2. every rollout server aborts what runs (running requests return what they generated so far,
   finish_reason "abort") and is paused in `abort` mode (requests arriving later are held);
3. once those calls are back, every response generated and not yet sent to the learner (partial,
   being scored by the teacher, or waiting to be sent) goes to the learner in one
   `PartialRollouts`; the learner scores their tokens of version v with the weights of v, which it
   still holds, and keeps log pi_old per sample id until the finished sample arrives;
4. the next `WeightsPublished` reopens the gate (and resumes the servers); aborted requests
   continue from their partial output (prompt + partial in, the rest out), so a response may
   span versions, and its per-token versions say which.

Invariants:
- A row is registered (under the gate's lock) before its generate call is counted as returned,
  and removed only once its sample was handed to the sample channel; so after step 3's wait
  every token of version v that the learner has not received is in the answer, except in calls
  still running when the grace period ends, which are counted (`late_calls`): calls that reached
  a paused server are held there with no tokens, so the grace only guards against slow replies.
- A continued response is the exact token sequence: earlier tokens are never re-sampled or
  re-tokenised; each continuation asks for the tokens left of `max_new_tokens`.
- Multi-turn episodes (megatron_opd/episodes.py): a row is the whole episode so far (prompt,
  earlier turns, tool tokens, this turn), never one turn, so the learner scores the sample's own
  response positions; between turns the row of the last call stays registered.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from megatron_opd.serving.resume import merge_partial
from megatron_opd.serving.sglang_client import GenerateResult, SGLangError


class InterruptGate:
    """Shared by the generation workers and the orchestrator's main thread."""

    def __init__(self):
        self._cv = threading.Condition()
        self.closed = False
        self.stopped = False
        self.inflight = 0  # generate calls running
        # sample id -> (prompt ids, response ids so far, their versions): generated, not sent
        self.rows: dict[str, tuple[list[int], list[int], np.ndarray]] = {}
        self.stats = {"interrupts": 0, "late_calls": 0, "continued_requests": 0,
                      "server_errors": 0}

    def begin_generate(self) -> bool:
        """Wait while an interrupt is on; False once stopped."""
        with self._cv:
            while self.closed and not self.stopped:
                self._cv.wait(timeout=0.5)
            if self.stopped:
                return False
            self.inflight += 1
            return True

    def end_generate(self, rows: dict) -> None:
        with self._cv:
            self.rows.update(rows)
            self.inflight -= 1
            self._cv.notify_all()

    def sent(self, sample_id: str) -> None:
        with self._cv:
            self.rows.pop(sample_id, None)

    def interrupt(self, servers, grace_s: float) -> list[tuple]:
        """Close; abort what runs on every server and wait briefly for those calls; pause the
        servers in abort mode (new requests are held; this also aborts a request that arrived
        in between); wait for the running calls (up to grace_s); return the rows to send.

        Why abort before the pause: SGLang's abort-mode pause re-checks for running requests
        once a second, so pausing while requests run costs a whole second; after the abort it
        finds none and returns at once."""
        with self._cv:
            self.closed = True
            self.stats["interrupts"] += 1
        self.each(servers, lambda c: c.abort_all())
        self.wait_idle(0.5)
        self.each(servers, lambda c: c.pause_generation("abort"))
        self.wait_idle(grace_s)
        with self._cv:
            self.stats["late_calls"] += self.inflight
            return [(k, p, r, v) for k, (p, r, v) in self.rows.items()]

    def each(self, servers, call) -> None:
        """`call(server)` on every server; one that is down (being restarted: its requests are
        re-issued by the client) is counted, not fatal."""
        for c in servers:
            try:
                call(c)
            except SGLangError as e:
                self.stats["server_errors"] += 1
                print(f"[orchestrator] interrupt sync: {e}", flush=True)

    def wait_idle(self, timeout_s: float) -> bool:
        """Until no generate call runs (True) or timeout_s passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self.inflight and time.monotonic() < deadline:
                self._cv.wait(timeout=max(0.0, deadline - time.monotonic()))
            return not self.inflight

    def reopen(self) -> None:
        with self._cv:
            self.closed = False
            self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self.stopped = True
            self._cv.notify_all()


def generate_continuing(rollout, prompts: list[list[int]], sampling_params: dict | list[dict],
                        keys: list[str], gate: InterruptGate, prefixes: list[tuple] | None = None
                        ) -> list[GenerateResult] | None:
    """One batch of requests that survives interrupts: aborted rows are re-submitted from their
    partial output until each finishes. Every call's rows are registered with the gate. None
    once the gate stopped. `sampling_params`: one dict, or one per prompt.

    `prefixes` (multi-turn, megatron_opd/episodes.py): per prompt, the episode's (prompt ids,
    response so far, its versions); `prompts[i]` is then their concatenation, and the row
    registered is the whole episode so far (its prompt, the response so far plus this turn's
    tokens): the learner scores a sample's response positions, not one turn's."""
    results: list[GenerateResult | None] = [None] * len(prompts)
    todo = list(range(len(prompts)))
    params = [dict(sampling_params)] * len(prompts) if isinstance(sampling_params, dict) \
        else [dict(p) for p in sampling_params]
    limits = [int(p["max_new_tokens"]) for p in params]
    while todo:
        if not gate.begin_generate():
            return None
        rows = {}
        try:
            inputs = [prompts[i] + (list(results[i].output_ids) if results[i] else []) for i in todo]
            call = [{**params[i], "max_new_tokens": limits[i] - (len(results[i].output_ids)
                                                                if results[i] else 0)}
                    for i in todo]
            out = rollout.generate(inputs, call, return_logprob=True)
            for i, res in zip(todo, out):
                results[i] = res if results[i] is None else merge_partial(results[i], res)
                rows[keys[i]] = _row(prompts[i], results[i], prefixes[i] if prefixes else None)
        finally:
            gate.end_generate(rows)
        again = [i for i in todo if results[i].finish_reason == "abort"
                 and len(results[i].output_ids) < limits[i]]
        for i in todo:  # aborted right after its last token: complete by length
            if results[i].finish_reason == "abort" and i not in again:
                results[i].finish_reason = "length"
        gate.stats["continued_requests"] += len(again)
        todo = again
    return results


def _row(prompt: list[int], res: GenerateResult, prefix: tuple | None) -> tuple:
    """The gate's row of one sequence: (prompt ids, response ids so far, their versions)."""
    if prefix is None:
        return (prompt, list(res.output_ids), res.token_versions)
    base, response, versions = prefix
    return (list(base), list(response) + list(res.output_ids),
            np.concatenate([np.asarray(versions, np.int64), res.token_versions]))
