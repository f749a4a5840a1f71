"""
The server's Prometheus metrics, on a registry of their own so that two
servers in one process (as in tests) never share counters.  Every metric is
documented in docs/metrics.md.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from . import __version__

# Commits take a millisecond on a quiet SQLite file, tens of milliseconds on a
# busy disk or a remote MongoDB, and as long as an outage lasts while writes
# are held: fine steps at the bottom, coarse ones up to a minute.
COMMIT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# A chat's `sent` waits for its commit: the same scale.
SENT_BUCKETS = COMMIT_BUCKETS
# Umeng answers in tens to hundreds of milliseconds; a request gives up after
# its timeout (10 s by default).
PUSH_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Most API calls are one commit or one lookup.
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# Label values the alerting rules watch (deploy/prometheus/alerts.yml), exported
# at 0 from the start: rate() and increase() see a counter's first step only
# when a sample precedes it.
WATCHED = {
    "auth_failures": ("bad_credentials", "auth_unavailable", "client_id", "empty_client_id"),
    "pushes": ("sent", "failed", "given_up", "no_device", "disabled"),
    "dropped": ("queue_full",),
    "refusals": ("queue_full",),
}


def _counter(registry: CollectorRegistry, name: str, doc: str, *labels: str) -> Counter:
    return Counter(name, doc, labels, registry=registry)


def _gauge(registry: CollectorRegistry, name: str, doc: str) -> Gauge:
    return Gauge(name, doc, registry=registry)


def _histogram(
    registry: CollectorRegistry,
    name: str,
    doc: str,
    buckets: tuple[float, ...],
    *labels: str,
) -> Histogram:
    return Histogram(name, doc, labels, registry=registry, buckets=buckets)


@attrs.frozen
class _StoreCollector:
    """The store's state, read when scraped: nothing to keep in step."""

    available: Callable[[], bool]
    outages: Callable[[], int]

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sktalent_store_up",
            "1 while the store commits, 0 while it cannot be reached.",
            value=int(self.available()),
        )
        yield CounterMetricFamily(
            "sktalent_store_outages",
            "Times the store became unreachable since the server started.",
            value=self.outages(),
        )


@attrs.define(eq=False)
class Level:
    """
    A gauge changed only on the reactor thread, so without the lock
    prometheus_client takes at every change: the queue gauges change with
    every message queued and every one acknowledged.
    """

    name: str
    documentation: str
    value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, value=self.value)


def _level(registry: CollectorRegistry, name: str, doc: str) -> Level:
    level = Level(name, doc)
    registry.register(level)
    return level


@attrs.define
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    # This server's name (as GET /v1/users/{id}/session says it), for build_info.
    node: str = attrs.field(default="", kw_only=True)
    connections: Gauge = attrs.field(init=False)
    sessions: Gauge = attrs.field(init=False)
    queued: Level = attrs.field(init=False)
    queued_bytes: Level = attrs.field(init=False)
    oldest_queued: Gauge = attrs.field(init=False)
    messages_in: Counter = attrs.field(init=False)
    messages_out: Counter = attrs.field(init=False)
    refusals: Counter = attrs.field(init=False)
    dropped: Counter = attrs.field(init=False)
    logins: Counter = attrs.field(init=False)
    auth_failures: Counter = attrs.field(init=False)
    pushes: Counter = attrs.field(init=False)
    push_requests: Counter = attrs.field(init=False)
    push_failures: Counter = attrs.field(init=False)
    expired: Counter = attrs.field(init=False)
    push_latency: Histogram = attrs.field(init=False)
    store_latency: Histogram = attrs.field(init=False)
    sent_latency: Histogram = attrs.field(init=False)
    api_requests: Counter = attrs.field(init=False)
    api_latency: Histogram = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        Info("sktalent_build", "The running version; always 1.", registry=r).info(
            {"version": __version__, "python": platform.python_version(), "node": self.node}
        )
        ProcessCollector(registry=r)
        self.connections = _gauge(r, "sktalent_connections", "Open MQTT connections.")
        self.sessions = _gauge(r, "sktalent_sessions", "Sessions held, online or not.")
        self.queued = _level(
            r, "sktalent_queued_messages", "Messages queued or in flight to clients."
        )
        self.queued_bytes = _level(
            r, "sktalent_queued_bytes", "Payload bytes of the messages queued or in flight."
        )
        self.oldest_queued = _gauge(
            r,
            "sktalent_oldest_queued_seconds",
            "Age of the oldest message queued or in flight to a client; 0 when none is.",
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
        self.logins = _counter(r, "sktalent_logins", "Accepted CONNECTs.")
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
        self.push_latency = _histogram(
            r,
            "sktalent_push_request_seconds",
            "Time of one request to the push service, answered or not.",
            PUSH_BUCKETS,
        )
        self.store_latency = _histogram(
            r,
            "sktalent_store_commit_seconds",
            "Time from submit to durable commit.",
            COMMIT_BUCKETS,
        )
        self.sent_latency = _histogram(
            r,
            "sktalent_publish_to_sent_seconds",
            "Time from a chat's PUBLISH arriving to its `sent` going out.",
            SENT_BUCKETS,
        )
        self.api_requests = _counter(
            r,
            "sktalent_api_requests",
            "HTTP API requests answered, by route and status.",
            "method",
            "route",
            "status",
        )
        self.api_latency = _histogram(
            r,
            "sktalent_api_request_seconds",
            "Time from an HTTP API request arriving to its answer.",
            API_BUCKETS,
            "method",
            "route",
        )

        for name, values in WATCHED.items():
            family: Counter = getattr(self, name)
            for value in values:
                family.labels(value)

    def watch_store(self, available: Callable[[], bool], outages: Callable[[], int]) -> None:
        """Report the store's availability and outages, read at each scrape."""
        self.registry.register(_StoreCollector(available, outages))

    def watch_queues(
        self, oldest_queued_at: Callable[[], float | None], now: Callable[[], float]
    ) -> None:
        """Report the age of the oldest queued message, computed at each scrape."""

        def age() -> float:
            oldest = oldest_queued_at()
            return 0.0 if oldest is None else max(0.0, now() - oldest)

        self.oldest_queued.set_function(age)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
