"""
The metrics that are read when scraped: the store's state, the age of the
oldest queued message and the build.
"""

from __future__ import annotations

import platform

from twisted.trial.unittest import SynchronousTestCase

import sktalent
from sktalent.metrics import Metrics


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

    def test_oldest_queued(self) -> None:
        """The age is now minus the oldest queue time; 0 with nothing queued."""
        oldest: list[float] = []
        self.metrics.watch_queues(lambda: min(oldest, default=None), lambda: 1000.0)
        self.assertEqual(self.value("sktalent_oldest_queued_seconds"), 0)
        oldest.append(940.5)
        self.assertEqual(self.value("sktalent_oldest_queued_seconds"), 59.5)

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
