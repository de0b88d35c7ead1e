"""Teacher scoring's HTTP leg (SGLang -> orchestrator), bytes per scored token for each teacher
signal, on real SGLang servers (CPU, a tiny fp32 model): sampled, top-K, and hidden states as
upstream's JSON float lists (the baseline) and as our servers' base64 frames
(compat/sglang_cpu.patch_hidden_states_as_frames, bfloat16 and float32). The hidden-state
figures are also given per hidden value, which is what scales to a real teacher's d.

    .venv/bin/python bench/teacher_http.py [--tokens 48] [--sequences 8]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48, help="tokens per sequence")
    ap.add_argument("--sequences", type=int, default=8)
    args = ap.parse_args()

    from megatron_opd.serving.sglang_client import SGLangClient
    from megatron_opd.serving.sglang_server import SGLangServer, free_port
    from tests.test_sglang_serving import SPEC, save_model

    root = Path(tempfile.mkdtemp(prefix="teacher_http_"))
    model = save_model(root / "teacher", 0)
    servers = {  # hidden_states_dtype only matters with the flag: frames of that dtype
        "frames_bf16": SGLangServer("frames_bf16", str(model), free_port(), str(root / "a.log"),
                                    threads=1, max_total_tokens=4096,
                                    extra_args=("--enable-return-hidden-states",),
                                    hidden_states_dtype="bfloat16"),
        "frames_fp32": SGLangServer("frames_fp32", str(model), free_port(), str(root / "b.log"),
                                    threads=1, max_total_tokens=4096,
                                    extra_args=("--enable-return-hidden-states",),
                                    hidden_states_dtype="float32"),
    }
    json_lists = SGLangServer("json", str(model), free_port(), str(root / "c.log"), threads=1,
                              max_total_tokens=4096, extra_args=("--enable-return-hidden-states",))
    json_lists.environment = _without_frames(json_lists.environment)
    servers["json_lists"] = json_lists
    rng = np.random.default_rng(0)
    seqs = [[1] + rng.integers(3, SPEC.vocab_size, args.tokens - 1).tolist()
            for _ in range(args.sequences)]
    start = [args.tokens // 4] * len(seqs)
    scored = sum(len(x) - s for x, s in zip(seqs, start))
    d, k = SPEC.hidden_size, min(32, SPEC.vocab_size)
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait_ready(300)

        # every figure with the prompts in the prefix cache (as a GRPO group's later members):
        # the prefill's rows then start at logprob_start_len (a cold prompt sends its rows too)
        for name, dtype in (("json_lists", "float32"), ("frames_bf16", "bfloat16"),
                            ("frames_fp32", "float32")):
            SGLangClient(servers[name].url, timeout=120).score(seqs, start=start, hidden=dtype)

        def per_token(name, **kw):
            rs = SGLangClient(servers[name].url, timeout=120).score(seqs, start=start, **kw)
            return sum(r.http_bytes for r in rs) / scored

        out = {"sampled": per_token("json_lists"),
               f"top{k}": per_token("json_lists", top_k=k),
               "hidden_json_lists": per_token("json_lists", hidden="float32"),
               "hidden_frames_bf16": per_token("frames_bf16", hidden="bfloat16"),
               "hidden_frames_fp32": per_token("frames_fp32", hidden="float32")}
    finally:
        for s in servers.values():
            s.stop()
    base = out["sampled"]
    res = {f"http_bytes_per_token_{n}": round(v, 1) for n, v in out.items()}
    for n in ("hidden_json_lists", "hidden_frames_bf16", "hidden_frames_fp32"):
        res[f"http_bytes_per_hidden_value_{n[7:]}"] = round((out[n] - base) / d, 2)
    res["frames_bf16_over_json_lists"] = round(
        (out["hidden_frames_bf16"] - base) / (out["hidden_json_lists"] - base), 3)
    res["frames_fp32_over_json_lists"] = round(
        (out["hidden_frames_fp32"] - base) / (out["hidden_json_lists"] - base), 3)
    res.update(hidden_size=d, top_k=k, scored_tokens=scored, sequences=len(seqs))
    for n, v in out.items():
        print(f"{n:>20}: {v:10.1f} B/token  ({v / base:6.1f}x sampled)")
    print(json.dumps(res))


def _without_frames(environment):
    """The upstream form: the same server without the frames patch (JSON float lists)."""
    from megatron_opd.compat.sglang_cpu import HIDDEN_STATES_ENV

    def env():
        e = environment()
        e.pop(HIDDEN_STATES_ENV, None)
        return e
    return env


if __name__ == "__main__":
    main()
