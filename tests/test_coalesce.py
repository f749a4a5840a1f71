"""
One push per burst: the Coalescer in front of a pusher, on a Clock.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sktalent.metrics import Metrics
from sktalent.push.coalesce import Coalescer
from sktalent.push.interfaces import IPusher, PushNotice


def pushes(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("sktalent_pushes_total", {"outcome": outcome})
    return value or 0.0


@implementer(IPusher)
@attrs.define
class PassedOn:
    """The pusher behind a Coalescer: what reached it, when."""

    clock: Clock
    pushed: list[tuple[float, str, PushNotice]] = attrs.Factory(list)
    tags: list[tuple[str, PushNotice]] = attrs.Factory(list)
    stopped: bool = False

    def push_to_users(self, user_ids: Any, notice: PushNotice) -> None:
        self.pushed += [(self.clock.seconds(), user_id, notice) for user_id in user_ids]

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
        """stop() drops held pushes (counted cancelled), leaves no timer, stops the pusher."""
        self.coalescer.push_to_users(["bob"], chat_push(1))
        self.coalescer.push_to_users(["bob"], chat_push(2))
        self.coalescer.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(pushes(self.metrics, "cancelled"), 1)
        self.assertTrue(self.inner.stopped)
        self.coalescer.push_to_users(["bob"], chat_push(3))
        self.assertEqual([n for _, _, n in self.inner.pushed], [chat_push(1), chat_push(3)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
