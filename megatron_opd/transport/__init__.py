"""Typed messages over ZeroMQ between the orchestrator and the learner (never pickled).

`schema`: the messages and their invariants; `auth`: run secret, HMAC envelope, loopback policy;
`channel`: the reliable sample channel (SampleServer / SampleClient: handshake, credit, acks,
resends, dedup); `zmq_link`: control PUB/SUB and the plain PUSH/PULL sample pair;
`dedup`: the compact, checkpointable set of seen sample ids.
"""

from megatron_opd.transport.auth import (
    AuthRequired, SecretFileError, check_endpoint, generate_secret, is_loopback_endpoint,
    load_secret, write_secret,
)
from megatron_opd.transport.channel import SampleClient, SampleServer
from megatron_opd.transport.dedup import SeenIds
from megatron_opd.transport.schema import (
    SCHEMA_VERSION, Ack, Credit, EvalReport, Hello, Interrupt, Message, PartialRollouts,
    ProtocolError, Sample, Shutdown, WeightsPublished, decode, encode,
)
from megatron_opd.transport.zmq_link import (
    ControlPublisher, ControlSubscriber, SampleReceiver, SampleSender, free_tcp_endpoint,
)

__all__ = [
    "SCHEMA_VERSION", "Ack", "Credit", "EvalReport", "Hello", "Interrupt", "Message",
    "PartialRollouts", "ProtocolError",
    "Sample", "Shutdown", "WeightsPublished", "decode", "encode", "ControlPublisher",
    "ControlSubscriber", "SampleReceiver", "SampleSender", "free_tcp_endpoint", "SampleClient",
    "SampleServer", "SeenIds", "AuthRequired", "SecretFileError", "check_endpoint",
    "generate_secret", "is_loopback_endpoint", "load_secret", "write_secret",
]
