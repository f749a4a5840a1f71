"""
Crash safety with a real process: what the server acknowledged survives a
SIGKILL, for each durable back end.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sktalent.authsign import sign
from sktalent.testing.server import ServerProcess, running

from .helpers import chat, mongo_store, msgid, nothing_more
from .pahoclient import PahoUser

COUNT = 300


class CrashMixin:
    def store(self) -> str | None:
        raise NotImplementedError

    def test_acknowledged_chat_survives_sigkill(self) -> None:
        """
        Every chat acknowledged with sent before a SIGKILL reaches the
        offline recipient after the restart, in order, with its session.
        """
        case: SynchronousTestCase = self  # type: ignore[assignment]
        server = running(case, ServerProcess(args=["--chat-rate", "10000"], store=self.store()))
        alice = PahoUser(server.mqtt_port, "alice", "alice", sign(server.secret, "alice"))
        case.addCleanup(alice.drop)
        for n in range(COUNT):
            alice.send(chat("alice", "bob", n))
        acknowledged = [f["msgid"] for f in alice.frames(COUNT, timeout=60)]
        case.assertEqual(acknowledged, [msgid(n) for n in range(COUNT)])
        server.kill()
        alice.drop()

        again = server.restarted()
        case.addCleanup(again.stop)
        bob = PahoUser(again.mqtt_port, "bob", "bob", sign(again.secret, "bob"))
        case.addCleanup(bob.close)
        case.assertEqual((bob.rc, bob.session_present), (0, True))
        contents = [f["payload"]["content"] for f in bob.frames(COUNT, timeout=60)]
        case.assertEqual(contents, [f"m{n}" for n in range(COUNT)])
        nothing_more(bob)
        case.assertEqual(again.stop(), 0)


class SQLiteCrashTests(CrashMixin, SynchronousTestCase):
    def store(self) -> str | None:
        return None  # The embedded default.


class MongoCrashTests(CrashMixin, SynchronousTestCase):
    def store(self) -> str | None:
        return mongo_store()
