"""
The store's worker thread (sktalent/store/worker.py): calls run in order on a
thread of their own, and their outcomes reach the reactor thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sktalent.store.worker import Worker


@implementer(IReactorFromThreads)
@attrs.define
class HeldReactor:
    """Keeps what callFromThread is given, to be run on the test's thread."""

    held: list[tuple[Callable[..., Any], tuple[Any, ...]]] = attrs.Factory(list)
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        with self.lock:
            self.held.append((callable, args))

    def run(self) -> None:
        with self.lock:
            held, self.held = self.held, []
        for f, args in held:
            f(*args)


class WorkerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = HeldReactor()
        self.worker = Worker(self.reactor, "test-worker")
        self.worker.start()
        self.addCleanup(self.worker.stop)

    def test_order_and_thread(self) -> None:
        """Calls run in the order made, off the caller's thread; stop() waits for them."""
        ran: list[tuple[int, str]] = []

        def record(n: int) -> int:
            ran.append((n, threading.current_thread().name))
            return n * 2

        results = [self.worker.call(record, n) for n in range(50)]
        self.worker.stop()
        self.assertEqual(ran, [(n, "test-worker") for n in range(50)])
        self.assertFalse(any(d.called for d in results))
        self.reactor.run()
        self.assertEqual([self.successResultOf(d) for d in results], list(range(0, 100, 2)))

    def test_failure(self) -> None:
        """A call that raises fails its Deferred with that error; later calls still run."""

        def broken() -> None:
            raise ValueError("no")

        failed = self.worker.call(broken)
        after = self.worker.call(lambda: "after")
        self.worker.stop()
        self.reactor.run()
        failure: Failure = self.failureResultOf(failed, ValueError)
        self.assertEqual(str(failure.value), "no")
        self.assertEqual(self.successResultOf(after), "after")

    def test_stop(self) -> None:
        """stop() ends the thread; stopping again does nothing."""
        self.assertTrue(self.worker.started)
        self.worker.stop()
        self.assertFalse(self.worker.started)
        self.worker.stop()
