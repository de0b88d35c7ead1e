"""The per-token and per-sample fields of a trajectory, declared once.

`FIELDS` is the one table of what a sample carries from the orchestrator to the loss; the
consumers derive their lists from it:

- `transport/schema.py`: `Sample.TENSORS` (names, wire dtypes, frame order) and
  `Sample.validate`'s dtype, shape and value checks (`wire_tensors`, `shape`, `values`);
- `offline_store.py`: the arrays of a shard (`stored_ragged`, `stored_per_sample`);
- `learner/batch.py`: `collate`'s allocation and padding (`batch_fields`, `pad`); `TrainBatch`
  stays an explicit dataclass whose fields are exactly `batch_fields()` (tested);
- `learner/io.py`: the broadcast table (`batch_fields`, non-optional first, optional after);
- `learner/losses.py`: the fields a training micro-batch carries (`micro_batch_fields`, `reads`);
  `objectives/compose.py:ObjectiveInputs` names which of its inputs come from which batch field
  (`FROM_BATCH`, tested against this table).

Shape letters: P prompt length, T response length, K teacher top-K width (may be 0), S = P+T-1
input positions of a sample, N MoE layers, R router top-k, D the teacher's hidden size; in the batch B samples, L = max(P+T)
input length, T = max T. A sample shape starting with P or T is ragged: padded in the batch
(right, with `pad`) and stored flat with offsets in the offline store.

Torch-free (dtypes are numpy/torch names): the transport and the offline store import this.
"""

from __future__ import annotations

from dataclasses import dataclass

PAD_ID = "pad_id"  # `pad` value meaning: the run's pad token id (given to `collate`)

# `source`: where a field comes from
TENSOR = "tensor"  # a Sample array: one raw frame on the wire
SCALAR = "scalar"  # a Sample number: a header field on the wire, [B] in the batch
COLLATE = "collate"  # made by `collate` from other fields (not in a Sample)


@dataclass(frozen=True)
class SampleField:
    name: str  # Sample attribute (wire name); also the TrainBatch attribute unless `batch_name`
    source: str  # TENSOR / SCALAR / COLLATE
    doc: str  # one line: what it means
    wire: tuple[str, ...] = ()  # TENSOR: numpy dtypes a Sample may carry (little-endian)
    shape: str = ""  # TENSOR: shape letters in the Sample
    batch: str | None = None  # dtype in TrainBatch (numpy == torch name); None: not in the batch
    batch_shape: str = ""  # shape letters in TrainBatch
    pad: float | str = 0  # batch padding of ragged fields (PAD_ID: the run's pad token)
    optional: bool = False  # may be None (in a Sample and in the batch)
    store: str | None = None  # dtype in the offline store; None: not stored
    values: str = ""  # value invariant `Sample.validate` checks: VALUE_CHECKS
    reads: str | None = None  # when a training micro-batch carries it: READS
    batch_name: str | None = None  # TrainBatch attribute when it differs from `name`

    @property
    def batch_attr(self) -> str:
        return self.batch_name or self.name


# Value invariants (`values`), checked by Sample.validate with these reasons:
VALUE_CHECKS = {
    "": "none",
    "0/1": "bad_value: every entry is 0 or 1",
    "logprob": "non_finite / bad_value: finite and <= 0 (1e-4 slack)",
    "finite": "non_finite: no NaN/inf",
    "finite_bf16": "non_finite: no NaN/inf (uint16 frames are bfloat16 bit patterns)",
    "versions": "bad_versions: >= 0 and non-decreasing",
}
# Micro-batch conditions (`reads`), resolved by learner/losses.py:objective_fields:
READS = {
    "always": "every objective",
    "topk": "an objective that reads the teacher's top-K (losses._wants_topk)",
    "grpo_opd": "the grpo_opd term",
    "hidden": "an objective that reads the teacher's hidden states (teacher.signal=hidden)",
}

# Order matters twice: the Sample tensors are in frame order (the wire format of schema versions
# 2 and 3: never reorder them), and the batch fields in TrainBatch's attribute order (optional last).
F = SampleField
FIELDS: tuple[SampleField, ...] = (
    F("input_ids", COLLATE, "prompt + response, right-padded",
      batch="int64", batch_shape="BL", pad=PAD_ID),
    F("response_index", COLLATE, "the input position whose logits predict response token t",
      batch="int64", batch_shape="BT", pad=0, reads="always"),
    F("prompt_ids", TENSOR, "prompt token ids", wire=("int32",), shape="P", store="int32"),
    F("response_ids", TENSOR, "sampled response tokens y_t", wire=("int32",), shape="T",
      batch="int64", batch_shape="BT", pad=PAD_ID, store="int32", reads="always"),
    F("loss_mask", TENSOR, "1: trained; 0: environment/tool tokens, padding, stale tokens",
      wire=("uint8",), shape="T", batch="float32", batch_shape="BT", pad=0, store="uint8",
      values="0/1", reads="always"),
    F("behaviour_logprobs", TENSOR, "log mu(y_t) as the rollout engine reported it "
      "(temperature applied, not top-p renormalised)", wire=("float32",), shape="T",
      batch="float32", batch_shape="BT", pad=0, store="float32", values="logprob",
      reads="always"),
    F("token_versions", TENSOR, "policy version that sampled each token (-1 on batch padding; "
      "stored samples are version 0)", wire=("int64",), shape="T", batch="int64",
      batch_shape="BT", pad=-1, values="versions"),
    F("teacher_logprobs", TENSOR, "log q(y_t): the teacher's log-prob of the sampled token",
      wire=("float32",), shape="T", batch="float32", batch_shape="BT", pad=0, store="float32",
      values="finite", reads="always"),
    F("teacher_topk_ids", TENSOR, "the teacher's top-K token ids per response token",
      wire=("int32",), shape="TK", batch="int64", batch_shape="BTK", pad=0, store="int32",
      reads="topk"),
    F("teacher_topk_logprobs", TENSOR, "log q at the teacher's top-K ids",
      wire=("float32",), shape="TK", batch="float32", batch_shape="BTK", pad=0, store="float32",
      values="finite", reads="topk"),
    F("reward", SCALAR, "the environment verifier's outcome", batch="float32", batch_shape="B",
      store="float32", batch_name="rewards"),
    F("sample_advantages", COLLATE, "group-normalised rewards over the batch's samples sharing "
      "a group_id (a lone sample gets 0)", batch="float32", batch_shape="B", reads="grpo_opd"),
    F("revision_changed", COLLATE, "1 where the teacher revision that scored the sample is "
      "not the run's (teacher.revision), else 0: part of the supervision drift (ALGORITHMS.md §7; "
      "the learner adds it to every micro-batch with token_versions)",
      batch="float32", batch_shape="B"),
    F("temperature", SCALAR, "sampling temperature of the rollout", batch="float32",
      batch_shape="B", store="float64", reads="always"),
    F("top_p", SCALAR, "top-p of the rollout sampler", batch="float32", batch_shape="B",
      store="float64"),
    F("teacher_temperature", SCALAR, "temperature the teacher's log-probs are of "
      "(teacher.temperature); the distillation terms score the student at it", batch="float32",
      batch_shape="B", store="float64", reads="always"),
    F("interrupt_logprobs", COLLATE, "log pi_old(y_t) scored by interrupt sync with the weights "
      "of the token's version before they were replaced (correction.proximal=interrupt; NaN: "
      "none; the learner fills it from its store after collate)", batch="float32",
      batch_shape="BT", pad=float("nan")),
    F("routed_experts", TENSOR, "the rollout engine's experts per input position (R3)",
      wire=("uint8", "int16", "int32"), shape="SNR", batch="int64", batch_shape="BLNR",
      optional=True),
    # teacher.signal=hidden (ALGORITHMS.md §10): row t is the teacher's final hidden state (after
    # its final norm, as SGLang returns it) at the input position whose logits predict response
    # token t, i.e. the positions of teacher_logprobs. Wire: uint16 = bfloat16 bits (numpy has no
    # bfloat16; `bf16_bits_to_float32` is exact), float32 with teacher.hidden_dtype=float32.
    # Multi-turn tool tokens carry zero rows (masked). Not in the offline store (config refuses).
    # Batch: bfloat16 when every sample is (kept so through the broadcast), else float32.
    F("teacher_hidden", TENSOR, "the teacher's final hidden state at each response position",
      wire=("uint16", "float32"), shape="TD", batch="float32", batch_shape="BTD", pad=0,
      optional=True, values="finite_bf16", reads="hidden"),
)
del F


# ------------------------------------------------------------------------ derived views
def wire_tensors(table=FIELDS) -> dict[str, tuple[str, ...]]:
    """Sample tensors in frame order: name -> allowed wire dtypes (Sample.TENSORS)."""
    return {f.name: f.wire for f in table if f.source == TENSOR}


def batch_fields(table=FIELDS) -> tuple[SampleField, ...]:
    """Fields of TrainBatch, in its attribute order."""
    return tuple(f for f in table if f.batch is not None)


def ragged_copied(table=FIELDS) -> tuple[SampleField, ...]:
    """Sample tensors `collate` copies into [B, T, ...] batch tensors, right-padded with `pad`
    (the optional ones are collated where present: learner/batch.py)."""
    return tuple(f for f in table if f.source == TENSOR and f.batch is not None
                 and not f.optional and f.shape[:1] == "T" and f.batch_shape == "B" + f.shape)


def bf16_bits_to_float32(bits):
    """uint16 bfloat16 bit patterns (numpy array) -> float32, exactly (bf16 is fp32's top half)."""
    import numpy as np

    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x):
    """float32 -> uint16 bfloat16 bit patterns, rounded to nearest even (torch's conversion);
    NaN stays NaN."""
    import numpy as np

    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, np.uint16(0x7FC0), rounded)


def stored_ragged(table=FIELDS) -> dict[str, str]:
    """Offline store: ragged Sample tensors stored flat over a shard ([sum P] / [sum T, ...])."""
    return {f.name: f.store for f in table
            if f.source == TENSOR and f.store and f.shape[:1] in ("P", "T")}


def stored_per_sample(table=FIELDS) -> dict[str, str]:
    """Offline store: per-sample numbers stored as [n] arrays."""
    return {f.name: f.store for f in table if f.source == SCALAR and f.store}


def micro_batch_fields(conditions, table=FIELDS) -> tuple[str, ...]:
    """TrainBatch attributes a micro-batch carries when `conditions` (keys of READS) hold."""
    unknown = set(conditions) - set(READS)
    if unknown:
        raise ValueError(f"unknown micro-batch conditions {sorted(unknown)}")
    return tuple(f.batch_attr for f in table if f.reads in conditions)


TEACHER_FIELDS = ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs", "teacher_hidden")


def teacher_wire_bytes(sample) -> int:
    """Bytes of a Sample's teacher frames on the ZeroMQ wire (raw arrays: each frame is exactly
    its array's bytes; header fields such as teacher_revision not counted)."""
    return sum(getattr(sample, n).nbytes for n in TEACHER_FIELDS
               if getattr(sample, n) is not None)


def teacher_payload_metrics(samples) -> dict:
    """Teacher payload per response token on each leg (docs/teachers.md): SGLang -> orchestrator,
    the HTTP response bytes of teacher scoring the teacher client measured (each sample's share:
    metadata `teacher_http_bytes`); orchestrator -> learner, the ZeroMQ frames of the samples'
    teacher fields (`teacher_wire_bytes`)."""
    tokens = sum(s.num_tokens for s in samples) or 1
    return {"teacher/bytes_per_token_http":
            sum(float(s.metadata.get("teacher_http_bytes", 0.0)) for s in samples) / tokens,
            "teacher/bytes_per_token_zmq": sum(teacher_wire_bytes(s) for s in samples) / tokens}


def pad_value(f: SampleField, pad_id: int):
    return pad_id if f.pad == PAD_ID else f.pad


def _check_table(table=FIELDS) -> None:
    names = [f.name for f in table]
    attrs = [f.batch_attr for f in batch_fields(table)]
    assert len(set(names)) == len(names) and len(set(attrs)) == len(attrs), "duplicate field"
    for f in table:
        assert f.source in (TENSOR, SCALAR, COLLATE), f.name
        assert (f.source == TENSOR) == bool(f.wire) == bool(f.shape), f.name
        assert f.values in VALUE_CHECKS and (f.reads is None or f.reads in READS), f.name
        assert (f.batch is None) == (not f.batch_shape), f.name
        assert f.batch_shape[:1] in ("", "B"), f.name
        assert f.source != SCALAR or f.batch_shape in ("", "B"), f.name
        assert f.reads is None or f.batch is not None, f.name
    optional = [f.optional for f in batch_fields(table)]
    assert optional == sorted(optional), "optional batch fields come last (TrainBatch defaults)"


_check_table()
