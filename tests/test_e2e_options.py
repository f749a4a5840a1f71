"""
Deployment options end to end: MQTT over TLS, and authSign checked by an
HTTP hook, against a real server process.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from sktalent.testing.server import ServerProcess, free_port, listening, running, wait_for

from .helpers import port_taken
from .pahoclient import PahoUser


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class TLSTests(SynchronousTestCase):
    def test_mqtt_over_tls(self) -> None:
        """
        A second listener given as ssl:PORT:... serves MQTT over TLS with the
        operator's certificate, next to the plain one.
        """
        server = ServerProcess()
        key, cert = self_signed(server.directory)
        tls_port = free_port()
        server.args = [
            "--anonymous",
            "--listen",
            f"ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        ]
        running(self, server)
        wait_for(lambda: listening(tls_port), what="the TLS listener")
        plain = PahoUser(server.mqtt_port, "plain", clean=True)
        self.addCleanup(plain.close)
        self.assertEqual(plain.subscribe("tls/#", 1), [1])

        context = ssl.create_default_context(cafile=str(cert))
        secure = PahoUser(tls_port, "secure", clean=True, tls=context)
        self.addCleanup(secure.close)
        self.assertEqual(secure.rc, 0)
        secure.publish("tls/hello", b"over TLS", 1)
        [message] = plain.take(1)
        self.assertEqual((message.topic, message.payload), ("tls/hello", b"over TLS"))


class ListenTests(SynchronousTestCase):
    def test_port_taken(self) -> None:
        """A listener that cannot listen stops the start with status 1."""
        server = ServerProcess(mqtt_port=port_taken(self))
        self.addCleanup(shutil.rmtree, server.directory, True)
        server.start()  # The taken port answers, so this returns at once.
        assert server.process is not None
        self.assertEqual(server.process.wait(20), 1)
        self.assertIn("Address already in use", server.log)


class PushTextsTests(SynchronousTestCase):
    def test_bad_file_stops_start(self) -> None:
        """
        A --push-texts file with a bad key stops the start, before any
        listener opens, with one line naming the file and the key, status 1.
        """
        server = ServerProcess()
        self.addCleanup(shutil.rmtree, server.directory, True)
        texts = server.directory / "texts.json"
        texts.write_text(json.dumps({"expert": {"fail": "失败：{reason}"}}), encoding="utf-8")
        server.args = ["--push-texts", str(texts)]
        with self.assertRaises(AssertionError):
            server.start()
        assert server.process is not None
        self.assertEqual(server.process.returncode, 1)
        self.assertFalse(listening(server.mqtt_port))
        [line] = server.log.strip().splitlines()
        self.assertEqual(
            line,
            f"sktalent: --push-texts: The push texts file {texts} is wrong: expert.fail has the"
            " placeholder {reason}; it may use {status}, {content}.",
        )


class Hook(BaseHTTPRequestHandler):
    """
    The login service's hook: "let-me-in" is the one valid authSign, and the
    user "broken" makes it fail.
    """

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["user_id"] == "broken":
            status = 500
        elif body["auth_sign"] == "let-me-in":
            status = 200
        else:
            status = 403
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class AuthHookTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        threading.Thread(target=self.hook.serve_forever, daemon=True).start()
        self.addCleanup(self.hook.server_close)
        self.addCleanup(self.hook.shutdown)
        url = f"http://127.0.0.1:{self.hook.server_address[1]}/mqtt-auth"
        self.server = running(self, ServerProcess(args=["--auth-url", url]))

    def rc(self, user: str, auth_sign: str) -> int:
        client = PahoUser(self.server.mqtt_port, user, user, auth_sign)
        self.addCleanup(client.client.loop_stop)
        return client.rc

    def test_hook_decides(self) -> None:
        """The hook's 200 accepts, 403 refuses with 4, and 500 answers 3."""
        self.assertEqual(self.rc("alice", "let-me-in"), 0)
        self.assertEqual(self.rc("alice", "wrong"), 4)
        self.assertEqual(self.rc("broken", "let-me-in"), 3)

    def test_hook_down(self) -> None:
        """With the hook unreachable, CONNECT is answered 3, not 4."""
        self.hook.shutdown()
        self.hook.server_close()
        self.assertEqual(self.rc("alice", "let-me-in"), 3)
