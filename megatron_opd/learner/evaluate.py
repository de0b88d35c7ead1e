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
    kls = [_response_kl(model, p, s.output_ids, sc, vocab_size)
           for p, s, sc in zip(prompts, sampled, scores) if len(s.output_ids) > 0]
    all_kl = np.concatenate(kls) if kls else np.zeros(1)
    return {
        "eval/accuracy": accuracy,
        "eval/reverse_kl": float(all_kl.mean()),
        "eval/version": version,
        "eval/served_version_ok": float(served == {version}),
        "eval/response_len": float(np.mean([len(s.output_ids) for s in sampled])),
    }


def _response_kl(model, prompt, response, score, vocab_size: int) -> np.ndarray:
    ids = torch.tensor([prompt + list(response)], dtype=torch.long)
    P, n = len(prompt), len(response)
    logits = forward_logits(model, ids)
    index = torch.arange(P - 1, P - 1 + n).unsqueeze(0)
    logp = torch.log_softmax(response_logits(logits, index)[0].double(), dim=-1)  # [n, V]
    logq = torch.full((n, vocab_size), -torch.inf, dtype=torch.float64)
    logq.scatter_(1, torch.as_tensor(score.topk_ids, dtype=torch.long),
                  torch.as_tensor(score.topk_logprobs, dtype=torch.float64))
    p = logp.exp()
    # Terms with p == 0 contribute 0 even where q == 0 (-inf); where p > 0 and q == 0, KL = inf.
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1).numpy()
