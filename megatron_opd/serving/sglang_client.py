"""HTTP client for SGLang's native API: generation, teacher scoring and weight-update control."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np
import requests


class SGLangError(RuntimeError):
    pass


@dataclass
class GenerateResult:
    output_ids: list[int]
    output_logprobs: np.ndarray  # float32 [T]: log-prob of each sampled token under the sampler
    token_versions: np.ndarray  # int64 [T]: policy version that produced each output token
    weight_version: int  # version when the request finished
    finish_reason: str
    routed_experts: np.ndarray | None = None  # int32 [prompt+T-1, layers, top_k]
    meta_info: dict = field(default_factory=dict, repr=False)


@dataclass
class ScoreResult:
    logprobs: np.ndarray  # float32 [n]: log q(token_j | tokens_<j) for positions j >= start
    topk_ids: np.ndarray  # int32 [n, K]: teacher's top-K ids at those positions (K may be 0)
    topk_logprobs: np.ndarray  # float32 [n, K]


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


class SGLangClient:
    def __init__(self, url: str, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()

    def _post(self, path: str, payload: dict | None = None, timeout: float | None = None):
        try:
            r = self._session.post(f"{self.url}/{path}", json=payload if payload is not None else {},
                                   timeout=timeout or self.timeout)
        except requests.RequestException as e:
            raise SGLangError(f"{self.url}/{path}: {e}") from e
        if r.status_code != 200:
            raise SGLangError(f"{self.url}/{path}: HTTP {r.status_code}: {r.text[:2000]}")
        return r.json() if r.content else None

    def _get(self, path: str):
        try:
            r = self._session.get(f"{self.url}/{path}", timeout=self.timeout)
        except requests.RequestException as e:
            raise SGLangError(f"{self.url}/{path}: {e}") from e
        if r.status_code != 200:
            raise SGLangError(f"{self.url}/{path}: HTTP {r.status_code}: {r.text[:2000]}")
        return r.json()

    # ------------------------------------------------------------------ generation / scoring
    def generate(self, input_ids: list[list[int]], sampling_params: dict, *,
                 return_logprob: bool = True, return_routed_experts: bool = False,
                 rid: list[str] | None = None) -> list[GenerateResult]:
        payload = {"input_ids": input_ids, "sampling_params": sampling_params,
                   "return_logprob": return_logprob}
        if return_routed_experts:
            payload["return_routed_experts"] = True
        if rid is not None:
            payload["rid"] = rid
        out = self._post("generate", payload)
        if isinstance(out, dict):
            out = [out]
        if len(out) != len(input_ids):
            raise SGLangError(f"{self.url}/generate: {len(out)} results for {len(input_ids)} prompts")
        return [self._parse_generate(r, return_logprob) for r in out]

    @staticmethod
    def _parse_generate(r: dict, return_logprob: bool) -> GenerateResult:
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
            routed = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype=np.int32)
        return GenerateResult(
            output_ids=ids, output_logprobs=logprobs,
            token_versions=token_versions_from_meta(meta, len(ids)),
            weight_version=int(meta["weight_version"]),
            finish_reason=(meta.get("finish_reason") or {}).get("type", ""),
            routed_experts=routed, meta_info=meta)

    def score(self, input_ids: list[list[int]], *, start: list[int], top_k: int = 0) -> list[ScoreResult]:
        """Teacher scoring of given sequences (no generation): log-prob of every token at
        positions >= start[i], and the top-K distribution at those positions."""
        if len(start) != len(input_ids) or any(not 1 <= s < len(x) for s, x in zip(start, input_ids)):
            raise ValueError("score: need 1 <= start[i] < len(input_ids[i]) for every sequence")
        # logprob_start_len = s - 1: SGLang then reports positions s-1.., whose first entry has
        # no log-prob of its own (it conditions nothing); entry j+1 is log q(x_{s+j} | x_<s+j).
        payload = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                   "return_logprob": True, "logprob_start_len": [s - 1 for s in start],
                   "top_logprobs_num": top_k}
        out = self._post("generate", payload)
        if isinstance(out, dict):
            out = [out]
        results = []
        for r, x, s in zip(out, input_ids, start):
            meta = r["meta_info"]
            entries = meta["input_token_logprobs"][1:]
            n = len(x) - s
            # SGLang 0.5.23 reports the id of the last vocabulary entry as 0 in
            # input_token_logprobs (a clip meant for multimodal hashes); the value is right.
            if len(entries) != n or any(e[1] != t and e[1] != 0 for e, t in zip(entries, x[s:])):
                raise SGLangError(f"score: expected {n} log-probs for tokens {x[s:]}, got "
                                  f"{[e[1] for e in entries]}")
            lp = np.asarray([e[0] for e in entries], dtype=np.float32)
            if top_k:
                tops = meta["input_top_logprobs"][1:]
                ids = np.asarray([[t[1] for t in row] for row in tops], dtype=np.int32)
                tlp = np.asarray([[t[0] for t in row] for row in tops], dtype=np.float32)
            else:
                ids = np.zeros((n, 0), dtype=np.int32)
                tlp = np.zeros((n, 0), dtype=np.float32)
            results.append(ScoreResult(lp, ids.reshape(n, top_k), tlp.reshape(n, top_k)))
        return results

    # ------------------------------------------------------------------ control
    def health(self) -> bool:
        try:
            return self._session.get(f"{self.url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

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

    def continue_generation(self) -> None:
        self._post("continue_generation", {})

    def flush_cache(self) -> None:
        self._post("flush_cache", {})

    def _check(self, out, what: str) -> None:
        if isinstance(out, dict) and out.get("success") is False:
            raise SGLangError(f"{self.url}/{what}: {out.get('message')}")
