"""The reliable sample channel: orchestrator `SampleClient` (DEALER, connect) → learner
`SampleServer` (ROUTER, bind), with a READY handshake, credit flow control, acks, resends and
server-side deduplication.

Protocol (messages in `schema.py`):
1. The client sends `Hello(run_id, client, epoch)` and nothing else until the server answers
   `Credit(session, epoch, total)`. Before the server exists the Hello waits in ZeroMQ's queue
   and is repeated every `hello_interval_s`.
2. The client sends a sample only while (samples sent since that Hello) < total; every sample,
   first send or resend, uses one credit. The server raises `total` by one for every message of
   that client it is done with: a sample `recv()` handed to the learner, a duplicate it dropped,
   a message it rejected (announced at once when half the window or more is owed, otherwise
   coalesced into one Credit sent before `recv` waits or returns with nothing more to read).
   So at most `credit` samples of a client are in transit or queued in the server at any time (ZeroMQ high-water marks are the second bound), and a slow learner
   slows generation down instead of growing memory. Credits are cumulative, so a lost Credit is
   repaired by the next one; a client that has had no credit and heard nothing for
   `resend_after_s` starts a new handshake (epoch + 1), which resynchronises the count.
3. `SampleServer.recv()` returns each sample id once: an id seen before (in this process or in
   the state given to `load_seen_state`) is dropped and counted ("duplicates"). `ack(ids)` sends
   `Ack(ids)` to the client that sent them (routed by client name, so it reaches the client's
   current connection). A duplicate of an id that was already acked is re-acked at once.
4. The client keeps every sample it sent until it is acked (`unacked()`). A sample that the
   server has not reported as consumed (`Credit.received`) within `resend_after_s` is sent
   again (counted in `stats["resent"]`). When a Credit carries a new `session` (the server
   process restarted), the client re-sends *every* unacked sample, consumed or not, to the new
   server, with fresh credit.

   Samples travel in batches (`zmq_link.pack_batch`): with `batch_max > 1` the client gathers
   samples it has credit for and sends them as one message (flushed when full, on `poll`,
   `flush`, `wait_acked`, `send_outside_credit` and before `send` waits); each sample in a batch
   spends one credit and is acked, re-sent and deduplicated on its own. A rejected batch gives
   its client back the credit it claims (at most the window).
5. `PartialRollouts` (the answer to the learner's `Interrupt`, interrupt sync) travel outside
   credit: `send_outside_credit` sends one at once, never holds or re-sends it; the server
   keeps the last few in `partial_rollouts` (only from a client that said Hello) and counts them.

Guarantees: delivery client → server is at-least-once for every sample the client still holds
(it holds it until acked, across reconnects and server restarts); with server-side dedup this
gives exactly-once *acceptance* by the learner as long as the dedup state and the training state
are saved together. What the learner must do:
- ack an id only once its outcome (trained, or deliberately dropped as stale) is durable, e.g.
  after the checkpoint containing it is on disk. Acking earlier is allowed (less client memory)
  but then a learner crash loses the samples trained since the last checkpoint;
- save `seen_state()` in the same checkpoint as the weights, at a point where every sample
  `recv()` returned is accounted for in that checkpoint, and `load_seen_state(...)` it on resume
  before the first `recv()`. Samples received after that checkpoint are not in the saved state,
  so when the client re-sends them to the restarted learner they are accepted again: they are
  not in the restored weights either.
What the orchestrator must do: keep calling `poll()` (or `send`) so acks free memory and resends
happen; use sample ids unique within the run (also across orchestrator restarts); bound its
memory with `max_unacked` if the learner acks rarely. The client's unacked samples live only in
its memory: an orchestrator crash loses them (they are regenerated, with new ids).

Every message is authenticated when a secret is given (required beyond loopback); every bad
message (see `stats["rejected_by_reason"]`) is counted, never crashes the receiver, and, coming
from a client that said Hello, gives its credit back.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterable

import zmq

from megatron_opd.transport.dedup import SeenIds
from megatron_opd.transport.schema import (
    MAX_IDS_PER_MESSAGE, Ack, Credit, Hello, PartialRollouts, ProtocolError, Sample, encode,
)
from megatron_opd.transport.zmq_link import (
    DEFAULT_MAX_MESSAGE_BYTES, MAX_BATCH_MESSAGES, _Socket, batch_claims,
)


@dataclass
class _Peer:
    name: str
    epoch: int
    base: int  # credit total = base + released (this epoch)
    arrived: int = 0  # samples of this epoch counted against credit
    released: int = 0  # messages done with in this epoch
    buffered: int = 0  # samples waiting in the server's queue for recv()
    unsent: int = 0  # releases not yet announced in a Credit
    received: list = None  # ids consumed since the last Credit

    def __post_init__(self):
        self.received = []

    @property
    def total(self) -> int:
        return max(0, self.base + self.released)


class SampleServer(_Socket):
    """Learner side (ROUTER, bind). Single-threaded: call from one thread only.

    recv(timeout_ms) -> Sample | None; ack(ids); seen_state() / load_seen_state(state);
    poll(timeout_ms) handles handshakes and queues arriving samples without consuming them;
    stats (property) -> dict.
    """

    def __init__(self, endpoint: str, *, secret=None, run_id: str = "", credit: int = 16,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, rcvhwm: int = 1000,
                 sndhwm: int = 10_000, mac: str = "hmac-sha256", allow_insecure: bool = False,
                 max_age_s: float | None = None, context: zmq.Context | None = None):
        if credit < 1:
            raise ValueError("credit must be >= 1")
        super().__init__(zmq.ROUTER, context, endpoint, secret=secret, mac=mac,
                         allow_insecure=allow_insecure, max_age_s=max_age_s,
                         max_message_bytes=max_message_bytes,
                         kinds=(Hello, Sample, PartialRollouts), role="SampleServer")
        self.run_id, self.credit = run_id, credit
        self.session = os.urandom(8).hex()
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client keeps its identity
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)  # ZeroMQ's own safety net
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._peers: dict[bytes, _Peer] = {}
        self._by_name: dict[str, bytes] = {}
        self._queue: deque[tuple[bytes, int, Sample]] = deque()
        self._queued_ids: set[str] = set()  # ids in _queue (duplicate check without a scan)
        self._seen = SeenIds()
        self._pending: dict[str, str] = {}  # returned by recv, not acked yet: id -> client name
        self._owed: set[bytes] = set()  # peers with freed credit not announced yet
        self._counts = {"received": 0, "duplicates": 0, "acked": 0, "reacked": 0,
                        "handshakes": 0, "partial_rollouts": 0}
        # interrupt-sync answers (outside credit: a handful per run, each after an Interrupt)
        self.partial_rollouts: deque[PartialRollouts] = deque(maxlen=8)

    # ------------------------------------------------------------------------ learner API
    def recv(self, timeout_ms: int = 1000) -> Sample | None:
        """The next new sample (each id at most once), or None after timeout_ms. Handshakes,
        duplicates and bad messages are dealt with inside; the sample's credit goes back to its
        client when it is returned here."""
        deadline = time.monotonic() + timeout_ms / 1000
        while not self._queue:
            left = deadline - time.monotonic()
            if self._owed and not self.sock.poll(0, zmq.POLLIN):
                self.flush_credit()  # about to wait: announce what was freed
            if not self.sock.poll(max(0, int(left * 1000)), zmq.POLLIN):
                return None
            self._handle(self.sock.recv_multipart(copy=False))
        identity, epoch, sample = self._queue.popleft()
        self._queued_ids.discard(sample.sample_id)
        self._seen.add(sample.sample_id)
        self._counts["received"] += 1
        peer = self._peers.get(identity)
        if peer is not None:
            peer.buffered -= 1
            self._pending[sample.sample_id] = peer.name
            self._release(identity, peer, [sample.sample_id])
        if self._owed and (not self._queue or not self.sock.poll(0, zmq.POLLIN)):
            self.flush_credit()  # nothing more to read right now: announce freed credit
        return sample

    def flush_credit(self) -> None:
        """Send the Credit messages owed (recv does this by itself: under load it coalesces
        freed credit into fewer messages, and flushes before the learner may go off to train)."""
        for identity in self._owed:
            peer = self._peers.get(identity)
            if peer is not None and (peer.unsent or peer.received):
                self._send(identity, Credit(session=self.session, epoch=peer.epoch,
                                            total=peer.total, received=peer.received))
                peer.unsent, peer.received = 0, []
        self._owed.clear()

    def poll(self, timeout_ms: int = 0, max_messages: int = 10_000) -> int:
        """Handle what arrives within timeout_ms (handshakes answered, samples queued for recv,
        no credit given back); returns how many samples are queued."""
        wait = timeout_ms
        for _ in range(max_messages):
            if not self.sock.poll(wait, zmq.POLLIN):
                break
            self._handle(self.sock.recv_multipart(copy=False))
            wait = 0
        if self._owed:
            self.flush_credit()
        return len(self._queue)

    def queued_samples(self) -> list[Sample]:
        """Samples received and queued, not yet returned by `recv` (in arrival order)."""
        return [s for _, _, s in self._queue]

    def ack(self, ids: Iterable[str]) -> int:
        """The outcome of these ids is durable: tell their clients (they forget them). Ids never
        returned by recv or already acked are ignored. Returns how many were acked."""
        by_client: dict[str, list[str]] = {}
        for i in ids:
            name = self._pending.pop(i, None)
            if name is not None:
                by_client.setdefault(name, []).append(i)
        n = 0
        for name, lst in by_client.items():
            n += len(lst)
            identity = self._by_name.get(name)
            if identity is not None:
                self._send_ack(identity, lst)
        self._counts["acked"] += n
        return n

    def seen_state(self) -> dict:
        """Every id recv() returned (and those loaded), as plain JSON-able data."""
        return self._seen.to_state()

    def load_seen_state(self, state: dict) -> None:
        """Merge ids from a checkpoint: they count as seen and durably accepted (a client
        re-sending one gets an Ack straight away)."""
        for i in SeenIds.from_state(state):
            self._seen.add(i)

    @property
    def stats(self) -> dict:
        return {**self._counts, "rejected_total": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected), "queued": len(self._queue),
                "pending_acks": len(self._pending), "seen": len(self._seen),
                "peers": len(self._by_name), "session": self.session}

    # ------------------------------------------------------------------------- internals
    def _handle(self, frames: list) -> None:
        identity, body = frames[0].bytes, frames[1:]
        peer = self._peers.get(identity)
        try:
            msgs = self._incoming_many(body)
            if len(msgs) > 1 and not all(isinstance(m, Sample) for m in msgs):
                raise ProtocolError("wrong_kind", "only samples travel in a batch")
        except ProtocolError as e:
            self._reject(e)
            if peer is not None:  # its client spent credit on it: give that back (what the
                # batch says it held, unverified, so at most what the client may have in flight)
                claimed = batch_claims(body)
                for _ in range(max(1, min(claimed, peer.total - peer.arrived))):
                    peer.arrived += 1
                    self._release(identity, peer, [])
            return
        msg = msgs[0]
        if isinstance(msg, Hello):
            self._hello(identity, peer, msg)
            return
        if isinstance(msg, PartialRollouts):  # no credit: it answers the learner's Interrupt
            if peer is None:
                self._reject(ProtocolError("no_handshake", "partial rollouts without Hello"))
            else:
                self._counts["partial_rollouts"] += 1
                self.partial_rollouts.append(msg)
            return
        if peer is None:  # e.g. this server restarted: the client must say Hello first
            self._reject(ProtocolError("no_handshake", "sample from a client without Hello"))
            self._send(identity, Credit(session=self.session, epoch=0, total=0))
            return
        for msg in msgs:
            self._take(identity, peer, msg)

    def _take(self, identity: bytes, peer: _Peer, msg: Sample) -> None:
        if peer.arrived + 1 > peer.total:
            self._reject(ProtocolError("over_credit", f"{peer.name} sent beyond its credit"))
            return
        peer.arrived += 1
        sid = msg.sample_id
        if sid in self._seen or sid in self._queued_ids:
            self._counts["duplicates"] += 1
            if sid in self._seen and sid not in self._pending:  # durable already: say so again
                self._counts["reacked"] += 1
                self._send_ack(identity, [sid])
            self._release(identity, peer, [sid])
            return
        peer.buffered += 1
        self._queue.append((identity, peer.epoch, msg))
        self._queued_ids.add(sid)

    def _hello(self, identity: bytes, peer: _Peer | None, msg: Hello) -> None:
        if self.run_id and msg.run_id != self.run_id:
            self._reject(ProtocolError("wrong_run", f"Hello for run {msg.run_id!r}"))
            return
        if peer is None or peer.epoch != msg.epoch or peer.name != msg.client:
            buffered = peer.buffered if peer is not None else 0
            # samples of the old epoch still queued here count against the new credit
            peer = _Peer(name=msg.client, epoch=msg.epoch, base=self.credit - buffered,
                         buffered=buffered)
            old = self._by_name.get(msg.client)
            if old is not None and old != identity and self._peers.get(old) is not None \
                    and self._peers[old].buffered == 0:
                del self._peers[old]
            self._peers[identity] = peer
            self._by_name[msg.client] = identity
            self._counts["handshakes"] += 1
        self._send(identity, Credit(session=self.session, epoch=peer.epoch, total=peer.total))

    def _release(self, identity: bytes, peer: _Peer, received: list[str]) -> None:
        """One more message of this peer is done with: one more credit, sent at once when the
        peer is short of it (half its window or more owed), else with the next flush."""
        peer.released += 1
        peer.unsent += 1
        peer.received.extend(received)
        self._owed.add(identity)
        if peer.unsent * 2 >= self.credit or len(peer.received) >= MAX_IDS_PER_MESSAGE:
            self._send(identity, Credit(session=self.session, epoch=peer.epoch,
                                        total=peer.total, received=peer.received))
            peer.unsent, peer.received = 0, []

    def _send_ack(self, identity: bytes, ids: list[str]) -> None:
        for k in range(0, len(ids), MAX_IDS_PER_MESSAGE):
            self._send(identity, Ack(session=self.session, ids=ids[k:k + MAX_IDS_PER_MESSAGE]))

    def _send(self, identity: bytes, msg) -> None:
        try:  # ROUTER drops (never blocks) when that client's queue is full or it is gone
            self.sock.send_multipart([identity] + self._outgoing(msg), flags=zmq.NOBLOCK,
                                     copy=False)
        except zmq.Again:
            pass


@dataclass
class _Entry:
    sample: Sample
    frames: list  # encode(sample), kept for re-sends (validated once)
    sent_at: float = 0.0
    sends: int = 0
    received: bool = False  # the server reported it consumed (no timed resend)
    queued: bool = False  # waiting in the resend queue


class SampleClient(_Socket):
    """Orchestrator side (DEALER, connect). Single-threaded: call from one thread only.

    send(sample, timeout_ms) -> bool; poll(timeout_ms) -> int; unacked() -> int;
    wait_acked(timeout_s) -> bool; stats (property) -> dict.
    """

    def __init__(self, endpoint: str, *, secret=None, run_id: str = "", name: str = "orchestrator",
                 resend_after_s: float = 30.0, hello_interval_s: float = 1.0,
                 max_unacked: int | None = None, sndhwm: int = 1000, rcvhwm: int = 100_000,
                 max_message_bytes: int = 16 << 20, mac: str = "hmac-sha256",
                 allow_insecure: bool = False, max_age_s: float | None = None,
                 batch_bytes: int = 1 << 20, batch_max: int = 1,
                 context: zmq.Context | None = None):
        if not 1 <= batch_max <= MAX_BATCH_MESSAGES or batch_bytes < 0:
            raise ValueError(f"batch_max must be in 1..{MAX_BATCH_MESSAGES} (what a server "
                             f"takes) and batch_bytes >= 0")
        super().__init__(zmq.DEALER, context, endpoint, secret=secret, mac=mac,
                         allow_insecure=allow_insecure, max_age_s=max_age_s,
                         max_message_bytes=max_message_bytes, kinds=(Credit, Ack),
                         role="SampleClient")
        self.run_id, self.name = run_id, name
        self.resend_after_s, self.hello_interval_s = resend_after_s, hello_interval_s
        self.max_unacked = max_unacked
        # a fixed identity: after a reconnect the server still knows who we are
        self.sock.setsockopt(zmq.ROUTING_ID, b"c" + os.urandom(15))
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
        self.sock.connect(endpoint)
        self._unacked: OrderedDict[str, _Entry] = OrderedDict()
        self._resend: deque[str] = deque()
        self.batch_bytes, self.batch_max = batch_bytes, batch_max
        self._batch: list[_Entry] = []  # samples taken (credit spent), not yet handed to zmq
        self._batch_nbytes = 0
        self.session: str | None = None
        self._epoch = 0
        self._total = 0
        self._sent = 0  # samples sent since the current Hello
        self._handshaking = False
        self._hello_at = 0.0
        self._heard_at = time.monotonic()
        self._next_scan = 0.0
        self._counts = {"sent": 0, "resent": 0, "acked": 0, "handshakes": 0,
                        "sessions": 0, "send_timeouts": 0, "batches": 0}
        self._start_handshake()

    # -------------------------------------------------------------------- orchestrator API
    @property
    def credit(self) -> int:
        """Samples that may be sent right now."""
        return 0 if self._handshaking else max(0, self._total - self._sent)

    def unacked(self) -> int:
        return len(self._unacked)

    def send(self, sample: Sample, timeout_ms: int = 10_000) -> bool:
        """Send one sample once credit allows (pending resends go first). True: it was taken
        (credit spent) and is held until acked. It leaves in a batch with the samples sent after
        it: at once when the batch holds `batch_max` samples or `batch_bytes` bytes, else at the
        next `poll`, `flush`, `wait_acked`, `send_outside_credit`, or when `send` waits for
        credit. False: no credit (or `max_unacked` reached) within timeout_ms; the sample was
        not taken. Raises ProtocolError for an invalid sample, ValueError for an id already
        held."""
        if sample.sample_id in self._unacked:
            raise ValueError(f"sample id {sample.sample_id!r} is already in flight")
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            self._service()
            room = self.max_unacked is None or len(self._unacked) < self.max_unacked
            if room and not self._resend and self.credit > 0 and self._batch_room():
                entry = _Entry(sample, encode(sample))  # validates
                self._unacked[sample.sample_id] = entry
                self._take(entry)
                return True
            self.flush()  # about to wait for credit: what is taken must go out first
            left = deadline - time.monotonic()
            if left <= 0:
                self._counts["send_timeouts"] += 1
                return False
            self._wait(min(left, 0.05))

    def send_outside_credit(self, msg: PartialRollouts, timeout_ms: int = 10_000) -> bool:
        """Send an interrupt-sync answer now: no credit, never held or re-sent (a lost one only
        costs exactness, which the learner counts). False without a handshake or on timeout."""
        self._service()
        self.flush()  # it must arrive after every sample sent before it
        if self._handshaking or not self.sock.poll(timeout_ms, zmq.POLLOUT):
            return False
        self.sock.send_multipart(self._outgoing(msg), copy=False)
        return True

    def flush(self) -> bool:
        """Hand the samples taken by `send` to ZeroMQ now, as one message; False when ZeroMQ's
        queue is full (they stay in the batch and go with the next flush)."""
        if not self._batch:
            return True
        frames = self._sealed_batch([e.frames for e in self._batch])
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        now = time.monotonic()
        for e in self._batch:
            e.sent_at = now
        self._batch, self._batch_nbytes = [], 0
        self._counts["batches"] += 1
        return True

    def close(self) -> None:
        try:
            self.flush()  # best effort: unflushed samples are unacked anyway
        except zmq.ZMQError:
            pass
        super().close()

    def poll(self, timeout_ms: int = 0) -> int:
        """Handle Credit / Ack messages arriving within timeout_ms, repeat the handshake if due,
        re-send what is due; returns the number of unacked samples."""
        self._wait(timeout_ms / 1000)
        self._service()
        self.flush()
        return len(self._unacked)

    def wait_acked(self, timeout_s: float) -> bool:
        """Keep polling until every sent sample is acked (e.g. before shutting down)."""
        deadline = time.monotonic() + timeout_s
        while self._unacked and time.monotonic() < deadline:
            self.poll(timeout_ms=50)
        return not self._unacked

    @property
    def stats(self) -> dict:
        return {**self._counts, "unacked": len(self._unacked), "credit": self.credit,
                "resend_queue": len(self._resend), "session": self.session,
                "rejected_total": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected)}

    # ------------------------------------------------------------------------- internals
    def _wait(self, seconds: float) -> None:
        """Receive and handle messages for up to `seconds` (returns after the first batch)."""
        wait = max(0, int(seconds * 1000))
        while self.sock.poll(wait, zmq.POLLIN):
            frames = self.sock.recv_multipart(copy=False)
            try:
                msg = self._incoming(frames)
            except ProtocolError as e:
                self._reject(e)
            else:
                self._heard_at = time.monotonic()
                if isinstance(msg, Credit):
                    self._on_credit(msg)
                else:
                    self._on_ack(msg)
            wait = 0

    def _service(self) -> None:
        self._wait(0)
        now = time.monotonic()
        if self._handshaking:
            if now - self._hello_at >= self.hello_interval_s:
                self._send_hello()  # same epoch: the server answers a repeat idempotently
            return
        if now >= self._next_scan:  # timed resends of samples the server never reported
            self._next_scan = now + min(1.0, self.resend_after_s / 4)
            for sid, e in self._unacked.items():
                if not e.received and not e.queued and now - e.sent_at >= self.resend_after_s:
                    e.queued = True
                    self._resend.append(sid)
        if self.credit == 0 and now - self._heard_at >= self.resend_after_s and (
                self._resend or any(not e.received for e in self._unacked.values())):
            self._start_handshake()  # credit may have been lost, or the server is gone
            return
        while self._resend and self.credit > 0 and self._batch_room():
            entry = self._unacked.get(self._resend.popleft())
            if entry is None:
                continue
            entry.queued = False
            self._take(entry)
            self._counts["resent"] += 1

    def _batch_room(self) -> bool:
        """False while a full batch could not be flushed (ZeroMQ's queue is full)."""
        return len(self._batch) < self.batch_max and self._batch_nbytes < self.batch_bytes

    def _take(self, entry: _Entry) -> None:
        """Spend one credit on entry: into the outgoing batch, flushed when full."""
        n = sum(memoryview(f).nbytes for f in entry.frames)
        if self._batch and self._batch_nbytes + n > self.batch_bytes:
            self.flush()
        self._batch.append(entry)
        self._batch_nbytes += n
        self._sent += 1
        entry.sends += 1
        entry.sent_at = time.monotonic()
        entry.received = False
        if entry.sends == 1:
            self._counts["sent"] += 1
        if len(self._batch) >= self.batch_max or self._batch_nbytes >= self.batch_bytes:
            self.flush()

    def _start_handshake(self) -> None:
        # samples taken but not handed to zmq: their credit is void, they go again after it
        for e in self._batch:
            if not e.queued and e.sample.sample_id in self._unacked:
                e.queued = True
                self._resend.append(e.sample.sample_id)
        self._batch, self._batch_nbytes = [], 0
        self._epoch += 1
        self._handshaking, self._total, self._sent = True, 0, 0
        self._counts["handshakes"] += 1
        self._send_hello()

    def _send_hello(self) -> None:
        self._hello_at = time.monotonic()
        frames = self._outgoing(Hello(run_id=self.run_id, client=self.name, epoch=self._epoch))
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # queue full: repeated after hello_interval_s

    def _on_credit(self, c: Credit) -> None:
        if c.session == self.session:
            for sid in c.received:
                e = self._unacked.get(sid)
                if e is not None:
                    e.received = True
        if c.epoch == self._epoch and c.epoch > 0:
            if c.session != self.session:  # first contact, or the server restarted
                if self.session is not None:
                    self._counts["sessions"] += 1
                self.session = c.session
                self._resend.clear()
                for sid, e in self._unacked.items():  # everything unacked goes to this server
                    e.queued, e.received = True, False
                    self._resend.append(sid)
            self._handshaking = False
            self._total = max(self._total, c.total)
        elif not self._handshaking and (c.session != self.session or c.epoch == 0):
            self._start_handshake()  # a server that does not know us (restarted): say Hello

    def _on_ack(self, a: Ack) -> None:
        for sid in a.ids:  # durable is durable, whichever server session says so
            if self._unacked.pop(sid, None) is not None:
                self._counts["acked"] += 1
