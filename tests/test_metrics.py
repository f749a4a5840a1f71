"""
The metrics that are read when scraped: the store's state, the stored
queues as last read and the age of their oldest message, and the build.
"""

from __future__ import annotations

import platform

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

import sktalent
from sktalent.metrics import Metrics, QueueFigures
from sktalent.store.interfaces import PutSession, QueueTotals, StoreUnavailable
from sktalent.store.memory import MemoryStore


@attrs.define
class FailingStore(MemoryStore):
    """A MemoryStore whose queue figures cannot be read while ``failing``."""

    failing: bool = False

    def queue_totals(self) -> Deferred[QueueTotals]:
        if self.failing:
            return fail(StoreUnavailable("the test failed this read"))
        return MemoryStore.queue_totals(self)


class ScrapedMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def test_store(self) -> None:
        """sktalent_store_up and the outage count follow the store at each scrape."""
        state = {"available": True, "outages": 0}
        self.metrics.watch_store(lambda: bool(state["available"]), lambda: int(state["outages"]))
        self.assertEqual(self.value("sktalent_store_up"), 1)
        self.assertEqual(self.value("sktalent_store_outages_total"), 0)
        state.update(available=False, outages=3)
        self.assertEqual(self.value("sktalent_store_up"), 0)
        self.assertEqual(self.value("sktalent_store_outages_total"), 3)

    def test_queue_figures(self) -> None:
        """
        The stored sessions, queued messages and bytes are as last read from
        the store, the age now minus the oldest queue time; 0 before any
        read and with nothing queued.
        """
        last: list[QueueTotals] = []
        self.metrics.watch_queues(lambda: last[-1] if last else None, lambda: 1000.0)
        names = (
            "sktalent_sessions",
            "sktalent_queued_messages",
            "sktalent_queued_bytes",
            "sktalent_oldest_queued_seconds",
        )
        self.assertEqual([self.value(n) for n in names], [0, 0, 0, 0])
        last.append(QueueTotals(3, 0, 0, None))
        self.assertEqual([self.value(n) for n in names], [3, 0, 0, 0])
        last.append(QueueTotals(3, 2, 40, 940_500))
        self.assertEqual([self.value(n) for n in names], [3, 2, 40, 59.5])

    def test_queue_figures_read_periodically(self) -> None:
        """
        QueueFigures reads the store at start and every interval until
        stopped; a failed read is logged as a warning and the next one runs.
        """
        clock = Clock()
        store = FailingStore()
        figures = QueueFigures(clock, store, interval=30)
        figures.start()
        self.assertEqual(figures.last, QueueTotals(0, 0, 0, None))
        store.submit([PutSession("a", ())])
        clock.advance(29)
        self.assertEqual(figures.last, QueueTotals(0, 0, 0, None))
        clock.advance(1)
        self.assertEqual(figures.last, QueueTotals(1, 0, 0, None))
        store.failing = True
        with capturedLogs() as events:
            clock.advance(30)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])
        self.assertEqual(figures.last, QueueTotals(1, 0, 0, None))
        figures.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_build_info(self) -> None:
        """sktalent_build_info names the running version and the node."""
        metrics = Metrics(node="mqtt-1:8075")
        labels = {
            "version": sktalent.__version__,
            "python": platform.python_version(),
            "node": "mqtt-1:8075",
        }
        self.assertEqual(metrics.registry.get_sample_value("sktalent_build_info", labels), 1)

    def test_process(self) -> None:
        """The process's own metrics (memory, CPU, descriptors) are exported."""
        resident = self.value("process_resident_memory_bytes")
        assert resident is not None
        self.assertGreater(resident, 0)
