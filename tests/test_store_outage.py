"""
The store stops answering under load: nothing more is acknowledged, /healthz
says so, clients stay connected, and everything resumes when it is back.
"""

from __future__ import annotations

import json
import queue
import socket
import sqlite3
import threading
import time
from urllib.parse import urlsplit

from twisted.trial.unittest import SynchronousTestCase

from sktalent.testing.server import ServerProcess, free_port, running, wait_for

from .helpers import chat, mongo_store, msgid, paho_user

BEFORE, DURING = 20, 30


class Relay:
    """
    A TCP relay on 127.0.0.1 standing between the server and its MongoDB:
    cut() closes it and every connection through it, restore() listens again
    on the same port.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target, 5)
            except OSError:
                return
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        assert self._listener is not None
        # shutdown() wakes the thread blocked in accept(); close() alone does not.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._sockets = []


class OutageMixin:
    """The scenario; subclasses say how the store goes away and comes back."""

    def store(self) -> str | None:
        raise NotImplementedError

    def break_store(self) -> None:
        raise NotImplementedError

    def mend_store(self) -> None:
        raise NotImplementedError

    def test_outage(self) -> None:
        """
        While the store is away no chat is acknowledged and /healthz answers
        503; afterwards every chat is acknowledged and delivered in order.
        """
        case: SynchronousTestCase = self  # type: ignore[assignment]
        self.server = running(
            case, ServerProcess(args=["--chat-rate", "10000"], store=self.store())
        )
        alice = paho_user(case, self.server, "alice")
        for n in range(BEFORE):
            alice.send(chat("alice", "bob", n))
        case.assertEqual(len(alice.frames(BEFORE)), BEFORE)
        case.assertEqual(self.server.api("/healthz")[0], 200)

        self.break_store()
        for n in range(BEFORE, BEFORE + DURING):
            alice.client.publish(
                "$sktalent/server/mqttserver", json.dumps(chat("alice", "bob", n)), 1
            )
        wait_for(lambda: self.server.api("/healthz")[0] == 503, 30, "/healthz to say 503")
        # No probe passes a store that is away: this is a stall, watched for 2 s.
        try:
            early = alice.messages.get(timeout=2.0)
        except queue.Empty:
            pass
        else:
            case.fail(f"acknowledged while the store was away: {early.payload!r}")
        case.assertTrue(alice.client.is_connected())

        self.mend_store()
        sent = [f["msgid"] for f in alice.frames(DURING, timeout=60)]
        case.assertEqual(sent, [msgid(n) for n in range(BEFORE, BEFORE + DURING)])
        wait_for(lambda: self.server.api("/healthz")[0] == 200, 30, "/healthz to recover")
        bob = paho_user(case, self.server, "bob")
        contents = [f["payload"]["content"] for f in bob.frames(BEFORE + DURING, timeout=30)]
        case.assertEqual(contents, [f"m{n}" for n in range(BEFORE + DURING)])


class SQLiteOutageTests(OutageMixin, SynchronousTestCase):
    """Another process holds the database's write lock."""

    def store(self) -> str | None:
        return None

    def break_store(self) -> None:
        self.locker = sqlite3.connect(self.server.directory / "store.sqlite3", timeout=10)
        self.locker.execute("BEGIN EXCLUSIVE")

    def mend_store(self) -> None:
        self.locker.rollback()
        self.locker.close()


class MongoOutageTests(OutageMixin, SynchronousTestCase):
    """The network path to MongoDB is cut."""

    def store(self) -> str | None:
        uri = urlsplit(mongo_store())
        assert uri.hostname is not None and uri.port is not None
        self.relay = Relay((uri.hostname, uri.port))
        self.addCleanup(self.relay.cut)
        return f"mongodb://127.0.0.1:{self.relay.port}{uri.path}"

    def break_store(self) -> None:
        self.relay.cut()
        time.sleep(0.2)

    def mend_store(self) -> None:
        self.relay.restore()
