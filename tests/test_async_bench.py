"""bench/async_vs_sync.py's pure parts (no timings): the power-law lengths, the expected longest
response of a batch, the designed Markov chain, and the Hugging Face checkpoint made from it,
whose sampled responses (transformers, temperature 1) follow the chain exactly and have the
designed lengths."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from async_vs_sync import (_tokens_in, chain_logits, expected_batch_max,  # noqa: E402
                           length_pmf, make_long_tail_model)


def test_length_pmf_is_the_normalised_power_law():
    p = length_pmf(5, 2.0)
    ref = np.array([1, 1 / 4, 1 / 9, 1 / 16, 1 / 25])
    assert p == pytest.approx(ref / ref.sum(), rel=1e-12)


def test_expected_batch_max_against_enumeration():
    p = np.array([0.5, 0.3, 0.2])  # L = 1, 2, 3
    assert expected_batch_max(p, 1) == pytest.approx(1 * 0.5 + 2 * 0.3 + 3 * 0.2)
    # n = 2: every ordered pair
    ref = sum(p[a] * p[b] * (max(a, b) + 1) for a in range(3) for b in range(3))
    assert expected_batch_max(p, 2) == pytest.approx(ref)


def test_chain_logits_walk_the_countdown():
    pmf = length_pmf(4, 1.0)
    chain, start, eos = [0, 1, 2, 3], 5, 4
    z = chain_logits(6, chain, start, eos, pmf)
    assert [int(np.argmax(z[c])) for c in chain] == [eos, 0, 1, 2]
    first = np.exp(z[start] - z[start].max())
    first /= first.sum()
    assert first[chain] == pytest.approx(pmf, rel=1e-9)  # c_L with probability p(L)
    with pytest.raises(ValueError):
        chain_logits(6, chain, 3, eos, pmf)


def test_tokens_in_spreads_each_request_over_its_lifetime():
    spans = [(0.0, 2.0, 10), (1.0, 3.0, 4)]
    assert _tokens_in(spans, 0.0, 1.0) == pytest.approx(5.0)
    assert _tokens_in(spans, 1.0, 3.0) == pytest.approx(5.0 + 4.0)
    assert _tokens_in(spans, 3.0, 4.0) == 0.0


def test_the_checkpoint_samples_the_designed_lengths(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    max_len, alpha, n = 12, 1.0, 200
    model_dir, pmf = make_long_tail_model(tmp_path, max_len, alpha)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "reverse: abc"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt)["input_ids"]
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids] * n), do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0, max_new_tokens=max_len + 4,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    counts = np.zeros(max_len)
    for row in out[:, len(ids):].tolist():
        L = row.index(tok.eos_token_id)  # c_L .. c_1 then eos: L tokens before it
        assert row[:L] == list(range(L - 1, -1, -1)), row  # c_k is id k - 1 here
        counts[L - 1] += 1
    # every length's frequency within 4.5 binomial standard errors of p(L)
    se = np.sqrt(pmf * (1 - pmf) / n)
    assert np.all(np.abs(counts / n - pmf) < 4.5 * se), (counts / n, pmf)
