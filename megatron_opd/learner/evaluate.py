"""Held-out evaluation of the current policy: task accuracy and exact reverse KL to the teacher.

Accuracy: greedy answers from the rollout server (which serves exactly the learner's latest
version). Reverse KL(student || teacher): on student-sampled held-out responses, the full-vocab
KL at every response position, with the student's distribution from the learner's own forward
pass and the teacher's from the teacher server's top-K = whole vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_opd.learner.batch import response_logits
from megatron_opd.models.qwen3_moe import forward_logits


@torch.no_grad()
def evaluate(model, task, examples, rollout, teacher, version: int, vocab_size: int,
             max_new_tokens: int, seed: int) -> dict[str, float]:
    prompts = [list(ex.prompt_ids) for ex in examples]
    greedy = rollout.generate(prompts, {"temperature": 0.0, "max_new_tokens": max_new_tokens,
                                        "stop_token_ids": [task.eos]}, return_logprob=False)
    accuracy = float(np.mean([task.is_correct(p, g.output_ids) for p, g in zip(prompts, greedy)]))
    sampled = rollout.generate(prompts, {"temperature": 1.0, "top_p": 1.0,
                                         "max_new_tokens": max_new_tokens,
                                         "stop_token_ids": [task.eos], "sampling_seed": seed},
                               return_logprob=False)
    served = {g.weight_version for g in greedy + sampled}
    seqs = [p + list(s.output_ids) for p, s in zip(prompts, sampled)]
    scores = teacher.score(seqs, start=[len(p) for p in prompts], top_k=vocab_size)
    kl = _response_kl(model, prompts, [list(s.output_ids) for s in sampled], scores, vocab_size)
    return {
        "eval/accuracy": accuracy,
        "eval/reverse_kl": float(kl.mean()) if kl.size else 0.0,
        "eval/version": version,
        "eval/served_version_ok": float(served == {version}),
        "eval/response_len": float(np.mean([len(s.output_ids) for s in sampled])),
    }


def _response_kl(model, prompts, responses, scores, vocab_size: int) -> np.ndarray:
    """Per-position KL(pi || q) over the whole vocabulary at every response token (one batch)."""
    keep = [i for i, r in enumerate(responses) if r]
    if not keep:
        return np.zeros(0)
    seqs = [prompts[i] + responses[i] for i in keep]
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    T = max(len(responses[i]) for i in keep)
    index = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, i in enumerate(keep):
        ids[b, :len(seqs[b])] = torch.tensor(seqs[b])
        P, n = len(prompts[i]), len(responses[i])
        index[b, :n] = torch.arange(P - 1, P - 1 + n)
    logp = torch.log_softmax(response_logits(forward_logits(model, ids), index).double(), -1)
    out = []
    for b, i in enumerate(keep):
        n, sc = len(responses[i]), scores[i]
        logq = torch.full((n, vocab_size), -torch.inf, dtype=torch.float64)
        logq.scatter_(1, torch.as_tensor(sc.topk_ids, dtype=torch.long),
                      torch.as_tensor(sc.topk_logprobs, dtype=torch.float64))
        lp = logp[b, :n]
        p = lp.exp()
        # p == 0 contributes 0 even where q == 0; p > 0 with q == 0 is an infinite KL.
        out.append(torch.where(p > 0, p * (lp - logq), torch.zeros_like(p)).sum(-1).numpy())
    return np.concatenate(out)
