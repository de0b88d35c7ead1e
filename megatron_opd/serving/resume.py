"""Generation that goes on through weight updates, whatever `weight_sync.pause_mode` the
publisher pauses the rollout servers with (megatron_opd/weight_sync.py).

- retract: the server frees the running requests' KV cache, and after the update recomputes it
  with the new weights and goes on; `meta_info.weight_versions` spans give every token its
  version. Nothing to do here.
- abort: running requests come back with what they generated so far (finish_reason "abort").
  Such a response is re-queued: prompt + partial output in, the tokens left of max_new_tokens
  out, and its tokens, log-probs and per-token versions are concatenated, so the earlier tokens
  are never re-sampled. Repeated until it finishes for a real reason (length, stop).
- in_place: running requests keep their KV cache, computed by the old weights, and decode on
  with the new ones. A response whose tokens span more than one version was so decoded, and so
  may be one whose first token is newer than any version the client had seen when it sent the
  request (its prompt may have been prefilled by the old weights: `_stale_kv`):
  `GenerateResult.stale_kv` is set. The rollout servers must run without a prefix cache (the
  publisher checks), or a new request could start from a prefix computed by older weights.

The same continuation, under the interrupt gate of `correction.proximal=interrupt`:
`interrupt_sync.generate_continuing`.
"""

from __future__ import annotations

import numpy as np

from megatron_opd.serving.sglang_client import GenerateResult, SGLangError

PAUSE_MODES = ("abort", "retract", "in_place")


def merge_partial(first: GenerateResult, more: GenerateResult) -> GenerateResult:
    """`first`'s partial output followed by `more`, generated from prompt + first.output_ids.
    Routed experts (when both carry them, with the same start): `first`'s rows for the positions
    it covers, then the continuation's rows for the positions after them (the earlier positions
    keep the routing they were generated with)."""
    routed = None
    if first.routed_experts is not None and more.routed_experts is not None:
        if first.routed_experts_start != more.routed_experts_start:
            raise SGLangError("continuation: routed experts start at another position")
        routed = np.concatenate([first.routed_experts,
                                 more.routed_experts[len(first.routed_experts):]])
    return GenerateResult(
        output_ids=list(first.output_ids) + list(more.output_ids),
        output_logprobs=np.concatenate([first.output_logprobs, more.output_logprobs]),
        token_versions=np.concatenate([first.token_versions, more.token_versions]),
        weight_version=more.weight_version, finish_reason=more.finish_reason,
        routed_experts=routed, routed_experts_start=more.routed_experts_start,
        meta_info=more.meta_info, stale_kv=first.stale_kv or more.stale_kv)


def _user_abort(res: GenerateResult) -> bool:
    """Aborted by a pause or abort_request (no status code), not refused by the server."""
    reason = res.meta_info.get("finish_reason") or {}
    if res.finish_reason != "abort":
        return False
    if reason.get("status_code") is not None:
        raise SGLangError(f"generation failed on the server: {reason.get('message')} "
                          f"(status {reason.get('status_code')})")
    return True


def _stale_kv(res: GenerateResult, seen: int) -> bool:
    """Under in_place: may this call's tokens sit on KV of older weights? Yes when its tokens
    span versions, and also when its first token is newer than every version the client had
    seen when it sent the call: the prompt may then have been prefilled by the older weights
    before the update paused the server, its first token sampled (and tagged) after it
    (measured: SGLang's overlapped scheduler tags such tokens with the new version, their
    log-probs off by up to 0.2 nats; tests/test_fleet_pause_modes.py). A call sent after an
    answer of version v met no update to v mid-prefill: every server was paused for that update
    before any finished it, and a paused server holds new requests. Conservative: it may also
    flag a response whose prompt was prefilled after the update."""
    versions = res.token_versions.tolist()
    return len(set(versions)) > 1 or bool(versions) and versions[0] > seen


def generate_through_updates(client, input_ids: list[list[int]],
                             sampling_params: dict | list[dict], *, pause_mode: str,
                             return_routed_experts: bool = False,
                             routed_experts_shape=None) -> list[GenerateResult]:
    """`client.generate` for responses that may meet weight updates made with `pause_mode`
    (weight_sync.pause_mode). One result per prompt, each finished for a real reason (never
    "abort"), with per-token versions; under in_place, `stale_kv` marks the responses decoded
    partly on KV of older weights. A response aborted without an error is continued in every
    mode (interrupt sync aborts too); one the server refused (abort with a status code) raises.
    See the module docstring."""
    if pause_mode not in PAUSE_MODES:
        raise ValueError(f"weight_sync.pause_mode: {pause_mode!r} is not one of {PAUSE_MODES}")
    n = len(input_ids)
    params = [dict(sampling_params)] * n if isinstance(sampling_params, dict) else \
        [dict(p) for p in sampling_params]
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling-params dicts for {n} prompts")
    limits = [int(p["max_new_tokens"]) for p in params]
    kw = dict(return_logprob=True, return_routed_experts=return_routed_experts,
              routed_experts_shape=routed_experts_shape)
    results: list[GenerateResult | None] = [None] * n
    todo = list(range(n))
    while todo:
        done = [len(results[i].output_ids) if results[i] else 0 for i in todo]
        # the newest version any answer of this client carried before this call: an update to a
        # newer one cannot have finished on any server before the call (see _stale_kv)
        seen = getattr(client, "newest_version_seen", 0)
        out = client.generate([list(input_ids[i]) + (list(results[i].output_ids) if results[i]
                                                     else []) for i in todo],
                              [{**params[i], "max_new_tokens": limits[i] - d}
                               for i, d in zip(todo, done)], **kw)
        again = []
        for i, res in zip(todo, out):
            # in_place: one call's tokens of several versions were decoded on stale KV (a
            # continuation starts from a fresh prefill: versions across calls are not)
            res.stale_kv = pause_mode == "in_place" and _stale_kv(res, seen)
            client.newest_version_seen = max(getattr(client, "newest_version_seen", 0),
                                             res.weight_version)
            results[i] = res if results[i] is None else merge_partial(results[i], res)
            if not _user_abort(res):
                continue
            # re-queued in every mode: besides the abort-mode pause, interrupt sync aborts too
            if len(results[i].output_ids) < limits[i]:
                again.append(i)  # re-queued: continued from its partial output
            else:  # aborted right after its last token: complete by length
                results[i].finish_reason = "length"
        todo = again
    return results
