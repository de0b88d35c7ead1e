"""Held-out evaluation of the current policy: task accuracy and exact reverse KL to the teacher.

Accuracy: greedy answers from the rollout server (which serves exactly the learner's latest
version). Reverse KL(student || teacher): on student-sampled held-out responses, the full-vocab
KL at every response position, with the student's distribution from the learner's own forward
pass (any layout, vocab-sharded) and the teacher's from the teacher server's top-K = whole
vocabulary. Rank 0 talks to the servers; every rank runs the forward pass.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.learner.io import broadcast_tensor
from megatron_opd.learner.losses import reverse_kl_fn
from megatron_opd.learner.train_step import MicroBatch, forward_backward


@torch.no_grad()
def evaluate(ddp, groups, task, examples, rollout, teacher, version: int, vocab_size: int,
             max_new_tokens: int, seed: int, micro_batch_size: int) -> dict[str, float]:
    out: dict[str, float] = {}
    tensors = None
    if dist.get_rank() == 0:
        prompts = [list(ex.prompt_ids) for ex in examples]
        greedy = rollout.generate(prompts, {"temperature": 0.0, "max_new_tokens": max_new_tokens,
                                            "stop_token_ids": [task.eos]}, return_logprob=False)
        sampled = rollout.generate(prompts, {"temperature": 1.0, "top_p": 1.0,
                                             "max_new_tokens": max_new_tokens,
                                             "stop_token_ids": [task.eos], "sampling_seed": seed},
                                   return_logprob=False)
        served = {g.weight_version for g in greedy + sampled}
        responses = [list(s.output_ids) for s in sampled]
        out = {"eval/accuracy": float(np.mean([task.is_correct(p, g.output_ids)
                                               for p, g in zip(prompts, greedy)])),
               "eval/version": version, "eval/served_version_ok": float(served == {version}),
               "eval/response_len": float(np.mean([len(r) for r in responses]))}
        tensors = _kl_inputs(prompts, responses, teacher, vocab_size, task.pad, micro_batch_size)
    names = ("input_ids", "response_index", "loss_mask", "teacher_full_logprobs")
    dims = (2, 2, 2, 3)
    dtypes = (torch.int64, torch.int64, torch.float32, torch.float32)
    data = {n: broadcast_tensor(tensors[n] if tensors else None, k, dt)
            for n, k, dt in zip(names, dims, dtypes)}
    # Every data-parallel rank scores the whole (small) set: the mean is unchanged.
    micro = [MicroBatch(data["input_ids"][i:i + micro_batch_size],
                        {n: data[n][i:i + micro_batch_size] for n in names[1:]})
             for i in range(0, data["input_ids"].shape[0], micro_batch_size)]
    _, _, metrics = forward_backward(ddp, micro, reverse_kl_fn(groups.tp, groups.tp_rank), groups,
                                     forward_only=True)
    out["eval/reverse_kl"] = metrics["reverse_kl"]
    return out


def _kl_inputs(prompts, responses, teacher, vocab_size: int, pad: int, mbs: int) -> dict:
    """Right-padded ids, response positions, mask and full-vocab teacher log-probs, with rows
    padded to a multiple of the micro-batch size (pipeline stages need equal shapes)."""
    n = len(prompts)
    rows = -(-n // mbs) * mbs
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    T = max(1, max(len(r) for r in responses))
    ids = torch.full((rows, L), pad, dtype=torch.long)
    index = torch.zeros(rows, T, dtype=torch.long)
    mask = torch.zeros(rows, T)
    logq = torch.zeros(rows, T, vocab_size)
    keep = [i for i, r in enumerate(responses) if r]
    scores = teacher.score([prompts[i] + responses[i] for i in keep],
                           start=[len(prompts[i]) for i in keep], top_k=vocab_size) if keep else []
    for i, sc in zip(keep, scores):
        P, m = len(prompts[i]), len(responses[i])
        ids[i, :P + m] = torch.tensor(prompts[i] + responses[i])
        index[i, :m] = torch.arange(P - 1, P - 1 + m)
        mask[i, :m] = 1.0
        row = torch.full((m, vocab_size), -torch.inf)
        row.scatter_(1, torch.as_tensor(sc.topk_ids, dtype=torch.long),
                     torch.as_tensor(sc.topk_logprobs, dtype=torch.float32))
        logq[i, :m] = row
    return {"input_ids": ids, "response_index": index, "loss_mask": mask,
            "teacher_full_logprobs": logq}
