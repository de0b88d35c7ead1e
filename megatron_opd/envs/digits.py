"""The digits environment (`env.name: digits`), the quickstart's toy: transform a digit string.

Prompt: `<bos> OP d1 .. dn =`, answer: `r1 .. rn <eos>` where r = OP(d). Exact answers give a task
accuracy; a model trained on it longer (the teacher) is genuinely better than a briefly trained one
(the student's init). Held-out prompts are fixed by the seed and never drawn for training. Its
models are made here (`digits_models.prepare`): the task has its own word-level vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_opd.envs.base import Environment, EnvPrompt, SpecialIds
from megatron_opd.tokenizer import BOS, EOS, SPECIALS

KNOWN_OPS = {
    "rev": lambda d: d[::-1],
    "sort": sorted,
    "copy": lambda d: list(d),
    "rot": lambda d: d[1:] + d[:1],
}
EQUALS = "="


def build_vocab(ops: list[str], vocab_size: int) -> list[str]:
    """Specials, digits, op names, '=', then unused fillers up to vocab_size."""
    words = list(SPECIALS) + [str(i) for i in range(10)] + sorted(KNOWN_OPS) + [EQUALS]
    if len(words) > vocab_size:
        raise ValueError(f"model.vocab_size: must be >= {len(words)} for the task vocabulary")
    return words + [f"<unused{i}>" for i in range(vocab_size - len(words))]


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # includes the final <eos>
    op: str


class DigitTask:
    def __init__(self, ops: list[str], min_digits: int, max_digits: int, vocab_size: int,
                 num_digit_symbols: int = 10):
        self.ops = list(ops)
        self.min_digits, self.max_digits = min_digits, max_digits
        self.num_digit_symbols = num_digit_symbols
        self.vocab = build_vocab(self.ops, vocab_size)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.bos, self.eos, self.pad = self.ids[BOS], self.ids[EOS], self.ids[SPECIALS[0]]
        self.max_prompt_len = 3 + max_digits
        self.max_answer_len = max_digits + 1

    @classmethod
    def from_config(cls, digits_cfg, vocab_size: int) -> "DigitTask":
        """From the `env.digits` section."""
        return cls(digits_cfg.ops, digits_cfg.min_digits, digits_cfg.max_digits, vocab_size,
                   digits_cfg.num_digits_symbols)

    def make(self, op: str, digits: list[int]) -> Example:
        out = KNOWN_OPS[op](list(digits))
        prompt = [self.bos, self.ids[op]] + [self.ids[str(d)] for d in digits] + [self.ids[EQUALS]]
        answer = [self.ids[str(d)] for d in out] + [self.eos]
        return Example(tuple(prompt), tuple(answer), op)

    def draw(self, rng: np.random.Generator) -> Example:
        n = int(rng.integers(self.min_digits, self.max_digits + 1))
        op = self.ops[int(rng.integers(len(self.ops)))]
        digits = rng.integers(0, self.num_digit_symbols, size=n).tolist()
        return self.make(op, digits)

    def eval_set(self, n: int, seed: int) -> list[Example]:
        """Held-out prompts: a fixed draw from a seed stream that training never uses."""
        rng = np.random.default_rng([seed, 0xE7A1])
        seen, out = set(), []
        while len(out) < n:
            ex = self.draw(rng)
            if ex.prompt_ids not in seen:
                seen.add(ex.prompt_ids)
                out.append(ex)
        return out

    def train_stream(self, seed: int, exclude: set[tuple[int, ...]]):
        """Infinite stream of training examples, skipping held-out prompts."""
        rng = np.random.default_rng([seed, 0x7124])
        while True:
            ex = self.draw(rng)
            if ex.prompt_ids not in exclude:
                yield ex

    def answer_for(self, prompt_ids: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        words = [self.vocab[i] for i in prompt_ids]
        if len(words) < 3 or words[0] != BOS or words[-1] != EQUALS or words[1] not in KNOWN_OPS:
            raise ValueError(f"not a task prompt: {words}")
        digits = [int(w) for w in words[2:-1]]
        return self.make(words[1], digits).answer_ids

    def is_correct(self, prompt_ids, response_ids) -> bool:
        """Exact match of the answer, <eos> included (a response must stop where it should)."""
        ans = self.answer_for(prompt_ids)
        return tuple(response_ids[: len(ans)]) == ans

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids)


# ----------------------------------------------------------------------------- the environment
TRAIN_SEED_OFFSET = 3  # the training stream's seed is run.seed + 3 (the quickstart's history)


def validate_digits(cfg, need) -> None:
    """The `env.digits` section and what it asks of the rest of the config."""
    d = cfg.env.digits
    need(len(d.ops) > 0, "env.digits.ops", "needs at least one op")
    for i, op in enumerate(d.ops):
        need(op in KNOWN_OPS, f"env.digits.ops[{i}]", f"unknown op {op!r}; known: {sorted(KNOWN_OPS)}")
    need(len(set(d.ops)) == len(d.ops), "env.digits.ops", "has duplicates")
    need(1 <= d.min_digits <= d.max_digits, "env.digits.min_digits",
         "must be in [1, env.digits.max_digits]")
    need(2 <= d.num_digits_symbols <= 10, "env.digits.num_digits_symbols", "must be in [2, 10]")
    need(cfg.rollout.max_new_tokens >= d.max_digits + 1, "rollout.max_new_tokens",
         f"must be >= env.digits.max_digits + 1 = {d.max_digits + 1} (answer + <eos>)")
    need(not cfg.init.student and not cfg.init.teacher, "init.student",
         "the digits environment trains the models `megatron-opd prepare` makes (its own "
         "vocabulary); use env.name=chat with data.train for a Hugging Face checkpoint")


def digits_max_prompt_tokens(cfg) -> int:
    return 3 + cfg.env.digits.max_digits


class DigitsEnv(Environment):
    name = "digits"

    def __init__(self, cfg):
        self.task = DigitTask.from_config(cfg.env.digits, cfg.model.vocab_size)
        self.special = SpecialIds(pad=self.task.pad, eos=self.task.eos, stop_ids=(self.task.eos,),
                                  bos=self.task.bos)
        self._seed, self._num_eval = cfg.run.seed, cfg.env.num_eval_prompts

    @staticmethod
    def _prompt(ex: Example, position: int = -1) -> EnvPrompt:
        return EnvPrompt(ex.prompt_ids, source=ex.op, position=position, metadata={"op": ex.op})

    def eval_prompts(self) -> list[EnvPrompt]:
        return [self._prompt(ex) for ex in self.task.eval_set(self._num_eval, self._seed)]

    def train_prompts(self, start: int = 0):
        held_out = {ex.prompt_ids for ex in self.task.eval_set(self._num_eval, self._seed)}
        stream = self.task.train_stream(self._seed + TRAIN_SEED_OFFSET, held_out)
        for position, ex in enumerate(stream):  # skipping = drawing digits: cheap
            if position >= start:
                yield self._prompt(ex, position)

    @property
    def has_verifier(self) -> bool:
        return True

    def reward(self, prompt: EnvPrompt, response_ids) -> float:
        # the response ends with <eos> when the model stopped: is_correct expects it there
        return 1.0 if self.task.is_correct(prompt.token_ids, response_ids) else 0.0

    def decode(self, ids) -> str:
        return self.task.decode(ids)
