"""Typed, versioned messages between processes, encoded as ZeroMQ multipart frames.

Frame 0 is a JSON header: {"schema": "megatron-opd", "version": SCHEMA_VERSION, "kind": ...,
"fields": {scalars}, "tensors": [{"name", "dtype", "shape"}, ...]}; each following frame is the
raw little-endian, C-contiguous bytes of one tensor, in table order. Tensors are handed to ZeroMQ
as buffers (no copy through Python objects) and decoded with `np.frombuffer` over the received
frames (zero-copy, read-only). Nothing is ever pickled. `decode` validates everything and raises
`ProtocolError(reason, detail)`; receivers count rejections by reason and keep serving.

Both ends of a run come from one build, so the version must match exactly: version 2 added the
sampler fields of `Sample` (`temperature`, `top_p`); version 3 added `teacher_temperature` (the
temperature the teacher's log-probs are of, which a v3 header must state: a missing one is
refused, never taken as 1); version 4 added the optional `teacher_hidden` frame (teacher.signal=
hidden: the teacher's final hidden states, bfloat16 bits as uint16 or float32). An older peer is refused ("bad_schema_version"), not guessed at.
Version 2 also defines the kinds of the reliable sample channel (`Hello`, `Credit`, `Ack`; see
`transport/channel.py`). They only travel between a ROUTER `SampleServer` and a DEALER
`SampleClient`, socket types a pre-channel PUSH/PULL peer cannot even connect to, and every socket
refuses kinds that are not meant for it (reason "wrong_kind").

Limits: a header is at most MAX_HEADER_BYTES; a whole message at most the receiver's
`max_message_bytes` (checked on frame sizes before anything is parsed or authenticated; reason
"oversize"). With a run secret every message also carries an authentication frame in front of
the header (`transport/auth.py`); that frame has its own version byte.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import orjson

from megatron_opd import sample_fields

SCHEMA = "megatron-opd"
SCHEMA_VERSION = 4  # 2: Sample.temperature / Sample.top_p; 3: Sample.teacher_temperature;
# 4: Sample.teacher_hidden
MAX_HEADER_BYTES = 1 << 20


class ProtocolError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _fail(reason: str, detail: str = "") -> None:
    raise ProtocolError(reason, detail)


# ------------------------------------------------------------------------------- messages
@dataclass
class Sample:
    """One trajectory for the learner (orchestrator → learner).

    Its tensors and per-sample numbers are declared in the field table
    (`megatron_opd/sample_fields.py`: wire dtypes, shapes, value invariants); the dataclass lists
    them in the table's order, which is the frame order. Invariants (checked by `decode`, and by
    `validate` before sending):
    - sample_id unique per run, 1..128 chars; P = len(prompt_ids) >= 1; T = len(response_ids) >= 1.
    - loss_mask, behaviour_logprobs, token_versions, teacher_logprobs have length T;
      teacher_topk_ids / teacher_topk_logprobs are [T, K] (K may be 0).
    - loss_mask in {0, 1} (environment/tool tokens are 0); log-probs finite; behaviour log-probs
      <= 0 (1e-4 slack); token_versions >= 0 and non-decreasing (weights only move forward
      while a response is generated).
    - routed_experts, when present, is [P + T - 1, num_moe_layers, top_k].
    - teacher_hidden, when present, is [T, D] (D the teacher's hidden size), uint16 (bfloat16
      bit patterns) or float32, every value finite: row t at the position of teacher_logprobs[t].
    - temperature > 0 and 0 < top_p <= 1: the sampler settings that produced response_ids.
    - teacher_temperature > 0: the temperature teacher_logprobs / teacher_topk_logprobs are of
      (the distillation terms score the student at it; ratios against mu use `temperature`).
    - reward is finite (the task verifier's outcome, e.g. 1.0 / 0.0 for exact answers); samples
      of one GRPO group share group_id (the orchestrator sends a group back to back).

    behaviour_logprobs are what SGLang returns: log_softmax(logits / temperature) of the sampled
    token, NOT renormalised over the top-p nucleus (nor top-k). So with top_p < 1 they are not the
    log-probs of the distribution the token was actually drawn from (that one is the nucleus
    renormalisation, >= these values); a loss that needs μ exactly must renormalise itself, using
    `temperature` and `top_p` carried here.
    """

    sample_id: str
    group_id: str
    prompt_ids: np.ndarray  # int32 [P]
    response_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # uint8 [T]
    behaviour_logprobs: np.ndarray  # float32 [T]
    token_versions: np.ndarray  # int64 [T]
    teacher_logprobs: np.ndarray  # float32 [T]
    teacher_topk_ids: np.ndarray  # int32 [T, K]
    teacher_topk_logprobs: np.ndarray  # float32 [T, K]
    teacher_revision: str = ""
    routed_experts: np.ndarray | None = None
    teacher_hidden: np.ndarray | None = None  # uint16 (bfloat16 bits) / float32 [T, D]
    reward: float = 0.0
    metadata: dict = field(default_factory=dict)
    created_at: float = 0.0
    finish_reason: str = ""
    temperature: float = 1.0  # sampling temperature of the rollout (behaviour_logprobs use it)
    top_p: float = 1.0  # nucleus of the rollout sampler (behaviour_logprobs are NOT renormalised)
    teacher_temperature: float = 1.0  # temperature of the teacher's log-probs (teacher.temperature)

    KIND: ClassVar[str] = "sample"
    # header fields a sender must state although the dataclass has a default (never implied)
    HEADER_REQUIRED: ClassVar[frozenset] = frozenset({"teacher_temperature"})
    # name -> wire dtypes, in frame order: from the field table (megatron_opd/sample_fields.py)
    TENSORS: ClassVar[dict[str, tuple[str, ...]]] = sample_fields.wire_tensors()

    @property
    def num_tokens(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def min_version(self) -> int:
        return int(self.token_versions.min())

    @property
    def max_version(self) -> int:
        return int(self.token_versions.max())

    def validate(self) -> None:
        _check_str(self.sample_id, "sample_id", 1, 128)
        _check_str(self.group_id, "group_id", 0, 128)
        _check_str(self.teacher_revision, "teacher_revision", 0, 256)
        _check_str(self.finish_reason, "finish_reason", 0, 64)
        _check_float(self.created_at, "created_at")
        for name in _SCALARS:  # per-sample numbers of the field table (reward, sampler)
            _check_float(getattr(self, name), name)
        if not self.temperature > 0:
            _fail("bad_value", f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            _fail("bad_value", f"top_p must be in (0, 1], got {self.top_p}")
        if not self.teacher_temperature > 0:
            _fail("bad_value", f"teacher_temperature must be > 0, got {self.teacher_temperature}")
        _check_metadata(self.metadata)
        _check_tensors(self)


@dataclass
class EvalReport:
    """Evaluation metrics of one policy version (orchestrator → learner)."""

    version: int
    metrics: dict = field(default_factory=dict)
    KIND: ClassVar[str] = "eval_report"
    TENSORS: ClassVar[dict] = {}

    def validate(self) -> None:
        _check_int(self.version, "version")
        if not isinstance(self.metrics, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                for k, v in self.metrics.items()):
            _fail("bad_field", "metrics must map str to numbers")


@dataclass
class WeightsPublished:
    """Weights of `version` are live on the rollout fleet (learner → orchestrator). Latest wins."""

    version: int
    step: int
    published_at: float = 0.0
    KIND: ClassVar[str] = "weights_published"
    TENSORS: ClassVar[dict] = {}

    def validate(self) -> None:
        _check_int(self.version, "version")
        _check_int(self.step, "step")
        _check_float(self.published_at, "published_at")


@dataclass
class Shutdown:
    """The run is over; stop generating (learner → orchestrator)."""

    reason: str = ""
    KIND: ClassVar[str] = "shutdown"
    TENSORS: ClassVar[dict] = {}

    def validate(self) -> None:
        _check_str(self.reason, "reason", 0, 1024)


@dataclass
class Interrupt:
    """Interrupt sync (`correction.proximal=interrupt`, learner → orchestrator): the learner is
    about to replace the fleet's weights `version`; pause the rollout fleet (abort mode: running
    requests return their partial trajectories), and send back `PartialRollouts(interrupt=seq)`
    with every token sequence not yet sent to the learner. Generation stays paused until the
    next `WeightsPublished` (aborted requests then continue from their partial output)."""

    seq: int
    version: int
    KIND: ClassVar[str] = "interrupt"
    TENSORS: ClassVar[dict] = {}

    def validate(self) -> None:
        _check_int(self.seq, "seq")
        _check_int(self.version, "version")
        if self.seq < 0 or self.version < 0:
            _fail("bad_value", "seq and version must be >= 0")


@dataclass
class PartialRollouts:
    """Answer to `Interrupt(seq)` (orchestrator → learner on the sample channel, outside credit):
    the responses generated so far that the learner has not received, packed row after row.

    Invariants (checked by `validate`): n = len(keys) rows, each key the sample id the finished
    sample will carry (1..128 chars, unique); prompt_lengths, response_lengths int32 [n], every
    prompt >= 1 token and every response >= 1 token; token_ids int32 [sum(P_i + T_i)] holds row
    i's prompt then its response; token_versions int64 [sum(T_i)] the version of each response
    token, >= 0 and non-decreasing within a row. A row is always the response from its first
    token (a continued request sends everything generated so far)."""

    interrupt: int
    version: int
    keys: list = field(default_factory=list)
    prompt_lengths: np.ndarray | None = None  # int32 [n]
    response_lengths: np.ndarray | None = None  # int32 [n]
    token_ids: np.ndarray | None = None  # int32 [sum(P + T)]
    token_versions: np.ndarray | None = None  # int64 [sum(T)]
    KIND: ClassVar[str] = "partial_rollouts"
    TENSORS: ClassVar[dict] = {"prompt_lengths": ("int32",), "response_lengths": ("int32",),
                               "token_ids": ("int32",), "token_versions": ("int64",)}

    def validate(self) -> None:
        _check_int(self.interrupt, "interrupt")
        _check_int(self.version, "version")
        if not isinstance(self.keys, list) or len(self.keys) > MAX_IDS_PER_MESSAGE:
            _fail("bad_field", f"keys must be a list of at most {MAX_IDS_PER_MESSAGE} ids")
        for k in self.keys:
            _check_str(k, "keys[]", 1, 128)
        if len(set(self.keys)) != len(self.keys):
            _fail("bad_value", "keys repeat")
        n = len(self.keys)
        arrays = [self.prompt_lengths, self.response_lengths, self.token_ids, self.token_versions]
        if n == 0:
            if any(a is not None and np.asarray(a).size for a in arrays):
                _fail("bad_shape", "tensors of an empty PartialRollouts must be empty")
            return
        if any(a is None or np.asarray(a).ndim != 1 for a in arrays):
            _fail("missing_field", "every tensor is required and 1-D when keys is not empty")
        p = np.asarray(self.prompt_lengths, dtype=np.int64)
        t = np.asarray(self.response_lengths, dtype=np.int64)
        if p.shape != (n,) or t.shape != (n,) or (p < 1).any() or (t < 1).any():
            _fail("bad_shape", "prompt_lengths / response_lengths: n entries, each >= 1")
        if self.token_ids.shape[0] != int(p.sum() + t.sum()) or \
                self.token_versions.shape[0] != int(t.sum()):
            _fail("bad_shape", "token_ids / token_versions do not add up to the row lengths")
        if (np.asarray(self.token_ids) < 0).any():
            _fail("bad_value", "token ids must be >= 0")
        v = np.asarray(self.token_versions)
        ends = np.cumsum(t)
        if (v < 0).any() or any((np.diff(v[e - n_:e]) < 0).any() for e, n_ in zip(ends, t)):
            _fail("bad_versions", "token_versions must be >= 0 and non-decreasing per row")

    def rows(self):
        """(key, prompt ids, response ids, response token versions) per row (views)."""
        at, vat = 0, 0
        for key, p, t in zip(self.keys, self.prompt_lengths.tolist() if self.keys else [],
                             self.response_lengths.tolist() if self.keys else []):
            yield (key, self.token_ids[at:at + p], self.token_ids[at + p:at + p + t],
                   self.token_versions[vat:vat + t])
            at, vat = at + p + t, vat + t

    @classmethod
    def pack(cls, interrupt: int, version: int, rows) -> "PartialRollouts":
        """From (key, prompt ids, response ids, response versions) tuples."""
        rows = [r for r in rows if len(r[2])]
        if not rows:
            return cls(interrupt=interrupt, version=version)
        return cls(interrupt=interrupt, version=version, keys=[r[0] for r in rows],
                   prompt_lengths=np.asarray([len(r[1]) for r in rows], dtype=np.int32),
                   response_lengths=np.asarray([len(r[2]) for r in rows], dtype=np.int32),
                   token_ids=np.concatenate([np.concatenate([np.asarray(r[1], np.int32),
                                                             np.asarray(r[2], np.int32)])
                                             for r in rows]),
                   token_versions=np.concatenate([np.asarray(r[3], np.int64) for r in rows]))


MAX_IDS_PER_MESSAGE = 4096  # ids in one Credit / Ack (SampleServer.ack splits longer lists)


@dataclass
class Hello:
    """Handshake (SampleClient → SampleServer): nothing but a Hello is sent before credit.

    - run_id: the run the client belongs to (a server started with a run_id refuses others:
      reason "wrong_run"); client: its name, unique in the run (acks are routed by it).
    - epoch >= 1 numbers the client's handshakes; a retry of the same handshake repeats its epoch,
      and the server's Credit echoes it (a Credit of an older epoch is stale).
    """

    run_id: str
    client: str
    epoch: int
    KIND: ClassVar[str] = "hello"
    TENSORS: ClassVar[dict] = {}

    def validate(self) -> None:
        _check_str(self.run_id, "run_id", 0, 128)
        _check_str(self.client, "client", 1, 128)
        _check_int(self.epoch, "epoch")
        if self.epoch < 1:
            _fail("bad_field", "epoch must be >= 1")


@dataclass
class Credit:
    """Flow control (SampleServer → SampleClient).

    - session: the server process's random nonce; a new one means the server restarted (the
      client then re-sends everything not yet acked).
    - epoch: the Hello it answers; 0 means "I do not know you: say Hello".
    - total: how many samples the client may have sent since that Hello (cumulative, so a lost
      Credit is repaired by the next one); the client sends only while its count is below it.
    - received: ids the learner has consumed since the previous Credit (the client stops its
      resend timer for them but keeps them until they are acked).
    """

    session: str
    epoch: int
    total: int
    received: list = field(default_factory=list)
    KIND: ClassVar[str] = "credit"
    TENSORS: ClassVar[dict] = {}

    def validate(self) -> None:
        _check_str(self.session, "session", 1, 64)
        _check_int(self.epoch, "epoch")
        _check_int(self.total, "total")
        _check_ids(self.received, "received")


@dataclass
class Ack:
    """Durable acceptance (SampleServer → SampleClient): the learner has made the outcome of these
    sample ids durable (e.g. they are in a checkpoint); the client forgets them."""

    session: str
    ids: list = field(default_factory=list)
    KIND: ClassVar[str] = "ack"
    TENSORS: ClassVar[dict] = {}

    def validate(self) -> None:
        _check_str(self.session, "session", 1, 64)
        _check_ids(self.ids, "ids")


_TYPES = {names: frozenset(np.dtype(n).type for n in names) for names in Sample.TENSORS.values()}
_LITTLE = {n: np.dtype(n).newbyteorder("<") for names in Sample.TENSORS.values() for n in names}
_TENSOR_CHECKS = tuple((f.name, _TYPES[f.wire], f.shape, f.optional, f.values)
                       for f in sample_fields.FIELDS if f.source == sample_fields.TENSOR)
_SCALARS = tuple(f.name for f in sample_fields.FIELDS if f.source == sample_fields.SCALAR)
# Frames follow the dataclass field order (`encode`): it must be the table's order.
assert [f.name for f in fields(Sample) if f.name in Sample.TENSORS] == list(Sample.TENSORS)
assert set(_SCALARS) <= {f.name for f in fields(Sample)} - set(Sample.TENSORS)

Message = (Sample | EvalReport | WeightsPublished | Shutdown | Hello | Credit | Ack | Interrupt
           | PartialRollouts)
KINDS: dict[str, type] = {c.KIND: c for c in (Sample, EvalReport, WeightsPublished, Shutdown,
                                              Hello, Credit, Ack, Interrupt, PartialRollouts)}


def _check_str(v: Any, name: str, lo: int, hi: int) -> None:
    if not isinstance(v, str) or not lo <= len(v) <= hi:
        _fail("bad_field", f"{name} must be a string of length {lo}..{hi}")


def _check_int(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        _fail("bad_field", f"{name} must be a non-negative integer")


def _check_float(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail("bad_field", f"{name} must be a finite number")


def _check_ids(v: Any, name: str) -> None:
    if not isinstance(v, list) or len(v) > MAX_IDS_PER_MESSAGE or not all(
            isinstance(x, str) and 1 <= len(x) <= 128 for x in v):
        _fail("bad_field", f"{name} must be a list of at most {MAX_IDS_PER_MESSAGE} sample ids")


def _check_tensors(s: Sample) -> None:
    """Dtypes, shapes (the table's shape letters) and value invariants of a Sample's tensors.
    prompt_ids and response_ids define P and T; S = P + T - 1; any other letter (K, N, R) is
    bound by the first tensor that has it. Few numpy calls: this runs for every message on both
    ends."""
    present = []
    for name, types, letters, optional, values in _TENSOR_CHECKS:
        arr = getattr(s, name)
        if arr is None and optional:
            continue
        if not isinstance(arr, np.ndarray) or arr.dtype.type not in types:
            _fail("bad_dtype", f"{name} must be a numpy array of {Sample.TENSORS[name]}")
        present.append((arr, name, letters, values))
    P, T = s.prompt_ids.shape[0] if s.prompt_ids.ndim == 1 else -1, \
        s.response_ids.shape[0] if s.response_ids.ndim == 1 else -1
    if P < 1 or T < 1:
        _fail("bad_shape", "prompt_ids and response_ids must be 1-D and non-empty")
    dims = {"P": P, "T": T, "S": P + T - 1}
    for arr, name, letters, values in present:
        shape = arr.shape
        ok = len(shape) == len(letters)
        for c, n in zip(letters, shape) if ok else ():
            ok = ok and dims.setdefault(c, n) == n
        if not ok:
            want = ", ".join(f"{c}={dims[c]}" if c in dims else c for c in letters)
            _fail("bad_shape", f"{name} must be [{want}], got {list(shape)}")
        if not values or not arr.size:
            continue
        if values == "0/1":
            if arr.max() > 1:  # unsigned: 0/1 exactly
                _fail("bad_value", f"{name} must be 0/1")
        elif values == "finite_bf16":
            if arr.dtype.kind == "u":  # bfloat16 bits: an all-ones exponent is inf or NaN
                if ((arr & 0x7F80) == 0x7F80).any():
                    _fail("non_finite", f"{name} has NaN/inf")
            elif not np.isfinite(arr).all():
                _fail("non_finite", f"{name} has NaN/inf")
        elif values in ("finite", "logprob"):
            if not np.isfinite(arr).all():
                _fail("non_finite", f"{name} has NaN/inf")
            if values == "logprob" and arr.max() > 1e-4:
                _fail("bad_value", f"{name} must be <= 0")
        elif values == "versions":  # non-decreasing from >= 0 (weights only move forward)
            if arr[0] < 0 or (shape[0] > 1 and not (arr[1:] >= arr[:-1]).all()):
                _fail("bad_versions", f"{name} must be >= 0 and non-decreasing")
        else:
            raise AssertionError(f"no check for values={values!r}")


def _check_metadata(m: Any) -> None:
    if not isinstance(m, dict) or len(m) > 64:
        _fail("bad_field", "metadata must be a flat mapping of at most 64 entries")
    for k, v in m.items():
        if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
            _fail("bad_field", "metadata values must be str/int/float/bool")


# ------------------------------------------------------------------------------ encoding
_LAYOUTS: dict[type, tuple] = {}


def _layout(cls) -> tuple[tuple[str, ...], frozenset, frozenset]:
    """(field names in order, scalar field names, required field names) of a message class."""
    lay = _LAYOUTS.get(cls)
    if lay is None:
        fs = fields(cls)
        lay = _LAYOUTS[cls] = (
            tuple(f.name for f in fs), frozenset(f.name for f in fs if f.name not in cls.TENSORS),
            frozenset(f.name for f in fs if f.default is MISSING and f.default_factory is MISSING)
            | getattr(cls, "HEADER_REQUIRED", frozenset()))
    return lay


_DTYPE_NAMES: dict = {}


def _dtype_name(dtype: np.dtype) -> str:
    # numpy builds `dtype.name` anew on every access (~3.6 us): a tenth of a small sample's encode
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


def encode(msg: Message) -> list:
    """Header bytes + one buffer per tensor (views of the arrays, never copies)."""
    msg.validate()
    scalars, table, frames = {}, [], []
    for name in _layout(type(msg))[0]:
        value = getattr(msg, name)
        if name in msg.TENSORS:
            if value is None:
                continue
            arr = np.ascontiguousarray(value)  # no copy when already contiguous
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            table.append({"name": name, "dtype": _dtype_name(arr.dtype), "shape": list(arr.shape)})
            frames.append(memoryview(arr).cast("B") if arr.size else b"")
        else:
            scalars[name] = value
    header = {"schema": SCHEMA, "version": SCHEMA_VERSION, "kind": msg.KIND, "fields": scalars,
              "tensors": table}
    return [orjson.dumps(header)] + frames


def decode(frames: list, max_message_bytes: int | None = None) -> Message:
    """Validate and decode frames (bytes / zmq.Frame / memoryview). Raises ProtocolError."""
    if not frames:
        _fail("empty", "no frames")
    bufs = [memoryview(f.buffer if hasattr(f, "buffer") else f) for f in frames]
    total = sum(b.nbytes for b in bufs)
    if max_message_bytes is not None and total > max_message_bytes:
        _fail("oversize", f"{total} bytes > {max_message_bytes}")
    if bufs[0].nbytes > MAX_HEADER_BYTES:
        _fail("oversize", "header too large")
    try:
        header = orjson.loads(bytes(bufs[0]))
    except orjson.JSONDecodeError as e:
        _fail("bad_header", f"not JSON: {e}")
    if not isinstance(header, dict):
        _fail("bad_header", "header is not an object")
    if header.get("schema") != SCHEMA:
        _fail("bad_schema", f"schema {header.get('schema')!r} is not {SCHEMA!r}")
    if header.get("version") != SCHEMA_VERSION:
        _fail("bad_schema_version", f"schema version {header.get('version')!r} is not supported "
                                    f"(this build speaks {SCHEMA_VERSION})")
    if set(header) != {"schema", "version", "kind", "fields", "tensors"}:
        _fail("bad_header", f"header keys {sorted(header)}")
    cls = KINDS.get(header["kind"]) if isinstance(header["kind"], str) else None
    if cls is None:
        _fail("unknown_kind", f"kind {header['kind']!r}")
    scalars, table = header["fields"], header["tensors"]
    if not isinstance(scalars, dict) or not isinstance(table, list):
        _fail("bad_header", "fields must be an object and tensors a list")
    if len(table) != len(bufs) - 1:
        _fail("frame_count", f"{len(table)} tensors declared, {len(bufs) - 1} frames received")
    _, scalar_names, required = _layout(cls)
    if set(scalars) - scalar_names:
        _fail("bad_field", f"unknown fields {sorted(set(scalars) - scalar_names)}")
    arrays = {}
    for entry, buf in zip(table, bufs[1:]):
        arrays.update([_decode_tensor(cls, entry, buf, arrays)])
    missing = required - set(scalars) - set(arrays)
    if missing:
        _fail("missing_field", f"{sorted(missing)}")
    try:
        msg = cls(**scalars, **arrays)
    except TypeError as e:
        _fail("bad_field", str(e))
    msg.validate()
    return msg


def _decode_tensor(cls, entry: Any, buf: memoryview, seen: dict) -> tuple[str, np.ndarray]:
    if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
        _fail("bad_tensor_table", "each tensor entry needs name, dtype, shape")
    name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
    if name not in cls.TENSORS or name in seen:
        _fail("bad_tensor_table", f"unexpected or repeated tensor {name!r}")
    if dtype not in cls.TENSORS[name]:
        _fail("bad_dtype", f"{name}: dtype {dtype!r} not in {cls.TENSORS[name]}")
    if not isinstance(shape, list) or len(shape) > 4 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape):
        _fail("bad_shape", f"{name}: shape {shape!r}")
    dt = _LITTLE[dtype]
    expected = math.prod(shape) * dt.itemsize
    if buf.nbytes != expected:
        _fail("bad_shape", f"{name}: {buf.nbytes} bytes for shape {shape} of {dtype}")
    arr = np.frombuffer(buf, dtype=dt) if expected else np.zeros(0, dtype=dt)
    return name, arr.reshape(shape)

