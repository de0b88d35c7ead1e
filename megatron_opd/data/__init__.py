"""Prompt datasets and Hugging Face tokenizers for runs on a user's own models and data.

Pure library code: plain arguments (no config tree), no torch import. `prompts` reads chat prompt
files into validated rows and streams them deterministically; `tokenizers` loads tokenizers from
model dirs, resolves special ids and refuses mismatched student/teacher vocabularies.
"""

from megatron_opd.data.prompts import (
    PromptDataError, PromptFile, PromptRow, PromptStream, StreamItem, encode_prompt,
    read_prompt_rows,
)
from megatron_opd.data.tokenizers import (
    SpecialIds, TokenizerError, TokenizerMismatch, compare_vocabularies, decode, load_tokenizer,
    special_ids,
)

__all__ = [
    "PromptDataError", "PromptFile", "PromptRow", "PromptStream", "StreamItem", "encode_prompt",
    "read_prompt_rows", "SpecialIds", "TokenizerError", "TokenizerMismatch",
    "compare_vocabularies", "decode", "load_tokenizer", "special_ids",
]
