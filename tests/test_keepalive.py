"""
Tests for sktalent.mqtt.keepalive: every connection's keepalive on one timer.
"""

from __future__ import annotations

import math

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sktalent.mqtt.keepalive import Keepalives, Ring, forget


@attrs.define(eq=False)
class Connection:
    """A watched connection that records when it expired."""

    keepalives: Keepalives
    clock: Clock
    expired: list[float] = attrs.Factory(list)
    filed: Ring | None = None
    keepalive_prev: object = None
    keepalive_next: object = None

    def heard(self, silence: float) -> None:
        """Heard from now: it may be silent for silence seconds."""
        due = self.clock.seconds() + silence
        self.filed = self.keepalives.watch(self, due, self.filed)

    def keepalive_expired(self) -> None:
        self.expired.append(self.clock.seconds())


class KeepalivesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.keepalives = Keepalives(self.clock)

    def connection(self, silence: float) -> Connection:
        connection = Connection(self.keepalives, self.clock)
        connection.heard(silence)
        return connection

    def test_one_timer(self) -> None:
        """However many connections are watched, one timer is set: for the earliest."""
        connections = [self.connection(30 + i / 7) for i in range(100)]
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 30)
        self.assertEqual(len(self.keepalives), 100)
        self.clock.advance(60)
        self.assertTrue(all(c.expired for c in connections))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.keepalives), 0)

    def test_expires_within_a_second(self) -> None:
        """A connection expires at the whole second its silence runs out in, not before."""
        connection = self.connection(10.2)
        self.clock.advance(10.99)
        self.assertEqual(connection.expired, [])
        self.clock.advance(0.01)
        self.assertEqual(connection.expired, [11])

    def test_heard_from_again(self) -> None:
        """
        A connection heard from again moves to a later second, and only the
        silence after its last read counts; within a second it stays put.
        """
        connection = self.connection(4.5)
        first = connection.filed
        self.clock.advance(0.3)
        connection.heard(4.5)
        self.assertIs(connection.filed, first)
        self.clock.advance(3)
        connection.heard(4.5)
        self.assertIsNot(connection.filed, first)
        assert first is not None
        self.assertEqual(len(first), 0)
        self.clock.advance(7.99 - self.clock.seconds())
        self.assertEqual(connection.expired, [])
        self.clock.advance(0.01)
        self.assertEqual(connection.expired, [8])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_forget(self) -> None:
        """
        A forgotten connection does not expire, and is in no ring; the others
        of its second, before and after it in the ring, do.
        """
        before, gone, after = self.connection(3), self.connection(3), self.connection(3)
        forget(gone)
        forget(gone)
        self.assertEqual((gone.keepalive_prev, gone.keepalive_next), (None, None))
        self.assertEqual(len(self.keepalives), 2)
        self.clock.advance(3)
        self.assertEqual((before.expired, gone.expired, after.expired), ([3], [], [3]))
        self.assertEqual((after.keepalive_prev, after.keepalive_next), (None, None))

    def test_earlier_connection_moves_the_timer(self) -> None:
        """A connection due before every other one brings the timer forward."""
        late = self.connection(100)
        early = self.connection(4)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 4)
        self.clock.advance(4)
        self.assertEqual((early.expired, late.expired), ([4], []))
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 100)

    def test_stop(self) -> None:
        """Once stopped, nothing expires and no timer is left."""
        connection = self.connection(3)
        self.keepalives.stop()
        self.assertEqual((connection.keepalive_prev, connection.keepalive_next), (None, None))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(connection.expired, [])

    def test_failing_close(self) -> None:
        """A close that raises is logged; the others of its second still close."""

        @attrs.define(eq=False)
        class Broken:
            keepalive_prev: object = None
            keepalive_next: object = None

            def keepalive_expired(self) -> None:
                raise ZeroDivisionError()

        self.keepalives.watch(Broken(), 2)
        connection = self.connection(2)
        self.clock.advance(2)
        self.assertEqual(connection.expired, [2])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class RingModelTests(SynchronousTestCase):
    """The rings against a plain dict of who is due when."""

    @settings(max_examples=200)
    @given(
        st.lists(
            st.tuples(st.integers(0, 5), st.one_of(st.none(), st.floats(0.1, 4.0))),
            max_size=60,
        )
    )
    def test_rings_agree(self, operations: list[tuple[int, float | None]]) -> None:
        """
        After any sequence of connections filed again (at some delay) or
        forgotten, each expires exactly when the model says: at the whole
        second its last filing falls in, unless forgotten first.
        """
        clock = Clock()
        keepalives = Keepalives(clock)
        connections = [Connection(keepalives, clock) for _ in range(6)]
        due: dict[int, int] = {}
        expected: list[list[float]] = [[] for _ in connections]

        def step() -> None:
            clock.advance(0.25)
            now = clock.seconds()
            for index, second in list(due.items()):
                if second <= now:
                    expected[index].append(now)
                    del due[index]

        for index, delay in operations:
            step()
            if delay is None:
                forget(connections[index])
                due.pop(index, None)
            else:
                connections[index].heard(delay)
                due[index] = math.ceil(clock.seconds() + delay)
            self.assertEqual(len(keepalives), len(due))
        for _ in range(40):
            step()
        self.assertEqual([c.expired for c in connections], expected)
        self.assertEqual(len(keepalives), 0)
