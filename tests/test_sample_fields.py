"""The field table (megatron_opd/sample_fields.py) is the one declaration of the per-token and
per-sample fields: every consumer's list is derived from it or checked against it, and the wire
format (schema version 4) and the offline store layout (version 3) it produces are the ones peers
and stores use."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_opd import sample_fields as sf
from megatron_opd.config import ObjectiveConfig
from megatron_opd.learner.batch import TrainBatch, collate
from megatron_opd.transport import ProtocolError, Sample, decode, encode
from megatron_opd.transport.schema import SCHEMA_VERSION

# The wire contract of schema versions 2 and 3 (3 added a header field, teacher_temperature):
# tensor frames in this order, with these dtypes. Peers depend on it; the table must keep
# producing it (a change needs a new schema version).
WIRE_V3 = {
    "prompt_ids": ("int32",), "response_ids": ("int32",), "loss_mask": ("uint8",),
    "behaviour_logprobs": ("float32",), "token_versions": ("int64",),
    "teacher_logprobs": ("float32",), "teacher_topk_ids": ("int32",),
    "teacher_topk_logprobs": ("float32",), "routed_experts": ("uint8", "int16", "int32"),
}
# Version 4 appended one optional frame: the teacher's hidden states (bfloat16 bits / float32).
WIRE_V4 = {**WIRE_V3, "teacher_hidden": ("uint16", "float32")}
# Per-sample numbers in a version-3 Sample header.
HEADER_SCALARS_V3 = {"reward", "temperature", "top_p", "teacher_temperature"}
# The shard layout of offline store version 3 (version 2 had no teacher_temperature; a change
# needs a new OFFLINE_VERSION).
STORE_V3 = {
    "prompt_offsets": "int64", "response_offsets": "int64", "prompt_ids": "int32",
    "response_ids": "int32", "loss_mask": "uint8", "behaviour_logprobs": "float32",
    "teacher_logprobs": "float32", "teacher_topk_ids": "int32",
    "teacher_topk_logprobs": "float32", "reward": "float32", "temperature": "float64",
    "top_p": "float64", "teacher_temperature": "float64", "group": "int64",
}
# A field someone might add: it must appear in every derived list.
NEW = sf.SampleField("teacher_entropy", sf.TENSOR, "entropy of the teacher per response token",
                     wire=("float32",), shape="T", batch="float32", batch_shape="BT", pad=0,
                     store="float32", values="finite", reads="topk")
EXTENDED = sf.FIELDS[:-2] + (NEW,) + sf.FIELDS[-2:]  # the optional fields stay last


def make_sample(P=3, T=4, K=2, routed=False, seed=0, D=5, **kw) -> Sample:
    """routed=True: with the optional tensors (routed experts, the teacher's bf16 hidden states)."""
    rng = np.random.default_rng(seed)
    s = Sample(
        sample_id=f"s{seed}", group_id=f"g{seed % 2}",
        prompt_ids=rng.integers(1, 30, P).astype(np.int32),
        response_ids=rng.integers(1, 30, T).astype(np.int32),
        loss_mask=(rng.random(T) > 0.2).astype(np.uint8),
        behaviour_logprobs=-rng.random(T).astype(np.float32),
        token_versions=np.sort(rng.integers(0, 3, T)).astype(np.int64),
        teacher_logprobs=-rng.random(T).astype(np.float32),
        teacher_topk_ids=rng.integers(0, 30, (T, K)).astype(np.int32),
        teacher_topk_logprobs=-rng.random((T, K)).astype(np.float32),
        routed_experts=rng.integers(0, 8, (P + T - 1, 2, 2)).astype(np.int16) if routed else None,
        teacher_hidden=sf.float32_to_bf16_bits(rng.standard_normal((T, D))) if routed else None,
        reward=float(rng.random()), temperature=0.7, top_p=0.9)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


# ------------------------------------------------------------------------------ transport
def test_schema_tensors_are_the_tables_and_the_v4_wire_contract():
    assert SCHEMA_VERSION == 4
    assert Sample.TENSORS == sf.wire_tensors() == WIRE_V4
    assert list(Sample.TENSORS) == list(WIRE_V4)  # frame order
    # the dataclass lists them in that order (encode walks the dataclass fields)
    names = [f.name for f in dataclasses.fields(Sample)]
    assert [n for n in names if n in Sample.TENSORS] == list(WIRE_V4)
    # the table's per-sample numbers are header fields of Sample
    scalars = [f.name for f in sf.FIELDS if f.source == sf.SCALAR]
    assert set(scalars) == HEADER_SCALARS_V3 and set(scalars) <= set(names) - set(Sample.TENSORS)
    # what goes over the wire: the header's tensor table, frame by frame
    frames = encode(make_sample(routed=True))
    import orjson
    head = orjson.loads(bytes(frames[0]))
    assert HEADER_SCALARS_V3 <= set(head["fields"])
    assert [(e["name"], e["dtype"]) for e in head["tensors"]] == [
        (n, d[0] if n != "routed_experts" else "int16") for n, d in WIRE_V4.items()]


def test_adding_a_field_reaches_every_derived_list():
    assert sf.wire_tensors(EXTENDED)["teacher_entropy"] == ("float32",)
    assert list(sf.wire_tensors(EXTENDED))[-3:] == ["teacher_entropy", "routed_experts",
                                                    "teacher_hidden"]
    assert sf.stored_ragged(EXTENDED)["teacher_entropy"] == "float32"
    assert NEW in sf.ragged_copied(EXTENDED) and NEW in sf.batch_fields(EXTENDED)
    assert "teacher_entropy" in sf.micro_batch_fields({"always", "topk"}, EXTENDED)
    assert "teacher_entropy" not in sf.micro_batch_fields({"always"}, EXTENDED)
    sf._check_table(EXTENDED)
    with pytest.raises(AssertionError):  # an optional batch field before a required one
        sf._check_table(sf.FIELDS[-1:] + sf.FIELDS[:-1])


def _break(sample: Sample, f: sf.SampleField, how: str) -> None:
    arr = getattr(sample, f.name)
    if how == "dtype":
        bad = next(d for d in ("float64", "int8") if d not in f.wire)
        setattr(sample, f.name, arr.astype(bad))
    elif how == "shape":
        setattr(sample, f.name, arr[:-1] if arr.shape[0] > 1 else np.concatenate([arr, arr]))
    elif how == "ndim":
        setattr(sample, f.name, arr[..., None])
    else:  # a value the check refuses
        arr = arr.copy()
        arr.flat[0] = {"0/1": 2, "finite": np.nan, "logprob": 0.5,
                       "finite_bf16": 0x7F80}.get(f.values, arr.flat[0])  # bf16 +inf
        if f.values == "versions":
            arr[:] = np.arange(arr.shape[0])[::-1]
        setattr(sample, f.name, arr)


VALUE_REASONS = {"0/1": "bad_value", "finite": "non_finite", "logprob": "bad_value",
                 "versions": "bad_versions", "finite_bf16": "non_finite"}


@pytest.mark.parametrize("f", [f for f in sf.FIELDS if f.source == sf.TENSOR],
                         ids=lambda f: f.name)
def test_validation_checks_every_table_tensor(f):
    """Each tensor of the table: a wrong dtype, a wrong shape and a wrong value (where the table
    declares an invariant) are refused, with the table's reasons, at both ends."""
    cases = [("dtype", "bad_dtype"), ("shape", "bad_shape"), ("ndim", "bad_shape")]
    if f.values:
        cases.append(("value", VALUE_REASONS[f.values]))
    for how, reason in cases:
        s = make_sample(routed=True)
        _break(s, f, how)
        with pytest.raises(ProtocolError) as err:
            s.validate()
        assert err.value.reason == reason, (how, err.value)
    good = make_sample(routed=True)
    assert decode(encode(good)).num_tokens == good.num_tokens
    if f.optional:
        make_sample(routed=False).validate()


def test_every_value_invariant_has_a_check():
    assert {f.values for f in sf.FIELDS} - {""} <= set(VALUE_REASONS)
    assert set(VALUE_REASONS) == set(sf.VALUE_CHECKS) - {""}


# --------------------------------------------------------------------------- offline store
def test_offline_store_arrays_are_the_tables_and_the_v3_layout(tmp_path):
    import megatron_opd.offline_store as store

    assert store.OFFLINE_VERSION == 3
    assert store._RAGGED_ARRAYS == sf.stored_ragged()
    assert store._SAMPLE_ARRAYS == sf.stored_per_sample()
    samples = [make_sample(seed=i, K=3, teacher_temperature=1.0 + i / 4) for i in range(4)]
    for s in samples:
        s.token_versions = np.zeros(s.num_tokens, dtype=np.int64)
    manifest = store.write_store(tmp_path / "s", samples, "h")
    with np.load(io.BytesIO((tmp_path / "s" / manifest["shards"][0]["file"]).read_bytes()),
                 allow_pickle=False) as z:
        layout = {k: z[k].dtype.name for k in z.files}
    assert {k: v for k, v in layout.items() if k not in ("metadata", "finish_reason")} == STORE_V3
    assert layout["metadata"].startswith("str") and layout["finish_reason"].startswith("str")
    # every required Sample tensor is either stored or has a rule for reading it back
    required = {f.name for f in sf.FIELDS if f.source == sf.TENSOR and not f.optional}
    assert required == set(store._RAGGED_ARRAYS) | set(store._NOT_STORED)
    for (_, got), ref in zip(store.open_store(tmp_path / "s").iter_samples(), samples, strict=True):
        for f in sf.FIELDS:
            if f.store:  # exact at the store's dtype (a reward is stored as float32)
                a, b = getattr(got, f.name), getattr(ref, f.name)
                assert np.array_equal(np.asarray(a), np.asarray(b, dtype=f.store)), f.name
                if f.source == sf.TENSOR:
                    assert a.dtype == b.dtype, f.name


# ------------------------------------------------------------------------------- learner
def test_trainbatch_fields_are_the_tables_batch_fields():
    fields = dataclasses.fields(TrainBatch)
    assert [f.name for f in fields] == [f.batch_attr for f in sf.batch_fields()]
    for f, tf in zip(fields, sf.batch_fields()):
        assert (f.default is None) == tf.optional, f.name


def test_broadcast_table_is_derived_from_the_table():
    from megatron_opd.learner import io as lio

    want = {f.batch_attr: (getattr(torch, f.batch), f.batch_shape) for f in sf.batch_fields()}
    assert {**lio._BATCH_FIELDS, **lio._OPTIONAL_FIELDS} == want
    assert set(lio._OPTIONAL_FIELDS) == {f.batch_attr for f in sf.batch_fields() if f.optional}
    assert lio._DIMS == "BLTK"


@pytest.mark.parametrize("routed", [False, True])
def test_collate_allocates_and_pads_as_the_table_says(routed):
    pad_id = 7
    samples = [make_sample(P=2 + i % 3, T=1 + i, K=2, routed=routed, seed=i) for i in range(5)]
    batch, _ = collate(samples, pad_id, step=2, max_staleness=None)
    B, T = len(samples), max(s.num_tokens for s in samples)
    sizes = {"B": B, "T": T, "K": 2, "L": max(len(s.prompt_ids) + s.num_tokens for s in samples),
             "N": 2, "R": 2, "D": 5}
    for f in sf.batch_fields():
        t = getattr(batch, f.batch_attr)
        if f.optional and not routed:
            assert t is None, f.name
            continue
        # (teacher_hidden of bfloat16 samples stays bfloat16: the table's comment)
        kept = f.name == "teacher_hidden" and all(s.teacher_hidden.dtype == np.uint16
                                                  for s in samples)
        assert t.dtype == (torch.bfloat16 if kept else getattr(torch, f.batch)), f.name
        assert list(t.shape) == [sizes[c] for c in f.batch_shape], f.name
    for f in sf.ragged_copied():
        t = getattr(batch, f.batch_attr)
        for b, s in enumerate(samples):
            n = s.num_tokens
            assert np.array_equal(t[b, :n].numpy(), getattr(s, f.name)), f.name
            assert (t[b, n:] == sf.pad_value(f, pad_id)).all(), f.name
    for f in sf.batch_fields():
        if f.source == sf.SCALAR:
            assert getattr(batch, f.batch_attr).tolist() == pytest.approx(
                [getattr(s, f.name) for s in samples], rel=1e-6), f.name
    assert (batch.input_ids[0, len(samples[0].prompt_ids) + 1:] == pad_id).all()
    assert (batch.response_ids[0, 1:] == pad_id).all() and (batch.token_versions[0, 1:] == -1).all()


def _objective(terms, **kw) -> ObjectiveConfig:
    cfg = ObjectiveConfig(terms=list(terms))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_micro_batch_fields_are_the_tables():
    from megatron_opd.learner.losses import OPD_FIELDS, objective_fields

    base = {"response_index", "response_ids", "loss_mask", "behaviour_logprobs",
            "teacher_logprobs", "temperature", "teacher_temperature"}
    topk = {"teacher_topk_ids", "teacher_topk_logprobs"}
    assert set(OPD_FIELDS) == base == set(sf.micro_batch_fields({"always"}))
    assert set(objective_fields(_objective(["sampled_token_opd"]))) == base
    assert set(objective_fields(_objective(["lsm"]))) == base | topk
    assert set(objective_fields(_objective(["grpo_opd"]))) == base | {"sample_advantages"}
    attrs = {f.batch_attr for f in sf.batch_fields()}
    assert set(sf.micro_batch_fields(set(sf.READS))) <= attrs
    with pytest.raises(ValueError, match="unknown micro-batch conditions"):
        sf.micro_batch_fields({"sometimes"})


def test_objective_inputs_from_the_batch_are_table_fields():
    """ObjectiveInputs stays an explicit dataclass: the inputs it takes from the batch are table
    fields a micro-batch can carry, with the shapes its docstring states; the others are the
    student's statistics."""
    from megatron_opd.objectives.compose import FROM_BATCH, ObjectiveInputs

    names = {f.name for f in dataclasses.fields(ObjectiveInputs)}
    assert set(FROM_BATCH) <= names
    assert names - set(FROM_BATCH) == {"logprobs", "old_logprobs", "logsumexp", "entropy",
                                       "topk_logits", "full_reverse_kl", "context_lag",
                                       "distill_logprobs", "distill_logsumexp",
                                       "distill_topk_logits", "hidden_reverse_kl",
                                       "hidden_forward_kl"}
    table = {f.batch_attr: f for f in sf.batch_fields()}
    shapes = {"teacher_topk_logprobs": "BTK", "sample_advantages": "B"}  # the rest: [b, T]
    for inp, attr in FROM_BATCH.items():
        assert table[attr].reads is not None, attr  # some objective's micro-batch carries it
        assert table[attr].batch_shape == shapes.get(inp, "BT"), inp


def test_table_and_transport_import_no_torch():
    code = ("import sys, megatron_opd.sample_fields, megatron_opd.transport, "
            "megatron_opd.offline_store; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
