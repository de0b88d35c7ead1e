"""The chat environment (`env.name: chat`): prompts from the user's dataset, the student's
tokenizer and chat template, an exact-match verifier where rows carry a reference answer.

Prompt ids: a training prompt's position is its slot in `data.PromptStream` (epoch e visits the
rows in a permutation seeded by (run.seed, e)); an over-long prompt's slot is dropped and counted,
never reused. The same slot is the same row after every restart, and a resumed stream starts at
a slot without tokenizing the rows before it. Held-out prompts: the first
`env.num_eval_prompts` usable rows of `data.eval`, or (no eval file) that many rows of a seeded
shuffle of `data.train`, which training then never sees.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from megatron_opd.envs.base import Environment, EnvPrompt, SpecialIds

EVAL_SPLIT_SEED = 0xE7A1  # the held-out draw from data.train; training uses run.seed itself


def validate_chat(cfg, need) -> None:
    d = cfg.data
    need(bool(d.train.strip()), "data.train",
         "the chat environment needs a prompt file (JSONL, Parquet or a `datasets` directory)")
    need(bool(cfg.init.student.strip()), "init.student",
         "the chat environment needs the student's Hugging Face directory (its weights, "
         "tokenizer and chat template)")
    need(bool(cfg.init.teacher.strip()), "init.teacher",
         "the chat environment needs the teacher's Hugging Face directory")


class ChatEnv(Environment):
    name = "chat"

    def __init__(self, cfg, tokenizer_dir: str | Path):
        from megatron_opd.data.tokenizers import load_tokenizer, special_ids

        self.cfg, self.data = cfg, cfg.data
        self.tokenizer = load_tokenizer(tokenizer_dir)
        sp = special_ids(tokenizer_dir, self.tokenizer)
        self.special = SpecialIds(pad=sp.pad, eos=sp.eos, stop_ids=tuple(sp.stop_ids), bos=sp.bos)
        self._special_set = set(self.tokenizer.all_special_ids)
        self._counters = {"data/dropped_prompts": 0, "data/skipped_rows": 0}

    # ------------------------------------------------------------------------- rows
    def _read(self, path: str):
        from megatron_opd.data.prompts import read_prompt_rows

        d = self.data
        out = read_prompt_rows(path, prompt_key=d.prompt_key, label_key=d.label_key,
                               on_error="skip" if d.bad_rows == "skip" else "raise")
        self._counters["data/skipped_rows"] += out.skipped
        return list(out.rows)

    @cached_property
    def _all_train_rows(self) -> list:
        return self._read(self.data.train)

    @cached_property
    def _held_out(self) -> set[int]:
        """Indices of data.train rows held out for evaluation (none when data.eval is given)."""
        if self.data.eval:
            return set()
        n_rows = len(self._all_train_rows)
        order = np.random.default_rng([self.cfg.run.seed, EVAL_SPLIT_SEED]).permutation(n_rows)
        return set(order[:min(n_rows // 2, self.cfg.env.num_eval_prompts)].tolist())

    def _train_rows(self) -> list:
        held = self._held_out
        return [r for i, r in enumerate(self._all_train_rows) if i not in held]

    def _eval_rows(self) -> list:
        """The eval file only, when there is one: the learner never reads data.train."""
        if self.data.eval:
            return self._read(self.data.eval)
        return [self._all_train_rows[i] for i in sorted(self._held_out)]

    def _encode(self, row) -> list[int]:
        from megatron_opd.data.prompts import encode_prompt

        return encode_prompt(row, self.tokenizer, self.data.apply_chat_template)

    def _prompt(self, row, ids, position: int = -1) -> EnvPrompt:
        # the row's other columns travel with the sample (teacher.route_by=column reads one)
        return EnvPrompt(tuple(int(i) for i in ids), source=row.row_id, label=row.label,
                         position=position, metadata={**row.metadata, "row": row.row_id})

    def eval_prompts(self) -> list[EnvPrompt]:
        out = []
        for row in self._eval_rows():
            ids = self._encode(row)
            if len(ids) <= self.data.max_prompt_tokens:
                out.append(self._prompt(row, ids))
            if len(out) == self.cfg.env.num_eval_prompts:
                break
        if not out:
            raise ValueError(f"data.eval: no usable held-out prompt (every one is longer than "
                             f"data.max_prompt_tokens = {self.data.max_prompt_tokens} or the "
                             "file is empty)")
        return out

    def train_prompts(self, start: int = 0):
        from megatron_opd.data.prompts import PromptStream

        rows = self._train_rows()
        if not rows:
            raise ValueError(f"data.train: no usable training prompt in {self.data.train}")
        stream = PromptStream(rows, encode=self._encode, seed=self.cfg.run.seed,
                              max_prompt_tokens=self.data.max_prompt_tokens,
                              epochs=self.data.epochs or None, start=start)
        for position, row, ids in stream:
            self._counters["data/dropped_prompts"] = stream.dropped
            yield self._prompt(row, ids, position)

    # ------------------------------------------------------------------------- responses
    @property
    def has_verifier(self) -> bool:
        return self.cfg.env.verifier != "none"

    def reward(self, prompt: EnvPrompt, response_ids) -> float:
        if not self.has_verifier or prompt.label is None:
            return 0.0
        return 1.0 if self.answer_text(response_ids) == prompt.label.strip() else 0.0

    def answer_text(self, response_ids) -> str:
        """The response as the verifier reads it: special tokens and outer white space gone."""
        ids = [int(i) for i in response_ids
               if int(i) not in self._special_set and int(i) < len(self.tokenizer)]
        return self.tokenizer.decode(ids).strip()

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def stats(self) -> dict[str, float]:
        return dict(self._counters)
