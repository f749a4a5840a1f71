"""
A paho-mqtt client driven synchronously, for end-to-end tests.
"""

from __future__ import annotations

import json
import queue
import ssl
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from sktalent.testing.server import wait_for

# paho reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes.
_CONNACK_CODES = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
# Bounds the wait for a probe: no test has more than this on its way.
_MOST_BEFORE_A_PROBE = 1000


class PahoUser:
    """
    One connected client that records what it receives, acknowledging it as
    paho does.
    """

    def __init__(
        self,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        clean: bool = False,
        tls: ssl.SSLContext | None = None,
        connack_timeout: float = 10.0,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set_context(tls)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[tuple[int, bool]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_connect = lambda c, u, flags, rc, p: self.connack.put(
            (_CONNACK_CODES[rc.value], flags.session_present)
        )
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subacks.put(
            [code.value for code in codes]
        )
        self.client.reconnect_delay_set(60, 120)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self.rc, self.session_present = self.connack.get(timeout=connack_timeout)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait for the publish flow to complete."""
        info = self.client.publish(topic, payload, qos, retain)
        info.wait_for_publish(10)
        if not info.is_published():
            raise AssertionError(f"publish to {topic} at QoS {qos} did not complete")

    def send(self, frame: dict[str, Any]) -> None:
        self.publish("$sktalent/server/mqttserver", json.dumps(frame, ensure_ascii=False))

    def subscribe(self, topic_filter: str, qos: int) -> list[int]:
        self.client.subscribe(topic_filter, qos)
        return self.subacks.get(timeout=10)

    def take(self, count: int, timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        """The next count messages received, each waited for at most timeout."""
        try:
            return [self.messages.get(timeout=timeout) for _ in range(count)]
        except queue.Empty:
            raise AssertionError(f"fewer than {count} messages arrived") from None

    def frames(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The next count JSON frames received."""
        return [json.loads(m.payload) for m in self.take(count, timeout)]

    def until(
        self, is_probe: Callable[[mqtt.MQTTMessage], bool], timeout: float = 10.0
    ) -> list[mqtt.MQTTMessage]:
        """
        The messages received before the first one is_probe accepts, which
        is taken too.  With a probe sent behind everything already on its
        way to this client, that is all of it: an empty list proves nothing
        more was coming, however late it would have arrived.
        """
        before: list[mqtt.MQTTMessage] = []
        for _ in range(_MOST_BEFORE_A_PROBE):
            try:
                message = self.messages.get(timeout=timeout)
            except queue.Empty:
                payloads = [m.payload for m in before]
                raise AssertionError(f"the probe never came; before it: {payloads}") from None
            if is_probe(message):
                return before
            before.append(message)
        raise AssertionError(f"no probe among {_MOST_BEFORE_A_PROBE} messages")

    def probe(self, topic: str) -> list[mqtt.MQTTMessage]:
        """
        Publish a probe to topic, which this client subscribes to, at QoS 1:
        what the client receives before it (see until).
        """
        payload = f"probe {uuid.uuid4().hex}".encode()
        self.publish(topic, payload, 1)
        return self.until(lambda m: m.topic == topic and m.payload == payload)

    def close(self) -> None:
        """
        DISCONNECT, and wait until paho has written it: paho closes its socket
        only then, so the server has it before anything the test does next.
        """
        self.client.disconnect()
        wait_for(lambda: self.client.socket() is None, 10, "paho to send DISCONNECT")
        self.client.loop_stop()

    def drop(self) -> None:
        """Lose the connection without DISCONNECT."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def wait_closed(self) -> None:
        wait_for(lambda: not self.client.is_connected(), 10, "the connection to close")
