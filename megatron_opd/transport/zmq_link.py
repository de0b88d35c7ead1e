"""ZeroMQ sockets carrying the schema's messages.

Samples, reliable (issue 5): `SampleServer` / `SampleClient` in `transport/channel.py` (credit
flow control, acks, resends, dedup). The plain PUSH/PULL pair below stays for tools and tests:
orchestrator PUSH (connect) → learner PULL (bind). High-water marks bound what is queued, so a slow
learner makes `send` time out (the orchestrator waits) instead of growing memory.
Control: learner PUB (bind) → orchestrator SUB (connect). PUB/SUB drops messages sent before the
subscriber joined ("slow joiner"); version announcements are latest-wins, so the learner simply
re-announces its version while it waits, and a missed one is harmless. The subscriber accepts only
control kinds (WeightsPublished, Shutdown, Interrupt).

Every socket here takes `secret` (bytes or a secret file, see `transport/auth.py`): with it, every
message is authenticated (HMAC-SHA256 by default) and unauthenticated / bad-MAC / replayed
messages are rejected before parsing. Beyond loopback a secret is required (`AuthRequired` at
construction). Every receiver counts rejections by reason (`stats`) and keeps serving.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections import Counter

import zmq

from megatron_opd.transport.auth import (
    MAGIC, Opener, Sealer, check_endpoint, resolve_secret,
)
from megatron_opd.transport.schema import (
    Interrupt, Message, ProtocolError, Shutdown, WeightsPublished, decode, encode,
)

log = logging.getLogger(__name__)
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20

# ------------------------------------------------------------------ batch framing (samples)
# The sample channel (client -> server) sends one or more schema messages in one ZeroMQ message:
# per-message costs (a zmq send per frame, a MAC setup, a credit round) are paid once per batch,
# and small frames are packed instead of each costing a zmq frame:
#
#   [auth frame (with a secret)] [index frame] [data frame 0] [data frame 1] ...
#
# index frame (little-endian): b"OPDB", BATCH_VERSION (u8), 3 zero bytes, messages m (u32),
# parts p (u32), then m part counts (u32), then p parts of (data frame u32, offset u64, length u64).
# Message i is its parts in order: the schema's frames (JSON header, tensors), each a view into a
# data frame. The sender packs parts under PACK_BELOW bytes into data frame 0 (8-byte aligned:
# int64/float64 views stay aligned) and hands bigger ones to ZeroMQ as their own zero-copy frames.
# A schema header starts with "{", so a receiver tells a batch from a single message by its first
# byte; a receiver of an older build refuses a batch as "bad_header", an unknown BATCH_VERSION is
# "bad_batch_version", an inconsistent index "bad_batch".
BATCH_MAGIC = b"OPDB"
BATCH_VERSION = 1
MAX_BATCH_MESSAGES = 1024
PACK_BELOW = 64 << 10  # pyzmq copies frames under 64 KiB anyway (zmq.COPY_THRESHOLD)
_BATCH_HEAD = struct.Struct("<4sB3xII")
_PART = struct.Struct("<IQQ")  # data frame, offset, length
_PAD = [b"\x00" * k for k in range(8)]


def _view(f) -> memoryview:
    return memoryview(f.buffer if hasattr(f, "buffer") else f)


def pack_batch(messages: list[list]) -> list:
    """Frames of several encoded messages (each a list of bytes / memoryviews) as one batch."""
    counts, parts, small, big, at = [], [], [], [], 0
    for m in messages:
        counts.append(len(m))
        for f in m:
            n = memoryview(f).nbytes
            if n < PACK_BELOW:
                parts += (0, at, n)
                small.append(f)
                if n & 7:
                    small.append(_PAD[8 - (n & 7)])
                at += (n + 7) & ~7
            else:
                big.append(f)
                parts += (len(big), 0, n)  # data frame 0 is the packed one
    packed = b"".join(small)  # one pass over the small parts, no zero-filling first
    p = len(parts) // 3
    index = _BATCH_HEAD.pack(BATCH_MAGIC, BATCH_VERSION, len(messages), p) \
        + struct.pack(f"<{len(counts)}I{'IQQ' * p}", *counts, *parts)
    return [index, packed] + big


def is_batch(frames: list) -> bool:
    return bool(frames) and bytes(_view(frames[0])[:4]) == BATCH_MAGIC


def batch_claims(frames: list) -> int:
    """How many messages an (unverified) batch says it holds, behind an authentication frame
    or not; 1 for anything else."""
    if frames and not is_batch(frames) and bytes(_view(frames[0])[:4]) == MAGIC:
        frames = frames[1:]
    if not is_batch(frames):
        return 1
    b = _view(frames[0])
    if b.nbytes < _BATCH_HEAD.size:
        return 1
    return max(1, _BATCH_HEAD.unpack(b[:_BATCH_HEAD.size])[2])


def unpack_batch(frames: list) -> list[list[memoryview]]:
    """The messages of a batch as lists of views into the received frames (no copy). Raises
    ProtocolError("bad_batch_version" | "bad_batch")."""
    index = _view(frames[0])
    if index.nbytes < _BATCH_HEAD.size:
        raise ProtocolError("bad_batch", "index frame too short")
    _, version, m, p = _BATCH_HEAD.unpack(index[:_BATCH_HEAD.size])
    if version != BATCH_VERSION:
        raise ProtocolError("bad_batch_version", f"batch version {version} (this build: "
                                                 f"{BATCH_VERSION})")
    if not 1 <= m <= MAX_BATCH_MESSAGES or index.nbytes != _BATCH_HEAD.size + 4 * m \
            + _PART.size * p:
        raise ProtocolError("bad_batch", f"index of {index.nbytes} bytes for {m} messages, "
                                         f"{p} parts")
    counts = struct.unpack_from(f"<{m}I", index, _BATCH_HEAD.size)
    if sum(counts) != p or 0 in counts:
        raise ProtocolError("bad_batch", "part counts do not add up")
    data = [_view(f) for f in frames[1:]]
    views = []
    for fr, off, n in _PART.iter_unpack(index[_BATCH_HEAD.size + 4 * m:]):
        if fr >= len(data):
            raise ProtocolError("bad_batch", "a part points past the data frames")
        if off > data[fr].nbytes or n > data[fr].nbytes - off:
            raise ProtocolError("bad_batch", "a part lies outside its data frame")
        views.append(data[fr][off:off + n])
    out, k = [], 0
    for c in counts:
        out.append(views[k:k + c])
        k += c
    return out


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


class _Socket:
    """A ZeroMQ socket that speaks the schema, optionally authenticated with the run secret.

    Subclasses bind/connect after this constructor checked the endpoint policy."""

    def __init__(self, kind: int, context: zmq.Context | None, endpoint: str = "", *,
                 secret=None, mac: str = "hmac-sha256", allow_insecure: bool = False,
                 max_age_s: float | None = None, max_message_bytes: int | None = None,
                 kinds: tuple | None = None, role: str = "socket"):
        key = resolve_secret(secret)
        if endpoint:
            check_endpoint(endpoint, key, allow_insecure=allow_insecure, role=role)
        self._sealer = Sealer(key, mac) if key is not None else None
        self._opener = Opener(key, mac, max_age_s) if key is not None else None
        self.authenticated = key is not None
        self.max_message_bytes = max_message_bytes
        self._kinds = kinds
        self.rejected: Counter[str] = Counter()
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)

    def _outgoing(self, msg: Message) -> list:
        """Frames of msg (tensor frames are views of its arrays), sealed when authenticated."""
        frames = encode(msg)
        return self._sealer.seal(frames) if self._sealer is not None else frames

    def _sealed_batch(self, encoded: list[list]) -> list:
        """One batch (`pack_batch`) of already encoded messages, sealed when authenticated."""
        frames = pack_batch(encoded)
        return self._sealer.seal(frames) if self._sealer is not None else frames

    def _opened(self, frames: list) -> list:
        """Size check and authentication: the frames after the authentication frame."""
        if not frames:
            raise ProtocolError("empty", "no frames")
        if self.max_message_bytes is not None:
            total = sum(len(f) for f in frames)
            if total > self.max_message_bytes:
                raise ProtocolError("oversize", f"{total} bytes > {self.max_message_bytes}")
        if self._opener is not None:
            return self._opener.open(frames)
        if bytes(_view(frames[0])[:4]) == MAGIC:
            raise ProtocolError("auth_not_configured",
                                "authenticated message but this socket has no secret")
        return frames

    def _checked(self, frames: list) -> Message:
        msg = decode(frames)
        if self._kinds is not None and not isinstance(msg, self._kinds):
            raise ProtocolError("wrong_kind", f"{msg.KIND} is not accepted on this socket")
        return msg

    def _incoming(self, frames: list) -> Message:
        """Size check, authentication, decode, kind check; raises ProtocolError (never parses an
        unauthenticated or oversize message). Batches are refused here ("unexpected_batch")."""
        frames = self._opened(frames)
        if is_batch(frames):
            raise ProtocolError("unexpected_batch", "a batch on a socket that takes single "
                                                    "messages")
        return self._checked(frames)

    def _incoming_many(self, frames: list) -> list:
        """As `_incoming`, for a single message or a batch (all or nothing: one bad message
        rejects the batch)."""
        frames = self._opened(frames)
        if not is_batch(frames):
            return [self._checked(frames)]
        return [self._checked(m) for m in unpack_batch(frames)]

    def _reject(self, e: ProtocolError) -> None:
        self.rejected[e.reason] += 1
        n = self.rejected[e.reason]
        if n in (1, 10, 100, 1000) or n % 10000 == 0:
            log.warning("%s rejected message #%d (%s): %s", type(self).__name__, n, e.reason,
                        e.detail[:200])

    def close(self) -> None:
        self.sock.close(linger=0)


class SampleSender(_Socket):
    def __init__(self, endpoint: str, *, sndhwm: int = 256, context: zmq.Context | None = None,
                 secret=None, mac: str = "hmac-sha256", allow_insecure: bool = False):
        super().__init__(zmq.PUSH, context, endpoint, secret=secret, mac=mac,
                         allow_insecure=allow_insecure, role="SampleSender")
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.connect(endpoint)

    def send(self, msg: Message, timeout_ms: int = 10_000) -> bool:
        """Send without copying tensor payloads; False if the peer did not take it in time."""
        frames = self._outgoing(msg)
        if not self.sock.poll(timeout_ms, zmq.POLLOUT):
            return False
        self.sock.send_multipart(frames, copy=False)
        return True


class SampleReceiver(_Socket):
    def __init__(self, endpoint: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 rcvhwm: int = 256, context: zmq.Context | None = None, secret=None,
                 mac: str = "hmac-sha256", allow_insecure: bool = False,
                 max_age_s: float | None = None):
        super().__init__(zmq.PULL, context, endpoint, secret=secret, mac=mac,
                         allow_insecure=allow_insecure, max_age_s=max_age_s,
                         max_message_bytes=max_message_bytes, role="SampleReceiver")
        # `_incoming` rejects (and counts) messages over max_message_bytes. As a memory safety
        # net ZeroMQ itself drops any single frame over twice that, by disconnecting the sending
        # peer (which reconnects); those never reach us to be counted.
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.bind(endpoint)
        self.received = 0

    @property
    def stats(self) -> dict:
        return {"received": self.received, "rejected_total": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected)}

    def recv(self, timeout_ms: int = 1000) -> Message | None:
        """The next valid message, or None on timeout or after rejecting an invalid one."""
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        frames = self.sock.recv_multipart(copy=False)
        try:
            msg = self._incoming(frames)
        except ProtocolError as e:
            self._reject(e)
            return None
        self.received += 1
        return msg


CONTROL_KINDS = (WeightsPublished, Shutdown, Interrupt)


class ControlPublisher(_Socket):
    def __init__(self, endpoint: str, *, context: zmq.Context | None = None, secret=None,
                 mac: str = "hmac-sha256", allow_insecure: bool = False):
        super().__init__(zmq.PUB, context, endpoint, secret=secret, mac=mac,
                         allow_insecure=allow_insecure, role="ControlPublisher")
        self.sock.bind(endpoint)

    def publish(self, msg: Message) -> None:
        if not isinstance(msg, CONTROL_KINDS):
            raise TypeError(f"{type(msg).__name__} is not a control message")
        self.sock.send_multipart(self._outgoing(msg), copy=False)


class ControlSubscriber(_Socket):
    def __init__(self, endpoint: str, *, context: zmq.Context | None = None,
                 max_message_bytes: int = 1 << 20, secret=None, mac: str = "hmac-sha256",
                 allow_insecure: bool = False, max_age_s: float | None = None):
        super().__init__(zmq.SUB, context, endpoint, secret=secret, mac=mac,
                         allow_insecure=allow_insecure, max_age_s=max_age_s,
                         max_message_bytes=max_message_bytes, kinds=CONTROL_KINDS,
                         role="ControlSubscriber")
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)  # see SampleReceiver
        self.sock.connect(endpoint)
        self.received = 0

    @property
    def stats(self) -> dict:
        return {"received": self.received, "rejected_total": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected)}

    def poll(self, timeout_ms: int = 0) -> list[Message]:
        """All valid messages available within timeout (invalid ones are counted, skipped)."""
        out: list[Message] = []
        wait = timeout_ms
        while self.sock.poll(wait, zmq.POLLIN):
            frames = self.sock.recv_multipart(copy=False)
            try:
                out.append(self._incoming(frames))
                self.received += 1
            except ProtocolError as e:
                self._reject(e)
            wait = 0
        return out
