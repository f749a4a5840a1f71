"""
One MQTT 3.1.1 connection: the state machine between the codec and the
broker.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, cast

import attrs
from twisted.cred.credentials import Anonymous, ICredentials, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    ILoggingContext,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..failures import logged
from ..logs import ThrottledLog
from ..metrics import Metrics
from ..store.interfaces import Message, StoreUnavailable
from . import packets as p
from . import send
from .bans import Bans
from .batch import Batch
from .broker import Broker, OpenFailed
from .codec import Decoder, decode, encode_all, encode_puback
from .interfaces import (
    IApplication,
    IAuthorizer,
    IConnection,
    IdentifierRejected,
    IMQTTUser,
    ServiceUnavailable,
)
from .keepalive import Keepalives, Ring, forget
from .plan import Plan
from .session import Session

log = Logger()


class State(enum.Enum):
    """Where a connection is in its life; it only ever moves down this list."""

    # Only a CONNECT may come.
    AWAITING_CONNECT = enum.auto()
    # The CONNECT is being checked; what else arrives waits for the CONNACK.
    AUTHENTICATING = enum.auto()
    # CONNACK accepted sent; the session is attached.
    CONNECTED = enum.auto()
    # Closing or closed: nothing more is read or sent.
    CLOSED = enum.auto()


# The states by name, as the connection compares them several times a packet:
# reading a member off its Enum class takes 60 ns, a module global 15.
AWAITING_CONNECT, AUTHENTICATING, CONNECTED, CLOSED = State

# Inbound publishes awaiting their commit before the transport is paused.
_HIGH_WATER = 256
_LOW_WATER = 64


@attrs.frozen
class Limits:
    max_packet_size: int = 65536
    # Seconds for the CONNECT to arrive, then as long again for its login.
    connect_timeout: float = 10.0


@implementer(IProtocol, ILoggingContext, IConnection)
@attrs.define(eq=False, repr=False, weakref_slot=False)
class MQTTServerProtocol:
    """
    One client's connection, from its first byte to its close.

    Invariants:

    - The state only moves forward (see State); from any state it may jump
      to CLOSED, and a closed connection reads and sends nothing more.
    - The first CONNECT gets a CONNACK unless the connection is gone first:
      accepted, refused with the reason, or server unavailable when handling
      it failed or took longer than the connect timeout (counted from the
      CONNECT); a second CONNECT closes the connection.  Nothing else is
      sent before the CONNACK, and the session's resent messages follow it.
    - Packets that arrive while the CONNECT is being checked wait (more than
      _HIGH_WATER of them close the connection) and are handled in order
      once it is accepted.
    - A publish is acknowledged (PUBACK, PUBREC) only once what it causes is
      durable, and acknowledgements go out in the order the publishes came
      (the broker's commit pipeline); PUBCOMP never overtakes PUBREC.
    - Reading pauses while _HIGH_WATER publishes await the store and resumes
      at _LOW_WATER.
    - ``_session`` is the broker's session for this connection from the
      accepted CONNECT until the connection ends or is taken over.  The
      session is opened (read from the store) before the CONNACK; a store
      that does not answer in time gets CONNACK 3.
    - The will is published only when the connection ends otherwise than by
      DISCONNECT or the server stopping.
    - What is written while a Batch holds goes out, in order, at its end or
      before the connection closes, whichever comes first.
    - A connection with a keepalive is watched by the shared Keepalives
      from its CONNACK until it ends, filed in the ring ``_keepalive_filed``
      of the second its silence runs out in, as of the last read that
      completed a packet.
    """

    # Not a twisted Protocol, whose instances each have a __dict__: what it
    # would give is here, in slots like every other attribute.
    factory: Any = attrs.field(default=None, init=False)
    transport: ITransport | None = attrs.field(default=None, init=False)

    _broker: Broker
    _portal: Portal
    _authorizer: IAuthorizer
    _app: IApplication | None
    _clock: IReactorTime
    _metrics: Metrics
    _limits: Limits
    _bans: Bans = attrs.field(kw_only=True)
    _batch: Batch = attrs.field(kw_only=True)
    _keepalives: Keepalives = attrs.field(kw_only=True)
    # Only while a packet is part-read.
    _decoder: Decoder | None = None
    _state: State = AWAITING_CONNECT
    # Packets that came while the CONNECT was being checked.
    _waiting: list[p.Packet] | None = None
    # Output held by the batch.
    _out: list[bytes] | None = None
    # The connect and login timeouts.
    _timer: IDelayedCall | None = None
    # Seconds, as the CONNECT said: the client may be silent 1.5 times as long.
    _keepalive: int = 0
    _keepalive_filed: Ring | None = None
    # Its neighbours in that ring, Keepalives' to set.
    keepalive_prev: Any = None
    keepalive_next: Any = None
    _user: IMQTTUser | None = None
    _client_id: str = ""
    _session: Session | None = None
    _will: p.Will | None = None
    _unacknowledged: int = 0
    _paused: bool = False
    # What the CONNECT claimed to be (its username, else its client id).
    _claimed: str | None = None
    # Shared by every connection: what clients do before a login, and their
    # takeovers, are logged sparingly.
    _before_login: ThrottledLog = attrs.field(kw_only=True)
    _takeovers: ThrottledLog = attrs.field(kw_only=True)

    # -- transport events ---------------------------------------------------

    def logPrefix(self) -> str:
        return type(self).__name__

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            # Output is already one write per batch: Nagle's algorithm would
            # only hold a batch back until the one before is acknowledged.
            cast(ITCPTransport, self.transport).setTcpNoDelay(True)
        self._metrics.connections.inc()
        if isinstance(self.factory, MQTTFactory):
            self.factory.opened(self)
        self._timer = self._clock.callLater(self._limits.connect_timeout, self._connect_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._state == CLOSED:
            return
        self._batch.hold(reading=True)
        try:
            self._received(data)
        finally:
            self._batch.release()

    def _received(self, data: bytes) -> None:
        decoder = self._decoder
        try:
            if decoder is None:
                received, self._decoder = decode(data, self._limits.max_packet_size)
            else:
                received = decoder.feed(data)
                if not decoder.pending:
                    self._decoder = None
        except p.UnacceptableProtocolLevel as e:
            if self._state == AWAITING_CONNECT:
                self._write([p.ConnAck(p.REFUSED_PROTOCOL_VERSION)])
            self._close(f"unacceptable protocol level {e.level}")
            return
        except p.UnusableIdentifier as e:
            if self._state == AWAITING_CONNECT:
                self._refuse(p.REFUSED_IDENTIFIER, "bad_user_id")
            else:
                self._close(f"malformed packet: {e}")
            return
        except p.PacketTooLarge as e:
            self._metrics.dropped.labels("packet_too_large").inc()
            self._close(str(e))
            return
        except p.ProtocolError as e:
            self._close(f"malformed packet: {e}")
            return
        if received and self._keepalive_filed is not None:
            self._keepalive_filed = self._keepalives.watch(
                self, self._clock.seconds() + self._keepalive * 1.5, self._keepalive_filed
            )
        for packet in received:
            if self._state == CLOSED:
                return
            if self._state == AUTHENTICATING:
                if self._waiting is None:
                    self._waiting = []
                if len(self._waiting) >= _HIGH_WATER:
                    self._close("too many packets before CONNACK")
                    return
                self._waiting.append(packet)
            else:
                self._dispatch(packet)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._metrics.connections.dec()
        if isinstance(self.factory, MQTTFactory):
            self.factory.closed(self)
        self._state = CLOSED
        self._out = None
        self._cancel_timer()
        forget(self)
        if self._will is not None:
            # Only DISCONNECT clears the will: any other loss is abnormal.
            self._publish_will(self._will)
        if self._session is not None:
            self._broker.disconnected(self._session, self)
            self._session = None

    # -- IConnection --------------------------------------------------------

    def send(self, packets: list[p.Packet]) -> None:
        if self._state == CONNECTED:
            self._write(packets)

    def server_stopping(self) -> None:
        # Wills announce a client's failure; a server going down is not one,
        # and the store is closing behind it.
        self._will = None
        self._close("the server is stopping")

    def take_over(self) -> None:
        self._takeovers.info(
            "Client {client} connected again; closing its old connection", client=self._client_id
        )
        self._session = None
        self._close(None)

    def end(self, why: str) -> None:
        self._close(why)

    # -- helpers ------------------------------------------------------------

    def _write(self, packets: list[p.Packet]) -> None:
        self._write_bytes(encode_all(packets))

    def _write_bytes(self, data: bytes) -> None:
        if self.transport is None:
            return
        if not self._batch.holding:
            send.write(self.transport, data)
        elif self._out is None:
            self._out = [data]
            self._batch.held(self)
        else:
            self._out.append(data)

    def flush(self) -> None:
        """Write the output the batch held."""
        out, self._out = self._out, None
        if out and self.transport is not None:
            data = b"".join(out)
            if self._batch.reading:
                self.transport.write(data)
            else:
                send.write(self.transport, data)

    def _close(self, why: str | None) -> None:
        if why is not None and self._user is None:
            # Anyone can cause this, as often as they like.
            self._before_login.info(
                "Closed a connection from {peer} before a login: {why}", peer=self._peer(), why=why
            )
        elif why is not None:
            log.info("Closing connection of {client!r}: {why}", client=self._client_id, why=why)
        self._state = CLOSED
        # What was written before the close goes out before it.
        self.flush()
        if self.transport is not None:
            self.transport.loseConnection()

    def _peer(self) -> str:
        address = None if self.transport is None else self.transport.getPeer()
        if isinstance(address, IPv4Address | IPv6Address):
            return f"{address.host}:{address.port}"
        return str(address)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _connect_timed_out(self) -> None:
        self._timer = None
        self._close("no CONNECT in time")

    def keepalive_expired(self) -> None:
        if self._state != CLOSED:
            self._close("keepalive expired")

    def _dispatch(self, packet: p.Packet) -> None:
        if self._state == AWAITING_CONNECT:
            if isinstance(packet, p.Connect):
                self._on_connect(packet)
            else:
                self._close(f"{type(packet).__name__} before CONNECT")
            return
        handler = self._handlers.get(type(packet))
        if handler is None:
            self._close(f"unexpected {type(packet).__name__}")
            return
        handler(self, packet)

    # -- CONNECT ------------------------------------------------------------

    def _on_connect(self, connect: p.Connect) -> None:
        self._state = AUTHENTICATING
        self._claimed = connect.client_id if connect.username is None else connect.username
        # The CONNECT came in time: its login gets a time of its own (the
        # auth hook times out sooner), and whatever happens, a CONNACK.
        self._cancel_timer()
        self._timer = self._clock.callLater(self._limits.connect_timeout, self._login_timed_out)
        Deferred.fromCoroutine(self._login(connect)).addErrback(self._login_failed)

    def _login_timed_out(self) -> None:
        self._timer = None
        self._refuse(p.REFUSED_SERVER_UNAVAILABLE, "auth_unavailable")

    def _login_failed(self, failure: Failure) -> None:
        if self._state != AUTHENTICATING:
            self._unexpected(failure, "CONNECT handling failed")
            return
        # A bug, not the client's doing: still, every CONNECT gets a CONNACK.
        log.failure("CONNECT handling failed", failure)
        self._refuse(p.REFUSED_SERVER_UNAVAILABLE, "internal_error")

    def _refuse(self, code: int, reason: str) -> None:
        if self._state == CLOSED:
            return  # Timed out already, or the client left: nobody to answer.
        self._metrics.auth_failures.labels(reason).inc()
        self._before_login.info(
            "Refused a login from {peer} as {user_id!r}: {reason} (CONNACK {code})",
            peer=self._peer(),
            user_id=self._claimed,
            reason=reason,
            code=code,
        )
        self._write([p.ConnAck(code)])
        self._close(None)

    async def _login(self, connect: p.Connect) -> None:
        client_id = connect.client_id
        if not client_id:
            if not connect.clean_session:
                self._refuse(p.REFUSED_IDENTIFIER, "empty_client_id")
                return
            client_id = "auto-" + uuid.uuid4().hex
        credentials: ICredentials = (
            Anonymous()
            if connect.username is None
            else UsernamePassword(connect.username.encode(), connect.password or b"")
        )
        try:
            _, avatar, _ = await self._portal.login(credentials, None, IMQTTUser)
            user = IMQTTUser(avatar)
        except UnhandledCredentials:
            # No checker takes a CONNECT without a username: it has none to show.
            self._refuse(p.REFUSED_BAD_CREDENTIALS, "missing_credentials")
            return
        except IdentifierRejected:
            self._refuse(p.REFUSED_IDENTIFIER, "bad_user_id")
            return
        except UnauthorizedLogin:
            self._refuse(p.REFUSED_BAD_CREDENTIALS, "bad_credentials")
            return
        except ServiceUnavailable:
            self._refuse(p.REFUSED_SERVER_UNAVAILABLE, "auth_unavailable")
            return
        if self._state == CLOSED:
            return
        code = self._authorizer.check_client_id(user, client_id)
        if code:
            self._refuse(code, "client_id")
            return
        banned: bool | None
        try:
            banned = await self._bans.banned(client_id)
        except StoreUnavailable:
            banned = None  # Cannot tell.
        if self._state == CLOSED:
            return
        if banned is None:
            self._refuse(p.REFUSED_SERVER_UNAVAILABLE, "store_unavailable")
            return
        if banned:
            self._refuse(p.REFUSED_NOT_AUTHORIZED, "banned")
            return
        self._user, self._client_id = user, client_id
        try:
            session, present = await self._broker.open(client_id, connect.clean_session, self)
        except OpenFailed as e:
            log.warn("CONNECT of {client} refused: {why}", client=client_id, why=str(e))
            if self._state != CLOSED:
                self._refuse(p.REFUSED_SERVER_UNAVAILABLE, e.reason)
            return
        if self._state == CLOSED:
            # Gone while its session was being opened.
            self._broker.disconnected(session, self)
            return
        self._session = session
        if connect.will is not None:
            if self._authorizer.accept_will(user, client_id, connect.will):
                self._will = connect.will
            else:
                self._metrics.dropped.labels("will_not_allowed").inc()
        self._state = CONNECTED
        self._metrics.logins.inc()
        self._cancel_timer()
        if connect.keepalive:
            self._keepalive = connect.keepalive
            self._keepalive_filed = self._keepalives.watch(
                self, self._clock.seconds() + connect.keepalive * 1.5
            )
        self._batch.hold()
        try:
            # CONNACK must precede what the session resends.
            self.send([p.ConnAck(p.ACCEPTED, present)])
            self._broker.resume(session)
            waiting, self._waiting = self._waiting or [], None
            for packet in waiting:
                if self._state != CONNECTED:
                    break
                self._dispatch(packet)
        finally:
            self._batch.release()

    def _unexpected(self, failure: Failure, what: str) -> None:
        log.failure(what, failure)
        if self._state != CLOSED:
            self._close(what)

    # -- PUBLISH ------------------------------------------------------------

    def _on_publish(self, publish: p.Publish) -> None:
        session = self._session
        assert session is not None and self._user is not None
        plan = Plan()
        if publish.qos:
            # First among the effects: the publisher hears PUBACK/PUBREC before
            # anything its publish causes (such as a `sent` frame).
            plan.add(None, _Acknowledge(self, publish))
        pid = publish.packet_id
        if publish.qos == 2 and pid in session.inbound:
            pass  # A resent QoS 2 publish: answered, never delivered twice.
        elif not self._authorizer.may_publish(self._user, self._client_id, publish.topic):
            self._metrics.dropped.labels("publish_not_allowed").inc()
            if publish.qos == 2:
                assert pid is not None
                session.hold_inbound(plan, pid)
        else:
            message = Message(publish.topic, publish.payload, publish.qos, publish.retain)
            if self._app is not None and self._app.owns(publish.topic):
                self._app.handle(self._client_id, message, plan)
            else:
                self._batch.routed += 1
                self._broker.route(plan, message)
            if publish.qos == 2:
                assert pid is not None
                session.hold_inbound(plan, pid)
        if self._broker.apply_now(plan):
            return
        self._track(+1)
        self._broker.commit_batched(plan).addCallbacks(self._committed, self._not_committed)

    def _committed(self, _: object) -> None:
        self._track(-1)

    def _not_committed(self, failure: Failure) -> None:
        self._unexpected(failure, "Could not commit a publish")

    def _acknowledge(self, publish: p.Publish) -> None:
        if publish.qos == 1:
            assert publish.packet_id is not None
            if self._state == CONNECTED:
                self._write_bytes(encode_puback(publish.packet_id))
        elif publish.qos == 2:
            assert publish.packet_id is not None
            self.send([p.PubRec(publish.packet_id)])

    def _track(self, delta: int) -> None:
        # Back-pressure: stop reading while too many publishes await the store.
        self._unacknowledged += delta
        if self.transport is None:
            return
        if not self._paused and self._unacknowledged >= _HIGH_WATER:
            self._paused = True
            IPushProducer(self.transport).pauseProducing()
        elif self._paused and self._unacknowledged <= _LOW_WATER:
            self._paused = False
            IPushProducer(self.transport).resumeProducing()

    def _on_pubrel(self, pubrel: p.PubRel) -> None:
        assert self._session is not None
        self._session.release_inbound(pubrel.packet_id)
        # Behind any commit still under way, so PUBCOMP never overtakes PUBREC.
        self._broker.barrier().addCallback(lambda _: self.send([p.PubComp(pubrel.packet_id)]))

    # -- acknowledgements of what the server sent ---------------------------

    def _on_puback(self, puback: p.PubAck) -> None:
        assert self._session is not None
        self._session.acknowledged(puback.packet_id, 1)

    def _on_pubcomp(self, pubcomp: p.PubComp) -> None:
        assert self._session is not None
        self._session.acknowledged(pubcomp.packet_id, 2)

    def _on_pubrec(self, pubrec: p.PubRec) -> None:
        assert self._session is not None

        def answer(known: bool) -> None:
            if known:
                self.send([p.PubRel(pubrec.packet_id)])

        self._session.received(pubrec.packet_id).addCallback(answer).addErrback(
            self._unexpected, "Could not record a PUBREC"
        )

    # -- subscriptions ------------------------------------------------------

    def _on_subscribe(self, subscribe: p.Subscribe) -> None:
        session, user = self._session, self._user
        assert session is not None and user is not None
        codes: list[int] = []
        granted: list[tuple[str, int]] = []
        for filter_, requested in subscribe.topics:
            qos = self._authorizer.grant(user, self._client_id, filter_, requested)
            codes.append(qos)
            if qos != p.SUBSCRIBE_FAILURE:
                granted.append((filter_, qos))

        def subscribed(_: object) -> Deferred[None]:
            self.send([p.SubAck(subscribe.packet_id, tuple(codes))])
            return self._broker.deliver_retained(session, granted)

        self._broker.subscribe(session, granted).addCallback(subscribed).addErrback(
            self._unexpected, "Could not subscribe"
        )

    def _on_unsubscribe(self, unsubscribe: p.Unsubscribe) -> None:
        assert self._session is not None
        self._broker.unsubscribe(self._session, unsubscribe.filters).addCallback(
            lambda _: self.send([p.UnsubAck(unsubscribe.packet_id)])
        ).addErrback(self._unexpected, "Could not unsubscribe")

    # -- the rest -----------------------------------------------------------

    def _on_pingreq(self, _: p.PingReq) -> None:
        self.send([p.PingResp()])

    def _on_connect_again(self, _: p.Connect) -> None:
        self._close("second CONNECT")

    def _on_disconnect(self, _: p.Disconnect) -> None:
        self._will = None
        self._close("DISCONNECT")

    def _publish_will(self, will: p.Will) -> None:
        plan = Plan()
        self._broker.route(plan, Message(will.topic, will.message, will.qos, will.retain))
        self._broker.commit(plan).addErrback(logged(log, "Publishing a will failed"))

    _handlers: ClassVar[dict[type, Callable[[Any, Any], None]]] = {
        p.Publish: _on_publish,
        p.PubAck: _on_puback,
        p.PubRec: _on_pubrec,
        p.PubRel: _on_pubrel,
        p.PubComp: _on_pubcomp,
        p.Subscribe: _on_subscribe,
        p.Unsubscribe: _on_unsubscribe,
        p.PingReq: _on_pingreq,
        p.Connect: _on_connect_again,
        p.Disconnect: _on_disconnect,
    }


@attrs.define(eq=False)
class _Acknowledge:
    """
    A publish's first effect: an object, not a closure, as are the effects
    made for each message in flight (see Broker).
    """

    _protocol: MQTTServerProtocol
    _publish: p.Publish

    def __call__(self, _: object) -> None:
        self._protocol._acknowledge(self._publish)


@attrs.define(eq=False, repr=False)
class MQTTFactory(Factory):
    """
    Builds a protocol per connection and knows every live one, so that a
    stopping server can close them.
    """

    _broker: Broker
    _portal: Portal
    _authorizer: IAuthorizer
    _app: IApplication | None
    _clock: IReactorTime
    _metrics: Metrics
    _limits: Limits = attrs.Factory(Limits)
    _bans: Bans = attrs.field(kw_only=True)
    # A dict, not a set: with thousands of entries a set takes 30 to 100 bytes
    # each, a dict 30 to 50.
    _live: dict[MQTTServerProtocol, None] = attrs.Factory(dict)
    _before_login: ThrottledLog = attrs.field(init=False)
    _takeovers: ThrottledLog = attrs.field(init=False)
    _keepalives: Keepalives = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._keepalives = Keepalives(self._clock)
        self._before_login = ThrottledLog(
            log,
            self._clock,
            "{count} more refused logins (or connections closed before a login) in {seconds} s,"
            " not logged one by one; sktalent_auth_failures_total counts the logins",
        )
        self._takeovers = ThrottledLog(
            log,
            self._clock,
            "{count} more clients connected again, closing their old connections, in"
            " {seconds} s, not logged one by one",
        )

    def buildProtocol(self, addr: object) -> MQTTServerProtocol:
        protocol = MQTTServerProtocol(
            self._broker,
            self._portal,
            self._authorizer,
            self._app,
            self._clock,
            self._metrics,
            self._limits,
            bans=self._bans,
            before_login=self._before_login,
            takeovers=self._takeovers,
            batch=self._broker.batch,
            keepalives=self._keepalives,
        )
        protocol.factory = self
        return protocol

    def opened(self, protocol: MQTTServerProtocol) -> None:
        self._live[protocol] = None

    def closed(self, protocol: MQTTServerProtocol) -> None:
        self._live.pop(protocol, None)

    def close_all(self) -> None:
        """Close every connection: the server is stopping, not the clients failing."""
        for protocol in list(self._live):
            protocol.server_stopping()
        self._before_login.stop()
        self._takeovers.stop()
        self._keepalives.stop()
