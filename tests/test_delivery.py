"""
When chats and notifications are pushed, in memory with a Clock: at once for
an offline recipient, after push-after when unacknowledged on a live
connection, when the connection ends first; at most once, marked pushed only
once the push is settled, and so pushed again after a restart when it was
not; withdrawn when acknowledged while held in the coalescing window.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred

from sktalent.calltalent import delivery
from sktalent.calltalent.app import AppLimits
from sktalent.calltalent.delivery import PushDelivery, decode_notice, encode_notice
from sktalent.mqtt import packets as p
from sktalent.mqtt.plan import LOOSE_WAIT
from sktalent.push.coalesce import WINDOW, Coalescer
from sktalent.push.interfaces import PushNotice
from sktalent.store.interfaces import MarkPushed, Op
from sktalent.store.memory import MemoryStore

from .helpers import chat, msgid
from .mqttclient import Client
from .test_calltalent import PUSH_AFTER, CallTalentCase, HeldStore


@attrs.define
class OpsStore(MemoryStore):
    """A MemoryStore that keeps every operation submitted to it."""

    ops: list[Op] = attrs.Factory(list)

    def submit(self, ops: Sequence[Op]) -> Deferred[list[object]]:
        self.ops += ops
        return MemoryStore.submit(self, ops)


class DeliveryCase(CallTalentCase):
    coalesced = False

    def coalescing(self) -> None:
        """
        Pushes go through a Coalescer (on the test's clock) to the recording
        pusher, also after a restart.
        """
        self.coalesced = True
        coalescer = Coalescer(self.h.clock, self.pusher, self.h.metrics)
        self.delivery = PushDelivery(self.h.broker, self.store, coalescer, self.h.clock, PUSH_AFTER)
        self.h.broker.watch(self.delivery)

    def restart(self) -> None:
        """A new server on the same store: what a SIGKILL leaves."""
        self.h = self.harness(self.store)
        if self.coalesced:
            self.coalescing()
        self.successResultOf(Deferred.fromCoroutine(self.h.broker.start()))
        self.delivery.recover()

    def marked(self, user: str) -> list[tuple[str, bool]]:
        """(msgid, pushed) of each message queued for user in the store."""
        sessions = self.successResultOf(self.store.load_sessions())
        return [
            (json.loads(q.message.payload)["msgid"], q.pushed)
            for s in sessions
            if s.client_id == user
            for q in s.queue
        ]

    def pushes(self) -> list[tuple[str, str | None, int | None, str]]:
        """(user, msgid, badge, reason) of each push since the last call."""
        self.h.clock.advance(0)
        pushed, self.pusher.pushed[:] = list(self.pusher.pushed), []
        return [(u, n.msgid, n.badge, n.reason) for (u,), n in pushed]

    def chats(self, sender: Client, to: str, numbers: range) -> None:
        """Chats from sender to `to`, each answered with sent."""
        for n in numbers:
            self.publish(sender, chat(sender.protocol._client_id, to, n, f"m{n}"), n)
        answers: list[str] = []
        # Each round acknowledges what came, letting a small window move on.
        for _ in numbers:
            answers += [f["type"] for f in self.frames(sender)]
        self.assertEqual(answers, ["sent"] * len(numbers))

    def unacknowledged(self, c: Client, packets: list[p.Packet] | None = None) -> list[int]:
        """The packet ids of the publishes c was sent (or in packets), not acknowledged."""
        return [
            x.packet_id or 0
            for x in (c.received() if packets is None else packets)
            if isinstance(x, p.Publish)
        ]

    def reconnect(self, user: str) -> tuple[Client, list[int]]:
        """user connects; the packet ids of what was resent, not acknowledged."""
        c, packets = self.login(user)
        self.assertEqual(packets[0], p.ConnAck(0, True))
        return c, self.unacknowledged(c, packets)


class PushRuleTests(DeliveryCase):
    def test_offline_pushed_at_commit_once(self) -> None:
        """
        A chat to a user without a connection is pushed when committed, as
        offline with the badge of her unacknowledged messages; never again,
        not after push-after nor when she connects and leaves unacknowledged.
        """
        a = self.user("alice")
        self.chats(a, "bob", range(1, 3))
        self.assertEqual(
            self.pushes(), [("bob", msgid(1), 1, "offline"), ("bob", msgid(2), 2, "offline")]
        )
        b, resent = self.reconnect("bob")
        self.assertEqual(len(resent), 2)
        self.h.clock.advance(PUSH_AFTER * 3)
        b.lose()
        self.h.clock.advance(PUSH_AFTER * 3)
        self.assertEqual(self.pushes(), [])

    def test_unacknowledged_pushed_after_push_after(self) -> None:
        """
        A chat delivered to a live connection and not acknowledged is pushed
        push-after seconds after it was committed, not a moment before, and
        only once.
        """
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 2))
        self.assertEqual(len(self.unacknowledged(b)), 1)
        self.h.clock.advance(PUSH_AFTER - 0.001)
        self.assertEqual(self.pushes(), [])
        self.h.clock.advance(0.001)
        self.assertEqual(self.pushes(), [("bob", msgid(1), 1, "unacknowledged")])
        self.h.clock.advance(PUSH_AFTER * 3)
        b.lose()
        self.assertEqual(self.pushes(), [])

    def test_acknowledged_in_time_not_pushed(self) -> None:
        """A chat acknowledged before push-after is never pushed."""
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 2))
        [pid] = self.unacknowledged(b)
        self.h.clock.advance(PUSH_AFTER - 0.01)
        b.send(p.PubAck(pid))
        self.h.clock.advance(PUSH_AFTER * 3)
        b.lose()
        self.assertEqual(self.pushes(), [])

    def test_each_waits_its_own_time(self) -> None:
        """Chats committed a second apart are pushed a second apart."""
        a, b = self.user("alice"), self.user("bob")
        for n in range(1, 4):
            self.chats(a, "bob", range(n, n + 1))
            self.h.clock.advance(1)
        self.assertEqual(len(self.unacknowledged(b)), 3)
        self.h.clock.advance(PUSH_AFTER - 3)
        self.assertEqual([m for _, m, _, _ in self.pushes()], [msgid(1)])
        self.h.clock.advance(1)
        self.assertEqual([m for _, m, _, _ in self.pushes()], [msgid(2)])
        self.h.clock.advance(1)
        self.assertEqual([m for _, m, _, _ in self.pushes()], [msgid(3)])

    def test_connection_lost_pushes_unacknowledged(self) -> None:
        """
        When the connection ends, each chat sent on it and not acknowledged is
        pushed at once, as connection_lost, with the badge of those left; an
        acknowledged one is not, and nothing more follows.
        """
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 5))
        first, *_ = self.unacknowledged(b)
        b.send(p.PubAck(first))
        self.h.clock.advance(1)
        b.lose()
        self.assertEqual(
            self.pushes(),
            [("bob", msgid(n), 3, "connection_lost") for n in range(2, 5)],
        )
        self.h.clock.advance(PUSH_AFTER * 3)
        self.assertEqual(self.pushes(), [])

    def test_queued_behind_the_window_counts_too(self) -> None:
        """
        Chats still waiting behind the in-flight window of a live connection
        are pushed after push-after too, and when the connection ends.
        """
        self.h.broker.max_inflight = 2
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 5))
        self.assertEqual(len(self.unacknowledged(b)), 2)
        self.h.clock.advance(PUSH_AFTER)
        self.assertEqual(len(self.pushes()), 4)
        self.chats(a, "bob", range(5, 7))
        b.lose()
        self.assertEqual(self.pushes(), [("bob", msgid(n), 6, "connection_lost") for n in (5, 6)])

    def test_takeover_waits_again(self) -> None:
        """
        A connection taken over by a new one of the same client is not an
        end: nothing is pushed then; the new connection gets the chat again,
        and push-after counts from there.
        """
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 3))
        self.assertEqual(len(self.unacknowledged(b)), 2)
        self.h.clock.advance(3)
        again, (first, _) = self.reconnect("bob")
        b.lose()
        again.send(p.PubAck(first))
        self.h.clock.advance(PUSH_AFTER - 0.001)
        self.assertEqual(self.pushes(), [])
        self.h.clock.advance(0.001)
        self.assertEqual(self.pushes(), [("bob", msgid(2), 1, "unacknowledged")])

    def test_takeovers_keep_one_wait_per_message(self) -> None:
        """
        However often a client with unacknowledged messages reconnects, each
        message has one wait, the latest connection's: the waits are bounded
        by the messages, not by the reconnects, and each message is pushed
        once, push-after after the last connection got it.
        """
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 11))
        for _ in range(300):
            self.h.clock.advance(0.01)
            again, resent = self.reconnect("bob")
            self.assertEqual(len(resent), 10)
            b.lose()
            b = again
        self.assertEqual(self.delivery.waiting, 10)
        self.h.clock.advance(PUSH_AFTER - 0.001)
        self.assertEqual(self.pushes(), [])
        self.h.clock.advance(0.001)
        pushed = self.pushes()
        self.assertEqual([m for _, m, _, _ in pushed], [msgid(n) for n in range(1, 11)])
        self.assertEqual({reason for *_, reason in pushed}, {"unacknowledged"})
        self.assertEqual(self.delivery.waiting, 0)
        self.h.clock.advance(PUSH_AFTER * 3)
        b.lose()
        self.assertEqual(self.pushes(), [])

    def test_notifications_pushed_frames_not(self) -> None:
        """
        Notifications are pushed like chats; sent, received and error frames
        are never pushed and not in the badge.
        """
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 2))
        self.assertEqual(self.pushes(), [])
        [pid] = self.unacknowledged(b)
        b.send(p.PubAck(pid))
        a.lose()
        self.publish(b, {"msgid": msgid(1), "from": "bob", "to": "alice", "type": "received"}, 2)
        self.publish(b, b"{bad", 3)
        self.assertEqual(len(self.unacknowledged(b)), 1)  # The error frame.
        note = self.successResultOf(self.app.notify("alice", "feedback", {"content": "ok"}, None))
        self.assertEqual(self.pushes(), [("alice", note, 1, "offline")])
        summary = self.successResultOf(self.store.session_summary("alice"))
        self.assertEqual(summary and summary.queued, 2)
        self.h.clock.advance(PUSH_AFTER * 3)
        b.lose()
        self.assertEqual(self.pushes(), [])

    def test_clean_session_pushed_when_it_ends(self) -> None:
        """A chat unacknowledged on a clean session is pushed when it ends."""
        a = self.user("alice")
        b, _ = self.login("bob", clean=True)
        self.chats(a, "bob", range(1, 2))
        b.lose()
        self.assertEqual(self.pushes(), [("bob", msgid(1), 1, "connection_lost")])

    def test_one_timer_for_many_messages(self) -> None:
        """
        However many messages wait, the push decisions hold one timer: the
        reactor's delayed calls do not grow with them.
        """
        self.h = self.harness(self.store, AppLimits(rate=1000, burst=1000))
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 2))
        self.h.clock.advance(0.01)
        calls = len(self.h.clock.getDelayedCalls())
        for n in range(2, 200):
            self.chats(a, "bob", range(n, n + 1))
            self.h.clock.advance(0.01)
        self.assertEqual(len(self.h.clock.getDelayedCalls()), calls)
        self.assertEqual(len(self.unacknowledged(b)), 32)
        self.h.clock.advance(PUSH_AFTER)
        self.assertEqual(len(self.pushes()), 199)

    def test_marked_once_settled(self) -> None:
        """
        A push goes out at once; its message is marked pushed in the store
        only once the pusher has settled it, in one commit with the others
        settled in the same turn.
        """
        store = HeldStore(holding=False)
        self.h = self.harness(store)
        self.pusher.settle_at_once = False
        a = self.user("alice")
        store.holding = True
        for n in (1, 2):
            self.publish(a, chat("alice", "bob", n), n)
        store.release()
        self.assertEqual(
            self.pushes(), [("bob", msgid(1), 1, "offline"), ("bob", msgid(2), 2, "offline")]
        )
        self.h.clock.advance(PUSH_AFTER)
        store.release()
        self.assertEqual(store.held, [])
        for settled in self.pusher.unsettled:
            settled.callback(True)
        self.h.clock.advance(0)
        [(_, ops)] = store.held
        self.assertEqual(list(ops), [MarkPushed("bob", 1), MarkPushed("bob", 2)])

    def test_not_settled_not_marked(self) -> None:
        """A push the pusher did not settle (it stopped) leaves its message unmarked."""
        self.pusher.settle_at_once = False
        a = self.user("alice")
        self.publish(a, chat("alice", "bob", 1))
        self.assertEqual(len(self.pushes()), 1)
        self.pusher.unsettled[0].callback(False)
        self.h.clock.advance(PUSH_AFTER)
        self.assertEqual(self.marked("bob"), [(msgid(1), False)])

    def test_acknowledged_before_settled_not_marked(self) -> None:
        """
        A push settled after its message was acknowledged marks nothing, and
        asks the pusher to withdraw it if it has not left yet.
        """
        self.store = OpsStore()
        self.h = self.harness(self.store)
        self.pusher.settle_at_once = False
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 2))
        self.h.clock.advance(PUSH_AFTER)
        self.assertEqual(len(self.pushes()), 1)
        [wanted] = self.pusher.wanted
        self.assertIs(wanted(), True)
        [pid] = self.unacknowledged(b)
        b.send(p.PubAck(pid))
        self.assertIs(wanted(), False)
        self.pusher.unsettled[0].callback(True)
        self.h.clock.advance(0)
        self.assertNotIn(MarkPushed("bob", 1), self.store.ops)

    def test_stop_marks_what_is_settled(self) -> None:
        """
        Stopping marks at once the pushes settled in the last turn, before
        the store closes; what is not settled by then stays unmarked.
        """
        self.pusher.settle_at_once = False
        a = self.user("alice")
        for n in (1, 2):
            self.publish(a, chat("alice", "bob", n), n)
        self.assertEqual(len(self.pushes()), 2)
        self.pusher.unsettled[0].callback(True)
        self.delivery.stop()
        self.pusher.unsettled[1].callback(False)
        self.assertEqual(self.marked("bob"), [(msgid(1), True), (msgid(2), False)])

    def test_stopping_server_pushes_nothing(self) -> None:
        """
        Connections closed because the server stops are not ended by their
        clients: nothing is pushed, and nothing more once it stopped.
        """
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 3))
        self.delivery.stop()
        b.lose()
        self.h.clock.advance(PUSH_AFTER * 3)
        self.assertEqual(self.pushes(), [])

    def test_deleted_account_not_pushed(self) -> None:
        """A deleted account's unacknowledged chats are not pushed."""
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 3))
        self.successResultOf(self.app.delete_user("bob"))
        self.assertTrue(b.closed)
        b.lose()
        self.h.clock.advance(PUSH_AFTER * 3)
        self.assertEqual(self.pushes(), [])


class CleanSessionTests(DeliveryCase):
    """
    A chat `sent` to its sender is kept for a clean session like for any
    other until the session is discarded, and what is discarded
    unacknowledged is pushed first: nothing promised is silently lost.
    """

    def stored(self, user: str) -> list[int]:
        return [q.seq for q in self.successResultOf(self.store.read_queue(user, 0, 100))]

    def test_stored_while_connected_discarded_at_the_end(self) -> None:
        """
        Chats to a connected clean session are in the store; when it ends,
        those unacknowledged are pushed, then the session is discarded, and
        a chat sent after is queued for the user's next session.
        """
        a = self.user("alice")
        b, _ = self.login("bob", clean=True)
        self.chats(a, "bob", range(1, 3))
        [first, _] = self.unacknowledged(b)
        b.send(p.PubAck(first))
        self.h.clock.advance(LOOSE_WAIT)
        self.assertEqual(self.stored("bob"), [2])
        b.lose()
        self.assertEqual(self.pushes(), [("bob", msgid(2), 1, "connection_lost")])
        self.assertEqual(self.stored("bob"), [])
        self.chats(a, "bob", range(3, 4))
        self.assertEqual(self.pushes(), [("bob", msgid(3), 1, "offline")])
        _, resent = self.reconnect("bob")
        self.assertEqual(len(resent), 1)

    def test_clean_connect_pushes_what_it_discards(self) -> None:
        """
        A clean CONNECT discards the stored session, pushing first what it
        held unacknowledged and never pushed; its own session starts empty.
        """
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 3))
        self.assertEqual(len(self.unacknowledged(b)), 2)
        again, packets = self.login("bob", clean=True)
        self.assertEqual(packets, [p.ConnAck(0, False)])
        self.assertTrue(b.closed)
        self.assertEqual(
            self.pushes(),
            [("bob", msgid(n), 2, "connection_lost") for n in (1, 2)],
        )
        self.assertEqual(self.stored("bob"), [])
        self.chats(a, "bob", range(3, 4))
        self.assertEqual(len(self.unacknowledged(again)), 1)

    def test_leftover_clean_session_pushed_after_a_crash(self) -> None:
        """
        A clean session the server died holding keeps its unacknowledged
        chats in the store: the restart pushes them once, and the user's
        next CONNECT finds no session.
        """
        a = self.user("alice")
        b, _ = self.login("bob", clean=True)
        self.chats(a, "bob", range(1, 3))
        self.assertEqual(len(self.unacknowledged(b)), 2)
        self.h = self.harness(self.store)
        self.delivery.recover()
        self.h.clock.advance(PUSH_AFTER)
        self.assertEqual(
            self.pushes(), [("bob", msgid(1), 2, "offline"), ("bob", msgid(2), 2, "offline")]
        )
        _, packets = self.login("bob")
        self.assertEqual(packets, [p.ConnAck(0, False)])
        self.assertEqual(self.pushes(), [])


class RestartTests(DeliveryCase):
    def test_neither_acknowledged_nor_pushed_is_pushed_after_restart(self) -> None:
        """
        A chat delivered and not acknowledged when the server died is pushed
        push-after seconds after the restart, once; one acknowledged, or
        pushed already, is not; and a second restart pushes nothing.
        """
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 4))
        first, *_ = self.unacknowledged(b)
        b.send(p.PubAck(first))
        self.h.clock.advance(0)
        self.chats(a, "carol", range(4, 5))
        self.assertEqual(self.pushes(), [("carol", msgid(4), 1, "offline")])
        self.restart()
        self.h.clock.advance(PUSH_AFTER - 0.001)
        self.assertEqual(self.pushes(), [])
        self.h.clock.advance(0.001)
        self.assertEqual(
            self.pushes(), [("bob", msgid(2), 2, "offline"), ("bob", msgid(3), 2, "offline")]
        )
        self.restart()
        self.h.clock.advance(PUSH_AFTER * 3)
        self.assertEqual(self.pushes(), [])

    def test_restart_reads_pushes_owed_in_pages(self) -> None:
        """
        What a restart finds owed is read from the store a page at a time,
        however much it is, and each is pushed once.
        """
        self.patch(delivery, "PAGE", 2)
        a = self.user("alice")
        for user in ("bob", "carol"):
            self.login(user)
            self.chats(a, user, range(1, 4) if user == "bob" else range(4, 7))
        self.restart()
        self.h.clock.advance(PUSH_AFTER)
        pushed = self.pushes()
        self.assertEqual(
            [(u, m) for u, m, _, _ in pushed],
            [("bob", msgid(n)) for n in (1, 2, 3)] + [("carol", msgid(n)) for n in (4, 5, 6)],
        )

    def test_reconnect_after_restart_in_time(self) -> None:
        """
        After a restart a client that reconnects and acknowledges within
        push-after is not pushed.
        """
        a, _ = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 2))
        self.restart()
        self.h.clock.advance(1)
        again, [pid] = self.reconnect("bob")
        self.h.clock.advance(PUSH_AFTER - 1.5)
        again.send(p.PubAck(pid))
        self.h.clock.advance(PUSH_AFTER * 3)
        self.assertEqual(self.pushes(), [])

    def test_push_not_settled_comes_again(self) -> None:
        """
        A push not yet settled when the server died (queued, being sent or
        retried) is pushed again push-after seconds after the restart, once.
        """
        self.pusher.settle_at_once = False
        a = self.user("alice")
        self.publish(a, chat("alice", "bob", 1))
        self.assertEqual(self.pushes(), [("bob", msgid(1), 1, "offline")])
        self.pusher.settle_at_once = True
        self.restart()
        self.h.clock.advance(PUSH_AFTER)
        self.assertEqual(self.pushes(), [("bob", msgid(1), 1, "offline")])
        self.restart()
        self.h.clock.advance(PUSH_AFTER * 3)
        self.assertEqual(self.pushes(), [])

    def test_settled_but_not_marked_in_time_comes_again(self) -> None:
        """
        A push settled but whose mark had not landed when the server died is
        pushed again after the restart: at least once across a crash.
        """
        store = HeldStore(holding=False)
        self.store = store
        self.h = self.harness(store)
        a = self.user("alice")
        store.holding = True
        self.publish(a, chat("alice", "bob", 1))
        store.release()
        self.assertEqual(self.pushes(), [("bob", msgid(1), 1, "offline")])
        [(_, ops)] = store.held
        self.assertEqual(list(ops), [MarkPushed("bob", 1)])
        store.held.clear()  # The MarkPushed never lands.
        store.holding = False
        self.restart()
        self.h.clock.advance(PUSH_AFTER)
        self.assertEqual(self.pushes(), [("bob", msgid(1), 1, "offline")])

    def test_held_in_the_window_pushed_after_restart(self) -> None:
        """
        The server dies with a push held in the coalescing window: that
        message was not marked, and is pushed after the restart; the one
        pushed before the window is not pushed again.
        """
        self.coalescing()
        a = self.user("alice")
        self.publish(a, chat("alice", "bob", 1), 1)
        self.publish(a, chat("alice", "bob", 2), 2)
        self.assertEqual(self.pushes(), [("bob", msgid(1), 1, "offline")])
        self.assertEqual(self.marked("bob"), [(msgid(1), True), (msgid(2), False)])
        self.restart()
        self.h.clock.advance(PUSH_AFTER)
        self.assertEqual(self.pushes(), [("bob", msgid(2), 2, "offline")])
        self.assertEqual(self.marked("bob"), [(msgid(1), True), (msgid(2), True)])


class WithdrawnTests(DeliveryCase):
    def setUp(self) -> None:
        super().setUp()
        self.coalescing()

    def cut_with_three(self) -> Client:
        """
        bob's connection ends with chats 1 to 3 unacknowledged: 1 is pushed,
        2 and 3 are held in the window; bob is connected again.
        """
        a, b = self.user("alice"), self.user("bob")
        self.chats(a, "bob", range(1, 4))
        self.assertEqual(len(self.unacknowledged(b)), 3)
        b.lose()
        self.assertEqual(self.pushes(), [("bob", msgid(1), 3, "connection_lost")])
        again, resent = self.reconnect("bob")
        self.resent = resent
        return again

    def withdrawn(self) -> float:
        value = self.h.metrics.registry.get_sample_value(
            "sktalent_pushes_total", {"outcome": "withdrawn"}
        )
        return value or 0.0

    def test_acknowledged_while_held_not_pushed(self) -> None:
        """
        The messages held in the window are acknowledged before it ends: the
        held push is withdrawn (counted), and they are not pushed after a
        restart either.
        """
        again = self.cut_with_three()
        for pid in self.resent[1:]:
            again.send(p.PubAck(pid))
        self.h.clock.advance(WINDOW)
        self.assertEqual(self.pushes(), [])
        self.assertEqual(self.withdrawn(), 2)
        again.lose()
        self.assertEqual(self.pushes(), [])
        self.restart()
        self.h.clock.advance(PUSH_AFTER * 3)
        self.assertEqual(self.pushes(), [])

    def test_latest_acknowledged_earlier_pushed(self) -> None:
        """
        Of the two held, the latest is acknowledged: the earlier one is
        pushed at the end of the window, and marked with it.
        """
        again = self.cut_with_three()
        again.send(p.PubAck(self.resent[2]))
        self.h.clock.advance(WINDOW)
        self.assertEqual(self.pushes(), [("bob", msgid(2), 3, "connection_lost")])
        self.assertEqual(self.withdrawn(), 1)
        self.assertEqual(self.marked("bob"), [(msgid(1), True), (msgid(2), True)])

    def test_held_not_acknowledged_pushed(self) -> None:
        """
        Nothing acknowledged: the latest held is pushed at the end of the
        window and settles the one it covers: both are marked.
        """
        self.cut_with_three()
        self.h.clock.advance(WINDOW)
        self.assertEqual(self.pushes(), [("bob", msgid(3), 3, "connection_lost")])
        self.assertEqual([pushed for _, pushed in self.marked("bob")], [True] * 3)
        self.assertEqual(self.withdrawn(), 0)


class NoticeTests(DeliveryCase):
    def test_round_trip(self) -> None:
        """A kept notice comes back as it was, without badge and reason."""
        notice = PushNotice(
            "order", "专家已确认", o_id="o1", status="confirmed", msgid=msgid(3), badge=4
        )
        kept = encode_notice(notice)
        self.assertEqual(decode_notice(kept), attrs.evolve(notice, badge=None))
        self.assertNotIn("badge", json.loads(kept))

    def test_unknown_fields_left_out(self) -> None:
        """A notice kept by another version loads with the fields known here."""
        kept = json.dumps({"kind": "feedback", "alert": "hi", "sound": "ding"})
        self.assertEqual(decode_notice(kept), PushNotice("feedback", "hi"))
