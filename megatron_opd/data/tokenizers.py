"""Tokenizers from Hugging Face model dirs: loading, special ids, vocabulary checks, decoding.

Student and teacher exchange token ids, never text, so their vocabularies must be the same map
from token string to id; `compare_vocabularies` refuses anything else before a server starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Files one of which every Hugging Face tokenizer dir has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MAX_REPORTED_IDS = 5  # a mismatch names the first few differing ids


class TokenizerError(ValueError):
    """A model dir whose tokenizer or special ids cannot be used; the message names the dir."""


class TokenizerMismatch(TokenizerError):
    """Student and teacher vocabularies differ."""


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None  # what the tokenizer prepends, if anything
    eos: int  # ends a completion (the first stop id)
    pad: int  # fills batches; never trained on
    stop_ids: tuple[int, ...]  # every id that ends generation, eos first


def load_tokenizer(model_dir: str | Path):
    """`transformers.AutoTokenizer` from a local dir (never the hub)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise TokenizerError(f"{model_dir}: no such model directory")
    if not any((d / f).exists() for f in TOKENIZER_FILES):
        raise TokenizerError(f"{model_dir}: no tokenizer (none of {list(TOKENIZER_FILES)}); "
                             f"copy the tokenizer files into the model directory")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise TokenizerError(f"{model_dir}: cannot load its tokenizer: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(cfg, dict):
        return {}
    # Multimodal configs keep the language model's ids under text_config (a top-level null
    # does not hide them).
    return {**(cfg.get("text_config") or {}), **{k: v for k, v in cfg.items() if v is not None}}


def _id_list(value: Any, source: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                             for v in values):
        raise TokenizerError(f"{source}: must be a token id or a list of them, got {value!r}")
    return values


def special_ids(model_dir: str | Path, tokenizer) -> SpecialIds:
    """Special ids of a model dir and its tokenizer.

    eos/stop ids: generation_config.json's eos_token_id, else config.json's, else the
    tokenizer's eos token; a list makes every entry a stop id and its first the eos (Qwen3
    instruct models stop on both <|im_end|> and <|endoftext|>).
    pad: the tokenizer's pad token, else generation_config.json's pad_token_id, else
    config.json's, else eos (padding is masked out, so any id works).
    bos: the tokenizer's bos token (what encoding prepends), None if it has none; config.json's
    bos_token_id is ignored, since Qwen names <|endoftext|> there but never prepends it.
    """
    d = Path(model_dir)
    gen, cfg = _read_json(d / "generation_config.json"), _read_json(d / "config.json")
    stops: list[int] | None = None
    for name, src in (("generation_config.json", gen), ("config.json", cfg)):
        if src.get("eos_token_id") is not None:
            stops = _id_list(src["eos_token_id"], f"{d / name}: eos_token_id")
            break
    if stops is None:
        if tokenizer.eos_token_id is None:
            raise TokenizerError(f"{model_dir}: no eos token (no eos_token_id in "
                                 f"generation_config.json or config.json, none in the tokenizer)")
        stops = [int(tokenizer.eos_token_id)]
    stops = list(dict.fromkeys(stops))  # dedupe, keep order
    pad = tokenizer.pad_token_id
    for name, src in (("generation_config.json", gen), ("config.json", cfg)):
        if pad is None and src.get("pad_token_id") is not None:
            pad = _id_list(src["pad_token_id"], f"{d / name}: pad_token_id")[0]
    bos = tokenizer.bos_token_id
    return SpecialIds(bos=None if bos is None else int(bos), eos=stops[0],
                      pad=stops[0] if pad is None else int(pad), stop_ids=tuple(stops))


def compare_vocabularies(student_dir: str | Path, teacher_dir: str | Path) -> None:
    """Refuse (TokenizerMismatch) unless both dirs' tokenizers map the same token strings,
    added and special tokens included, to the same ids; the message names the first differing
    ids and both sizes."""
    student = load_tokenizer(student_dir).get_vocab()
    teacher = load_tokenizer(teacher_dir).get_vocab()
    if student == teacher:  # the common case: one C-speed dict comparison
        return
    s_by_id, t_by_id = _by_id(student), _by_id(teacher)
    ids = sorted(i for i in s_by_id.keys() | t_by_id.keys() if s_by_id.get(i) != t_by_id.get(i))
    shown = "; ".join(f"id {i}: student {_tok(s_by_id.get(i))} vs teacher {_tok(t_by_id.get(i))}"
                      for i in ids[:MAX_REPORTED_IDS])
    if not ids:  # same id -> string view, but one side maps extra strings to shared ids
        extra = sorted(student.keys() ^ teacher.keys())[:MAX_REPORTED_IDS]
        shown = "tokens in only one of them: " + ", ".join(
            f"{t!r} (id {student.get(t, teacher.get(t))})" for t in extra)
    more = f"; ... ({len(ids)} ids differ)" if len(ids) > MAX_REPORTED_IDS else ""
    raise TokenizerMismatch(
        f"student {student_dir} and teacher {teacher_dir} have different vocabularies "
        f"(student {len(student)} tokens, teacher {len(teacher)}): {shown}{more}. They exchange "
        f"token ids, so both need the same tokenizer (cross-tokenizer distillation is not "
        f"supported)")


def _by_id(vocab: dict[str, int]) -> dict[int, str]:
    # A vocab may map two strings to one id (some added tokens); keep the first deterministically.
    out: dict[int, str] = {}
    for tok, i in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        out.setdefault(i, tok)
    return out


def _tok(token: str | None) -> str:
    return "(none)" if token is None else repr(token)


def decode(tokenizer, ids, skip_special_tokens: bool = False) -> str:
    """Text of token ids exactly as the tokenizer renders it (no space clean-up). Ids beyond the
    tokenizer (a model vocabulary padded past it) render as nothing: they are never sampled."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens,
                            clean_up_tokenization_spaces=False)
