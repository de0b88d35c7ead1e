"""The chat environment on a prompt file and a real tokenizer (no servers): templated prompt ids,
held-out rows never trained, a stream that is the same after a restart, verifier and loss mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron_opd.config import load_config
from megatron_opd.envs import make_env
from tests.hf_fixtures import IM_END, chatml, make_char_tokenizer, write_chat_prompts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = make_char_tokenizer(root / "tok")
    rows = write_chat_prompts(root / "train.jsonl", None, n=60, seed=0)
    return root, tok, rows


def _env(root, tok, *overrides):
    cfg = load_config(ROOT / "configs/hf-example.yaml", [
        f"init.student={tok}", f"init.teacher={tok}", f"data.train={root / 'train.jsonl'}",
        "data.eval=", "env.num_eval_prompts=10", *overrides])
    return make_env(cfg, tok)


def test_prompts_are_the_templated_rows_and_held_out_rows_never_train(files):
    root, tok, rows = files
    env = _env(root, tok)
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tok))
    evals = env.eval_prompts()
    assert len(evals) == 10
    stream = env.train_prompts()
    train = [next(stream) for _ in range(50)]  # one epoch of the 50 remaining rows
    assert len({p.source for p in train}) == 50
    assert not {p.source for p in evals} & {p.source for p in train}
    for p in evals + train:
        row = rows[int(p.source.split(":")[1]) - 1]  # row ids are "<file>:<line>"
        msgs = row["messages"]
        msgs = [{"role": "user", "content": msgs}] if isinstance(msgs, str) else msgs
        assert p.token_ids == tuple(t(chatml(msgs), add_special_tokens=False)["input_ids"])
        assert p.label == row["label"]  # the row's other columns ride along (route_by column)
        assert p.metadata == {"task": row["task"], "idx": row["idx"], "row": p.source}
    again = _env(root, tok).train_prompts()  # a restart: prompt i is the same prompt
    assert [next(again).source for _ in range(50)] == [p.source for p in train]


def test_verifier_loss_mask_and_special_ids(files):
    root, tok, _ = files
    env = _env(root, tok)
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tok))
    eos = t.convert_tokens_to_ids(IM_END)
    assert env.special.eos == eos and env.special.stop_ids == (eos,)
    assert env.special.pad == t.pad_token_id
    p = env.eval_prompts()[0]
    right = t(f" {p.label}\n", add_special_tokens=False)["input_ids"] + [eos]
    assert env.reward(p, right) == 1.0  # special tokens and outer white space do not count
    assert env.reward(p, right[:2] + [eos]) == 0.0  # " " + one letter: labels have >= 2
    padded = right[:2] + [len(t)] + right[2:]  # a model row the tokenizer lacks
    assert env.loss_mask(p, padded).tolist() == [1] * len(padded)  # a real model row trains
    assert env.reward(p, padded) == 1.0
    assert _env(root, tok, "env.verifier=none").reward(p, right) == 0.0


def test_over_long_prompts_are_dropped_and_counted(files):
    root, tok, _ = files
    env = _env(root, tok, "data.max_prompt_tokens=40", "rollout.max_new_tokens=4")
    stream = env.train_prompts()
    kept = [next(stream) for _ in range(20)]
    assert all(len(p.token_ids) <= 40 for p in kept)
    assert env.stats()["data/dropped_prompts"] > 0
    assert np.mean([len(p.token_ids) for p in kept]) < 40


def test_a_stream_started_at_a_position_is_the_suffix_without_dropped_slots(files):
    root, tok, _ = files
    env = _env(root, tok, "data.max_prompt_tokens=40", "rollout.max_new_tokens=4")
    full = env.train_prompts()
    head = [next(full) for _ in range(30)]
    positions = [p.position for p in head]
    assert positions == sorted(positions) and len(set(positions)) == 30
    assert positions[-1] > 29  # dropped (too long) slots are never reused
    start = positions[12]
    tail = _env(root, tok, "data.max_prompt_tokens=40", "rollout.max_new_tokens=4") \
        .train_prompts(start=start)
    assert [(p.position, p.source) for p in (next(tail) for _ in range(18))] == \
        [(p.position, p.source) for p in head[12:]]


def test_held_out_prompts_from_an_eval_file_never_read_the_training_file(files, tmp_path):
    """The learner asks for the held-out prompts only: a large data.train is not read for them."""
    root, tok, _ = files
    env = _env(root, tok, f"data.train={tmp_path / 'absent.jsonl'}",
               f"data.eval={root / 'train.jsonl'}")
    assert [p.source for p in env.eval_prompts()] == [f"train.jsonl:{i}" for i in range(1, 11)]
