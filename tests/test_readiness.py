"""
systemd's readiness notification: READY=1 once the server listens, so that
systemctl start, and a reload right behind it, wait for a server that is up.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sktalent.readiness import notify_ready
from sktalent.testing.server import ServerProcess, listening


def bound(case: SynchronousTestCase, address: str) -> socket.socket:
    """A datagram socket bound to address, as systemd's notify socket is."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    case.addCleanup(receiver.close)
    receiver.bind(address)
    receiver.settimeout(20)
    return receiver


class NotifyTests(SynchronousTestCase):
    def test_ready(self) -> None:
        """READY=1 goes to the socket NOTIFY_SOCKET names, a path or an abstract name."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "notify")
        receiver = bound(self, path)
        notify_ready({"NOTIFY_SOCKET": path})
        self.assertEqual(receiver.recv(100), b"READY=1")
        name = f"sktalent-test-{os.getpid()}"
        receiver = bound(self, "\0" + name)
        notify_ready({"NOTIFY_SOCKET": "@" + name})
        self.assertEqual(receiver.recv(100), b"READY=1")

    def test_not_under_systemd(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and nothing logged."""
        with capturedLogs() as events:
            notify_ready({})
        self.assertEqual(events, [])

    def test_socket_gone(self) -> None:
        """A notify socket that is not there is one warning, not a failure."""
        with capturedLogs() as events:
            notify_ready({"NOTIFY_SOCKET": "/nonexistent/notify"})
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn("/nonexistent/notify", formatEvent(event))


class ServerReadyTests(SynchronousTestCase):
    def test_ready_once_listening(self) -> None:
        """A real server sends READY=1 only once both its listeners accept connections."""
        server = ServerProcess()
        self.addCleanup(shutil.rmtree, server.directory, True)
        self.addCleanup(server.stop)
        receiver = bound(self, str(server.directory / "notify"))
        server.env = {"NOTIFY_SOCKET": str(server.directory / "notify")}
        server.spawn()
        self.assertEqual(receiver.recv(100), b"READY=1")
        self.assertTrue(listening(server.mqtt_port) and listening(server.api_port))
        self.assertEqual(server.stop(), 0)
