"""
One push per burst: the Coalescer in front of a pusher, on a Clock; what it
holds is settled by the push that covers it, or withdrawn when no longer
wanted.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sktalent.metrics import Metrics
from sktalent.push.coalesce import Coalescer
from sktalent.push.interfaces import IPusher, PushNotice, Wanted


def pushes(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("sktalent_pushes_total", {"outcome": outcome})
    return value or 0.0


@implementer(IPusher)
@attrs.define
class PassedOn:
    """The pusher behind a Coalescer: what reached it, when."""

    clock: Clock
    pushed: list[tuple[float, str, PushNotice]] = attrs.Factory(list)
    # What each push was passed on with, in the order of pushed.
    wanted: list[Wanted | None] = attrs.Factory(list)
    settled: list[Deferred[bool]] = attrs.Factory(list)
    tags: list[tuple[str, PushNotice]] = attrs.Factory(list)
    stopped: bool = False

    def push_to_users(
        self, user_ids: Any, notice: PushNotice, wanted: Wanted | None = None
    ) -> Deferred[bool]:
        self.pushed += [(self.clock.seconds(), user_id, notice) for user_id in user_ids]
        self.wanted.append(wanted)
        settled: Deferred[bool] = Deferred()
        self.settled.append(settled)
        return settled

    def push_to_tag(self, tag: str, notice: PushNotice) -> None:
        self.tags.append((tag, notice))

    def stop(self) -> None:
        self.stopped = True


def chat_push(n: int, reason: str = "offline") -> PushNotice:
    return PushNotice("order_chat", f"m{n}", o_id="o1", msgid=f"{n:024x}", badge=n, reason=reason)


class CoalescerTests(SynchronousTestCase):
    """One push per burst, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.inner = PassedOn(self.clock)
        self.metrics = Metrics()
        self.coalescer = Coalescer(self.clock, self.inner, self.metrics)

    def requests(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "sktalent_push_requests_total", {"reason": reason}
        )
        return value or 0.0

    def test_burst_is_two_pushes(self) -> None:
        """
        20 pushes to one user within a second: the first goes at once, the
        last at the end of the 2 s window with its text, msgid and badge;
        18 are counted coalesced, and nothing is left open afterwards.
        """
        for n in range(1, 21):
            self.coalescer.push_to_users(["bob"], chat_push(n))
            self.clock.advance(0.05)
        self.assertEqual(self.inner.pushed, [(0, "bob", chat_push(1))])
        self.clock.advance(2 - self.clock.seconds())
        self.assertEqual(self.inner.pushed[1:], [(2, "bob", chat_push(20))])
        self.assertEqual(pushes(self.metrics, "coalesced"), 18)
        self.assertEqual(self.requests("offline"), 20)
        # The window the held push opened ends with nothing held: released.
        self.clock.advance(2)
        self.assertEqual(len(self.inner.pushed), 2)
        self.assertEqual((self.coalescer.windows, self.clock.getDelayedCalls()), (0, []))

    def test_after_the_window_at_once(self) -> None:
        """A push after a quiet window goes at once again."""
        self.coalescer.push_to_users(["bob"], chat_push(1))
        self.clock.advance(2)
        self.coalescer.push_to_users(["bob"], chat_push(2))
        self.assertEqual([at for at, _, _ in self.inner.pushed], [0, 2])
        self.assertEqual(pushes(self.metrics, "coalesced"), 0)

    def test_steady_stream_one_push_per_window(self) -> None:
        """A push every half second is passed on once every 2 s, the latest each time."""
        for n in range(1, 21):
            self.coalescer.push_to_users(["bob"], chat_push(n))
            self.clock.advance(0.5)
        self.clock.advance(4)
        self.assertEqual(
            [(at, notice.msgid) for at, _, notice in self.inner.pushed],
            [(0, chat_push(1).msgid)] + [(2.0 * k, chat_push(4 * k).msgid) for k in range(1, 6)],
        )

    def test_users_apart(self) -> None:
        """Each user has a window of their own; one user's burst holds no one else."""
        self.coalescer.push_to_users(["bob", "carol"], chat_push(1, "unacknowledged"))
        self.clock.advance(1)
        self.coalescer.push_to_users(["bob"], chat_push(2, "connection_lost"))
        self.coalescer.push_to_users(["dave"], chat_push(3))
        self.assertEqual(
            [(at, user) for at, user, _ in self.inner.pushed],
            [(0, "bob"), (0, "carol"), (1, "dave")],
        )
        self.clock.advance(1)
        self.assertEqual(self.inner.pushed[-1], (2, "bob", chat_push(2, "connection_lost")))
        self.assertEqual(
            [self.requests(r) for r in ("offline", "unacknowledged", "connection_lost")],
            [1, 2, 1],
        )
        self.clock.advance(10)
        self.assertEqual((len(self.inner.pushed), self.coalescer.windows), (4, 0))

    def test_webview_and_tags_pass(self) -> None:
        """Webview pushes and pushes to a tag are never held."""
        webview = PushNotice("webview", "看看", url="https://example.com/")
        self.coalescer.push_to_users(["bob"], chat_push(1))
        self.coalescer.push_to_users(["bob"], webview)
        self.coalescer.push_to_tag("expert", webview)
        self.assertEqual([n for _, _, n in self.inner.pushed], [chat_push(1), webview])
        self.assertEqual(self.inner.tags, [("expert", webview)])

    def test_bounded(self) -> None:
        """Beyond max_windows open windows, pushes pass on uncoalesced."""
        coalescer = Coalescer(self.clock, self.inner, self.metrics, max_windows=2)
        for user in ("a", "b", "c", "c"):
            coalescer.push_to_users([user], chat_push(1))
        self.assertEqual([user for _, user, _ in self.inner.pushed], ["a", "b", "c", "c"])
        self.assertEqual(coalescer.windows, 2)

    def test_stop_drops_held(self) -> None:
        """
        stop() drops held pushes (counted cancelled, not settled), leaves no
        timer, stops the pusher.
        """
        self.coalescer.push_to_users(["bob"], chat_push(1))
        held = self.coalescer.push_to_users(["bob"], chat_push(2))
        self.coalescer.stop()
        self.assertIs(self.successResultOf(held), False)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(pushes(self.metrics, "cancelled"), 1)
        self.assertTrue(self.inner.stopped)
        self.coalescer.push_to_users(["bob"], chat_push(3))
        self.assertEqual([n for _, _, n in self.inner.pushed], [chat_push(1), chat_push(3)])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SettlementTests(SynchronousTestCase):
    """What the Deferred of each push tells, and pushes no longer wanted."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.inner = PassedOn(self.clock)
        self.metrics = Metrics()
        self.coalescer = Coalescer(self.clock, self.inner, self.metrics)
        self.acknowledged: set[int] = set()

    def push(self, n: int, user: str = "bob") -> Deferred[bool]:
        """Push message n, wanted until it is in self.acknowledged."""
        return self.coalescer.push_to_users(
            [user], chat_push(n), lambda: n not in self.acknowledged
        )

    def test_passed_on_settles_as_the_pusher_says(self) -> None:
        """A push passed on at once settles when the pusher behind settles it, as it says."""
        first = self.push(1)
        self.assertNoResult(first)
        self.inner.settled[0].callback(True)
        self.assertIs(self.successResultOf(first), True)
        self.clock.advance(2)
        other = self.push(2, "carol")
        self.inner.settled[1].callback(False)
        self.assertIs(self.successResultOf(other), False)

    def test_held_settled_by_the_push_that_covers_them(self) -> None:
        """
        Pushes held in a window settle with the one push that goes out for
        them at its end, not before; and that push is withdrawn by the pusher
        behind only when none of them is wanted any more.
        """
        self.push(1)
        held = [self.push(n) for n in (2, 3)]
        self.clock.advance(2)
        self.assertEqual([n.msgid for _, _, n in self.inner.pushed], [f"{n:024x}" for n in (1, 3)])
        for d in held:
            self.assertNoResult(d)
        wanted = self.inner.wanted[1]
        assert wanted is not None
        self.acknowledged.add(3)
        self.assertIs(wanted(), True)
        self.acknowledged.add(2)
        self.assertIs(wanted(), False)
        self.inner.settled[1].callback(True)
        self.assertEqual([self.successResultOf(d) for d in held], [True, True])
        self.assertEqual(pushes(self.metrics, "coalesced"), 1)

    def test_held_not_settled_when_its_push_is_not(self) -> None:
        """When the push that covers them is not settled, neither are the held ones."""
        self.push(1)
        held = [self.push(n) for n in (2, 3)]
        self.clock.advance(2)
        self.inner.settled[1].callback(False)
        self.assertEqual([self.successResultOf(d) for d in held], [False, False])

    def test_acknowledged_while_held_withdrawn(self) -> None:
        """
        The only push held is no longer wanted when its window ends: nothing
        goes out, it is settled and counted withdrawn, and the window is
        released, so the next push goes out at once.
        """
        self.push(1)
        held = self.push(2)
        self.acknowledged.add(2)
        self.clock.advance(2)
        self.assertEqual(len(self.inner.pushed), 1)
        self.assertIs(self.successResultOf(held), True)
        self.assertEqual(pushes(self.metrics, "withdrawn"), 1)
        self.assertEqual(self.coalescer.windows, 0)
        self.push(3)
        self.assertEqual([at for at, _, _ in self.inner.pushed], [0, 2])

    def test_latest_acknowledged_earlier_goes_out(self) -> None:
        """
        The latest push held is no longer wanted, an earlier one is: the
        earlier one goes out at the end of the window, with its own text
        and msgid, and settles both.
        """
        self.push(1)
        held = [self.push(n) for n in (2, 3)]
        self.acknowledged.add(3)
        self.clock.advance(2)
        self.assertEqual(self.inner.pushed[1], (2, "bob", chat_push(2)))
        self.inner.settled[1].callback(True)
        self.assertEqual([self.successResultOf(d) for d in held], [True, True])
        self.assertEqual(
            (pushes(self.metrics, "withdrawn"), pushes(self.metrics, "coalesced")), (1, 0)
        )

    def test_several_users_settle_together(self) -> None:
        """
        A push to several users fires once it is settled or not for each:
        True only when settled for every one.
        """
        both = self.coalescer.push_to_users(["bob", "carol"], chat_push(1))
        self.inner.settled[0].callback(True)
        self.assertNoResult(both)
        self.inner.settled[1].callback(True)
        self.assertIs(self.successResultOf(both), True)
        self.clock.advance(2)
        self.push(2)
        # bob's is held, carol's goes out at once and is not settled.
        either = self.coalescer.push_to_users(["bob", "carol"], chat_push(3))
        self.inner.settled[3].callback(False)
        self.assertNoResult(either)
        self.clock.advance(2)
        self.inner.settled[4].callback(True)
        self.assertIs(self.successResultOf(either), False)
