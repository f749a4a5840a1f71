"""
In-memory MQTT test harness: a broker on a MemoryStore and Clock, and
clients that speak to it over StringTransport.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import attrs
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from sktalent.metrics import Metrics
from sktalent.mqtt import packets as p
from sktalent.mqtt.auth import AllowEveryone, AllowEverything, portal_for
from sktalent.mqtt.bans import Bans
from sktalent.mqtt.broker import Broker
from sktalent.mqtt.codec import Decoder, encode_all
from sktalent.mqtt.interfaces import IApplication, IAuthorizer, ISessionGate
from sktalent.mqtt.protocol import Limits, MQTTFactory, MQTTServerProtocol
from sktalent.mqtt.router import RetainedLimits
from sktalent.store.interfaces import IStore, Op, StoreUnavailable
from sktalent.store.memory import MemoryStore

P = TypeVar("P", bound=p.Packet)


def only(kind: type[P], packets: Sequence[p.Packet]) -> list[P]:
    """packets, each checked to be a kind."""
    for packet in packets:
        assert isinstance(packet, kind), packet
    return list(packets)  # type: ignore[arg-type]


@attrs.define
class HeldStore(MemoryStore):
    """
    A MemoryStore whose commits land, or fail, only when the test says so,
    while ``holding``.
    """

    held: list[tuple[Deferred[list[object]], Sequence[Op]]] = attrs.Factory(list)
    holding: bool = True

    def submit(self, ops: Sequence[Op]) -> Deferred[list[object]]:
        if not self.holding:
            return MemoryStore.submit(self, ops)
        d: Deferred[list[object]] = Deferred()
        self.held.append((d, ops))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, ops in held:
            MemoryStore.submit(self, ops).chainDeferred(d)

    def fail(self) -> None:
        """The held commits fail: the store is unavailable."""
        held, self.held = self.held, []
        for d, _ in held:
            fail(StoreUnavailable("the test failed this commit")).chainDeferred(d)


class DownStore(MemoryStore):
    """A MemoryStore that says it is unavailable."""

    available = False


class CountingTransport(StringTransport):
    """A StringTransport that counts its writes."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


@attrs.define(eq=False)
class Client:
    """
    One connection: what the test sends, and the packets the server wrote.
    """

    protocol: MQTTServerProtocol
    transport: CountingTransport
    _decoder: Decoder = attrs.Factory(lambda: Decoder(1 << 28))

    def send(self, *packets: p.Packet) -> None:
        self.protocol.dataReceived(encode_all(packets))

    def received(self) -> list[p.Packet]:
        """Packets written since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return self._decoder.feed(data)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        """The network connection drops."""
        self.protocol.connectionLost(None)

    def connect(self, client_id: str, clean: bool = True, **kw: object) -> list[p.Packet]:
        self.send(p.Connect(client_id, clean_session=clean, **kw))  # type: ignore[arg-type]
        return self.received()


@attrs.define(eq=False)
class Harness:
    store: IStore = attrs.Factory(MemoryStore)
    authorizer: IAuthorizer = attrs.Factory(AllowEverything)
    app: IApplication | None = None
    clock: Clock = attrs.Factory(Clock)
    metrics: Metrics = attrs.Factory(Metrics)
    portal: Portal = attrs.Factory(lambda: portal_for(AllowEveryone()))
    limits: Limits = attrs.Factory(Limits)
    retained: RetainedLimits = attrs.Factory(RetainedLimits)
    # A plain broker's (see Broker); False for an application's.
    plain: bool = True
    gate: ISessionGate | None = None
    broker: Broker = attrs.field(init=False)
    bans: Bans = attrs.field(init=False)
    factory: MQTTFactory = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.broker = Broker(
            self.store,
            self.authorizer,
            self.metrics,
            self.clock,
            retained_limits=self.retained,
            route_offline=self.plain,
            clean_in_memory=self.plain,
            gate=self.gate,
        )
        self.bans = Bans(self.store, self.broker, self.clock)
        self.factory = self.make_factory()

    def make_factory(self) -> MQTTFactory:
        return MQTTFactory(
            self.broker,
            self.portal,
            self.authorizer,
            self.app,
            self.clock,
            self.metrics,
            self.limits,
            bans=self.bans,
        )

    def client(self) -> Client:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
        transport = CountingTransport()
        protocol.makeConnection(transport)
        return Client(protocol, transport)
