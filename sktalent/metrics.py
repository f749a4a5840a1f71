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
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import __version__
from .failures import every
from .store.interfaces import IStore, QueueTotals

log = Logger()

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
    "auth_failures": (
        "bad_credentials",
        "auth_unavailable",
        "client_id",
        "empty_client_id",
        "store_unavailable",
    ),
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


@attrs.define
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    # This server's name (as GET /v1/users/{id}/session says it), for build_info.
    node: str = attrs.field(default="", kw_only=True)
    connections: Gauge = attrs.field(init=False)
    sessions: Gauge = attrs.field(init=False)
    queued: Gauge = attrs.field(init=False)
    queued_bytes: Gauge = attrs.field(init=False)
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
        self.sessions = _gauge(r, "sktalent_sessions", "Sessions stored, online or not.")
        self.queued = _gauge(
            r, "sktalent_queued_messages", "Messages stored queued or in flight to clients."
        )
        self.queued_bytes = _gauge(
            r, "sktalent_queued_bytes", "Payload bytes of the messages stored queued or in flight."
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
        self, totals: Callable[[], QueueTotals | None], now: Callable[[], float]
    ) -> None:
        """
        Report the stored sessions and queues as totals() last found them,
        and the age of the oldest queued message as of each scrape.
        """

        def age() -> float:
            last = totals()
            if last is None or last.oldest_queued_at is None:
                return 0.0
            return max(0.0, now() - last.oldest_queued_at / 1000)

        def figure(name: str) -> Callable[[], float]:
            return lambda: 0.0 if (last := totals()) is None else float(getattr(last, name))

        self.oldest_queued.set_function(age)
        self.sessions.set_function(figure("sessions"))
        self.queued.set_function(figure("messages"))
        self.queued_bytes.set_function(figure("bytes"))

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


@attrs.define(eq=False)
class QueueFigures:
    """
    The stored sessions and queues in figures for the gauges, read from the
    store every ``interval`` seconds: a scan of the stored sessions, too
    costly for every scrape, and no figure held per session in memory.
    """

    _clock: IReactorTime
    _store: IStore
    interval: float = 30.0
    last: QueueTotals | None = None
    _loop: LoopingCall | None = None

    def start(self) -> None:
        """Read now, then every interval until stop()."""
        self._loop = every(
            self._clock, self.interval, self.refresh, log, "Reading queue figures stopped"
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def refresh(self) -> Deferred[None]:
        """Read the figures once; a failure is logged, and the next read still runs."""

        def read(totals: QueueTotals) -> None:
            self.last = totals

        def failed(failure: Failure) -> None:
            log.warn("Reading queue figures from the store failed: {why}", why=failure.value)

        return self._store.queue_totals().addCallbacks(read, failed)
