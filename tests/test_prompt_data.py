"""Prompt files, validation errors, chat-template encoding and the resumable prompt stream."""

import json
import re
import shutil

import numpy as np
import pytest

from tests.hf_fixtures import CHAR_SPECIALS, CHARS, chatml, make_char_tokenizer, write_chat_prompts
from megatron_opd.data import (
    PromptDataError, PromptRow, PromptStream, encode_prompt, load_tokenizer, read_prompt_rows,
)

ROLE_ERR = "must be one of ['system', 'user', 'assistant', 'tool']"
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in CHAR_SPECIALS) + ")")


def hand_encode(text: str) -> list[int]:
    """The char tokenizer's ids written out from its definition (chars, then specials)."""
    ids = []
    for part in _SPECIAL_RE.split(text):
        if part in CHAR_SPECIALS:
            ids.append(len(CHARS) + CHAR_SPECIALS.index(part))
        else:
            ids.extend(CHARS.index(c) for c in part)
    return ids


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_char_tokenizer(tmp_path_factory.mktemp("tok") / "char")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def _same(a, b):
    return [(r.messages, r.label, r.metadata) for r in a] == [(r.messages, r.label, r.metadata)
                                                              for r in b]


def test_jsonl_parquet_and_dataset_dir_give_the_same_rows(tmp_path):
    import datasets

    written = write_chat_prompts(tmp_path / "p.jsonl", tmp_path / "p.parquet", 40, seed=3)
    js, pq = read_prompt_rows(tmp_path / "p.jsonl"), read_prompt_rows(tmp_path / "p.parquet")
    assert len(js.rows) == 40 and js.skipped == 0 and _same(js.rows, pq.rows)
    for w, r in zip(written, js.rows):  # against what was written, plain strings included
        msgs = w["messages"]
        expected = ((("user", msgs),) if isinstance(msgs, str)
                    else tuple((m["role"], m["content"]) for m in msgs))
        assert r.messages == expected and r.label == w["label"]
        assert r.metadata == {"task": w["task"], "idx": w["idx"]}
    assert any(isinstance(w["messages"], str) for w in written)
    assert any(r.messages[0][0] == "system" for r in js.rows)
    # ids: file name and line (JSONL, 1-based) or row index (Parquet); the same on a re-read
    assert [r.row_id for r in js.rows] == [f"p.jsonl:{i + 1}" for i in range(40)]
    assert [r.row_id for r in pq.rows] == [f"p.parquet:{i}" for i in range(40)]
    assert read_prompt_rows(tmp_path / "p.jsonl") == js
    # a dataset dir saved by `datasets` (one split of a DatasetDict is taken as it is)
    ds = datasets.Dataset.from_parquet(str(tmp_path / "p.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dsdict"))
    ds.save_to_disk(str(tmp_path / "ds"))
    assert _same(read_prompt_rows(tmp_path / "ds").rows, js.rows)
    assert _same(read_prompt_rows(tmp_path / "dsdict").rows, js.rows)


def test_custom_keys_labels_blank_lines_and_line_numbers(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "hi", "answer": 42}\n\n   \n'
                    '{"prompt": [{"role": "user", "content": ""}], "answer": 1.5, "extra": null}\n'
                    '{"prompt": "x"}\n')
    rows = read_prompt_rows(path, prompt_key="prompt", label_key="answer").rows
    assert [r.row_id for r in rows] == ["c.jsonl:1", "c.jsonl:4", "c.jsonl:5"]
    assert [r.label for r in rows] == ["42", "1.5", None]
    assert rows[1].messages == (("user", ""),) and rows[1].metadata == {"extra": None}


BAD_ROWS = [
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     f"messages[1].role: {ROLE_ERR}, got 'bot'"),
    ('{"messages": [{"role": "user", "content": "a"}', "invalid JSON: Expecting ',' delimiter "
                                                       "(column 47)"),
    ("not json", "invalid JSON: Expecting value (column 1)"),
    ('{"prompt": "hi"}', "missing key 'messages' (the prompt key); the row has keys ['prompt']"),
    ('{"messages": []}', "messages: empty list of messages"),
    ('{"messages": ""}', "messages: empty prompt string"),
    ('{"messages": 5}', "messages: must be a list of {role, content} messages or a string, "
                        "got int"),
    ('{"messages": ["hi"]}', "messages[0]: must be an object with role and content, got string"),
    ('{"messages": [{"role": "user"}]}', "messages[0]: missing 'content'"),
    ('{"messages": [{"content": "a"}]}', "messages[0]: missing 'role'"),
    ('{"messages": [{"role": "user", "content": ["a"]}]}',
     "messages[0].content: must be a string, got list"),
    ('{"messages": [{"role": "user", "content": "a", "name": "x"}]}',
     "messages[0]: unsupported keys ['name'] (a message has only role and content)"),
    ('{"messages": "hi", "label": [1]}', "label: must be a string or a number, got list"),
    ('{"messages": "hi", "label": true}', "label: must be a string or a number, got bool"),
    ("[1, 2]", "expected a JSON object, got list"),
]


@pytest.mark.parametrize("line,what", BAD_ROWS, ids=[w.split(":")[0] + str(i)
                                                     for i, (_, w) in enumerate(BAD_ROWS)])
def test_malformed_jsonl_row_names_file_line_and_problem(tmp_path, line, what):
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": "good"}\n\n' + line + "\n" + '{"messages": "good"}\n')
    with pytest.raises(PromptDataError) as err:
        read_prompt_rows(path)
    assert str(err.value) == f"{path}:3: {what}"
    skipped = read_prompt_rows(path, on_error="skip")
    assert [r.row_id for r in skipped.rows] == ["train.jsonl:1", "train.jsonl:4"]
    assert skipped.skipped == 1 and skipped.skip_reasons == (f"{path}:3: {what}",)


def test_invalid_utf8_is_one_rows_error(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"messages": "ok"}\n{"messages": "\xff"}\n')
    with pytest.raises(PromptDataError, match=re.escape(f"{path}:2: not valid UTF-8")):
        read_prompt_rows(path)


def test_malformed_parquet_row_names_row_index(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    msgs = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}],
            [{"role": "robot", "content": "c"}], []]
    pq.write_table(pa.Table.from_pylist([{"messages": m} for m in msgs]), tmp_path / "t.parquet")
    with pytest.raises(PromptDataError) as err:
        read_prompt_rows(tmp_path / "t.parquet")
    assert str(err.value) == f"{tmp_path / 't.parquet'}: row 2: messages[0].role: {ROLE_ERR}, " \
                             f"got 'robot'"
    got = read_prompt_rows(tmp_path / "t.parquet", on_error="skip")
    assert got.skipped == 2 and [r.row_id for r in got.rows] == ["t.parquet:0", "t.parquet:1"]
    assert got.skip_reasons[1] == f"{tmp_path / 't.parquet'}: row 3: messages: empty list of " \
                                  f"messages"
    # a column whose values JSON cannot carry is refused, naming the column
    pq.write_table(pa.Table.from_pylist([{"messages": "a", "when": datetime.datetime(2026, 1, 1)}]),
                   tmp_path / "d.parquet")
    with pytest.raises(PromptDataError, match=re.escape(
            f"{tmp_path / 'd.parquet'}: row 0: when: metadata values must be JSON-able, "
            f"got datetime")):
        read_prompt_rows(tmp_path / "d.parquet")


def test_file_level_errors(tmp_path):
    with pytest.raises(PromptDataError, match="no such file or directory"):
        read_prompt_rows(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("messages\nhi\n")
    with pytest.raises(PromptDataError, match=r"p\.csv: unsupported prompt file; expected a "
                                              r"\.jsonl or \.parquet"):
        read_prompt_rows(tmp_path / "p.csv")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(PromptDataError, match=r"bad\.parquet: not a readable Parquet file"):
        read_prompt_rows(tmp_path / "bad.parquet")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptDataError, match=r"empty\.jsonl: no prompt rows$"):
        read_prompt_rows(tmp_path / "empty.jsonl")
    (tmp_path / "allbad.jsonl").write_text("{}\n{}\n")
    with pytest.raises(PromptDataError, match=re.escape(
            "allbad.jsonl: no prompt rows (2 malformed rows skipped; first: "
            f"{tmp_path / 'allbad.jsonl'}:1: missing key 'messages'")):
        read_prompt_rows(tmp_path / "allbad.jsonl", on_error="skip")


def test_chat_template_encoding_equals_the_hand_built_string(tok):
    row = PromptRow("f:1", (("system", "Be brief."), ("user", "reverse: abc")))
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nreverse: abc"
                "<|im_end|>\n<|im_start|>assistant\n")
    assert chatml(row.chat()) == expected
    assert encode_prompt(row, tok, apply_chat_template=True) == hand_encode(expected)
    # without the template: contents joined by a blank line, no role markers, no specials
    assert encode_prompt(row, tok, apply_chat_template=False) == hand_encode(
        "Be brief.\n\nreverse: abc")


def test_missing_chat_template_names_tokenizer_dir_and_key(tok_dir, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tok_dir, plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    row = PromptRow("f:1", (("user", "hi"),))
    with pytest.raises(PromptDataError) as err:
        encode_prompt(row, load_tokenizer(plain), apply_chat_template=True)
    assert str(plain) in str(err.value) and "data.apply_chat_template" in str(err.value)
    assert encode_prompt(row, load_tokenizer(plain), apply_chat_template=False) == hand_encode("hi")


# ---- the prompt stream -------------------------------------------------------------------

ROWS = tuple(PromptRow(f"r:{i}", (("user", "x" * (1 + i % 7)),)) for i in range(23))
N = len(ROWS)


def enc(row):
    return hand_encode(row.messages[0][1])


def reference(seed, positions, max_tokens=None):
    """(position, row_id) the stream must yield at these positions, from its definition."""
    out = []
    for p in positions:
        row = ROWS[int(np.random.default_rng([seed, p // N]).permutation(N)[p % N])]
        if max_tokens is None or len(enc(row)) <= max_tokens:
            out.append((p, row.row_id))
    return out


def take(stream, k):
    return [next(stream) for _ in range(k)]


def test_stream_is_deterministic_and_each_epoch_is_a_permutation():
    a = take(PromptStream(ROWS, enc, seed=5), 3 * N)
    b = take(PromptStream(ROWS, enc, seed=5), 3 * N)
    assert a == b
    assert [(x.position, x.row.row_id) for x in a] == reference(5, range(3 * N))
    assert all(x.token_ids == enc(x.row) for x in a)
    epochs = [[x.row.row_id for x in a[e * N:(e + 1) * N]] for e in range(3)]
    assert all(sorted(ep) == sorted(r.row_id for r in ROWS) for ep in epochs)  # each row once
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    other = [x.row.row_id for x in take(PromptStream(ROWS, enc, seed=6), N)]
    assert other != epochs[0]
    fixed = [x.row.row_id for x in take(PromptStream(ROWS, enc, seed=5, shuffle=False), 2 * N)]
    assert fixed == [r.row_id for r in ROWS] * 2


def test_long_prompts_are_dropped_and_counted_without_shifting_positions():
    s = PromptStream(ROWS, enc, seed=1, max_prompt_tokens=4, epochs=2)
    got = list(s)
    long_rows = sum(len(enc(r)) > 4 for r in ROWS)
    assert [(x.position, x.row.row_id) for x in got] == reference(1, range(2 * N), 4)
    assert s.dropped == 2 * long_rows and len(got) == 2 * (N - long_rows)
    assert all(len(x.token_ids) <= 4 for x in got) and len(s.dropped_row_ids) == 10
    with pytest.raises(StopIteration):
        next(s)
    with pytest.raises(ValueError, match="max_prompt_tokens must be >= 1 or None, got 0"):
        PromptStream(ROWS, enc, seed=1, max_prompt_tokens=0)
    with pytest.raises(PromptDataError, match="every prompt is longer than max_prompt_tokens=1 "
                                              r"\(data.max_prompt_tokens\)"):
        next(PromptStream(tuple(r for r in ROWS if len(enc(r)) > 1), enc, seed=1,
                          max_prompt_tokens=1))


@pytest.mark.parametrize("n", [0, 1, 7, N - 1, N, N + 3, 3 * N - 1, 3 * N])
def test_resuming_at_a_position_yields_exactly_the_suffix(n):
    full = list(PromptStream(ROWS, enc, seed=9, max_prompt_tokens=5, epochs=3))
    suffix = [x for x in full if x.position >= n]
    assert list(PromptStream(ROWS, enc, seed=9, max_prompt_tokens=5, epochs=3, start=n)) == suffix
    skipped = PromptStream(ROWS, enc, seed=9, max_prompt_tokens=5, epochs=3)
    skipped.skip(n)
    assert list(skipped) == suffix


def test_resuming_far_into_the_stream_encodes_only_what_it_yields():
    calls = []

    def counting(row):
        calls.append(row.row_id)
        return enc(row)

    far = 10**6 * N + 4
    item = next(PromptStream(ROWS, counting, seed=2, start=far))
    assert (item.position, item.row.row_id) == reference(2, [far])[0] and len(calls) == 1
