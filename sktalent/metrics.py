"""
The server's Prometheus metrics, on a registry of their own so that two
servers in one process (as in tests) never share counters.
"""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest


def _counter(registry: CollectorRegistry, name: str, doc: str, *labels: str) -> Counter:
    return Counter(name, doc, labels, registry=registry)


def _gauge(registry: CollectorRegistry, name: str, doc: str) -> Gauge:
    return Gauge(name, doc, registry=registry)


@attrs.define
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    connections: Gauge = attrs.field(init=False)
    sessions: Gauge = attrs.field(init=False)
    queued: Gauge = attrs.field(init=False)
    queued_bytes: Gauge = attrs.field(init=False)
    messages_in: Counter = attrs.field(init=False)
    messages_out: Counter = attrs.field(init=False)
    refusals: Counter = attrs.field(init=False)
    dropped: Counter = attrs.field(init=False)
    auth_failures: Counter = attrs.field(init=False)
    pushes: Counter = attrs.field(init=False)
    push_requests: Counter = attrs.field(init=False)
    push_failures: Counter = attrs.field(init=False)
    expired: Counter = attrs.field(init=False)
    store_latency: Histogram = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.connections = _gauge(r, "sktalent_connections", "Open MQTT connections.")
        self.sessions = _gauge(r, "sktalent_sessions", "Sessions held, online or not.")
        self.queued = _gauge(
            r, "sktalent_queued_messages", "Messages queued or in flight to clients."
        )
        self.queued_bytes = _gauge(
            r, "sktalent_queued_bytes", "Payload bytes of the messages queued or in flight."
        )
        self.messages_in = _counter(
            r, "sktalent_messages_in", "Messages received, by type.", "type"
        )
        self.messages_out = _counter(
            r, "sktalent_messages_out", "Messages sent to clients, by type.", "type"
        )
        self.refusals = _counter(
            r, "sktalent_refusals", "Client messages refused, by error code.", "code"
        )
        self.dropped = _counter(r, "sktalent_dropped", "Messages dropped, by reason.", "reason")
        self.auth_failures = _counter(
            r, "sktalent_auth_failures", "Refused CONNECTs, by reason.", "reason"
        )
        self.pushes = _counter(r, "sktalent_pushes", "Offline pushes, by outcome.", "outcome")
        self.push_requests = _counter(
            r,
            "sktalent_push_requests",
            "Messages to push, before coalescing, by why: offline, unacknowledged,"
            " connection_lost.",
            "reason",
        )
        self.push_failures = _counter(
            r,
            "sktalent_push_failures",
            "Push requests Umeng did not accept, by its error code, http_STATUS or network.",
            "code",
        )
        self.expired = _counter(
            r,
            "sktalent_expired",
            "Queued messages and never-connected sessions removed after the retention time.",
            "what",
        )
        self.store_latency = Histogram(
            "sktalent_store_commit_seconds",
            "Time from submit to durable commit.",
            registry=r,
        )

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
