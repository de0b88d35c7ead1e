"""The calculator tool environment (`env.name: calculator`): multi-turn tool use on a synthetic
task, with the student's Hugging Face tokenizer and chat template (models from `init.*`).

Task: "Compute 37*4+12-5." (`env.calculator`: 2..4 operands in [1, 99], + - *); the answer is
the integer. The model may call the calculator any number of times (up to `env.max_turns`
turns): a turn that ends with `call_end` is a call, its text after the last `call_start` the
expression, run by `tools.calculator` in a sandboxed subprocess. The tool's output or its error
comes back in the `observation` template. A turn that ends with a stop id (eos) is the final
answer: reward 1.0 when its text (special tokens and outer white space removed) is the answer.
A turn cut by rollout.max_new_tokens, a call without `call_start` or with an empty expression:
error observations, the episode goes on (a random model mostly produces those).

Streams: training prompt i is draw i of a generator seeded by (run.seed, TRAIN_SEED); held-out
prompts are the first `env.num_eval_prompts` distinct draws of another seed, and training skips
their expressions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_opd.envs.base import (EnvPrompt, Episode, MultiTurnEnvironment, SpecialIds, Step)
from megatron_opd.envs.tools import calculator

TRAIN_SEED, EVAL_SEED = 0xCA1C, 0xE7A1
OPS = ("+", "-", "*")
SYSTEM = ("You have a calculator. To use it, write {start}EXPRESSION{end}; its result comes "
          "back. Give the final answer as the number alone.")
MAX_RESULT_CHARS = 200  # of a tool's output in an observation


def validate_calculator(cfg, need) -> None:
    """`env.calculator` and the multi-turn knobs: checked for every config (their own rules),
    and what the environment asks of the rest when selected."""
    c, e = cfg.env.calculator, cfg.env
    need(c.min_operands <= c.max_operands, "env.calculator.min_operands",
         "must be <= env.calculator.max_operands")
    need("{result}" in c.observation, "env.calculator.observation",
         "must contain {result} (where the tool's output goes)")
    need(c.call_start != c.call_end, "env.calculator.call_end", "must differ from call_start")
    if e.name != "calculator":
        return
    need(bool(cfg.init.student.strip()), "init.student",
         "the calculator environment needs the student's Hugging Face directory (tokenizer, "
         "chat template, the tool-call tokens)")
    need(bool(cfg.init.teacher.strip()), "init.teacher",
         "the calculator environment needs the teacher's Hugging Face directory")
    need(cfg.rollout.max_new_tokens <= e.max_response_tokens, "rollout.max_new_tokens",
         f"must be <= env.max_response_tokens = {e.max_response_tokens} (one turn's budget)")
    need(cfg.teacher.mode == "live", "teacher.mode",
         "offline stores single-turn rollouts; multi-turn environments need teacher.mode=live")


def calculator_max_prompt_tokens(cfg) -> int:
    """The longest /generate input: a prompt (<= data.max_prompt_tokens) plus everything but the
    last turn of the response, so that prompt + rollout.max_new_tokens bounds a whole trajectory
    wherever sequence lengths are checked or planned."""
    return cfg.data.max_prompt_tokens + cfg.env.max_response_tokens - cfg.rollout.max_new_tokens


def _one_token(tokenizer, text: str, key: str) -> int:
    from megatron_opd.config import ConfigError

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"{key}: {text!r} is not one token of the student's tokenizer (it "
                          f"encodes to {len(ids)} ids); name the tokenizer's tool-call token")
    return int(ids[0])


class CalculatorEpisode(Episode):
    def __init__(self, env: "CalculatorEnv", prompt: EnvPrompt):
        self.env, self.prompt = env, prompt
        self.info = {"tool_calls": 0, "tool_errors": 0}

    def step(self, turn_ids: list[int], finish_reason: str) -> Step:
        env = self.env
        last = int(turn_ids[-1]) if turn_ids else -1
        if last in env.special.stop_ids:
            return Step(done=True, reward=env.verify(self.prompt, turn_ids), info=dict(self.info))
        if last == env.call_end_id:
            return self._call(turn_ids[:-1])
        self.info["tool_errors"] += 1
        return Step(env.observation("error: the turn ended without a tool call or an answer"),
                    info=dict(self.info))

    def _call(self, body: list[int]) -> Step:
        env = self.env
        self.info["tool_calls"] += 1
        starts = [i for i, t in enumerate(body) if int(t) == env.call_start_id]
        expr = env.text(body[starts[-1] + 1:]).strip() if starts else ""
        if not starts or not expr:
            self.info["tool_errors"] += 1
            why = "no expression" if starts else f"a call starts with {env.c.call_start}"
            return Step(env.observation(f"error: malformed tool call ({why})"),
                        info=dict(self.info))
        res = calculator(expr, timeout_s=env.c.tool_timeout_s, memory_mb=env.c.tool_memory_mb)
        self.info["tool_errors"] += not res.ok
        return Step(env.observation(res.output[:MAX_RESULT_CHARS]), info=dict(self.info))


class CalculatorEnv(MultiTurnEnvironment):
    name = "calculator"

    def __init__(self, cfg, tokenizer_dir: str | Path):
        from megatron_opd.data.tokenizers import load_tokenizer, special_ids

        self.cfg, self.c = cfg, cfg.env.calculator
        self.tokenizer = load_tokenizer(tokenizer_dir)
        sp = special_ids(tokenizer_dir, self.tokenizer)
        self.special = SpecialIds(pad=sp.pad, eos=sp.eos, stop_ids=tuple(sp.stop_ids), bos=sp.bos)
        self.call_start_id = _one_token(self.tokenizer, self.c.call_start,
                                        "env.calculator.call_start")
        self.call_end_id = _one_token(self.tokenizer, self.c.call_end, "env.calculator.call_end")
        self.turn_end_ids = (self.call_end_id,)
        self.max_turns, self.max_response_tokens = cfg.env.max_turns, cfg.env.max_response_tokens
        self._special_set = set(self.tokenizer.all_special_ids)
        self._counters = {"data/dropped_prompts": 0}

    # ------------------------------------------------------------------------- prompts
    def _draw(self, rng: np.random.Generator) -> str:
        n = int(rng.integers(self.c.min_operands, self.c.max_operands + 1))
        nums = rng.integers(1, self.c.max_operand + 1, size=n).tolist()
        ops = [OPS[int(i)] for i in rng.integers(0, len(OPS), size=n - 1)]
        return str(nums[0]) + "".join(f"{o}{x}" for o, x in zip(ops, nums[1:]))

    def _prompt(self, expr: str, position: int = -1) -> EnvPrompt | None:
        system = SYSTEM.format(start=self.c.call_start, end=self.c.call_end)
        user = f"Compute {expr}."
        if self.cfg.data.apply_chat_template and self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}],
                add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = self.tokenizer(f"{system}\n{user}\n", add_special_tokens=False)["input_ids"]
        if len(ids) > self.cfg.data.max_prompt_tokens:
            self._counters["data/dropped_prompts"] += 1
            return None
        # the expression has only digits and + - *: evaluating the generated string is safe
        label = str(eval(expr, {"__builtins__": {}}))  # noqa: S307
        return EnvPrompt(tuple(int(i) for i in ids), source=expr, label=label, position=position,
                         metadata={"expression": expr})

    def _eval_exprs(self) -> list[str]:
        rng, seen = np.random.default_rng([self.cfg.run.seed, EVAL_SEED]), []
        for _ in range(100 * self.cfg.env.num_eval_prompts):
            e = self._draw(rng)
            if e not in seen:
                seen.append(e)
            if len(seen) == self.cfg.env.num_eval_prompts:
                break
        return seen

    def eval_prompts(self) -> list[EnvPrompt]:
        out = [p for p in map(self._prompt, self._eval_exprs()) if p is not None]
        if not out:
            raise ValueError("data.max_prompt_tokens: every calculator prompt is longer")
        return out

    def train_prompts(self, start: int = 0):
        held = set(self._eval_exprs())
        rng = np.random.default_rng([self.cfg.run.seed, TRAIN_SEED])
        position = 0
        while True:  # a position is a draw: skipping ahead is drawing (cheap)
            expr = self._draw(rng)
            if expr not in held:
                if position >= start:
                    p = self._prompt(expr, position)
                    if p is not None:
                        yield p
                position += 1

    # ------------------------------------------------------------------------- episodes
    def reset(self, prompt: EnvPrompt) -> Episode:
        return CalculatorEpisode(self, prompt)

    def observation(self, result: str) -> str:
        return self.c.observation.replace("{result}", result)

    def encode_observation(self, text: str) -> tuple[int, ...]:
        return tuple(int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, ids) -> str:
        """Ids as text without special tokens (and ids past the tokenizer: model padding)."""
        keep = [int(i) for i in ids if int(i) not in self._special_set and int(i) < len(self.tokenizer)]
        return self.tokenizer.decode(keep)

    def verify(self, prompt: EnvPrompt, turn_ids) -> float:
        return 1.0 if prompt.label is not None and self.text(turn_ids).strip() == prompt.label \
            else 0.0

    # ------------------------------------------------------------------------- interface
    @property
    def has_verifier(self) -> bool:
        return True

    def reward(self, prompt: EnvPrompt, response_ids) -> float:
        """One response read as a final answer (single-turn evaluation; the multi-turn reward is
        the episode's, on its last turn)."""
        return self.verify(prompt, response_ids)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def stats(self) -> dict[str, float]:
        return dict(self._counters)
