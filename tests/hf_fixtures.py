"""Hugging Face checkpoints and chat prompt files made here (no downloads), shaped like real ones.

- `make_char_tokenizer`: a character-level tokenizer with Qwen's ChatML chat template, specials
  after the ordinary tokens (as in Qwen) and no BOS.
- `make_hf_moe`: a tiny random Qwen3-MoE or Mixtral checkpoint with that tokenizer, a model
  vocabulary padded past the tokenizer (as real Qwen checkpoints are) and generation_config.json.
- `write_chat_prompts`: synthetic "reverse: abc" / "upper: xyz" prompts with reference answers, as
  JSONL (messages lists, some plain strings) and Parquet (the same rows).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAR_SPECIALS = (ENDOFTEXT, IM_START, IM_END)
CHARS = tuple(chr(c) for c in range(32, 127)) + ("\n",)  # printable ASCII and newline
# Qwen3's ChatML without tools/thinking: one block per message, then the assistant's header.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "chat_template.jinja")


def chatml(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """CHATML_TEMPLATE written out by hand (the independent reference for tests)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def make_char_tokenizer(out_dir: str | Path, model_max_length: int = 512) -> Path:
    """One token per character of CHARS (ids 0..95), then <|endoftext|> (pad), <|im_start|>,
    <|im_end|> (eos). Decoding joins tokens without separators, so text round-trips exactly.
    The chat template goes into tokenizer_config.json, where real Qwen checkpoints keep it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(CHARS)}
    for s in CHAR_SPECIALS:
        vocab[s] = len(vocab)
    # BPE without merges and without a pre-tokenizer: every character is its own token.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in CHAR_SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   extra_special_tokens=[IM_START],
                                   model_max_length=model_max_length)
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(chat_template=CHATML_TEMPLATE, clean_up_tokenization_spaces=False)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (out / "chat_template.jinja").unlink(missing_ok=True)  # one copy of the template
    return out


def make_hf_moe(out_dir: str | Path, family: str = "qwen3_moe", tokenizer_dir: str | Path = "",
                vocab_size: int | None = None, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, num_experts: int = 8, top_k: int = 2,
                moe_intermediate_size: int = 32, intermediate_size: int = 96, seed: int = 0,
                head_scale: float = 1.0, pad_vocab_to: int = 8,
                max_position_embeddings: int = 512) -> Path:
    """A random-init Qwen3MoeForCausalLM or MixtralForCausalLM in fp32 safetensors, with the
    tokenizer of `tokenizer_dir` copied in and its special ids in config.json and
    generation_config.json.

    vocab_size defaults to the tokenizer's length rounded up to a multiple of pad_vocab_to, so
    the top rows have no token. head_scale multiplies lm_head (a teacher with peaked outputs).
    Qwen3-MoE: head_dim = hidden/heads, norm_topk_prob, and a dense intermediate_size distinct
    from moe_intermediate_size (real Qwen configs carry both). Mixtral's expert size is its
    intermediate_size, so there moe_intermediate_size is used and intermediate_size ignored.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    n_tok = len(tok)
    if vocab_size is None:
        vocab_size = -(-n_tok // pad_vocab_to) * pad_vocab_to
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer length {n_tok}")
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  head_dim=hidden_size // num_heads, num_experts_per_tok=top_k,
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, router_aux_loss_coef=0.0,
                  output_router_logits=False, torch_dtype="float32", **ids)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(num_experts=num_experts, moe_intermediate_size=moe_intermediate_size,
                                intermediate_size=intermediate_size, norm_topk_prob=True,
                                decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False,
                                **common)
        cls = Qwen3MoeForCausalLM
    elif family == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(num_local_experts=num_experts, intermediate_size=moe_intermediate_size,
                               hidden_act="silu", router_jitter_noise=0.0, sliding_window=None,
                               **common)
        cls = MixtralForCausalLM
    else:
        raise ValueError(f"family must be 'qwen3_moe' or 'mixtral', got {family!r}")
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILE_NAMES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy2(Path(tokenizer_dir) / name, out / name)
    # Like Qwen instruct checkpoints: generation stops on eos, given as a list.
    GenerationConfig(eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id).save_pretrained(str(out))
    return out


def chat_prompt_rows(n: int, seed: int) -> list[dict]:
    """n synthetic rows: {"messages": [...] or "text", "label": answer, "task": op, "idx": i}.
    Every third row has a system message, every fifth is a plain string."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = []
    for i in range(n):
        op = ("reverse", "upper")[int(rng.integers(2))]
        word = "".join(rng.choice(list(letters), size=int(rng.integers(2, 7))))
        answer = word[::-1] if op == "reverse" else word.upper()
        prompt = f"{op}: {word}"
        if i % 5 == 4:
            messages: list[dict] | str = prompt
        else:
            messages = [{"role": "user", "content": prompt}]
            if i % 3 == 0:
                messages.insert(0, {"role": "system", "content": "Answer with the result only."})
        rows.append({"messages": messages, "label": answer, "task": op, "idx": i})
    return rows


def write_chat_prompts(path_jsonl: str | Path | None, path_parquet: str | Path | None, n: int,
                       seed: int) -> list[dict]:
    """Write chat_prompt_rows(n, seed) as JSONL and/or Parquet; returns the rows. Parquet cannot
    mix strings and lists in one column, so there a plain-string prompt is written as the one
    user message it means."""
    rows = chat_prompt_rows(n, seed)
    if path_jsonl is not None:
        Path(path_jsonl).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if path_parquet is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        as_lists = [{**r, "messages": [{"role": "user", "content": r["messages"]}]
                     if isinstance(r["messages"], str) else r["messages"]} for r in rows]
        pq.write_table(pa.Table.from_pylist(as_lists), str(path_parquet))
    return rows
