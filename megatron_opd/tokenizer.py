"""A word-level tokenizer built locally (no hub), saved in Hugging Face format.

Both SGLang servers and `transformers` load it from the model directory. Token ids are fixed by
the vocabulary list, so a model made here and its tokenizer always agree.
"""

from __future__ import annotations

import json
from pathlib import Path

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)


def save_tokenizer(out_dir: str | Path, vocab: list[str], model_max_length: int = 64) -> None:
    """Write tokenizer.json + tokenizer_config.json for `vocab` (specials first, in SPECIALS order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
        raise ValueError(f"vocab must start with {SPECIALS}, got {vocab[:3]}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocab has duplicate tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=model_max_length,
    )
    fast.save_pretrained(str(out))
    # SGLang reads the chat template only when asked for one; keep the file self-describing.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["clean_up_tokenization_spaces"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
