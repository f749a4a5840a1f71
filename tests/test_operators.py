"""
What operators ask of a user's session, in memory: its state, a disconnect
with an optional ban, and a deleted account.
"""

from __future__ import annotations

from sktalent.calltalent.interfaces import SessionInfo
from sktalent.mqtt import packets as p
from sktalent.store.interfaces import Device, PutDevice, StoreUnavailable

from .helpers import chat, msgid
from .mqttclient import DownStore
from .test_calltalent import CallTalentCase

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


class DisconnectTests(CallTalentCase):
    def test_unknown(self) -> None:
        """A user without a session cannot be disconnected or banned."""
        self.assertFalse(self.app.disconnect("nobody", 60))
        self.assertEqual(self.login("nobody")[1], [p.ConnAck(0, False)])

    def test_disconnect_without_ban(self) -> None:
        """The connection is closed; the client may connect again at once."""
        b = self.user("bob")
        self.assertTrue(self.app.disconnect("bob", None))
        self.assertTrue(b.closed)
        b.lose()
        self.assertEqual(self.login("bob")[1], [p.ConnAck(0, True)])

    def test_offline_user(self) -> None:
        """An offline user with a session is banned all the same."""
        self.user("bob").lose()
        self.assertTrue(self.app.disconnect("bob", 60))
        self.assertEqual(self.login("bob")[1], [p.ConnAck(5)])

    def test_ban(self) -> None:
        """
        With ban_seconds, the user gets CONNACK 5 until they have passed,
        counted as banned; then connects again with the session kept.
        """
        b = self.user("bob")
        self.assertTrue(self.app.disconnect("bob", 60))
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
        self.app.disconnect("bob", 60)
        self.app.disconnect("bob", 600)
        self.h.clock.advance(61)
        self.assertEqual(self.login("bob")[1], [p.ConnAck(5)])
        self.app.disconnect("bob", 0)
        self.assertEqual(self.login("bob")[1], [p.ConnAck(0, True)])

    def test_other_users_not_banned(self) -> None:
        """A ban is the user's alone."""
        self.user("bob").lose()
        self.app.disconnect("bob", 60)
        self.assertEqual(self.login("carol")[1], [p.ConnAck(0, False)])


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
        self.assertEqual(self.login("bob")[1], [p.ConnAck(0, True)])

    def test_store_down(self) -> None:
        """While the store is down, a deletion is refused at once and nothing changes."""
        self.h = self.harness(DownStore())
        b = self.user("bob")
        self.assertRaises(StoreUnavailable, self.app.delete_user, "bob")
        self.assertFalse(b.closed)
