"""Typed messages over ZeroMQ between the orchestrator and the learner (never pickled)."""

from megatron_opd.transport.schema import (
    SCHEMA_VERSION, EvalReport, Message, ProtocolError, Sample, Shutdown, WeightsPublished,
    decode, encode,
)
from megatron_opd.transport.zmq_link import (
    ControlPublisher, ControlSubscriber, SampleReceiver, SampleSender, free_tcp_endpoint,
)

__all__ = [
    "SCHEMA_VERSION", "EvalReport", "Message", "ProtocolError", "Sample", "Shutdown",
    "WeightsPublished", "decode", "encode", "ControlPublisher", "ControlSubscriber",
    "SampleReceiver", "SampleSender", "free_tcp_endpoint",
]
