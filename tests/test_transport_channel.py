"""The reliable sample channel over real ZeroMQ sockets: handshake, credit, acks, resends, server
restart, dedup state, authentication policy, secret files and `megatron-opd keygen`."""

import json
import os
import socket
import stat
import time
from collections import Counter

import numpy as np
import pytest
import zmq

from megatron_opd.cli import main as cli_main
from megatron_opd.transport import (
    AuthRequired, ControlPublisher, ControlSubscriber, Hello, ProtocolError, SampleClient,
    SampleReceiver, SampleServer, SecretFileError, SeenIds, WeightsPublished, decode,
    free_tcp_endpoint, generate_secret, is_loopback_endpoint, load_secret, write_secret,
)
from megatron_opd.transport.auth import Opener, Sealer
from megatron_opd.transport.schema import encode
from megatron_opd.transport.zmq_link import PACK_BELOW, pack_batch
from test_transport import assert_same, make_sample

KEY = generate_secret()


def sid(i: int) -> str:
    return f"run-{i:09d}"


def pump(server, client, seconds, until=lambda: False, consume=False):
    """Service both ends for up to `seconds` (server: poll only, or recv when consume)."""
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        if consume:
            m = server.recv(timeout_ms=5)
            if m is not None:
                got.append(m)
        else:
            server.poll(timeout_ms=5)
        client.poll(timeout_ms=5)
    return got


def shake(server, client):
    """Both ends live in this one thread: service them until the client holds credit."""
    pump(server, client, 5.0, until=lambda: client.credit > 0)
    assert client.credit > 0


@pytest.fixture
def pair():
    made = []

    def make(credit=8, resend_after_s=30.0, key=KEY, endpoint="tcp://127.0.0.1:0",
             handshake=True, **kw):
        server = SampleServer(endpoint, secret=key, credit=credit, run_id="run")
        client = SampleClient(server.endpoint, secret=key, run_id="run",
                              resend_after_s=resend_after_s, hello_interval_s=0.1, **kw)
        made.extend([client, server])
        if handshake:
            shake(server, client)
        return server, client

    yield make
    for s in made:
        s.close()


def test_nothing_but_hello_is_sent_before_credit():
    ep = free_tcp_endpoint()
    client = SampleClient(ep, secret=KEY, run_id="run", hello_interval_s=0.05)
    assert not client.send(make_sample(sid=sid(0)), timeout_ms=200)  # no receiver yet
    raw = zmq.Context.instance().socket(zmq.ROUTER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.bind(ep)  # a receiver that never grants credit
    for i in range(5):
        assert not client.send(make_sample(sid=sid(i)), timeout_ms=100)
    opener, kinds = Opener(KEY), []
    while raw.poll(200, zmq.POLLIN):
        kinds.append(type(decode(opener.open(raw.recv_multipart(copy=False)[1:]))))
    assert kinds and set(kinds) == {Hello}, kinds
    assert client.stats["sent"] == 0 and client.unacked() == 0
    client.close(), raw.close()


def test_credit_bounds_samples_in_flight_when_the_server_does_not_consume(pair):
    # resend_after_s short: timed resends and re-handshakes fire while held, and must not
    # push the client past its credit either
    server, client = pair(credit=4, resend_after_s=0.2, handshake=False)
    n, deadline = 0, time.monotonic() + 1.5
    while time.monotonic() < deadline:
        n += client.send(make_sample(sid=sid(n)), timeout_ms=10)
        server.poll(timeout_ms=5)  # answers Hellos, queues samples, consumes nothing
    assert n == 4 and client.unacked() == 4 and client.credit == 0
    assert server.stats["queued"] == 4 and server.stats["rejected_total"] == 0
    assert client.stats["resent"] == 0 and client.stats["handshakes"] > 1
    assert server.recv(timeout_ms=100).sample_id == sid(0)  # one consumed: one more credit
    # the held samples are past resend_after_s, so freed credit goes to their resends first
    # (the server drops those as duplicates), then to the new sample
    pump(server, client, 3.0, until=lambda: client.credit > 0)
    assert client.send(make_sample(sid=sid(n)), timeout_ms=100)
    got = pump(server, client, 3.0, consume=True, until=lambda: server.stats["received"] == 5)
    assert sorted(g.sample_id for g in got) == [sid(i) for i in range(1, 5)]  # each id once
    assert server.stats["duplicates"] == client.stats["resent"]
    assert server.stats["rejected_total"] == 0


def test_acks_clear_unacked(pair):
    server, client = pair()
    sent = [make_sample(sid=sid(i)) for i in range(6)]
    for s in sent:
        assert client.send(s, timeout_ms=2000)
    got = []
    while len(got) < 6:
        got.append(server.recv(timeout_ms=2000))
    for a, b in zip(sent, got):
        assert_same(a, b)
    assert client.unacked() == 6
    assert server.ack([sid(0), sid(1), sid(2), "never-seen"]) == 3
    assert server.ack([sid(0)]) == 0  # already acked
    pump(server, client, 3.0, until=lambda: client.unacked() == 3)
    assert client.unacked() == 3
    assert server.ack([sid(i) for i in range(6)]) == 3
    assert client.wait_acked(3.0)
    assert client.stats["acked"] == 6 and server.stats["pending_acks"] == 0


@pytest.mark.parametrize("batch_max", [1, 8])  # resends travel in batches too
def test_resend_after_timeout_then_server_dedups(pair, batch_max):
    server, client = pair(credit=8, resend_after_s=0.3, batch_max=batch_max)
    for i in range(3):
        assert client.send(make_sample(sid=sid(i)), timeout_ms=2000)
    # a slow learner: the samples wait in the server, unreported, past resend_after_s
    pump(server, client, 5.0, until=lambda: client.stats["resent"] >= 3)
    assert client.stats["resent"] == 3
    got = pump(server, client, 3.0, until=lambda: server.stats["duplicates"] >= 3, consume=True)
    got += pump(server, client, 0.3, consume=True)
    assert sorted(m.sample_id for m in got) == [sid(0), sid(1), sid(2)]  # each id once
    st = server.stats
    assert st["received"] == 3 and st["duplicates"] == 3 and st["rejected_total"] == 0
    server.ack([sid(i) for i in range(3)])
    assert client.wait_acked(3.0)


@pytest.mark.parametrize("batch_max", [1, 4])
def test_restarted_server_gets_every_unacked_sample_exactly_once(pair, batch_max):
    # A message the client sends while its DEALER still holds the dead server's pipe is lost
    # (ZeroMQ notices the disconnect asynchronously; ~1 run in 5 here): the timed resend is the
    # protocol's repair, so it must fire within the test's window.
    server, client = pair(credit=8, resend_after_s=2.0, batch_max=batch_max)
    ep = server.endpoint
    for i in range(5):
        assert client.send(make_sample(sid=sid(i)), timeout_ms=2000)
    assert client.flush()
    first = [server.recv(timeout_ms=2000).sample_id for _ in range(3)]
    assert first == [sid(0), sid(1), sid(2)]
    checkpoint = json.loads(json.dumps(server.seen_state()))  # s0..s2 are in the checkpoint
    server.ack([sid(0)])  # ... and the learner dies before acking s1 and s2
    pump(server, client, 2.0, until=lambda: client.unacked() == 4)
    assert client.unacked() == 4
    old_session = server.session
    server.close()

    deadline = time.monotonic() + 5
    while True:  # ZeroMQ closes the old listener in its I/O thread, a moment later
        try:
            server2 = SampleServer(ep, secret=KEY, credit=8, run_id="run")
            break
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    server2.load_seen_state(checkpoint)
    try:
        assert server2.session != old_session
        # the client learns about the new server when it next sends (or re-sends, when that
        # send went down the dead pipe): the sample is refused ("no_handshake"), the client says
        # Hello, sees the new session, re-sends all unacked
        assert client.send(make_sample(sid=sid(5)), timeout_ms=2000)  # old credit left
        got = pump(server2, client, 10.0, consume=True,
                   until=lambda: server2.stats["received"] >= 3
                   and server2.stats["duplicates"] >= 2)
        got += pump(server2, client, 0.3, consume=True)
        assert sorted(m.sample_id for m in got) == [sid(3), sid(4), sid(5)]
        st = server2.stats
        assert st["duplicates"] == 2 and st["reacked"] == 2  # s1, s2 are durable already
        # one refusal, or one per sample that was already on its way when the first was refused
        assert set(st["rejected_by_reason"]) == {"no_handshake"}
        assert 1 <= st["rejected_by_reason"]["no_handshake"] <= 3
        assert client.stats["sessions"] == 1
        server2.ack([m.sample_id for m in got])
        assert client.wait_acked(3.0)
        assert client.stats["acked"] == 6
    finally:
        server2.close()


def test_wrong_run_is_refused_and_gets_no_credit():
    server = SampleServer("tcp://127.0.0.1:0", secret=KEY, run_id="run-a")
    client = SampleClient(server.endpoint, secret=KEY, run_id="run-b", hello_interval_s=0.05)
    assert not client.send(make_sample(), timeout_ms=100)
    server.poll(timeout_ms=300)
    assert not client.send(make_sample(), timeout_ms=100)
    assert server.stats["rejected_by_reason"].get("wrong_run", 0) >= 1
    assert client.stats["sent"] == 0
    client.close(), server.close()


def test_seen_ids_state_round_trip_is_exact_and_compact():
    rng = np.random.default_rng(0)
    ids = [sid(i) for i in rng.permutation(5000)]
    ids += [f"run-{g:09d}-{j}" for g in range(300) for j in range(4)]
    ids += ["x-007", "x-7", "x-07", "plain", "a1b22c333", "٣٣", "n-" + "9" * 30, "0", "00"]
    seen = SeenIds()
    assert all(seen.add(i) for i in ids)
    assert not any(seen.add(i) for i in ids)
    assert len(seen) == len(ids) and sorted(seen) == sorted(ids)
    state = json.loads(json.dumps(seen.to_state()))  # plain JSON data
    back = SeenIds.from_state(state)
    assert sorted(back) == sorted(ids) and len(back) == len(ids)
    for probe in ["x-0007", "run-00000001", sid(5000), "run-000000299-4", "٣"]:
        assert probe not in back and probe not in seen
    assert seen.intervals < 20  # intervals + loose ids, not one entry per id
    big = SeenIds(sid(i) for i in range(200_000))
    assert big.intervals == 1 and len(json.dumps(big.to_state())) < 200
    with pytest.raises(ValueError):
        SeenIds.from_state({"format": "other"})
    with pytest.raises(ValueError):
        SeenIds.from_state({"format": state["format"], "ranges": [["run-", 9, "", [5, 3]]]})


def test_server_dedup_state_export_import(pair):
    server, client = pair()
    for i in range(4):
        assert client.send(make_sample(sid=sid(i)), timeout_ms=2000)
    assert [server.recv(timeout_ms=2000).sample_id for _ in range(4)] == [sid(i) for i in range(4)]
    state = server.seen_state()
    assert SeenIds.from_state(state).to_state() == state and len(SeenIds.from_state(state)) == 4
    fresh = SampleServer("tcp://127.0.0.1:0", secret=KEY)
    fresh.load_seen_state(state)
    assert fresh.seen_state() == state
    fresh.close()


def _non_loopback_address():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
        addr = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if addr.startswith("127.") else addr


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.2.1:5555", True), ("tcp://[::1]:5555", True),
    ("tcp://localhost:5555", True), ("ipc:///tmp/x.sock", True), ("inproc://samples", True),
    ("tcp://[::ffff:127.0.0.1]:5555", True), ("tcp://127.0.0.1:5;127.0.0.1:6", True),
    ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False), ("tcp://10.1.2.3:5555", False),
    ("tcp://[::]:5555", False), ("tcp://eth0:5555", False), ("tcp://10.0.0.1:5;127.0.0.1:6", False),
    ("ws://127.0.0.1:5555", False), ("tcp://127.0.0.1", False), ("garbage", False),
])
def test_loopback_policy(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback


def test_auth_required_beyond_loopback():
    with pytest.raises(AuthRequired, match="keygen"):
        SampleClient("tcp://10.1.2.3:5555")  # connecting needs no reachable peer
    with pytest.raises(AuthRequired):
        SampleServer("tcp://*:0")
    with pytest.raises(AuthRequired):
        ControlPublisher("tcp://0.0.0.0:0")
    with pytest.raises(AuthRequired):
        ControlSubscriber("tcp://10.1.2.3:5556")
    SampleClient("tcp://10.1.2.3:5555", secret=KEY).close()  # with the secret: fine
    SampleClient("tcp://10.1.2.3:5555", allow_insecure=True).close()  # explicit opt-out
    addr = _non_loopback_address()
    if addr is not None:  # bind on a real non-loopback interface of this machine
        with pytest.raises(AuthRequired):
            SampleServer(f"tcp://{addr}:0")
        SampleServer(f"tcp://{addr}:0", secret=KEY).close()
    SampleServer("tcp://127.0.0.1:0").close()  # loopback: optional


def test_secret_file_permissions(tmp_path):
    p = write_secret(tmp_path / "run.key")
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and len(load_secret(p)) == 32
    os.chmod(p, 0o640)
    with pytest.raises(SecretFileError, match="chmod 600"):
        load_secret(p)
    with pytest.raises(SecretFileError, match="chmod 600"):
        SampleServer("tcp://127.0.0.1:0", secret=str(p))
    os.chmod(p, 0o604)
    with pytest.raises(SecretFileError):
        load_secret(p)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    os.chmod(short, 0o600)
    with pytest.raises(SecretFileError, match="16 bytes"):
        load_secret(short)
    with pytest.raises(SecretFileError, match="does not exist"):
        load_secret(tmp_path / "missing.key")
    with pytest.raises(FileExistsError):
        write_secret(p)
    os.chmod(p, 0o600)
    before = p.read_bytes()
    assert write_secret(p, force=True).read_bytes() != before


def test_keygen_cli_writes_a_0600_secret(tmp_path, capsys):
    out = tmp_path / "run.key"
    old = os.umask(0)  # even with a permissive umask
    try:
        assert cli_main(["keygen", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = load_secret(out)
    assert len(key) == 32 and key != load_secret(write_secret(tmp_path / "other.key"))
    assert cli_main(["keygen", "--out", str(out)]) == 2  # refuses to overwrite: bad input
    assert "exists" in capsys.readouterr().err
    assert cli_main(["keygen", "--out", str(out), "--force"]) == 0 and load_secret(out) != key
    # the secret file drives a working authenticated channel
    server = SampleServer("tcp://127.0.0.1:0", secret=str(out))
    client = SampleClient(server.endpoint, secret=out)
    shake(server, client)
    assert client.send(make_sample(), timeout_ms=3000)
    assert server.recv(timeout_ms=3000).sample_id == "s-1"
    client.close(), server.close()


def test_bad_mac_unauthenticated_and_unconfigured_are_counted(pair):
    server = SampleServer("tcp://127.0.0.1:0", secret=KEY)
    wrong = SampleClient(server.endpoint, secret=generate_secret(), hello_interval_s=0.05)
    plain = SampleClient(server.endpoint, hello_interval_s=0.05)  # loopback: no secret
    for c in (wrong, plain):
        assert not c.send(make_sample(), timeout_ms=50)
    server.poll(timeout_ms=300)
    for c in (wrong, plain):
        assert not c.send(make_sample(), timeout_ms=100)
        assert c.stats["sent"] == 0
    server.poll(timeout_ms=300)
    reasons = server.stats["rejected_by_reason"]
    assert reasons["bad_mac"] >= 1 and reasons["unauthenticated"] >= 1
    assert set(reasons) == {"bad_mac", "unauthenticated"}
    unconfigured = SampleServer("tcp://127.0.0.1:0")  # no secret, peer authenticates
    signed = SampleClient(unconfigured.endpoint, secret=KEY)
    unconfigured.poll(timeout_ms=300)
    assert unconfigured.stats["rejected_by_reason"] == {"auth_not_configured": 1}
    good_server, good_client = pair()  # and a correct pair still works
    assert good_client.send(make_sample(sid="ok"), timeout_ms=3000)
    assert good_server.recv(timeout_ms=3000).sample_id == "ok"
    for s in (wrong, plain, server, unconfigured, signed):
        s.close()


def test_authenticated_control_pub_sub():
    ep = free_tcp_endpoint()
    pub = ControlPublisher(ep, secret=KEY)
    good, bad = ControlSubscriber(ep, secret=KEY), ControlSubscriber(ep, secret=generate_secret())
    plain = ControlSubscriber(ep)
    got, deadline = [], time.time() + 5
    while not got and time.time() < deadline:
        pub.publish(WeightsPublished(version=4, step=4, published_at=2.0))
        got = good.poll(timeout_ms=100)
    assert got[0] == WeightsPublished(version=4, step=4, published_at=2.0)
    deadline = time.time() + 5
    while time.time() < deadline and not (bad.stats["rejected_total"] and plain.stats["rejected_total"]):
        pub.publish(WeightsPublished(version=5, step=5))
        assert bad.poll(timeout_ms=50) == [] and plain.poll(timeout_ms=50) == []
    assert set(bad.stats["rejected_by_reason"]) == {"bad_mac"}
    assert set(plain.stats["rejected_by_reason"]) == {"auth_not_configured"}
    with pytest.raises(TypeError):
        pub.publish(make_sample())  # not a control kind
    for s in (pub, good, bad, plain):
        s.close()


def _frame_of(arr: np.ndarray):
    """The zmq.Frame whose buffer an array decoded by the transport lies in (or None)."""
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview) and isinstance(base.obj, zmq.Frame):
        return base.obj
    return None


def test_payload_is_never_copied(pair):
    server, client = pair()
    s = make_sample(T=64, K=256, routed=True)
    # the frames send() hands to ZeroMQ (copy=False): [auth, batch index, packed small parts,
    # then every tensor of PACK_BELOW bytes or more as a view of the sample's own array]
    sealed = client._sealed_batch([encode(s)])
    big = [s.teacher_topk_ids, s.teacher_topk_logprobs]  # 64 x 256 x 4 bytes = 64 KiB each
    assert all(a.nbytes >= PACK_BELOW for a in big) and len(sealed) == 3 + len(big)
    for arr, frame in zip(big, sealed[3:]):
        assert isinstance(frame, memoryview) and np.shares_memory(
            np.frombuffer(frame, dtype=np.uint8), arr.view(np.uint8).reshape(-1))
    assert client.send(s, timeout_ms=3000)
    got = server.recv(timeout_ms=3000)
    assert_same(s, got)
    for name in ("teacher_topk_logprobs", "teacher_topk_ids", "prompt_ids", "routed_experts"):
        arr = getattr(got, name)
        frame = _frame_of(arr)
        assert frame is not None, name
        assert np.shares_memory(arr, np.frombuffer(frame.buffer, dtype=np.uint8)), name


def test_poly1305_mac_round_trip_and_mismatch_is_bad_mac():
    pytest.importorskip("cryptography")
    server = SampleServer("tcp://127.0.0.1:0", secret=KEY, mac="poly1305")
    client = SampleClient(server.endpoint, secret=KEY, mac="poly1305")
    other = SampleClient(server.endpoint, secret=KEY, hello_interval_s=0.05)  # hmac-sha256
    s = make_sample(T=32, K=8)
    shake(server, client)
    assert client.send(s, timeout_ms=3000)
    assert_same(s, server.recv(timeout_ms=3000))
    other.send(make_sample(), timeout_ms=100)
    server.poll(timeout_ms=300)
    assert set(server.stats["rejected_by_reason"]) == {"bad_mac"}
    sealer, opener = Sealer(KEY, "poly1305"), Opener(KEY, "poly1305")
    frames = sealer.seal([b"abc", b"def"])
    assert opener.open(frames) == [b"abc", b"def"]
    with pytest.raises(ProtocolError, match="replay"):
        opener.open(frames)
    with pytest.raises(ProtocolError, match="bad_mac"):  # bytes moved between frames
        opener.open([sealer.seal([b"abc", b"def"])[0], b"abcd", b"ef"])
    for c in (server, client, other):
        c.close()


# ------------------------------------------------------------------ batches (issue 16 item 4)
MACS = ["hmac-sha256", "poly1305", "blake3"]


def _raw_peer(server, sealer):
    """A raw DEALER that said Hello to server (so its samples count against credit)."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(server.endpoint)
    dealer.send_multipart(sealer.seal(encode(Hello(run_id="run", client="raw", epoch=1))))
    deadline = time.monotonic() + 5
    while server.stats["handshakes"] == 0 and time.monotonic() < deadline:
        server.poll(timeout_ms=10)
    assert server.stats["handshakes"] == 1
    return dealer


def _poll_until(server, n_rejected, seconds=5.0):
    deadline = time.monotonic() + seconds
    while server.stats["rejected_total"] < n_rejected and time.monotonic() < deadline:
        server.poll(timeout_ms=10)


@pytest.mark.parametrize("mac", [None] + MACS)
def test_batches_round_trip_exactly_and_without_copying_big_tensors(mac):
    if mac is not None:
        pytest.importorskip({"poly1305": "cryptography", "blake3": "blake3"}.get(mac, "hmac"))
    kw = {} if mac is None else {"secret": KEY, "mac": mac}
    server = SampleServer("tcp://127.0.0.1:0", run_id="run", credit=16, **kw)
    client = SampleClient(server.endpoint, run_id="run", batch_max=8, hello_interval_s=0.1, **kw)
    shake(server, client)
    # sizes: tiny, and one with a 64 KiB+ tensor that travels as its own zero-copy frame
    sent = [make_sample(T=t, K=k, routed=r, sid=sid(i))
            for i, (t, k, r) in enumerate([(1, 0, False), (5, 3, True), (600, 32, False),
                                           (3, 1, True), (7, 2, False)])]
    for s in sent:
        assert client.send(s, timeout_ms=2000)
    assert client.stats["batches"] == 0  # taken, waiting for more or a poll
    got = pump(server, client, 5.0, consume=True, until=lambda: server.stats["received"] == 5)
    assert client.stats["batches"] == 1 and len(got) == 5
    for a, b in zip(sent, got):
        assert_same(a, b)
    big = got[2].teacher_topk_logprobs  # 600 x 32 float32 = 75 KiB: a frame of its own
    assert np.shares_memory(big, np.frombuffer(_frame_of(big).buffer, dtype=np.uint8))
    small = got[1].token_versions  # packed: a view into the shared frame, 8-byte aligned
    assert _frame_of(small) is not None and small.ctypes.data % 8 == 0
    assert server.stats["rejected_total"] == 0 and server.stats["duplicates"] == 0
    client.close(), server.close()


@pytest.mark.parametrize("mac", MACS)
def test_tampered_batches_are_rejected_and_counted_and_give_their_credit_back(mac):
    pytest.importorskip({"poly1305": "cryptography", "blake3": "blake3"}.get(mac, "hmac"))
    server = SampleServer("tcp://127.0.0.1:0", secret=KEY, mac=mac, run_id="run", credit=16)
    sealer = Sealer(KEY, mac)
    dealer = _raw_peer(server, sealer)
    samples = [make_sample(T=600, K=32, sid=sid(0)), make_sample(sid=sid(1))]
    body = pack_batch([encode(s) for s in samples])  # [index, packed, top-K ids, top-K lps]
    assert len(body) == 4
    sent, expect = 0, Counter()
    for j in range(1 + len(body)):  # a byte flipped in every frame, the auth frame included
        frames = [bytearray(f) for f in sealer.seal(list(body))]
        frames[j][len(frames[j]) // 2] ^= 0x5A
        dealer.send_multipart(frames)
        sent += 1
        expect["bad_mac"] += 1
    dealer.send_multipart(Sealer(generate_secret(), mac).seal(list(body)))  # wrong key
    expect["bad_mac"] += 1
    index = bytearray(body[0])
    index[4] = 99  # a batch version this build does not speak, properly signed
    dealer.send_multipart(sealer.seal([bytes(index)] + body[1:]))
    expect["bad_batch_version"] += 1
    dealer.send_multipart(sealer.seal([body[0], body[1][:-8], body[2]]))  # part out of its frame
    expect["bad_batch"] += 1
    dealer.send_multipart(list(body))  # not authenticated
    expect["unauthenticated"] += 1
    hello = encode(Hello(run_id="run", client="raw", epoch=1))
    dealer.send_multipart(sealer.seal(pack_batch([encode(samples[1]), hello])))
    expect["wrong_kind"] += 1  # only samples travel in a batch
    total = sum(expect.values())
    _poll_until(server, total)
    assert server.stats["rejected_by_reason"] == dict(expect)
    assert server.stats["received"] == 0 and server.stats["queued"] == 0
    # every rejected batch gave back the 2 credits it claimed (capped at the window): a good
    # batch still fits, and a replay of it is refused
    good = sealer.seal(list(body))
    dealer.send_multipart(good)
    got = [server.recv(timeout_ms=3000) for _ in samples]
    for a, b in zip(samples, got):
        assert_same(a, b)
    dealer.send_multipart(good)
    _poll_until(server, total + 1)
    assert server.stats["rejected_by_reason"]["replay"] == 1
    opener, totals = Opener(KEY, mac), []
    while dealer.poll(100):
        totals.append(decode(opener.open(dealer.recv_multipart())).total)
    # 16 at the handshake, + 2 per rejected message (10), + the 2 taken, + 2 for the replay
    assert max(totals) == 16 + 2 * 10 + 2 + 2
    dealer.close(), server.close()


def test_a_batch_on_a_single_message_socket_is_refused_and_counted():
    rx = SampleReceiver("tcp://127.0.0.1:0", secret=KEY)
    ep = rx.sock.getsockopt_string(zmq.LAST_ENDPOINT)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(ep)
    sealer = Sealer(KEY)
    push.send_multipart(sealer.seal(pack_batch([encode(make_sample())])))
    push.send_multipart(sealer.seal(encode(make_sample(sid="single"))))
    got, deadline = None, time.monotonic() + 5
    while got is None and time.monotonic() < deadline:
        got = rx.recv(timeout_ms=50)
    assert got.sample_id == "single"
    assert rx.stats["rejected_by_reason"] == {"unexpected_batch": 1}
    push.close(), rx.close()
