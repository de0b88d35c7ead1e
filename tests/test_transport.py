"""Transport over real ZeroMQ sockets: exact round trips, zero-copy, rejection and counting."""

import time

import numpy as np
import orjson
import pytest
import zmq

from megatron_opd.transport import (
    SCHEMA_VERSION, ControlPublisher, ControlSubscriber, EvalReport, ProtocolError, Sample,
    SampleReceiver, SampleSender, Shutdown, WeightsPublished, decode, encode, free_tcp_endpoint,
)


def make_sample(T=5, K=3, P=4, routed=False, sid="s-1", temperature=0.7, top_p=0.9) -> Sample:
    rng = np.random.default_rng(0)
    return Sample(
        sample_id=sid, group_id="g", prompt_ids=np.arange(P, dtype=np.int32),
        response_ids=np.arange(10, 10 + T, dtype=np.int32),
        loss_mask=np.array([1] * (T - 1) + [0], dtype=np.uint8),
        behaviour_logprobs=-rng.random(T).astype(np.float32),
        token_versions=np.array([0] * (T // 2) + [1] * (T - T // 2), dtype=np.int64),
        teacher_logprobs=-rng.random(T).astype(np.float32),
        teacher_topk_ids=rng.integers(0, 30, (T, K)).astype(np.int32),
        teacher_topk_logprobs=-rng.random((T, K)).astype(np.float32),
        teacher_revision="t0",
        routed_experts=rng.integers(0, 8, (P + T - 1, 2, 2)).astype(np.uint8) if routed else None,
        reward=0.5, metadata={"op": "rev", "n": 3, "ok": True}, created_at=123.5,
        finish_reason="stop", temperature=temperature, top_p=top_p)


def assert_same(a, b):
    assert type(a) is type(b)
    for k, v in vars(a).items():
        w = getattr(b, k)
        if isinstance(v, np.ndarray):
            assert v.dtype == w.dtype and v.shape == w.shape and np.array_equal(v, w), k
        else:
            assert v == w, k


@pytest.fixture
def link():
    ep = free_tcp_endpoint()
    rx = SampleReceiver(ep, max_message_bytes=1 << 20)
    tx = SampleSender(ep)
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(ep)
    yield tx, rx, raw
    tx.close(), rx.close(), raw.close()


def recv_one(rx, timeout_s=5.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        msg = rx.recv(timeout_ms=100)
        if msg is not None:
            return msg
    raise AssertionError("nothing received")


@pytest.mark.parametrize("msg", [
    make_sample(), make_sample(K=0), make_sample(routed=True), make_sample(T=1, K=1, P=1),
    make_sample(temperature=1.0, top_p=1.0), make_sample(temperature=1e-3, top_p=1e-3),
    EvalReport(version=3, metrics={"acc": 0.5}), WeightsPublished(version=7, step=7, published_at=1.0),
    Shutdown(reason="done"),
])
def test_round_trip_is_exact(link, msg):
    tx, rx, _ = link
    assert tx.send(msg)
    assert_same(recv_one(rx), msg)


def test_zero_copy_both_ways():
    s = make_sample()
    frames = encode(s)
    # encode hands zmq views of the arrays themselves
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.int32), s.prompt_ids)
    # decode reads arrays straight out of the received frame buffers
    ep = free_tcp_endpoint()
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(ep)
    tx = SampleSender(ep)
    tx.send(s)
    got = pull.recv_multipart(copy=False)
    out = decode(got)
    assert np.shares_memory(out.response_ids, np.frombuffer(got[2].buffer, dtype=np.uint8))
    tx.close(), pull.close()


def header(**over):
    h = {"schema": "megatron-opd", "version": SCHEMA_VERSION, "kind": "shutdown",
         "fields": {"reason": "x"},
         "tensors": []}
    h.update(over)
    return orjson.dumps(h)


def bad_messages():
    good = encode(make_sample())
    head = orjson.loads(good[0])
    nan = make_sample()
    frames_nan = encode(nan)
    arr = np.frombuffer(frames_nan[4], dtype=np.float32).copy()
    arr[0] = np.nan
    def with_header(**kw):
        h = dict(head)
        h.update(kw)
        return [orjson.dumps(h)] + [bytes(f) for f in good[1:]]
    versions_table = [dict(t) for t in head["tensors"]]
    return {
        "bad_header": [b"\x00garbage"],
        "bad_schema_version": [header(version=99)],
        "bad_schema": [header(schema="other")],
        "unknown_kind": [header(kind="rm -rf")],
        "frame_count": [bytes(f) for f in good] + [b"extra"],
        "bad_shape": [bytes(good[0])] + [bytes(f) for f in good[1:-1]] + [bytes(good[-1])[:-4]],
        "non_finite": [bytes(f) for f in frames_nan[:4]] + [arr.tobytes()] + [bytes(f) for f in frames_nan[5:]],
        "bad_field": [header(fields={"reason": 5})],
        "bad_dtype": with_header(tensors=[{**versions_table[0], "dtype": "float64"}] + versions_table[1:]),
        "oversize": [header(), b"x" * (3 << 19)],  # 1.5 MiB > 1 MiB limit
    }


def test_every_malformed_class_is_rejected_counted_and_receiver_keeps_serving(link):
    tx, rx, raw = link
    cases = bad_messages()
    for reason, frames in cases.items():
        raw.send_multipart(frames)
        deadline = time.time() + 5
        while rx.stats["rejected_by_reason"].get(reason, 0) < 1 and time.time() < deadline:
            assert rx.recv(timeout_ms=100) is None
        assert rx.stats["rejected_by_reason"].get(reason) == 1, (reason, rx.stats)
    # non-monotone versions are refused at the sender already
    bad = make_sample()
    bad.token_versions = np.array([2, 1, 1, 1, 1], dtype=np.int64)
    with pytest.raises(ProtocolError, match="bad_versions"):
        tx.send(bad)
    tx.send(make_sample(sid="after"))
    assert recv_one(rx).sample_id == "after"
    assert rx.stats["received"] == 1


def test_fuzzed_messages_never_escape_recv(link):
    _, rx, raw = link
    rng = np.random.default_rng(1)
    good = [bytes(f) for f in encode(make_sample(routed=True))]
    n = 3000
    for i in range(n):
        frames = [bytearray(f) for f in good]
        j = int(rng.integers(len(frames)))
        if len(frames[j]) and rng.random() < 0.7:
            for _ in range(int(rng.integers(1, 4))):  # flip bytes
                frames[j][int(rng.integers(len(frames[j])))] = int(rng.integers(256))
        else:
            frames[j] = frames[j][: int(rng.integers(len(frames[j]) + 1))]  # truncate
        if rng.random() < 0.1:
            frames = frames[: int(rng.integers(1, len(frames) + 1))]
        raw.send_multipart([bytes(f) for f in frames])
    accepted, deadline = 0, time.time() + 60
    while rx.stats["received"] + rx.stats["rejected_total"] < n and time.time() < deadline:
        accepted += rx.recv(timeout_ms=200) is not None
    assert rx.stats["received"] + rx.stats["rejected_total"] == n
    assert rx.stats["received"] == accepted  # flips inside e.g. a token id may stay valid


def test_control_pub_sub_after_slow_joiner():
    ep = free_tcp_endpoint()
    pub, sub = ControlPublisher(ep), ControlSubscriber(ep)
    got, deadline = [], time.time() + 5
    while not got and time.time() < deadline:  # re-announce until the subscriber has joined
        pub.publish(WeightsPublished(version=4, step=4, published_at=2.0))
        got = sub.poll(timeout_ms=100)
    assert got and got[0] == WeightsPublished(version=4, step=4, published_at=2.0)
    pub.close(), sub.close()


def test_sampler_fields_are_in_the_header_and_default_to_plain_sampling():
    s = make_sample(temperature=0.7, top_p=0.9)
    s.teacher_temperature = 1.25
    head = orjson.loads(encode(s)[0])
    assert head["version"] == SCHEMA_VERSION == 4
    assert head["fields"]["temperature"] == 0.7 and head["fields"]["top_p"] == 0.9
    assert head["fields"]["teacher_temperature"] == 1.25
    assert decode(encode(s)).teacher_temperature == 1.25
    # a sender that leaves them out means temperature 1, top-p 1
    del head["fields"]["temperature"], head["fields"]["top_p"]
    frames = [orjson.dumps(head)] + [bytes(f) for f in encode(make_sample())[1:]]
    out = decode(frames)
    assert out.temperature == 1.0 and out.top_p == 1.0


def test_the_teacher_temperature_must_be_stated():
    """The teacher's scoring temperature is never implied: a header without it is refused."""
    frames = [bytes(f) for f in encode(make_sample())]
    head = orjson.loads(frames[0])
    del head["fields"]["teacher_temperature"]
    with pytest.raises(ProtocolError) as err:
        decode([orjson.dumps(head)] + frames[1:])
    assert err.value.reason == "missing_field" and "teacher_temperature" in str(err.value)


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_peer_is_refused(version):
    """Version 1 had no sampler fields, version 2 no teacher_temperature: both refused, not
    guessed at."""
    frames = [bytes(f) for f in encode(make_sample())]
    head = orjson.loads(frames[0])
    head["version"] = version
    del head["fields"]["teacher_temperature"]
    if version == 1:
        del head["fields"]["temperature"], head["fields"]["top_p"]
    with pytest.raises(ProtocolError) as err:
        decode([orjson.dumps(head)] + frames[1:])
    assert err.value.reason == "bad_schema_version"


@pytest.mark.parametrize("field, value, reason", [
    ("temperature", 0.0, "bad_value"), ("temperature", -0.5, "bad_value"),
    ("temperature", float("nan"), "bad_field"), ("temperature", float("inf"), "bad_field"),
    ("temperature", "1.0", "bad_field"), ("temperature", True, "bad_field"),
    ("top_p", 0.0, "bad_value"), ("top_p", 1.0000001, "bad_value"), ("top_p", -1.0, "bad_value"),
    ("top_p", None, "bad_field"),
    ("teacher_temperature", 0.0, "bad_value"), ("teacher_temperature", -1.0, "bad_value"),
    ("teacher_temperature", "1.0", "bad_field"), ("teacher_temperature", None, "bad_field"),
])
def test_bad_sampler_values_are_refused_at_both_ends(field, value, reason):
    bad = make_sample()
    setattr(bad, field, value)
    with pytest.raises(ProtocolError) as err:  # the sender validates before encoding
        encode(bad)
    assert err.value.reason == reason
    # a peer that skips validation: the receiver refuses the same message
    frames = [bytes(f) for f in encode(make_sample())]
    head = orjson.loads(frames[0])
    if isinstance(value, float) and not np.isfinite(value):
        # JSON has no NaN/inf: a header spelling one is not even JSON
        raw = orjson.dumps(head).replace(b'"temperature":0.7', b'"temperature":NaN')
        assert b"NaN" in raw
        with pytest.raises(ProtocolError) as err:
            decode([raw] + frames[1:])
        assert err.value.reason == "bad_header"
        return
    head["fields"][field] = value
    with pytest.raises(ProtocolError) as err:
        decode([orjson.dumps(head)] + frames[1:])
    assert err.value.reason == reason
