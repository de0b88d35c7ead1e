"""Chat prompt datasets: read and validate rows, encode them, stream them deterministically.

A prompt file is local JSONL (one JSON object per line), Parquet, or a directory written by
`datasets.Dataset.save_to_disk`. A row holds chat messages under the prompt key (a list of
`{role, content}` objects, or a plain string = one user message) and an optional reference answer
under the label key; every other column is kept as JSON-able row metadata. Rows are validated when
the file is read, so a malformed one fails here, naming file and line, before anything downstream
sees it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
MAX_SKIP_REASONS = 10  # a skipped-row report keeps the first few reasons, not one per row
_BATCH = 1024  # rows per Parquet / datasets batch


class PromptDataError(ValueError):
    """A prompt file or row that cannot be used; the message names file and line (or row)."""


class _RowError(ValueError):
    """A problem inside one row; the reader adds the location."""


@dataclass(frozen=True)
class PromptRow:
    row_id: str  # "<file name>:<n>": n is the 1-based line (JSONL) or 0-based row index
    messages: tuple[tuple[str, str], ...]  # (role, content), in order
    label: str | None = None
    # Every other column; JSON-able values. Excluded from hash (dicts are unhashable).
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)

    def chat(self) -> list[dict[str, str]]:
        """The messages as `[{"role": ..., "content": ...}]` (what chat templates take)."""
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass(frozen=True)
class PromptFile:
    path: str
    rows: tuple[PromptRow, ...]
    skipped: int = 0  # malformed rows skipped under on_error="skip"
    skip_reasons: tuple[str, ...] = ()  # the first MAX_SKIP_REASONS of their messages


def read_prompt_rows(path: str | Path, prompt_key: str = "messages", label_key: str = "label",
                     on_error: str = "raise") -> PromptFile:
    """Read and validate every row of a JSONL file, a Parquet file or a saved `datasets` dir.

    on_error="raise" raises PromptDataError at the first malformed row; "skip" drops such rows
    and counts them. A file with no usable row is an error either way (almost surely a mistake).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    p = Path(path)
    if not p.exists():
        raise PromptDataError(f"{path}: no such file or directory")
    if p.is_dir():
        records, where = _dataset_dir_records(p), _row_location
    elif p.suffix == ".jsonl":
        records, where = _jsonl_records(p), _line_location
    elif p.suffix == ".parquet":
        records, where = _parquet_records(p), _row_location
    else:
        raise PromptDataError(f"{path}: unsupported prompt file; expected a .jsonl or .parquet "
                              f"file or a directory saved by datasets' save_to_disk")
    rows: list[PromptRow] = []
    skipped, reasons = 0, []
    for n, record in records:
        try:
            if isinstance(record, _RowError):
                raise record
            rows.append(_parse_row(record, f"{p.name}:{n}", prompt_key, label_key))
        except _RowError as e:
            msg = f"{where(path, n)}: {e}"
            if on_error == "raise":
                raise PromptDataError(msg) from None
            skipped += 1
            if len(reasons) < MAX_SKIP_REASONS:
                reasons.append(msg)
    if not rows:
        detail = f" ({skipped} malformed rows skipped; first: {reasons[0]})" if skipped else ""
        raise PromptDataError(f"{path}: no prompt rows{detail}")
    return PromptFile(str(path), tuple(rows), skipped, tuple(reasons))


def _line_location(path, n: int) -> str:
    return f"{path}:{n}"


def _row_location(path, n: int) -> str:
    return f"{path}: row {n}"


def _jsonl_records(p: Path) -> Iterator[tuple[int, Any]]:
    with p.open("rb") as f:  # bytes: a bad encoding is one row's error, not the file's
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, _RowError(f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line.rstrip("\r\n"))  # columns within the line
            except json.JSONDecodeError as e:
                yield lineno, _RowError(f"invalid JSON: {e.msg} (column {e.colno})")


def _parquet_records(p: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=_BATCH)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise PromptDataError(f"{p}: not a readable Parquet file: {e}") from None
    index = 0
    for batch in batches:
        for record in batch.to_pylist():
            yield index, record
            index += 1


def _dataset_dir_records(p: Path) -> Iterator[tuple[int, Any]]:
    import datasets  # heavy; only for dataset dirs

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise PromptDataError(f"{p}: not a dataset saved by datasets' save_to_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise PromptDataError(f"{p}: holds splits {sorted(ds)}; name one split's directory "
                                  f"(e.g. {p / sorted(ds)[0]})")
        ds = next(iter(ds.values()))
    index = 0
    for batch in ds.with_format(None).iter(batch_size=_BATCH):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield index, dict(zip(keys, values))
            index += 1


def _parse_row(record: Any, row_id: str, prompt_key: str = "messages",
              label_key: str = "label") -> PromptRow:
    """Validate one decoded record into a PromptRow; raises _RowError saying what is wrong."""
    if not isinstance(record, Mapping):
        raise _RowError(f"expected a JSON object, got {_type(record)}")
    if prompt_key not in record:
        raise _RowError(f"missing key {prompt_key!r} (the prompt key); the row has keys "
                        f"{sorted(record)}")
    messages = _messages(record[prompt_key], prompt_key)
    label = _label(record.get(label_key), label_key)
    metadata = {}
    for key, value in record.items():
        if key in (prompt_key, label_key):
            continue
        try:  # metadata travels in JSON (samples, eval files): refuse what cannot
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise _RowError(f"{key}: metadata values must be JSON-able, got {_type(value)}") \
                from None
        metadata[key] = value
    return PromptRow(row_id, messages, label, metadata)


def _messages(value: Any, key: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        if not value:
            raise _RowError(f"{key}: empty prompt string")
        return (("user", value),)
    if not isinstance(value, (list, tuple)):
        raise _RowError(f"{key}: must be a list of {{role, content}} messages or a string, "
                        f"got {_type(value)}")
    if not value:
        raise _RowError(f"{key}: empty list of messages")
    out = []
    for i, m in enumerate(value):
        at = f"{key}[{i}]"
        if not isinstance(m, Mapping):
            raise _RowError(f"{at}: must be an object with role and content, got {_type(m)}")
        for part in ("role", "content"):
            if m.get(part) is None:
                raise _RowError(f"{at}: missing {part!r}")
        extra = sorted(k for k, v in m.items() if k not in ("role", "content") and v is not None)
        if extra:  # dropping them silently would change the prompt the user meant
            raise _RowError(f"{at}: unsupported keys {extra} (a message has only role and "
                            f"content)")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise _RowError(f"{at}.role: must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _RowError(f"{at}.content: must be a string, got {_type(content)}")
        out.append((role, content))
    return tuple(out)


def _label(value: Any, key: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):  # a bool is an int in Python; as an answer it is a mistake
        raise _RowError(f"{key}: must be a string or a number, got bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _RowError(f"{key}: must be a finite number, got {value!r}")
        return str(value)
    raise _RowError(f"{key}: must be a string or a number, got {_type(value)}")


def _type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", type(None): "null"}.get(
        type(value), type(value).__name__)


def encode_prompt(row: PromptRow, tokenizer, apply_chat_template: bool) -> list[int]:
    """The prompt's token ids.

    apply_chat_template=True: the tokenizer's chat template over all messages with the generation
    prompt (`apply_chat_template(..., add_generation_prompt=True, tokenize=True)`), so the model
    continues as the assistant. False (base models): the contents of all messages in order,
    joined by a blank line ("\\n\\n") without role markers, tokenized with the tokenizer's own
    special tokens (`add_special_tokens=True`, e.g. a BOS where the tokenizer adds one).
    """
    if not apply_chat_template:
        text = "\n\n".join(content for _, content in row.messages)
        return [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "chat_template", None):
        raise PromptDataError(f"the tokenizer in {name!r} has no chat template; set "
                              f"data.apply_chat_template=false to tokenize prompts as plain text")
    try:
        out = tokenizer.apply_chat_template(row.chat(), add_generation_prompt=True, tokenize=True)
    except Exception as e:  # templates may raise (e.g. roles that must alternate)
        raise PromptDataError(f"{row.row_id}: the chat template of {name!r} refused the "
                              f"messages: {e}") from None
    if isinstance(out, Mapping):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    if len(out) and isinstance(out[0], (list, tuple)):  # a batch of one
        out = out[0]
    return [int(i) for i in out]


def privileged_row(row: PromptRow, template: str, hint_key: str) -> PromptRow:
    """The row as the privileged teacher sees it (teacher.prompt=privileged): its last user
    message becomes `template` with {prompt} = that message and {hint} = the row's `hint_key`
    column (a string, or JSON of anything else); every other message is kept. Encode it with
    `encode_prompt` as the row itself."""
    if hint_key not in row.metadata:
        raise PromptDataError(f"{row.row_id}: no {hint_key!r} column for the privileged teacher "
                              f"prompt (teacher.hint_key; the row has {sorted(row.metadata)})")
    hint = row.metadata[hint_key]
    hint = hint if isinstance(hint, str) else json.dumps(hint)
    users = [i for i, (role, _) in enumerate(row.messages) if role == "user"]
    if not users:
        raise PromptDataError(f"{row.row_id}: no user message to add the hint to")
    last = users[-1]
    # one pass over the template: a {hint} inside the prompt's text is never expanded
    text = "".join(row.messages[last][1] if part == "{prompt}" else hint if part == "{hint}"
                   else part for part in _template_parts(template))
    messages = tuple((r, text if i == last else c) for i, (r, c) in enumerate(row.messages))
    return PromptRow(row.row_id, messages, row.label, row.metadata)


def _template_parts(template: str) -> list[str]:
    import re

    return [p for p in re.split(r"({prompt}|{hint})", template) if p]


class StreamItem(NamedTuple):
    position: int  # stable prompt id: epoch * len(rows) + index within the epoch's order
    row: PromptRow
    token_ids: list[int]


class PromptStream:
    """Deterministic stream of prompts over `rows`: epoch e visits every row once, in the order
    `numpy.random.default_rng([seed, e]).permutation(len(rows))` (file order if shuffle=False).

    Positions are visit slots: position p is row `order_e[p % N]` of epoch `e = p // N`, so the
    same (rows, seed) always put the same row at the same position, and a resumed run starts at a
    position without tokenizing anything before it (`start=` or `seek`/`skip`). A row whose
    encoding is longer than max_prompt_tokens is dropped: its position is never yielded (ids of
    later prompts do not shift) and `dropped` counts it. Encoding is lazy (one row at a time) and
    nothing is cached but the current epoch's order. epochs=None streams forever; otherwise the
    stream ends after that many epochs. Not thread-safe: callers share it under a lock.
    """

    def __init__(self, rows: Sequence[PromptRow], encode: Callable[[PromptRow], Sequence[int]],
                 seed: int, *, max_prompt_tokens: int | None = None, epochs: int | None = None,
                 shuffle: bool = True, start: int = 0):
        if not rows:
            raise PromptDataError("a prompt stream needs at least one row")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {epochs}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
        self.rows, self.encode, self.seed = rows, encode, seed
        self.max_prompt_tokens, self.epochs, self.shuffle = max_prompt_tokens, epochs, shuffle
        self.dropped = 0  # rows dropped as too long by this object (not before `start`)
        self.dropped_row_ids: list[str] = []  # the first few, for a log line
        self._order_epoch, self._order = -1, np.arange(0)
        self._drop_run = 0  # consecutive drops: a whole epoch of them means nothing fits
        self.position = 0
        self.seek(start)

    @property
    def end(self) -> int | None:
        """One past the last position (None for an endless stream)."""
        return None if self.epochs is None else self.epochs * len(self.rows)

    def order(self, epoch: int) -> np.ndarray:
        """Row indices in the order epoch `epoch` visits them."""
        if epoch != self._order_epoch:
            n = len(self.rows)
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n)
                           if self.shuffle else np.arange(n))
            self._order_epoch = epoch
        return self._order

    def row_at(self, position: int) -> PromptRow:
        """The row at a position (whether or not its encoding fits), without encoding it."""
        epoch, k = divmod(position, len(self.rows))
        return self.rows[int(self.order(epoch)[k])]

    def seek(self, position: int) -> None:
        """Continue from `position` (the next item has a position >= it)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self.position = position
        self._drop_run = 0

    def skip(self, n: int) -> None:
        """Skip the next n positions (what a resumed run already trained)."""
        self.seek(self.position + n)

    def __iter__(self) -> Iterator[StreamItem]:
        return self

    def __next__(self) -> StreamItem:
        while self.end is None or self.position < self.end:
            pos = self.position
            row = self.row_at(pos)
            self.position += 1
            ids = [int(i) for i in self.encode(row)]
            if self.max_prompt_tokens is None or len(ids) <= self.max_prompt_tokens:
                self._drop_run = 0
                return StreamItem(pos, row, ids)
            self.dropped += 1
            if len(self.dropped_row_ids) < MAX_SKIP_REASONS:
                self.dropped_row_ids.append(row.row_id)
            self._drop_run += 1
            if self._drop_run >= len(self.rows):
                raise PromptDataError(f"every prompt is longer than max_prompt_tokens="
                                      f"{self.max_prompt_tokens} (data.max_prompt_tokens)")
        raise StopIteration
