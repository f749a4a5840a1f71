"""
What operators ask of a user's session, in memory: its state, a disconnect
with an optional ban kept in the store, and a deleted account.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred, fail

from sktalent.authsign import sign
from sktalent.calltalent.interfaces import SessionInfo
from sktalent.mqtt import packets as p
from sktalent.store.interfaces import Device, PutDevice, SetBan, StoreUnavailable
from sktalent.store.memory import MemoryStore

from .helpers import chat, msgid
from .mqttclient import DownStore, HeldStore
from .test_calltalent import SECRET, CallTalentCase

NOW_MS = 1_700_000_000_000


class SessionInfoTests(CallTalentCase):
    def test_unknown(self) -> None:
        """A user without a session has no session info."""
        self.assertIsNone(self.successResultOf(self.app.session_info("nobody")))

    def test_offline_with_queue(self) -> None:
        """
        An offline user's session: not online, no node nor connection time,
        how many messages wait and since when, the platform of the device.
        """
        a = self.user("alice")
        self.publish(a, chat("alice", "bob", 1))
        self.h.clock.advance(2.5)
        self.publish(a, chat("alice", "bob", 2), 2)
        self.successResultOf(self.store.submit([PutDevice(Device("bob", "ios", "t"))]))
        self.assertEqual(
            self.successResultOf(self.app.session_info("bob")),
            SessionInfo(False, None, None, 2, NOW_MS, "ios"),
        )

    def test_online(self) -> None:
        """
        A connected user's session: online on this node since the connect,
        in milliseconds; nothing queued once acknowledged; no device.
        """
        self.h.clock.advance(0.25)
        b = self.user("bob")
        self.h.clock.advance(10)
        self.assertEqual(
            self.successResultOf(self.app.session_info("bob")),
            SessionInfo(True, self.app.node, NOW_MS + 250, 0, None, None),
        )
        b.lose()
        info = self.successResultOf(self.app.session_info("bob"))
        assert info is not None
        self.assertEqual((info.online, info.node, info.connected_since), (False, None, None))


@attrs.define
class BanReadStore(MemoryStore):
    """A MemoryStore that counts its ban reads, holds them, or fails them when told."""

    reads: int = 0
    hold: bool = False
    held: list[tuple[Deferred[int | None], str]] = attrs.Factory(list)
    down: bool = False

    def get_ban(self, client_id: str) -> Deferred[int | None]:
        self.reads += 1
        if self.down:
            return fail(StoreUnavailable("the memory store is down"))
        if self.hold:
            held: Deferred[int | None] = Deferred()
            self.held.append((held, client_id))
            return held
        return MemoryStore.get_ban(self, client_id)

    def release(self) -> None:
        held, self.held = self.held, []
        for d, client_id in held:
            MemoryStore.get_ban(self, client_id).chainDeferred(d)


class DisconnectTests(CallTalentCase):
    def setUp(self) -> None:
        super().setUp()
        self.store = self.reading = BanReadStore()
        self.h = self.harness(self.store)
        self.h.clock.advance(1_700_000_000)

    def disconnect(self, user: str, ban_seconds: int | None) -> bool:
        return self.successResultOf(self.app.disconnect(user, ban_seconds))

    def restart(self) -> None:
        """A new server on the same store."""
        now = self.h.clock.seconds()
        self.h = self.harness(self.store)
        self.h.clock.advance(now)
        self.successResultOf(Deferred.fromCoroutine(self.h.broker.start()))

    def test_unknown(self) -> None:
        """A user without a session cannot be disconnected or banned."""
        self.assertFalse(self.disconnect("nobody", 60))
        self.assertEqual(self.login("nobody")[1], [p.ConnAck(0, False)])
        self.assertIsNone(self.successResultOf(self.store.get_ban("nobody")))

    def test_disconnect_without_ban(self) -> None:
        """The connection is closed; the client may connect again at once."""
        b = self.user("bob")
        self.assertTrue(self.disconnect("bob", None))
        self.assertTrue(b.closed)
        b.lose()
        self.assertEqual(self.login("bob")[1], [p.ConnAck(0, True)])

    def test_offline_user(self) -> None:
        """An offline user with a session is banned all the same."""
        self.user("bob").lose()
        self.assertTrue(self.disconnect("bob", 60))
        self.assertEqual(self.login("bob")[1], [p.ConnAck(5)])

    def test_ban(self) -> None:
        """
        With ban_seconds, the user gets CONNACK 5 until they have passed,
        counted as banned; then connects again with the session kept.
        """
        b = self.user("bob")
        self.assertTrue(self.disconnect("bob", 60))
        b.lose()
        self.h.clock.advance(59.9)
        refused, packets = self.login("bob")
        self.assertEqual(packets, [p.ConnAck(5)])
        self.assertTrue(refused.closed)
        banned = self.h.metrics.registry.get_sample_value(
            "sktalent_auth_failures_total", {"reason": "banned"}
        )
        self.assertEqual(banned, 1)
        self.h.clock.advance(0.1)
        self.assertEqual(self.login("bob")[1], [p.ConnAck(0, True)])

    def test_ban_replaced_and_lifted(self) -> None:
        """A new ban replaces the old one; ban_seconds 0 lifts it."""
        self.user("bob").lose()
        self.disconnect("bob", 60)
        self.disconnect("bob", 600)
        self.h.clock.advance(61)
        self.assertEqual(self.login("bob")[1], [p.ConnAck(5)])
        self.disconnect("bob", 0)
        self.assertEqual(self.login("bob")[1], [p.ConnAck(0, True)])

    def test_other_users_not_banned(self) -> None:
        """A ban is the user's alone."""
        self.user("bob").lose()
        self.disconnect("bob", 60)
        self.assertEqual(self.login("carol")[1], [p.ConnAck(0, False)])

    def test_ban_survives_restart_and_ends_on_time(self) -> None:
        """
        A ban is in the store: after a restart the user is still refused,
        until it ends, to the millisecond; a ban lifted before the restart
        stays lifted.
        """
        self.user("bob").lose()
        self.user("carol").lose()
        self.disconnect("bob", 60)
        self.disconnect("carol", 60)
        self.disconnect("carol", 0)
        self.h.clock.advance(30)
        self.restart()
        self.assertEqual(self.login("bob")[1], [p.ConnAck(5)])
        self.assertEqual(self.login("carol")[1], [p.ConnAck(0, True)])
        self.h.clock.advance(29.999)
        self.assertEqual(self.login("bob")[1], [p.ConnAck(5)])
        self.h.clock.advance(0.001)
        self.assertEqual(self.login("bob")[1], [p.ConnAck(0, True)])

    def test_ban_durable_before_disconnect(self) -> None:
        """
        The connection is closed only once the ban is in the store; a ban the
        store cannot keep disconnects nobody and bans nobody.
        """
        store = HeldStore(holding=False)
        self.h = self.harness(store)
        b = self.user("bob")
        store.holding = True
        banning = self.app.disconnect("bob", 60)
        self.assertFalse(b.closed)
        store.fail()
        self.failureResultOf(banning, StoreUnavailable)
        self.assertFalse(b.closed)
        banning = self.app.disconnect("bob", 60)
        store.release()
        self.assertIs(self.successResultOf(banning), True)
        self.assertTrue(b.closed)

    def test_store_down_refused_at_once(self) -> None:
        """While the store is down, a ban is refused at once: nothing is changed."""

        class DownStore(MemoryStore):
            available = False

        self.h = self.harness(DownStore())
        b = self.user("bob")
        self.failureResultOf(self.app.disconnect("bob", 60), StoreUnavailable)
        self.assertFalse(b.closed)
        self.assertTrue(self.disconnect("bob", None))

    def test_ban_read_at_connect_only_when_not_connected(self) -> None:
        """
        A CONNECT of a user not connected here reads the ban from the store;
        a takeover of a live connection needs no read; nothing is read at
        start, however many bans are stored.
        """
        self.successResultOf(
            self.store.submit([SetBan(f"u{n}", NOW_MS + 60_000) for n in range(100)])
        )
        self.restart()
        self.assertEqual(self.reading.reads, 0)
        self.user("bob")
        self.assertEqual(self.reading.reads, 1)
        self.user("bob")
        self.assertEqual(self.reading.reads, 1)
        self.assertEqual(self.login("u7")[1], [p.ConnAck(5)])
        self.assertEqual(self.reading.reads, 2)

    def test_ban_set_during_read(self) -> None:
        """
        A CONNECT whose read of the store began before the ban landed is
        refused all the same.
        """
        self.user("bob").lose()
        self.reading.hold = True
        c = self.h.client()
        c.connect("bob", username="bob", password=sign(SECRET, "bob").encode(), keepalive=30)
        self.assertEqual(len(self.reading.held), 1)
        self.disconnect("bob", 60)
        self.reading.release()
        self.assertEqual(c.received(), [p.ConnAck(5)])

    def test_takeover_of_the_connection_being_closed(self) -> None:
        """
        A new connection of a user just banned, while the old one is still
        closing, is refused: the ban was set here.
        """
        self.user("bob")
        self.disconnect("bob", 60)
        self.assertEqual(self.login("bob")[1], [p.ConnAck(5)])

    def test_store_down_at_connect(self) -> None:
        """A ban that cannot be read refuses the CONNECT as server unavailable (3)."""
        self.reading.down = True
        self.assertEqual(self.login("bob")[1], [p.ConnAck(3)])
        refused = self.h.metrics.registry.get_sample_value(
            "sktalent_auth_failures_total", {"reason": "store_unavailable"}
        )
        self.assertEqual(refused, 1)


class DeleteUserTests(CallTalentCase):
    def test_delete(self) -> None:
        """
        Deleting an account closes its connection and forgets its session,
        queue and device, in memory and in the store; its chat history stays,
        and it starts afresh if it ever connects again.
        """
        a, b = self.user("alice"), self.user("bob")
        self.publish(a, chat("alice", "bob", 1, "kept in history"))
        self.assertEqual(len(self.frames(a)), 1)
        self.successResultOf(self.store.submit([PutDevice(Device("bob", "android", "t"))]))
        self.successResultOf(self.app.delete_user("bob"))
        self.assertTrue(b.closed)
        b.lose()
        self.assertIsNone(self.successResultOf(self.app.session_info("bob")))
        self.assertNotIn(
            "bob", [s.client_id for s in self.successResultOf(self.store.load_sessions())]
        )
        self.assertIsNone(self.successResultOf(self.store.get_device("bob")))
        [kept] = self.successResultOf(self.store.chat_history("o1", 10, None))
        self.assertEqual(kept.msgid, msgid(1))
        self.assertEqual(self.h.metrics.registry.get_sample_value("sktalent_queued_messages"), 0)
        self.assertEqual(self.login("bob")[1], [p.ConnAck(0, False)])

    def test_ban_goes_with_the_account(self) -> None:
        """
        A deleted account's ban goes with it, from the store too: nobody
        could lift it, the user having no session left.
        """
        self.user("bob").lose()
        self.successResultOf(self.app.disconnect("bob", 60))
        self.successResultOf(self.app.delete_user("bob"))
        self.assertIsNone(self.successResultOf(self.store.get_ban("bob")))
        self.assertEqual(self.login("bob")[1], [p.ConnAck(0, False)])

    def test_unknown(self) -> None:
        """Deleting a user that has nothing is not an error."""
        self.successResultOf(self.app.delete_user("nobody"))
        self.assertIsNone(self.successResultOf(self.app.session_info("nobody")))

    def test_retransmission_after_delete(self) -> None:
        """
        The sender's retransmission of a chat to a deleted account is a
        retransmission still (the history is kept): sent, not delivered.
        """
        a = self.user("alice")
        self.publish(a, chat("alice", "bob", 1))
        self.successResultOf(self.app.delete_user("bob"))
        self.publish(a, chat("alice", "bob", 1), 2)
        self.assertEqual([f["type"] for f in self.frames(a)], ["sent", "sent"])
        # Nothing was queued for bob again: he has no session.
        self.assertEqual(self.login("bob")[1], [p.ConnAck(0, False)])

    def test_store_down(self) -> None:
        """While the store is down, a deletion is refused at once and nothing changes."""
        self.h = self.harness(DownStore())
        b = self.user("bob")
        self.assertRaises(StoreUnavailable, self.app.delete_user, "bob")
        self.assertFalse(b.closed)
