"""
Tests for sktalent.mqtt.keepalive: every connection's keepalive on one timer.
"""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sktalent.mqtt.keepalive import Keepalives


@attrs.define(eq=False)
class Connection:
    """A watched connection that records its checks and is silent from the start."""

    keepalives: Keepalives
    # When it must be heard from again; None once it was closed.
    deadline: float | None
    checked: list[float] = attrs.Factory(list)
    second: int = 0

    def watch(self) -> None:
        assert self.deadline is not None
        self.second = self.keepalives.watch(self, self.deadline)

    def keepalive_due(self, now: float) -> None:
        self.checked.append(now)
        assert self.deadline is not None
        if now >= self.deadline:
            self.deadline = None
        else:
            self.watch()


class KeepalivesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.keepalives = Keepalives(self.clock)

    def connection(self, deadline: float) -> Connection:
        connection = Connection(self.keepalives, deadline)
        connection.watch()
        return connection

    def test_one_timer(self) -> None:
        """However many connections are watched, one timer is set: for the earliest."""
        connections = [self.connection(30 + i / 7) for i in range(100)]
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 30)
        self.assertEqual(len(self.keepalives), 100)
        self.clock.advance(60)
        self.assertTrue(all(c.deadline is None for c in connections))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.keepalives), 0)

    def test_checked_within_a_second(self) -> None:
        """A connection is checked at the whole second its deadline falls in, not before."""
        connection = self.connection(10.2)
        self.clock.advance(10.99)
        self.assertEqual(connection.checked, [])
        self.clock.advance(0.01)
        self.assertEqual(connection.checked, [11])
        self.assertIsNone(connection.deadline)

    def test_heard_from_meanwhile(self) -> None:
        """A connection that moved its deadline on is filed again and checked then."""
        connection = self.connection(5)
        connection.deadline = 12.5
        self.clock.advance(5)
        self.assertEqual(connection.checked, [5])
        self.assertEqual(connection.second, 13)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 13)
        self.clock.advance(8)
        self.assertEqual(connection.checked, [5, 13])
        self.assertIsNone(connection.deadline)

    def test_forget(self) -> None:
        """A forgotten connection is not checked; the others of its second are."""
        gone, staying = self.connection(3), self.connection(3)
        self.keepalives.forget(gone, gone.second)
        self.clock.advance(3)
        self.assertEqual((gone.checked, staying.checked), ([], [3]))

    def test_earlier_connection_moves_the_timer(self) -> None:
        """A connection due before every other one brings the timer forward."""
        late = self.connection(100)
        early = self.connection(4)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 4)
        self.clock.advance(4)
        self.assertEqual((early.checked, late.checked), ([4], []))
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 100)

    def test_stop(self) -> None:
        """Once stopped, nothing is checked and no timer is left."""
        connection = self.connection(3)
        self.keepalives.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(connection.checked, [])

    def test_failing_check(self) -> None:
        """A check that raises is logged; the others of its second still run."""

        @attrs.define(eq=False)
        class Broken:
            def keepalive_due(self, now: float) -> None:
                raise ZeroDivisionError()

        self.keepalives.watch(Broken(), 2)
        connection = self.connection(2)
        self.clock.advance(2)
        self.assertEqual(connection.checked, [2])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
