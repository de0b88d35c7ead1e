"""ZeroMQ sockets carrying the schema's messages.

Samples: orchestrator PUSH (connect) → learner PULL (bind). High-water marks bound what is queued,
so a slow learner makes `send` time out (the orchestrator waits) instead of growing memory.
Control: learner PUB (bind) → orchestrator SUB (connect). PUB/SUB drops messages sent before the
subscriber joined ("slow joiner"); version announcements are latest-wins, so the learner simply
re-announces its version while it waits, and a missed one is harmless.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter

import zmq

from megatron_opd.transport.schema import Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


class _Socket:
    def __init__(self, kind: int, context: zmq.Context | None):
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)

    def close(self) -> None:
        self.sock.close(linger=0)


class SampleSender(_Socket):
    def __init__(self, endpoint: str, *, sndhwm: int = 256, context: zmq.Context | None = None):
        super().__init__(zmq.PUSH, context)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.connect(endpoint)

    def send(self, msg: Message, timeout_ms: int = 10_000) -> bool:
        """Send without copying tensor payloads; False if the peer did not take it in time."""
        frames = encode(msg)
        if not self.sock.poll(timeout_ms, zmq.POLLOUT):
            return False
        self.sock.send_multipart(frames, copy=False)
        return True


class SampleReceiver(_Socket):
    def __init__(self, endpoint: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 rcvhwm: int = 256, context: zmq.Context | None = None):
        super().__init__(zmq.PULL, context)
        # `decode` rejects (and counts) messages over max_message_bytes. As a memory safety net
        # ZeroMQ itself drops any single frame over twice that, by disconnecting the sending
        # peer (which reconnects); those never reach us to be counted.
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.bind(endpoint)
        self.max_message_bytes = max_message_bytes
        self.received = 0
        self.rejected: Counter[str] = Counter()

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
            msg = decode(frames, self.max_message_bytes)
        except ProtocolError as e:
            self.rejected[e.reason] += 1
            if self.rejected[e.reason] in (1, 10, 100, 1000) or self.rejected[e.reason] % 10000 == 0:
                log.warning("rejected message #%d (%s): %s", self.rejected[e.reason], e.reason,
                            e.detail[:200])
            return None
        self.received += 1
        return msg


class ControlPublisher(_Socket):
    def __init__(self, endpoint: str, *, context: zmq.Context | None = None):
        super().__init__(zmq.PUB, context)
        self.sock.bind(endpoint)

    def publish(self, msg: Message) -> None:
        self.sock.send_multipart(encode(msg), copy=False)


class ControlSubscriber(_Socket):
    def __init__(self, endpoint: str, *, context: zmq.Context | None = None,
                 max_message_bytes: int = 1 << 20):
        super().__init__(zmq.SUB, context)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.sock.connect(endpoint)
        self.max_message_bytes = max_message_bytes
        self.rejected: Counter[str] = Counter()

    def poll(self, timeout_ms: int = 0) -> list[Message]:
        """All valid messages available within timeout (invalid ones are counted, skipped)."""
        out: list[Message] = []
        wait = timeout_ms
        while self.sock.poll(wait, zmq.POLLIN):
            frames = self.sock.recv_multipart(copy=False)
            try:
                out.append(decode(frames, self.max_message_bytes))
            except ProtocolError as e:
                self.rejected[e.reason] += 1
            wait = 0
        return out
