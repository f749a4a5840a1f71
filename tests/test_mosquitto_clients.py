"""
Interoperability with the Mosquitto command line clients (mosquitto_pub,
mosquitto_sub) against a server process in anonymous mode.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time

from twisted.trial.unittest import SkipTest

from .test_conformance import ServerTestCase

# stdbuf makes mosquitto_sub's debug output line-buffered on a pipe, so the
# test sees its SUBACK before it publishes.
TOOLS = ("mosquitto_pub", "mosquitto_sub", "stdbuf")

# UTF-8 beyond ASCII and spaces, compared byte for byte (mosquitto_sub %x).
PAYLOAD = "héllo, 世界 ✓".encode()


class MosquittoClientTests(ServerTestCase):
    def setUp(self) -> None:
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            why = f"not installed: {', '.join(missing)}"
            if os.environ.get("CI") == "true":
                self.fail(why)
            raise SkipTest(why)
        super().setUp()

    def common(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.server.mqtt_port), "-V", "mqttv311"]

    def pub(self, topic: str, payload: bytes, qos: int, *extra: str) -> None:
        subprocess.run(
            ["mosquitto_pub", *self.common(), "-t", topic, "-q", str(qos), "-s", *extra],
            input=payload,
            check=True,
            timeout=15,
        )

    def sub_once(
        self, topic: str, qos: int, *extra: str, fmt: str = "MESSAGE %x"
    ) -> subprocess.Popen[bytes]:
        """
        mosquitto_sub for one message within 10 s, printing it in fmt.
        """
        process = subprocess.Popen(
            [
                "stdbuf",
                "-oL",
                "mosquitto_sub",
                *self.common(),
                "-t",
                topic,
                "-q",
                str(qos),
                "-C",
                "1",
                "-W",
                "10",
                "-F",
                fmt,
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(self._reap, process)
        return process

    def _reap(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)

    def wait_subscribed(self, process: subprocess.Popen[bytes]) -> bytes:
        """
        Read mosquitto_sub's debug output (-d) until its SUBACK is in; answer
        what was read.
        """
        assert process.stdout is not None
        seen = b""
        deadline = time.monotonic() + 10
        while b"received SUBACK" not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or process.poll() is not None:
                self.fail(f"mosquitto_sub did not subscribe: {seen!r}")
            if select.select([process.stdout], [], [], remaining)[0]:
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    self.fail(f"mosquitto_sub closed its output: {seen!r}")
                seen += chunk
        return seen

    def messages(self, process: subprocess.Popen[bytes], seen: bytes = b"") -> list[str]:
        """
        The MESSAGE lines of a mosquitto_sub run to its end; seen is output
        already read.
        """
        out, err = process.communicate(timeout=15)
        self.assertEqual(process.returncode, 0, err)
        lines = (seen + out).decode().splitlines()
        return [line for line in lines if line.startswith("MESSAGE ")]

    def test_publish_subscribe(self) -> None:
        """
        At QoS 0, 1 and 2, mosquitto_sub receives exactly the payload
        mosquitto_pub sends.
        """
        for qos in (0, 1, 2):
            topic = f"mosquitto/qos{qos}"
            sub = self.sub_once(topic, qos, "-d")
            seen = self.wait_subscribed(sub)
            payload = PAYLOAD + bytes([qos])
            self.pub(topic, payload, qos)
            self.assertEqual(self.messages(sub, seen), [f"MESSAGE {payload.hex()}"], f"QoS {qos}")

    def test_retained(self) -> None:
        """
        A message published with -r reaches a later mosquitto_sub, flagged
        retained.
        """
        self.pub("mosquitto/retained", PAYLOAD, 1, "-r")
        sub = self.sub_once("mosquitto/retained", 1, fmt="MESSAGE %r %x")
        self.assertEqual(self.messages(sub), [f"MESSAGE 1 {PAYLOAD.hex()}"])

    def test_persistent_session(self) -> None:
        """
        A persistent session (-c -i) receives, when it comes back, a QoS 1
        message published while it was offline.
        """
        session = ["-c", "-i", "mosquitto-persistent"]
        subprocess.run(
            ["mosquitto_sub", *self.common(), "-t", "mosquitto/offline", "-q", "1", *session, "-E"],
            check=True,
            timeout=15,
        )
        self.pub("mosquitto/offline", PAYLOAD, 1)
        sub = self.sub_once("mosquitto/offline", 1, *session)
        self.assertEqual(self.messages(sub), [f"MESSAGE {PAYLOAD.hex()}"])
