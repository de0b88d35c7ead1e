"""Bad input at every socket: >= 10,000 generated bad messages from a raw pyzmq DEALER to a real
authenticated SampleServer on loopback TCP, interleaved with valid samples; plus bad messages
to a SampleClient (from a raw ROUTER) and to a ControlSubscriber (from a raw PUB).

Asserted: nothing escapes (no exception), every bad message is counted exactly once (sum of the
rejection counters == bad messages sent), every valid message arrives intact, and the socket
keeps serving afterwards."""

import threading
import time

import numpy as np
import orjson
import zmq

from megatron_opd.transport import (
    Ack, ControlSubscriber, Credit, Hello, Sample, SampleClient, SampleServer, Shutdown,
    WeightsPublished, encode, generate_secret,
)
from megatron_opd.transport.auth import Sealer
from megatron_opd.transport.schema import SCHEMA_VERSION
from megatron_opd.transport.zmq_link import ControlPublisher
from test_transport import assert_same, make_sample

KEY = generate_secret()
MAX_BYTES = 1 << 20


def _flip(rng, b: bytes) -> bytes:
    b = bytearray(b)
    i = int(rng.integers(len(b)))
    b[i] ^= int(rng.integers(1, 256))  # always a different byte
    return bytes(b)


def _header_variant(good: list[bytes], **change) -> list[bytes]:
    head = orjson.loads(good[0])
    head.update(change)
    return [orjson.dumps(head)] + good[1:]


def _sample_semantic_bad() -> list[list[bytes]]:
    """Well-formed frames (they will be properly signed) whose content is invalid."""
    good = [bytes(f) for f in encode(make_sample(T=6, K=3, routed=True))]
    head = orjson.loads(good[0])
    table = head["tensors"]
    out = []
    for i, entry in enumerate(table):
        bad_dtype = dict(entry, dtype="float64" if entry["dtype"] != "float64" else "int8")
        out.append(_header_variant(good, tensors=table[:i] + [bad_dtype] + table[i + 1:]))
        wrong_shape = dict(entry, shape=[d + 1 for d in entry["shape"]])
        out.append(_header_variant(good, tensors=table[:i] + [wrong_shape] + table[i + 1:]))
        huge = dict(entry, shape=[2 ** 40] + entry["shape"][1:])
        out.append(_header_variant(good, tensors=table[:i] + [huge] + table[i + 1:]))
        big_ok_range = dict(entry, shape=[2 ** 31 - 1] * max(1, len(entry["shape"])))
        out.append(_header_variant(good, tensors=table[:i] + [big_ok_range] + table[i + 1:]))
        out.append(good[:1 + i] + good[2 + i:])  # tensor frame missing
        out.append(good[:1 + i] + [good[1 + i][:-1]] + good[2 + i:])  # truncated tensor frame
        out.append(good[:1 + i] + [good[1 + i] + b"\x00"] + good[2 + i:])  # one byte too many
    out.append(good + [b"extra"])
    out.append(_header_variant(good, tensors=table + [dict(table[0])]))  # repeated tensor
    out.append(_header_variant(good, tensors=[{"name": "x", "dtype": "int32", "shape": [1]}]
                               + table[1:]))
    nan = bytearray(good[4])  # behaviour_logprobs
    nan[0:4] = np.array([np.nan], dtype=np.float32).tobytes()
    out.append(good[:4] + [bytes(nan)] + good[5:])
    pos = np.abs(np.frombuffer(good[4], dtype=np.float32)) + 1  # log-probs > 0
    out.append(good[:4] + [pos.tobytes()] + good[5:])
    mask = bytearray(good[3])
    mask[0] = 2
    out.append(good[:3] + [bytes(mask)] + good[4:])
    versions = np.frombuffer(good[5], dtype=np.int64)[::-1].copy() + np.arange(6)[::-1]
    out.append(good[:5] + [versions.tobytes()] + good[6:])  # decreasing token versions
    v = SCHEMA_VERSION  # relative: the schema's version moves as fields are added
    for change in ({"version": v - 2}, {"version": v - 1}, {"version": v + 1}, {"version": str(v)},
                   {"schema": "x"},
                   {"kind": "nope"}, {"kind": 7}, {"fields": []}, {"tensors": {}},
                   {"extra": 1}):
        out.append(_header_variant(good, **change))
    fields = head["fields"]
    for k, v in (("temperature", 0.0), ("top_p", 2.0), ("teacher_temperature", -1.0),
                 ("reward", "x"), ("sample_id", ""),
                 ("sample_id", "x" * 200), ("metadata", {"a": [1]}), ("unknown", 1)):
        out.append(_header_variant(good, fields={**fields, k: v}))
    for name in ("sample_id", "teacher_temperature"):  # required; the latter never implied
        missing = dict(fields)
        del missing[name]
        out.append(_header_variant(good, fields=missing))
    for junk in (b"", b"{", b"[]", b"null", b'"str"', b"{\"schema\": NaN}", b"\xff\xfe",
                 b'{"a":' * 2000, orjson.dumps({"schema": "megatron-opd"})):
        out.append([junk] + good[1:])
    return out


def _bad(rng, sealer: Sealer, valid: list[bytes], semantic: list[list[bytes]],
         wrong_kinds: list[list[bytes]], history: list[list[bytes]]) -> list[bytes]:
    """One bad message (frames as bytes), of a random category."""
    c = int(rng.integers(12))
    if c == 0:  # random bytes, 1-4 frames
        return [b"\x00" + rng.bytes(int(rng.integers(0, 300))) for _ in range(int(rng.integers(1, 5)))]
    if c == 1:  # valid content, not signed
        return list(valid)
    sealed = [bytes(f) for f in sealer.seal(list(valid))]
    if c == 2:  # one byte flipped, anywhere (auth frame included)
        j = int(rng.integers(len(sealed)))
        if not sealed[j]:
            j = 0
        return sealed[:j] + [_flip(rng, sealed[j])] + sealed[j + 1:]
    if c == 3:  # a frame truncated after signing
        j = int(rng.integers(len(sealed)))
        if not sealed[j]:
            j = 0
        return sealed[:j] + [sealed[j][:int(rng.integers(len(sealed[j])))]] + sealed[j + 1:]
    if c == 4:  # frames missing / one extra
        if rng.random() < 0.5:
            return sealed[:int(rng.integers(1, len(sealed)))]
        return sealed + [rng.bytes(int(rng.integers(0, 64)))]
    if c == 5:  # signed with another key
        return [bytes(f) for f in Sealer(generate_secret()).seal(list(valid))]
    if c == 6 and history:  # replay of a message this receiver has already seen
        return history[int(rng.integers(len(history)))]
    if c == 7 and rng.random() < 0.15:  # oversize (under ZeroMQ's 2x cut-off: it arrives)
        return [bytes(f) for f in sealer.seal([valid[0], b"x" * (MAX_BYTES + MAX_BYTES // 2)])]
    if c == 8 and wrong_kinds:  # a kind this socket does not take, properly signed
        return [bytes(f) for f in sealer.seal(list(wrong_kinds[int(rng.integers(len(wrong_kinds)))]))]
    if c == 9:  # auth frame of another version / algorithm, or no tag
        first = bytearray(sealed[0])
        k = int(rng.integers(3))
        if k == 0:
            first[4] = 2
        elif k == 1:
            first[5] = 9
        else:
            first = first[:40]
        return [bytes(first)] + sealed[1:]
    if semantic:  # valid MAC over wrong content
        return [bytes(f) for f in sealer.seal(list(semantic[int(rng.integers(len(semantic)))]))]
    return list(valid)


def test_sample_server_survives_10k_bad_messages_and_counts_each():
    server = SampleServer("tcp://127.0.0.1:0", secret=KEY, run_id="fuzz", credit=16,
                          max_message_bytes=MAX_BYTES)
    rng = np.random.default_rng(5)
    semantic = _sample_semantic_bad()
    wrong_kinds = [[bytes(f) for f in encode(m)] for m in (
        Credit(session="s", epoch=1, total=3), Ack(session="s", ids=["a"]),
        WeightsPublished(version=1, step=1), Shutdown(reason="x"),
        Hello(run_id="other-run", client="intruder", epoch=1))]  # last: wrong_run
    n_bad, valid_every = 10_000, 97
    sent_valid: list[Sample] = []
    counts = {"bad": 0, "done": False}
    errors = []

    def sender():
        try:
            dealer = zmq.Context.instance().socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.RCVHWM, 0)
            dealer.connect(server.endpoint)
            sealer = Sealer(KEY)
            dealer.send_multipart(sealer.seal(encode(Hello(run_id="fuzz", client="fuzzer",
                                                           epoch=1))))
            history: list[list[bytes]] = []
            for i in range(n_bad):
                if i % valid_every == 0:
                    s = make_sample(T=int(rng.integers(1, 9)), K=int(rng.integers(0, 4)),
                                    routed=bool(rng.random() < 0.5), sid=f"fuzz-{i:09d}")
                    frames = [bytes(f) for f in sealer.seal(encode(s))]
                    dealer.send_multipart(frames)
                    sent_valid.append(s)
                    history.append(frames)
                valid = [bytes(f) for f in encode(make_sample(sid=f"bad-{i}"))]
                frames = _bad(rng, sealer, valid, semantic, wrong_kinds, history)
                dealer.send_multipart(frames)
                counts["bad"] += 1
                if rng.random() < 0.02:
                    history.append(frames)
                while dealer.poll(0):
                    dealer.recv_multipart()  # credits; not needed by this raw peer
            time.sleep(0.5)
            dealer.close()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            counts["done"] = True

    t = threading.Thread(target=sender, daemon=True)
    t0 = time.time()
    t.start()
    received: list[Sample] = []
    deadline = time.time() + 90
    while time.time() < deadline:
        msg = server.recv(timeout_ms=100)
        if msg is not None:
            received.append(msg)
        st = server.stats
        if counts["done"] and st["rejected_total"] + st["received"] >= n_bad + len(sent_valid):
            break
    t.join(5)
    assert not errors, errors
    st = server.stats
    print(f"\nfuzz: {n_bad} bad + {len(sent_valid)} valid in {time.time() - t0:.1f} s;"
          f" rejected by reason {st['rejected_by_reason']}")
    assert counts["bad"] == n_bad
    assert st["rejected_total"] == n_bad, st
    assert sum(st["rejected_by_reason"].values()) == n_bad
    assert st["received"] == len(sent_valid) == len(received) and st["duplicates"] == 0
    for a, b in zip(sent_valid, received):
        assert_same(a, b)
    for reason in ("unauthenticated", "bad_mac", "replay", "oversize", "wrong_kind", "wrong_run",
                   "bad_auth_version", "bad_header", "bad_schema", "bad_schema_version",
                   "unknown_kind", "bad_dtype", "bad_shape", "frame_count", "bad_tensor_table",
                   "bad_field", "missing_field", "non_finite", "bad_value", "bad_versions"):
        assert st["rejected_by_reason"].get(reason, 0) > 0, (reason, st["rejected_by_reason"])
    assert set(st["rejected_by_reason"]) <= {
        "unauthenticated", "bad_mac", "replay", "oversize", "wrong_kind", "wrong_run",
        "bad_auth_version", "bad_header", "bad_schema", "bad_schema_version", "unknown_kind",
        "bad_dtype", "bad_shape", "frame_count", "bad_tensor_table", "bad_field",
        "missing_field", "non_finite", "bad_value", "bad_versions", "empty"}
    # and it keeps serving a real client
    client = SampleClient(server.endpoint, secret=KEY, run_id="fuzz", hello_interval_s=0.1)
    deadline = time.time() + 5
    while client.credit == 0 and time.time() < deadline:
        server.poll(timeout_ms=10)
        client.poll(timeout_ms=10)
    s = make_sample(sid="after-fuzz")
    assert client.send(s, timeout_ms=2000)
    assert_same(server.recv(timeout_ms=2000), s)
    client.close(), server.close()


def _drain(counter, target, step, seconds=10.0):
    deadline = time.time() + seconds
    while counter() < target and time.time() < deadline:
        step()


def test_client_and_control_subscriber_reject_bad_messages_and_keep_serving():
    rng = np.random.default_rng(7)
    n_bad = 1500
    # ---- client: a raw ROUTER plays the server
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    client = SampleClient(router.getsockopt_string(zmq.LAST_ENDPOINT), secret=KEY, run_id="r",
                          max_message_bytes=MAX_BYTES, hello_interval_s=60)
    identity, hello = router.recv_multipart()[0], None
    sealer = Sealer(KEY)
    valid = [bytes(f) for f in encode(Credit(session="s1", epoch=1, total=0))]
    wrong = [[bytes(f) for f in encode(m)] for m in (
        make_sample(), Hello(run_id="r", client="x", epoch=1), WeightsPublished(version=1, step=1))]
    history = []
    for i in range(n_bad):
        frames = _bad(rng, sealer, valid, [], wrong, history)
        if i % 50 == 0:
            history.append([bytes(f) for f in sealer.seal(list(valid))])
            router.send_multipart([identity] + history[-1])  # valid: credit total 0
        router.send_multipart([identity] + frames)
        if i % 200 == 199:  # let it catch up (a ROUTER drops at its high-water mark)
            _drain(lambda: client.stats["rejected_total"], i + 1, lambda: client.poll(10))
    _drain(lambda: client.stats["rejected_total"], n_bad, lambda: client.poll(10))
    st = client.stats
    assert st["rejected_total"] == n_bad, st
    assert st["session"] == "s1" and st["sent"] == 0  # valid credits arrived, total 0
    router.send_multipart([identity] + sealer.seal(encode(Credit(session="s1", epoch=1, total=1))))
    s = make_sample(sid="c-1")
    _drain(lambda: client.credit, 1, lambda: client.poll(10))
    assert client.send(s, timeout_ms=2000)
    got = router.recv_multipart()
    assert got[0] == identity and b"c-1" in b"".join(got[2:])  # [id, auth, batch index, data]
    client.close(), router.close()

    # ---- control subscriber: a raw PUB next to the real publisher's socket type
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:0")
    sub = ControlSubscriber(pub.getsockopt_string(zmq.LAST_ENDPOINT), secret=KEY,
                            max_message_bytes=MAX_BYTES)
    sealer = Sealer(KEY)
    ok = [bytes(f) for f in encode(WeightsPublished(version=3, step=3, published_at=1.0))]
    while not sub.poll(timeout_ms=50):  # slow joiner: wait until subscribed
        pub.send_multipart(sealer.seal(list(ok)))
    wrong = [[bytes(f) for f in encode(m)] for m in (
        make_sample(), Credit(session="s", epoch=1, total=1), Hello(run_id="r", client="x", epoch=1))]
    history, got = [], []
    for i in range(n_bad):
        pub.send_multipart(_bad(rng, sealer, ok, [], wrong, history))
        if i % 100 == 0:
            history.append([bytes(f) for f in sealer.seal(list(ok))])
            pub.send_multipart(history[-1])
        if i % 200 == 199:
            _drain(lambda: sub.stats["rejected_total"], i + 1, lambda: got.extend(sub.poll(10)))
    _drain(lambda: sub.stats["rejected_total"], n_bad, lambda: got.extend(sub.poll(10)))
    assert sub.stats["rejected_total"] == n_bad, sub.stats
    assert len(got) == n_bad // 100 and all(m == WeightsPublished(3, 3, 1.0) for m in got)
    pub.send_multipart(sealer.seal(encode(Shutdown(reason="end"))))
    _drain(lambda: len(got), n_bad // 100 + 1, lambda: got.extend(sub.poll(10)))
    assert got[-1] == Shutdown(reason="end")
    sub.close(), pub.close()
    assert ControlPublisher  # the real publisher is exercised in test_transport_channel
