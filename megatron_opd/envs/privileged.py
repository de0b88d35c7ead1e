"""Privileged prompts for the teacher (`teacher.prompt: privileged`, ALGORITHMS.md §10 OPSD).

The student samples a response to its prompt; the teacher scores the SAME response tokens after
a prompt that also holds privileged text: `teacher.privileged_template` with {prompt} (the
student's prompt) and {hint}. The hint is the environment's: a dataset column
(`teacher.hint_key`) for the chat environment, the answer for the digits task (its hidden
state). The teacher's prompt is tokenised once, when the prompt is made, and travels beside it
(`PrivilegedPrompt.teacher_ids`, never in the sample); the orchestrator scores
`teacher_ids + response` from `len(teacher_ids)` on, so the response positions, its loss mask
and every per-token field line up with the student's sample.

`make_env` wraps the environment here when teacher.prompt=privileged; everything else about the
environment (streams, verifier, masks) is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_opd.envs.base import EnvPrompt
from megatron_opd.envs.chat import ChatEnv
from megatron_opd.envs.digits import DigitsEnv, Example

TEMPLATE_KEY = "teacher.privileged_template"


@dataclass(frozen=True)
class PrivilegedPrompt(EnvPrompt):
    """A prompt with the teacher's privileged prompt beside it (token ids)."""
    teacher_ids: tuple[int, ...] = ()


def teacher_prompt_ids(prompt: EnvPrompt) -> tuple[int, ...]:
    """The prompt the teacher scores the response after: the privileged one where the
    environment made one, else the student's."""
    return getattr(prompt, "teacher_ids", ()) or prompt.token_ids


def _digit_words(cfg, template: str) -> list[str]:
    """The template's own words (placeholders removed): each must be a task word."""
    from megatron_opd.envs.digits import build_vocab

    vocab = set(build_vocab(cfg.env.digits.ops, cfg.model.vocab_size))
    words = template.replace("{prompt}", " ").replace("{hint}", " ").split()
    return [w for w in words if w not in vocab]


def validate_privileged(cfg, need) -> None:
    """teacher.prompt=privileged needs an environment with hints: digits (the answer; the
    template's words must be task words) or chat (a dataset column)."""
    name = cfg.env.name
    need(name in ("digits", "chat"), "teacher.prompt",
         f"privileged needs a single-turn environment with hints (digits: the answer; chat: "
         f"the teacher.hint_key column), not env.name={name}")
    if name == "digits":
        unknown = _digit_words(cfg, cfg.teacher.privileged_template)
        need(not unknown, TEMPLATE_KEY, f"the digits task has no word(s) {unknown} (its words "
             "are separated by spaces: <bos>, digits, op names, =)")
        # the teacher scores the privileged prompt + response: it must fit the teacher
        from megatron_opd.config import run_teacher_spec
        from megatron_opd.envs.digits import digits_max_prompt_tokens

        tpl, d = cfg.teacher.privileged_template, cfg.env.digits.max_digits
        longest = len(tpl.replace("{prompt}", " ").replace("{hint}", " ").split()) + \
            tpl.count("{prompt}") * digits_max_prompt_tokens(cfg) + tpl.count("{hint}") * d
        spec = cfg.model if cfg.teacher.source == "self" else run_teacher_spec(cfg)
        need(spec.max_position_embeddings >= longest + cfg.rollout.max_new_tokens, TEMPLATE_KEY,
             f"makes teacher prompts of up to {longest} tokens: with rollout.max_new_tokens "
             f"more than the teacher's max_position_embeddings = {spec.max_position_embeddings}")


class PrivilegedDigitsEnv(DigitsEnv):
    """The digits task, its hint the answer (without <eos>), e.g. template
    "<bos> copy {hint} =": the teacher is asked to copy the answer it is scored on."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.template = cfg.teacher.privileged_template

    def _prompt(self, ex: Example, position: int = -1) -> EnvPrompt:
        t = self.task
        words = [t.vocab[i] for i in ex.prompt_ids]
        hint = [t.vocab[i] for i in ex.answer_ids if i != t.eos]
        text = self.template.replace("{prompt}", " ".join(words)).replace("{hint}",
                                                                          " ".join(hint))
        try:
            ids = tuple(t.ids[w] for w in text.split())
        except KeyError as e:  # validate_privileged checks the template first
            raise ValueError(f"{TEMPLATE_KEY}: the digits task has no word {e}") from None
        return PrivilegedPrompt(ex.prompt_ids, source=ex.op, position=position,
                                metadata={"op": ex.op}, teacher_ids=ids)


class PrivilegedChatEnv(ChatEnv):
    """Chat rows with a hint column: the last user message becomes the template with
    {prompt} = that message and {hint} = the row's `teacher.hint_key` value, encoded with the
    chat template like any prompt (data/prompts.privileged_row). A training prompt whose
    privileged prompt is longer than data.max_prompt_tokens is dropped (its position skipped,
    counted as data/dropped_privileged): the teacher's context must fit the model."""

    def __init__(self, cfg, tokenizer_dir):
        super().__init__(cfg, tokenizer_dir)
        self._counters["data/dropped_privileged"] = 0

    def _prompt(self, row, ids, position: int = -1) -> EnvPrompt:
        from megatron_opd.data.prompts import encode_prompt, privileged_row

        t = self.cfg.teacher
        hinted = privileged_row(row, t.privileged_template, t.hint_key)
        teacher_ids = tuple(encode_prompt(hinted, self.tokenizer, self.data.apply_chat_template))
        return PrivilegedPrompt(tuple(int(i) for i in ids), source=row.row_id, label=row.label,
                                position=position, metadata={**row.metadata, "row": row.row_id},
                                teacher_ids=teacher_ids)

    def train_prompts(self, start: int = 0):
        for p in super().train_prompts(start):
            if len(p.teacher_ids) > self.data.max_prompt_tokens:
                self._counters["data/dropped_privileged"] += 1
                continue
            yield p


def privileged_env(cfg, tokenizer_dir=None):
    """The run's environment with privileged teacher prompts (teacher.prompt=privileged)."""
    if cfg.env.name == "digits":
        return PrivilegedDigitsEnv(cfg)
    if cfg.env.name == "chat":
        if tokenizer_dir is None:
            raise ValueError("make_env: the chat environment needs the student's tokenizer dir")
        return PrivilegedChatEnv(cfg, tokenizer_dir)
    raise ValueError(f"teacher.prompt: privileged needs an environment with hints, not "
                     f"{cfg.env.name}")


class PrivilegedScoring:
    """A scoring client (`score(input_ids, *, start, ...)`) that scores every sequence starting
    with one of `prompts` after that prompt's privileged prompt instead, from its length on:
    the same response positions. Evaluation uses it, so the held-out reverse KL is the one the
    privileged teacher is distilled by (teacher.prompt=privileged)."""

    def __init__(self, client, prompts):
        self.client = client
        self.hinted = {tuple(p.token_ids): tuple(teacher_prompt_ids(p)) for p in prompts}

    def score(self, input_ids, *, start, **kwargs):
        seqs, starts = [], []
        for x, s in zip(input_ids, start):
            hinted = self.hinted.get(tuple(x[:s]))
            seqs.append(list(x) if hinted is None else list(hinted) + list(x[s:]))
            starts.append(s if hinted is None else len(hinted))
        return self.client.score(seqs, start=starts, **kwargs)


def privileged_scoring(cfg, client, prompts):
    """`client`, or with teacher.prompt=privileged a PrivilegedScoring over `prompts`."""
    return PrivilegedScoring(client, prompts) if cfg.teacher.prompt == "privileged" else client
