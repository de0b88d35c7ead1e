"""`megatron-opd prepare`: make the digits environment's models here, with no downloads.

The teacher (a larger Qwen3-MoE) is fine-tuned long on the synthetic task, the student's init (the
tiny Qwen3-MoE the learner trains) only briefly, so the teacher is genuinely better. Both are saved
in Hugging Face format with the local tokenizer: SGLang serves them, and the learner loads the
student through the one Megatron<->HF mapping. Results are cached by a hash of what made them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_opd.config import Config, to_dict
from megatron_opd.models.spec import MoEModelSpec, to_hf_config
from megatron_opd.envs.digits import DigitTask, Example
from megatron_opd.tokenizer import save_tokenizer

PREPARE_VERSION = 2  # bump when the recipe changes, so stale caches are not reused


@dataclass
class PreparedModels:
    root: Path
    teacher_dir: Path
    student_dir: Path
    meta: dict


def cache_key(cfg: Config) -> str:
    # "task" is the digits section's old name: cache keys of existing caches stay valid
    blob = json.dumps({"v": PREPARE_VERSION, "task": _task_key(cfg), "model": to_dict(cfg.model),
                       "prepare": to_dict(cfg.prepare), "seed": cfg.run.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _task_key(cfg: Config) -> dict:
    d = cfg.env.digits
    return {"ops": d.ops, "min_digits": d.min_digits, "max_digits": d.max_digits,
            "num_eval_prompts": cfg.env.num_eval_prompts, "num_digits_symbols": d.num_digits_symbols}


def prepare(cfg: Config, progress: bool = True) -> PreparedModels:
    """Return the cached teacher/student-init pair for this config, making it if needed."""
    root = Path(cfg.run.cache_dir) / f"prepared-{cache_key(cfg)}"
    if (root / "meta.json").exists():
        return PreparedModels(root, root / "teacher", root / "student_init",
                              json.loads((root / "meta.json").read_text()))
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    task = DigitTask.from_config(cfg.env.digits, cfg.model.vocab_size)
    eval_set = task.eval_set(cfg.env.num_eval_prompts, cfg.run.seed)
    exclude = {ex.prompt_ids for ex in eval_set}
    meta: dict = {"cache_key": cache_key(cfg), "created_at": time.time()}
    teacher_spec = _with_task_ids(cfg.prepare.teacher_model, task, cfg.model.vocab_size)
    student_spec = _with_task_ids(cfg.model, task, cfg.model.vocab_size)
    for name, spec, steps, seed, smoothing in (
        ("teacher", teacher_spec, cfg.prepare.teacher_steps, cfg.run.seed + 1,
         cfg.prepare.teacher_label_smoothing),
        ("student_init", student_spec, cfg.prepare.student_steps, cfg.run.seed + 2, 0.0),
    ):
        t0 = time.time()
        model = sft_model(spec, task, task.train_stream(seed, exclude), steps,
                          cfg.prepare.batch_size, cfg.prepare.lr, seed, desc=name,
                          progress=progress, label_smoothing=smoothing)
        acc = greedy_accuracy(model, task, eval_set)
        model.save_pretrained(tmp / name)
        save_tokenizer(tmp / name, task.vocab, spec.max_position_embeddings)
        meta[name] = {"sft_steps": steps, "eval_accuracy": acc, "seconds": time.time() - t0}
        print(f"[prepare] {name}: {steps} SFT steps, held-out greedy accuracy {acc:.3f}",
              flush=True)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if root.exists():  # another process won the race; keep theirs
        shutil.rmtree(tmp)
    else:
        tmp.rename(root)
    return PreparedModels(root, root / "teacher", root / "student_init", meta)


def _with_task_ids(spec: MoEModelSpec, task: DigitTask, vocab_size: int) -> MoEModelSpec:
    from dataclasses import replace

    return replace(spec, vocab_size=vocab_size, bos_token_id=task.bos, eos_token_id=task.eos,
                   pad_token_id=task.pad)


def collate(examples: list[Example], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside the answer)."""
    seqs = [list(ex.prompt_ids) + list(ex.answer_ids) for ex in examples]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (ex, s) in enumerate(zip(examples, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(ex.prompt_ids): len(s)] = torch.tensor(ex.answer_ids)
    return ids, mask, labels


def sft_model(spec: MoEModelSpec, task: DigitTask, stream, steps: int, batch_size: int,
              lr: float, seed: int, desc: str = "sft", progress: bool = True,
              label_smoothing: float = 0.0):
    from tqdm import tqdm

    from megatron_opd.models.spec import hf_causal_lm_class

    torch.manual_seed(seed)
    model = hf_causal_lm_class(spec)(to_hf_config(spec)).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    bar = tqdm(range(steps), desc=f"prepare {desc}", disable=not progress, mininterval=2.0)
    for _ in bar:
        ids, mask, labels = collate([next(stream) for _ in range(batch_size)], task.pad)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100,
                                                 label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model


@torch.no_grad()
def greedy_accuracy(model, task: DigitTask, examples: list[Example]) -> float:
    """Exact-match accuracy of greedy answers (batched by prompt length, no KV cache: tiny)."""
    by_len: dict[int, list[Example]] = {}
    for ex in examples:
        by_len.setdefault(len(ex.prompt_ids), []).append(ex)
    correct = 0
    for group in by_len.values():
        ids = torch.tensor([ex.prompt_ids for ex in group], dtype=torch.long)
        for _ in range(task.max_answer_len):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        for ex, row in zip(group, ids.tolist()):
            correct += task.is_correct(ex.prompt_ids, row[len(ex.prompt_ids):])
    return correct / max(1, len(examples))

