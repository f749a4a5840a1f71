"""
Crash safety with a real process: what the server acknowledged survives a
SIGKILL, for each durable back end, also when the SIGKILL comes while a
CONNECT is opening a session or while a queue is read in pages.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from sktalent.authsign import sign
from sktalent.mqtt import packets as p
from sktalent.testing.server import ServerProcess, running

from .helpers import chat, mongo_store, msgid, nothing_more
from .pahoclient import PahoUser
from .rawclient import RawClient

COUNT = 300


def read_chats(client: RawClient, count: int) -> list[int]:
    """The numbers of up to count chats client is sent, each acknowledged as it comes."""
    numbers: list[int] = []
    while len(numbers) < count:
        packet = client.receive(timeout=30)
        if packet is None:
            break
        assert isinstance(packet, p.Publish) and packet.packet_id is not None, packet
        client.send(p.PubAck(packet.packet_id))
        numbers.append(int(json.loads(packet.payload)["payload"]["content"][1:]))
    return numbers


class CrashMixin:
    def store(self) -> str | None:
        raise NotImplementedError

    def start(self) -> ServerProcess:
        case: SynchronousTestCase = self  # type: ignore[assignment]
        return running(case, ServerProcess(args=["--chat-rate", "10000"], store=self.store()))

    def chats_to_bob(self, server: ServerProcess) -> None:
        """alice sends bob COUNT chats, each acknowledged with sent."""
        case: SynchronousTestCase = self  # type: ignore[assignment]
        alice = PahoUser(server.mqtt_port, "alice", "alice", sign(server.secret, "alice"))
        case.addCleanup(alice.drop)
        for n in range(COUNT):
            alice.send(chat("alice", "bob", n))
        acknowledged = [f["msgid"] for f in alice.frames(COUNT, timeout=60)]
        case.assertEqual(acknowledged, [msgid(n) for n in range(COUNT)])
        alice.drop()

    def bob(self, server: ServerProcess) -> RawClient:
        """bob's raw connection, connected with cleansession=0."""
        case: SynchronousTestCase = self  # type: ignore[assignment]
        bob = RawClient(server.mqtt_port, timeout=30)
        case.addCleanup(bob.close)
        connack = bob.connect("bob", clean=False, password=sign(server.secret, "bob").encode())
        case.assertEqual(connack, p.ConnAck(0, True))
        return bob

    def test_acknowledged_chat_survives_sigkill(self) -> None:
        """
        Every chat acknowledged with sent before a SIGKILL reaches the
        offline recipient after the restart, in order, with its session.
        """
        case: SynchronousTestCase = self  # type: ignore[assignment]
        server = self.start()
        self.chats_to_bob(server)
        server.kill()

        again = server.restarted()
        case.addCleanup(again.stop)
        bob = PahoUser(again.mqtt_port, "bob", "bob", sign(again.secret, "bob"))
        case.addCleanup(bob.close)
        case.assertEqual((bob.rc, bob.session_present), (0, True))
        contents = [f["payload"]["content"] for f in bob.frames(COUNT, timeout=60)]
        case.assertEqual(contents, [f"m{n}" for n in range(COUNT)])
        nothing_more(bob)
        case.assertEqual(again.stop(), 0)

    def test_sigkill_while_a_session_is_opened(self) -> None:
        """
        A SIGKILL while bob's CONNECT is opening his session (reading it
        from the store) loses nothing: after the restart he gets every chat
        acknowledged to alice, each once, in order.
        """
        case: SynchronousTestCase = self  # type: ignore[assignment]
        server = self.start()
        self.chats_to_bob(server)
        connecting = RawClient(server.mqtt_port)
        connecting.send(
            p.Connect("bob", False, 0, None, "bob", sign(server.secret, "bob").encode())
        )
        server.kill()
        connecting.close()

        again = server.restarted()
        case.addCleanup(again.stop)
        bob = self.bob(again)
        case.assertEqual(read_chats(bob, COUNT), list(range(COUNT)))
        nothing_more(bob)
        case.assertEqual(again.stop(), 0)

    def test_sigkill_while_a_queue_is_paged(self) -> None:
        """
        A SIGKILL while bob drains his queue page by page (a third of it
        acknowledged) loses nothing: after the restart he gets the rest in
        order, what he acknowledged not before what he did not, and no chat
        is missing.
        """
        case: SynchronousTestCase = self  # type: ignore[assignment]
        server = self.start()
        self.chats_to_bob(server)
        first = read_chats(self.bob(server), COUNT // 3)
        case.assertEqual(first, list(range(COUNT // 3)))
        server.kill()

        again = server.restarted()
        case.addCleanup(again.stop)
        bob = self.bob(again)
        rest = read_chats(bob, 1)
        # Acknowledgements a SIGKILL cut short come again; nothing else does.
        case.assertLessEqual(rest[0], COUNT // 3)
        rest += read_chats(bob, COUNT - 1 - rest[0])
        case.assertEqual(rest, list(range(rest[0], COUNT)))
        nothing_more(bob)
        case.assertEqual(again.stop(), 0)


class SQLiteCrashTests(CrashMixin, SynchronousTestCase):
    def store(self) -> str | None:
        return None  # The embedded default.


class MongoCrashTests(CrashMixin, SynchronousTestCase):
    def store(self) -> str | None:
        return mongo_store()
