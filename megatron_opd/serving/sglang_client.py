"""HTTP client for SGLang's native API: generation, teacher scoring and weight-update control.

Server faults (docs/fault-tolerance.md): with `retry_timeout_s > 0`, `generate` and `score` that
fail because a server is down or (re)starting (connection refused/reset, timeout, HTTP 5xx) are
re-issued whole (a generation is not resumable), first on the other URLs of the fleet, then with
backoff until one answers or the deadline passes. Control calls (weight updates) never retry:
the weight publisher handles a restarted server itself (megatron_opd/weight_sync.py).
"""

from __future__ import annotations

import base64
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import requests


class SGLangError(RuntimeError):
    pass


class ServerUnavailable(SGLangError):
    """The server did not answer: connection refused/reset, timeout, or HTTP 5xx (it may be
    dead, restarting or starting). Requests that failed this way may be re-issued whole."""


@dataclass
class GenerateResult:
    output_ids: list[int]
    output_logprobs: np.ndarray  # float32 [T]: log-prob of each sampled token under the sampler
    token_versions: np.ndarray  # int64 [T]: policy version that produced each output token
    weight_version: int  # version when the request finished
    finish_reason: str
    # int32 [P + T - 1 - routed_experts_start, layers, top_k]; see decode_routed_experts
    routed_experts: np.ndarray | None = None
    routed_experts_start: int = 0  # token position of routed_experts[0]
    meta_info: dict = field(default_factory=dict, repr=False)
    # Under weight_sync.pause_mode=in_place: some tokens were decoded on a KV cache that older
    # weights computed (the response spans versions: serving/resume.py sets it). False otherwise.
    stale_kv: bool = False


@dataclass
class ScoreResult:
    logprobs: np.ndarray  # float32 [n]: log q(token_j | tokens_<j) for positions j >= start
    topk_ids: np.ndarray  # int32 [n, K]: teacher's top-K ids at those positions (K may be 0)
    topk_logprobs: np.ndarray  # float32 [n, K]
    # [n, d]: the teacher's final hidden state at the position predicting each scored token
    # (score(hidden=...)): uint16 bfloat16 bits or float32; None when not asked for
    hidden: np.ndarray | None = None
    http_bytes: float = 0.0  # this sequence's share of the scoring response body (by tokens)


HIDDEN_DTYPES = {"bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}


def decode_hidden_states(item, dtype: str) -> np.ndarray:
    """One forward's hidden states from SGLang's `meta_info.hidden_states` as a 2-D array of
    `dtype` ("bfloat16": uint16 bit patterns, "float32"): a frame of our servers' compat patch
    ({"dtype", "shape", "b64"}: compat/sglang_cpu.patch_hidden_states_as_frames) or upstream's
    JSON float lists."""
    from megatron_opd.sample_fields import float32_to_bf16_bits

    if isinstance(item, dict):
        if set(item) != {"dtype", "shape", "b64"} or item["dtype"] not in HIDDEN_DTYPES:
            raise SGLangError(f"hidden states frame with keys {sorted(item)} / dtype "
                              f"{item.get('dtype')!r}")
        got = HIDDEN_DTYPES[item["dtype"]]
        arr = np.frombuffer(base64.b64decode(item["b64"]), dtype=got)
        shape = [int(x) for x in item["shape"]]
        if arr.size != int(np.prod(shape)):
            raise SGLangError(f"hidden states frame: {arr.size} values for shape {shape}")
        arr = arr.reshape(shape)
    else:
        arr = np.asarray(item, dtype=np.float32)
    arr = arr.reshape(-1, arr.shape[-1]) if arr.ndim != 2 else arr
    if dtype == "bfloat16" and arr.dtype != np.uint16:
        return float32_to_bf16_bits(arr)
    if dtype == "float32" and arr.dtype == np.uint16:
        raise SGLangError("asked for float32 hidden states, the server sent bfloat16")
    return arr


def token_versions_from_meta(meta: dict, num_tokens: int) -> np.ndarray:
    """Per-output-token version from SGLang's `weight_versions` spans ([{version, start, end}]
    over output positions); without spans every token has `weight_version`."""
    out = np.full(num_tokens, -1, dtype=np.int64)
    spans = meta.get("weight_versions") or []
    for span in spans:
        out[int(span["start"]):int(span["end"])] = int(span["version"])
    if not spans or (out < 0).any():
        missing = out < 0
        if spans and missing.any() and not missing.all():
            raise SGLangError(f"weight_versions spans do not cover {num_tokens} tokens: {spans}")
        out[missing] = int(meta["weight_version"])
    return out


def decode_routed_experts(b64: str, num_rows: int, shape: tuple[int, int]) -> np.ndarray:
    """SGLang's `meta_info.routed_experts` (base64 of a flat int32 buffer) as int32
    [num_rows, num_moe_layers, top_k]: the expert ids the router chose (top-k order as SGLang
    keeps it; compare as sets), layers in model order.

    Rows (sglang 0.5.23, verified against transformers in tests/test_routed_experts.py): for a
    request with prompt length P, T generated tokens (through the stop token) and
    `routed_experts_start_len` S, row i holds the experts of the token at position S + i of
    prompt+output, for positions S .. P + T - 2: num_rows = P + T - 1 - S (>= 0). Position p's routing
    is that of the forward pass that *consumed* token p (which predicted token p + 1), so the last
    generated token, never fed back, has none; with max_new_tokens=0 the last prompt token has
    none either. Rows served from the prefix cache repeat the routing of the request that
    computed them."""
    layers, top_k = (int(x) for x in shape)
    flat = np.frombuffer(base64.b64decode(b64), dtype=np.int32)
    if flat.size != num_rows * layers * top_k:
        raise SGLangError(f"routed_experts: {flat.size} ids, expected {num_rows} positions x "
                          f"{layers} layers x top-{top_k} = {num_rows * layers * top_k}")
    return flat.reshape(num_rows, layers, top_k).copy()


def _raise_for(url: str, r) -> None:
    if r.status_code >= 500:
        raise ServerUnavailable(f"{url}: HTTP {r.status_code}: {r.text[:2000]}")
    if r.status_code != 200:
        raise SGLangError(f"{url}: HTTP {r.status_code}: {r.text[:2000]}")


class SGLangClient:
    """One server (`url`), or a fleet of interchangeable servers (`url` plus `fallback_urls`):
    control calls go to `url`; generation and scoring requests take the fleet's servers in turn
    (round robin: the client is the fleet's router) and move to the next server when one is
    unavailable (see the module docstring)."""

    def __init__(self, url: str, timeout: float = 120.0,
                 routed_experts_shape: tuple[int, int] | None = None, *,
                 fallback_urls: tuple[str, ...] | list[str] = (), retry_timeout_s: float = 0.0):
        self.url = url.rstrip("/")
        self.urls = [self.url] + [u.rstrip("/") for u in fallback_urls if u.rstrip("/") != self.url]
        self.timeout = timeout
        # (num_moe_layers, top_k) of the served model: SGLang sends a flat buffer without shape
        self.routed_experts_shape = routed_experts_shape
        self.retry_timeout_s = retry_timeout_s  # 0: no retries (errors raise at once)
        self.retries = 0  # requests re-issued after a server fault (all calls of this client)
        self._turn = itertools.count()  # round robin over the fleet (next() is atomic)
        self._session = requests.Session()
        self._last = threading.local()  # body size of this thread's latest response
    def _post(self, path: str, payload: dict | None = None, timeout: float | None = None,
              url: str | None = None, json_answer: bool = True):
        """POST `payload`; the answer parsed as JSON (None if empty; with json_answer=False
        always None: a route that answers in plain text)."""
        url = url or self.url
        try:
            r = self._session.post(f"{url}/{path}", json=payload if payload is not None else {},
                                   timeout=timeout or self.timeout)
        except requests.RequestException as e:
            raise ServerUnavailable(f"{url}/{path}: {e}") from e
        _raise_for(f"{url}/{path}", r)
        self._last.response_bytes = len(r.content)
        return r.json() if r.content and json_answer else None

    def _get(self, path: str, url: str | None = None, timeout: float | None = None):
        url = url or self.url
        try:
            r = self._session.get(f"{url}/{path}", timeout=timeout or self.timeout)
        except requests.RequestException as e:
            raise ServerUnavailable(f"{url}/{path}: {e}") from e
        _raise_for(f"{url}/{path}", r)
        return r.json()

    def _post_retrying(self, path: str, payload: dict, check: Callable | None = None):
        """POST to the fleet; on ServerUnavailable re-issue the whole request (next URL first,
        then backoff) until `retry_timeout_s` has passed since the first failure. `check`
        validates an answer (its exception is not retried): the caller gets one complete answer
        from one server. Returns (answer, url)."""
        deadline, delay, attempt = None, 0.25, 0
        first = next(self._turn)
        while True:
            url = self.urls[(first + attempt) % len(self.urls)]
            try:
                out = self._post(path, payload, url=url)
                return (check(out) if check else out), url
            except ServerUnavailable as e:
                if self.retry_timeout_s <= 0:
                    raise
                now = time.time()
                deadline = deadline or now + self.retry_timeout_s
                if now >= deadline:
                    raise ServerUnavailable(f"{e} (still failing after retrying for "
                                            f"{self.retry_timeout_s:.0f} s)") from e
                attempt += 1
                self.retries += 1
                if attempt % len(self.urls) == 0:  # every server of the fleet failed: back off
                    time.sleep(min(delay, max(0.0, deadline - now)))
                    delay = min(2 * delay, 5.0)

    def wait_ready(self, timeout: float, url: str | None = None) -> None:
        """Block until the server answers a generation (GET /health_generate: 503 while it
        starts); raise ServerUnavailable after `timeout` seconds."""
        url = url or self.url
        deadline = time.time() + timeout
        while True:
            try:
                if self._session.get(f"{url}/health_generate", timeout=10).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.time() >= deadline:
                raise ServerUnavailable(f"{url} not ready after {timeout:.0f} s")
            time.sleep(0.5)

    # ------------------------------------------------------------------ generation / scoring
    def generate(self, input_ids: list[list[int]], sampling_params: dict | list[dict], *,
                 return_logprob: bool = True, return_routed_experts: bool = False,
                 rid: list[str] | None = None,
                 routed_experts_shape: tuple[int, int] | None = None,
                 routed_experts_start_len: int = 0) -> list[GenerateResult]:
        """`return_routed_experts` needs a server started with --enable-return-routed-experts
        and the model's (num_moe_layers, top_k), here or in the constructor; the rows then cover
        positions routed_experts_start_len .. P+T-2 (one start for the whole batch, <= every
        prompt length; see decode_routed_experts)."""
        payload = {"input_ids": input_ids, "sampling_params": sampling_params,
                   "return_logprob": return_logprob}
        shape = routed_experts_shape or self.routed_experts_shape
        if return_routed_experts:
            if shape is None:
                raise ValueError("return_routed_experts needs routed_experts_shape="
                                 "(num_moe_layers, top_k), in generate() or SGLangClient(...)")
            if not 0 <= routed_experts_start_len <= min(len(x) for x in input_ids):
                raise ValueError(f"routed_experts_start_len={routed_experts_start_len} must be in "
                                 "[0, shortest prompt length]")
            payload["return_routed_experts"] = True
            payload["routed_experts_start_len"] = int(routed_experts_start_len)
        if rid is not None:
            payload["rid"] = rid

        def parse(out):
            if isinstance(out, dict):
                out = [out]
            if len(out) != len(input_ids):
                raise SGLangError(f"generate: {len(out)} results for {len(input_ids)} prompts")
            return [self._parse_generate(r, return_logprob, shape, routed_experts_start_len)
                    for r in out]

        return self._post_retrying("generate", payload, parse)[0]

    @staticmethod
    def _parse_generate(r: dict, return_logprob: bool,
                        routed_experts_shape: tuple[int, int] | None = None,
                        routed_experts_start: int = 0) -> GenerateResult:
        meta = r["meta_info"]
        ids = list(r["output_ids"])
        if return_logprob:
            lps = meta["output_token_logprobs"]
            if [e[1] for e in lps] != ids:
                raise SGLangError("output_token_logprobs do not match output_ids")
            logprobs = np.asarray([e[0] for e in lps], dtype=np.float32)
        else:
            logprobs = np.zeros(0, dtype=np.float32)
        routed = None
        if meta.get("routed_experts") is not None:
            if routed_experts_shape is None:
                raise SGLangError("routed_experts returned but routed_experts_shape is unknown")
            rows = max(0, int(meta["prompt_tokens"]) + len(ids) - 1 - routed_experts_start)
            routed = decode_routed_experts(meta["routed_experts"], rows, routed_experts_shape)
        return GenerateResult(
            output_ids=ids, output_logprobs=logprobs,
            token_versions=token_versions_from_meta(meta, len(ids)),
            weight_version=int(meta["weight_version"]),
            finish_reason=(meta.get("finish_reason") or {}).get("type", ""),
            routed_experts=routed, routed_experts_start=routed_experts_start, meta_info=meta)

    def score(self, input_ids: list[list[int]], *, start: list[int], top_k: int = 0,
              temperature: float = 1.0, hidden: str | None = None) -> list[ScoreResult]:
        """Teacher scoring of given sequences (no generation): log-prob of every token at
        positions >= start[i], and the top-K distribution at those positions, at `temperature`
        (teacher.temperature; the caller carries it on the sample, so it is never implied).
        SGLang 0.5.23 alone scores prompt tokens from the raw logits whatever the request's
        temperature; our servers carry the compat patch that applies it
        (compat/sglang_cpu.patch_input_logprobs_at_request_temperature), and
        serving/teachers.TeacherRouter.verify_temperature measures what a server applies.

        `hidden` ("bfloat16" / "float32"; teacher.signal=hidden): also the teacher's final hidden
        state at each scored position (the row whose logits give the log-prob), from a server
        started with --enable-return-hidden-states. SGLang returns none with max_new_tokens 0;
        with 1 its first list is the prefill's, one row per position it computed (from the end
        of the cached prefix, which stops at logprob_start_len), so such a request generates one
        token that is ignored (docs/teachers.md)."""
        if len(start) != len(input_ids) or any(not 1 <= s < len(x) for s, x in zip(start, input_ids)):
            raise ValueError("score: need 1 <= start[i] < len(input_ids[i]) for every sequence")
        if not temperature > 0:
            raise ValueError(f"score: temperature must be > 0, got {temperature}")
        # logprob_start_len = m: SGLang then reports positions m.., whose first entry has no
        # log-prob of its own (it conditions nothing); entry p - m is log q(x_p | x_<p). One
        # number for the batch (the shortest start): smg's /generate refuses a per-sequence list.
        m = min(start) - 1
        if hidden is not None and hidden not in HIDDEN_DTYPES:
            raise ValueError(f"score: hidden must be one of {list(HIDDEN_DTYPES)}, got {hidden!r}")
        payload = {"input_ids": input_ids,
                   "sampling_params": {"max_new_tokens": 0 if hidden is None else 1,
                                       "temperature": temperature},
                   "return_logprob": True, "logprob_start_len": m, "top_logprobs_num": top_k}
        if hidden is not None:
            payload["return_hidden_states"] = True
        out = self._post_retrying("generate", payload)[0]
        body = getattr(self._last, "response_bytes", 0)
        if isinstance(out, dict):
            out = [out]
        scored = sum(len(x) - s for x, s in zip(input_ids, start))
        results = []
        for r, x, s in zip(out, input_ids, start):
            meta = r["meta_info"]
            entries = meta["input_token_logprobs"][s - m:]
            n = len(x) - s
            # SGLang 0.5.23 reports the id of the last vocabulary entry as 0 in
            # input_token_logprobs (a clip meant for multimodal hashes); the value is right.
            if len(entries) != n or any(e[1] != t and e[1] != 0 for e, t in zip(entries, x[s:])):
                raise SGLangError(f"score: expected {n} log-probs for tokens {x[s:]}, got "
                                  f"{[e[1] for e in entries]}")
            lp = np.asarray([e[0] for e in entries], dtype=np.float32)
            if top_k:
                tops = meta["input_top_logprobs"][s - m:]
                ids = np.asarray([[t[1] for t in row] for row in tops], dtype=np.int32)
                tlp = np.asarray([[t[0] for t in row] for row in tops], dtype=np.float32)
            else:
                ids = np.zeros((n, 0), dtype=np.int32)
                tlp = np.zeros((n, 0), dtype=np.float32)
            rows = self._hidden_rows(meta, x, s, hidden) if hidden is not None else None
            results.append(ScoreResult(lp, ids.reshape(n, top_k), tlp.reshape(n, top_k),
                                       hidden=rows, http_bytes=body * n / scored))
        return results

    @staticmethod
    def _hidden_rows(meta: dict, x: list[int], s: int, dtype: str) -> np.ndarray:
        """[len(x) - s, d]: the prefill's hidden states at positions s-1 .. len(x)-2 (position p
        predicts token p+1). The prefill's rows are the last positions of the input (those after
        the cached prefix)."""
        states = meta.get("hidden_states")
        if not states:
            raise SGLangError("score: no hidden_states in the answer: start the teacher server "
                              "with --enable-return-hidden-states")
        rows = decode_hidden_states(states[0], dtype)
        first = len(x) - rows.shape[0]  # position of the first row
        cached = meta.get("cached_tokens")
        if cached is not None and int(cached) != first:  # e.g. a chunked prefill: rows missing
            raise SGLangError(f"score: {rows.shape[0]} hidden-state rows for {len(x)} tokens of "
                              f"which {cached} were cached: the prefill's rows are incomplete")
        if first > s - 1 or first < 0:
            raise SGLangError(f"score: {rows.shape[0]} hidden-state rows for {len(x)} tokens do "
                              f"not cover the scored positions {s - 1}..{len(x) - 2}")
        return np.ascontiguousarray(rows[s - 1 - first:len(x) - 1 - first])

    # ------------------------------------------------------------------ control
    def health(self) -> bool:
        try:
            return self._session.get(f"{self.url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def server_info(self) -> dict:
        """The server's arguments and state (GET /server_info)."""
        return self._get("server_info")

    def weight_version(self) -> str:
        return str(self._get("model_info")["weight_version"])

    def begin_weight_update(self) -> None:
        self._check(self._post("begin_weight_update", {"selector": "all"}), "begin_weight_update")

    def end_weight_update(self) -> None:
        self._check(self._post("end_weight_update", {}), "end_weight_update")

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str) -> None:
        self._check(self._post("init_weights_update_group", {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size, "group_name": group_name,
            "backend": backend}), "init_weights_update_group")

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._check(self._post("destroy_weights_update_group", {"group_name": group_name}),
                    "destroy_weights_update_group")

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str],
                                        shapes: list[list[int]], group_name: str,
                                        weight_version: str | None, flush_cache: bool = True) -> None:
        self._check(self._post("update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "flush_cache": flush_cache, "weight_version": weight_version}),
            "update_weights_from_distributed")

    def update_weights_from_disk(self, model_path: str, weight_version: str | None,
                                 flush_cache: bool = True) -> None:
        self._check(self._post("update_weights_from_disk", {
            "model_path": model_path, "weight_version": weight_version,
            "flush_cache": flush_cache}), "update_weights_from_disk")

    def pause_generation(self, mode: str = "retract") -> None:
        self._post("pause_generation", {"mode": mode})

    def abort_all(self) -> None:
        """Abort every request (running ones return their partial output, finish_reason abort)."""
        self._post("abort_request", {"abort_all": True})

    def continue_generation(self) -> None:
        self._post("continue_generation", {})

    def flush_cache(self) -> None:
        """Drop the server's prefix cache (refused, HTTP 400, while requests run). SGLang answers
        in plain text, not JSON: only the status is read."""
        self._post("flush_cache", {}, json_answer=False)

    def _check(self, out, what: str) -> None:
        if isinstance(out, dict) and out.get("success") is False:
            raise SGLangError(f"{self.url}/{what}: {out.get('message')}")


def fleet_client(urls: list[str], server_cfg, **kwargs) -> SGLangClient:
    """The client a run's processes use for one role (rollout or teacher): the first URL for
    control calls, every URL for generation and scoring, which are retried after a server fault
    for up to `server.start_timeout_s + server.request_timeout_s` (time for a restart)."""
    return SGLangClient(urls[0], timeout=server_cfg.request_timeout_s, fallback_urls=urls[1:],
                        retry_timeout_s=server_cfg.start_timeout_s + server_cfg.request_timeout_s,
                        **kwargs)
