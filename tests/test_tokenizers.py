"""Tokenizers from HF dirs: special ids, vocabulary comparison, the fixture checkpoints (loaded by
transformers, and served by a real SGLang server on CPU with chat-templated prompts)."""

import json
import shutil

import pytest
import torch

from tests.hf_fixtures import CHARS, chatml, make_char_tokenizer, make_hf_moe
from megatron_opd.data import (
    PromptRow, SpecialIds, TokenizerError, TokenizerMismatch, compare_vocabularies, decode,
    encode_prompt, load_tokenizer, special_ids,
)

PAD, IM_START_ID, EOS = len(CHARS), len(CHARS) + 1, len(CHARS) + 2  # 96, 97, 98
TEXTS = ["reverse: abc", "Hello, World!\n  two  spaces\n", "{'x': [1, 2]} ~`|\\", " lead"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def tok_dir(root):
    return make_char_tokenizer(root / "tok")


@pytest.fixture(scope="module")
def student(root, tok_dir):
    return make_hf_moe(root / "student", "qwen3_moe", tok_dir, seed=0)


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text()) if path.exists() else {}
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def test_char_tokenizer_round_trips_text_exactly(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert len(tok) == len(CHARS) + 3
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == [CHARS.index(c) for c in text]  # one token per character, no BOS
        assert decode(tok, ids) == text
    ids = encode_prompt(PromptRow("r:1", (("user", "hi there"),)), tok, True)
    assert decode(tok, ids) == chatml([{"role": "user", "content": "hi there"}])
    assert decode(tok, ids + [EOS], skip_special_tokens=True) == "user\nhi there\nassistant\n"


def test_special_ids_of_the_fixture_and_their_sources(student, tmp_path):
    tok = load_tokenizer(student)
    assert special_ids(student, tok) == SpecialIds(bos=None, eos=EOS, pad=PAD, stop_ids=(EOS,))
    d = tmp_path / "m"
    shutil.copytree(student, d)
    # generation_config's list: every entry stops, the first is eos
    _edit_json(d / "generation_config.json", eos_token_id=[PAD, EOS, PAD])
    assert special_ids(d, tok) == SpecialIds(None, PAD, PAD, (PAD, EOS))
    # no generation_config eos: config.json's
    _edit_json(d / "generation_config.json", eos_token_id=None)
    _edit_json(d / "config.json", eos_token_id=5)
    assert special_ids(d, tok).stop_ids == (5,)
    # neither: the tokenizer's eos
    _edit_json(d / "config.json", eos_token_id=None)
    assert special_ids(d, tok) == SpecialIds(None, EOS, PAD, (EOS,))
    # a tokenizer without pad: generation_config's, then config.json's, then eos
    _edit_json(d / "tokenizer_config.json", pad_token=None)
    nopad = load_tokenizer(d)
    assert nopad.pad_token_id is None
    _edit_json(d / "generation_config.json", pad_token_id=7)
    _edit_json(d / "config.json", pad_token_id=8)
    assert special_ids(d, nopad).pad == 7
    _edit_json(d / "generation_config.json", pad_token_id=None)
    assert special_ids(d, nopad).pad == 8
    _edit_json(d / "config.json", pad_token_id=None)
    assert special_ids(d, nopad) == SpecialIds(None, EOS, EOS, (EOS,))
    _edit_json(d / "config.json", eos_token_id="x")
    with pytest.raises(TokenizerError, match="config.json: eos_token_id: must be a token id"):
        special_ids(d, tok)


def test_load_tokenizer_errors_name_the_dir(tmp_path):
    with pytest.raises(TokenizerError, match="no such model directory"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'weights'}: no tokenizer"):
        load_tokenizer(tmp_path / "weights")


def test_compare_vocabularies(tok_dir, student, tmp_path):
    compare_vocabularies(student, tok_dir)  # the same tokenizer, copied
    compare_vocabularies(student, make_char_tokenizer(tmp_path / "again"))  # rebuilt identically
    # two tokens swapped in the teacher's model vocabulary
    swapped = tmp_path / "swapped"
    shutil.copytree(tok_dir, swapped)
    tj = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (swapped / "tokenizer.json").write_text(json.dumps(tj))
    a, b = CHARS.index("a"), CHARS.index("b")
    with pytest.raises(TokenizerMismatch) as err:
        compare_vocabularies(student, swapped)
    msg = str(err.value)
    assert f"student {student} and teacher {swapped} have different vocabularies (student 99 " \
           f"tokens, teacher 99): id {a}: student 'a' vs teacher 'b'; id {b}: student 'b' vs " \
           f"teacher 'a'. " in msg
    # one added token more
    bigger = tmp_path / "bigger"
    tok = load_tokenizer(tok_dir)
    tok.add_tokens(["<|extra|>"], special_tokens=True)
    tok.save_pretrained(str(bigger))
    with pytest.raises(TokenizerMismatch, match=r"\(student 99 tokens, teacher 100\): id 99: "
                                                r"student \(none\) vs teacher '<\|extra\|>'"):
        compare_vocabularies(student, bigger)


def test_compare_vocabularies_reports_many_differences_briefly(tok_dir, tmp_path):
    shifted = tmp_path / "shifted"
    shutil.copytree(tok_dir, shifted)
    tj = json.loads((shifted / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    letters = "abcdefgh"
    for i, c in enumerate(letters):  # rotate eight ids
        vocab[c] = CHARS.index(letters[(i + 1) % len(letters)])
    (shifted / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerMismatch) as err:
        compare_vocabularies(tok_dir, shifted)
    assert str(err.value).count("id ") == 5 and "... (8 ids differ)" in str(err.value)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fixture_checkpoints_load_in_transformers(family, tok_dir, root):
    from transformers import AutoModelForCausalLM

    base = make_hf_moe(root / f"{family}-1", family, tok_dir, seed=1)
    peaked = make_hf_moe(root / f"{family}-4", family, tok_dir, seed=1, head_scale=4.0)
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["architectures"] == [{"qwen3_moe": "Qwen3MoeForCausalLM",
                                     "mixtral": "MixtralForCausalLM"}[family]]
    assert cfg["vocab_size"] == 104 and cfg["max_position_embeddings"] == 512  # 99 padded to 8s
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (None, EOS, PAD)
    if family == "qwen3_moe":
        assert cfg["norm_topk_prob"] and cfg["intermediate_size"] != cfg["moe_intermediate_size"]
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == [EOS]
    m1 = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    m4 = AutoModelForCausalLM.from_pretrained(str(peaked), dtype=torch.float32).eval()
    assert type(m1).__name__ == cfg["architectures"][0]
    ids = encode_prompt(PromptRow("r:1", (("user", "upper: abc"),)), load_tokenizer(base), True)
    with torch.no_grad():
        l1, l4 = (m(torch.tensor([ids])).logits[0] for m in (m1, m4))
    assert l1.shape == (len(ids), 104)
    torch.testing.assert_close(l4, 4.0 * l1, rtol=1e-5, atol=1e-5)  # only the head differs
    ent = lambda lg: -(lg.log_softmax(-1).exp() * lg.log_softmax(-1)).sum(-1).mean()
    assert ent(l4) < ent(l1)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe"])  # tests/test_e2e_hf.py serves a Mixtral dir
def test_sglang_serves_fixture_dir_with_chat_templated_prompt(family, tok_dir, root, tmp_path):
    """A real SGLang server on CPU serves the fixture dir: it accepts the char tokenizer and the
    config, reads our prompt ids as we encode them, and generates what transformers would."""
    import requests
    from transformers import AutoModelForCausalLM

    from megatron_opd.serving.sglang_server import SGLangServer, free_port

    student = make_hf_moe(root / f"served-{family}", family, tok_dir, seed=0)
    tok = load_tokenizer(student)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "upper: ab"}]
    row = PromptRow("r:1", tuple((m["role"], m["content"]) for m in messages))
    ids = encode_prompt(row, tok, apply_chat_template=True)
    # Few new tokens: this random model's 4th greedy token is a padded id (no token), which
    # SGLang's incremental detokenizer renders as a space and the tokenizer as nothing.
    NEW = 3
    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=PAD)[0, len(ids):].tolist()
    srv = SGLangServer("fixture", str(student), free_port(), str(tmp_path / "server.log"),
                       max_total_tokens=2048, threads=1)
    srv.start()
    try:
        srv.wait_ready(300)
        greedy = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}
        by_ids = requests.post(f"{srv.url}/generate", timeout=120, json={
            "input_ids": ids, "sampling_params": greedy, "return_logprob": True,
            "logprob_start_len": 0}).json()
        # SGLang's own tokenization of the templated text is ours, id for id
        by_text = requests.post(f"{srv.url}/generate", timeout=120, json={
            "text": chatml(messages), "sampling_params": greedy, "return_logprob": True,
            "logprob_start_len": 0}).json()
        chat = requests.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
            "model": "fixture", "messages": messages, "max_tokens": NEW, "temperature": 0.0,
            "ignore_eos": True}).json()
    finally:
        srv.stop()
    for res in (by_ids, by_text):
        meta = res["meta_info"]
        assert meta["prompt_tokens"] == len(ids)
        assert [t[1] for t in meta["input_token_logprobs"]] == ids
        assert res["output_ids"] == ref  # greedy, as transformers
        assert max(ref) < len(tok), "a padded id was generated; see the comment on NEW"
        assert res["text"] == decode(tok, ref, skip_special_tokens=True)  # SGLang's default
    # the chat endpoint applies the same template from tokenizer_config.json
    assert chat["usage"]["prompt_tokens"] == len(ids)
