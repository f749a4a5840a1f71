"""
The CallTalent application on the MQTT core: the envelope of seed section 2,
chat with sent and received (section 4), notifications (section 5), each with
the push notice that delivery.py sends while it goes unacknowledged, and what
operators ask of a user's session.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
from prometheus_client import Counter
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..failures import logged
from ..metrics import Metrics
from ..mqtt.bans import Bans
from ..mqtt.interfaces import IApplication, IBroker, SessionStatus, Ticket
from ..mqtt.plan import Plan
from ..push.interfaces import IPusher, PushNotice
from ..store.interfaces import (
    ChatRecord,
    Device,
    DropDevice,
    InsertChat,
    Inserted,
    IStore,
    LogOut,
    MarkReceived,
    Message,
    PutDevice,
    StoreUnavailable,
)
from .auth import valid_user_id
from .delivery import chat_notice, encode_notice
from .interfaces import ICallTalent, InvalidRequest, QueueFull, SessionInfo
from .notifications import ID_RULE, bounded_id, validate_notification, validate_user_id
from .pushtexts import PushTexts
from .rules import SERVER_TOPIC, client_topic

if TYPE_CHECKING:
    from ..cluster.interfaces import Holder
    from ..cluster.node import ClusterNode

log = Logger()

_MSGID = re.compile(r"[0-9a-fA-F]{24}")
# Any surrogate in a decoded str is a lone one: JSON pairs become one character.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Compact UTF-8 JSON, as the apps send it.
_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# A str as _json writes it: the frames of every chat are written with it, at
# a fifth of the cost of _json (whose encoder is made anew for each call).
_string = json.encoder.encode_basestring
# One decoder for every message: json.loads with an option makes one a call.
_decode = json.JSONDecoder(parse_constant=lambda constant: _not_json(constant)).decode

_HEALTH_TIMEOUT = 2.0

# Frames that answer a user's own actions (its chat kept or read, its
# message refused) may use its queue's headroom, then are dropped and
# counted: the chat they are about is kept either way, and a refusal
# cannot be refused in turn.  Chats and notifications are refused at the
# limit instead, where the store commits them, before anything is promised.
_OWN_FRAMES = frozenset({"sent", "received", "error"})
# `received` receipts have a bucket of their own, this many times the chat rate.
_RECEIPTS_PER_CHAT = 10
# Past the rate a sender hears rate_limited at most this often, in seconds.
_WARN_EVERY = 1.0


def new_msgid(now: float) -> str:
    """A msgid of the ObjectId form clients use (seed section 2)."""
    return (int(now) & 0xFFFFFFFF).to_bytes(4, "big").hex() + os.urandom(8).hex()


class Refusal(Exception):
    def __init__(self, code: str, message: str, msgid: str = "") -> None:
        super().__init__(message)
        self.code, self.msgid = code, msgid


@attrs.frozen
class AppLimits:
    max_content: int = 4000
    # Token bucket per sender: sustained messages per second and burst.
    rate: float = 20.0
    burst: float = 60.0


@attrs.define(eq=False)
class _Bucket:
    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, now: float) -> bool:
        """Take a token if there is one."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@attrs.define(eq=False)
class _Sender:
    """What the rate limits remember of one sender."""

    chats: _Bucket
    receipts: _Bucket
    seen: float
    warned: float = -math.inf


def _is_new(outcome: object) -> bool:
    return outcome is Inserted.NEW


# The effects made for each chat are objects, not closures, as in the broker.


@attrs.define(eq=False)
class _Counted:
    _app: CallTalent
    _ticket: Ticket
    _counter: Counter
    _since: float | None

    def __call__(self, _: object) -> None:
        self._app._counted(self._ticket, self._counter, self._since)


@attrs.define(eq=False)
class _NotNew:
    _app: CallTalent
    _sender: str
    _echo: str
    _sent: bytes
    _arrived: float

    def __call__(self, found: Inserted) -> None:
        self._app._not_new(found, self._sender, self._echo, self._sent, self._arrived)


@attrs.frozen
class ChatPayload:
    o_id: str
    expert: bool
    content: str

    def digest(self) -> str:
        """What tells a retransmission from a msgid reused for other content."""
        # _json([o_id, expert, content]), as digests stored before were made.
        expert = "true" if self.expert else "false"
        text = f"[{_string(self.o_id)},{expert},{_string(self.content)}]".encode()
        return hashlib.blake2b(text, digest_size=16).hexdigest()


@attrs.frozen
class _Envelope:
    """A client's message as checked: only the fields of seed section 2."""

    # Lower case: the msgid as stored and forwarded.
    msgid: str
    # As the client wrote it: what answers to the sender carry.
    echo: str
    sender: str
    to: str
    kind: str
    payload: ChatPayload | None = None


def chat_frame(msgid: str, sender: str, to: str, payload: ChatPayload, received_at: int) -> str:
    """
    The chat as delivered: exactly the documented fields, nothing else a
    client sent.  Written as _json would write it, without building it.
    """
    expert = "true" if payload.expert else "false"
    return (
        f'{{"msgid":{_string(msgid)},"from":{_string(sender)},"to":{_string(to)},'
        f'"type":"order_chat","payload":{{"o_id":{_string(payload.o_id)},"expert":{expert},'
        f'"content":{_string(payload.content)},"t":"{received_at}"}}}}'
    )


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")


def _lone_surrogate(value: object) -> bool:
    """Whether a string anywhere in the parsed JSON value, key or not, holds one."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _text_field(payload: Mapping[str, Any], name: str, msgid: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise Refusal("bad_payload", f"payload.{name} must be a non-empty string", msgid)
    return value


@implementer(IApplication, ICallTalent)
@attrs.define(eq=False)
class CallTalent:
    _broker: IBroker
    _store: IStore
    _pusher: IPusher
    _clock: IReactorTime
    metrics: Metrics
    _limits: AppLimits = AppLimits()
    _texts: PushTexts = attrs.Factory(PushTexts)
    # Least recently seen first, so the idle are forgotten cheaply.
    _senders: OrderedDict[str, _Sender] = attrs.Factory(OrderedDict)
    # This server's name, for operators.
    node: str = attrs.field(factory=socket.gethostname, kw_only=True)
    _bans: Bans = attrs.field(kw_only=True)
    # In a cluster, the node that knows who is connected where.
    cluster: ClusterNode | None = attrs.field(default=None, kw_only=True)
    _counters: dict[tuple[Counter, str], Counter] = attrs.Factory(dict)

    # -- IApplication: what clients publish --------------------------------

    def owns(self, topic: str) -> bool:
        return topic == SERVER_TOPIC

    def handle(self, client_id: str, message: Message, plan: Plan) -> None:
        now = self._clock.seconds()
        sender = self._sender(client_id, now)
        try:
            envelope = self._parse(client_id, message.payload)
        except Refusal as refusal:
            # Refusals count against the chat rate like chats do.
            if sender.chats.take(now):
                self._refuse(plan, client_id, refusal)
            else:
                self._over_rate(plan, client_id, sender, now, refusal.msgid)
            return
        kind = envelope.kind
        if not (sender.receipts if kind == "received" else sender.chats).take(now):
            self._over_rate(plan, client_id, sender, now, envelope.echo)
            return
        self._counter(self.metrics.messages_in, kind).inc()
        if kind == "order_chat":
            self._chat(plan, envelope)
        else:
            self._received(plan, envelope)

    def _parse(self, client_id: str, raw: bytes) -> _Envelope:
        try:
            text = raw.decode("utf-8")
            parsed = _decode(text)
        except (ValueError, RecursionError):  # RecursionError: absurd nesting
            raise Refusal("bad_json", "the message is not UTF-8 JSON") from None
        written = parsed.get("msgid") if isinstance(parsed, dict) else None
        msgid = written if isinstance(written, str) else ""
        well_formed = _MSGID.fullmatch(msgid) is not None
        # UTF-8 carries no surrogate: only a \\u escape can make one.
        if "\\u" in text and _lone_surrogate(parsed):
            raise Refusal(
                "bad_json",
                "the message holds a lone surrogate, which is not Unicode text",
                msgid if well_formed else "",
            )
        if not isinstance(parsed, dict):
            raise Refusal("bad_envelope", "the message must be a JSON object")
        if not well_formed:
            raise Refusal("bad_msgid", "msgid must be 24 hex characters", msgid)
        if parsed.get("from") != client_id:
            raise Refusal("from_mismatch", "from must be your own userID", msgid)
        kind = parsed.get("type")
        if kind not in ("order_chat", "received"):
            raise Refusal("unknown_type", "type must be order_chat or received", msgid)
        to = parsed.get("to")
        if not isinstance(to, str) or not valid_user_id(to) or to == client_id:
            raise Refusal("bad_envelope", "to must be another user's userID", msgid)
        if kind == "received":
            return _Envelope(msgid.lower(), msgid, client_id, to, kind)
        payload = parsed.get("payload")
        if not isinstance(payload, dict):
            raise Refusal("bad_payload", "payload must be a JSON object", msgid)
        o_id = _text_field(payload, "o_id", msgid)
        if bounded_id(o_id) is None:
            raise Refusal("bad_payload", f"payload.o_id must be {ID_RULE}", msgid)
        expert = payload.get("expert")
        if not isinstance(expert, bool):
            raise Refusal("bad_payload", "payload.expert must be true or false", msgid)
        content = _text_field(payload, "content", msgid)
        if len(content) > self._limits.max_content:
            raise Refusal(
                "too_large",
                f"payload.content is longer than {self._limits.max_content} characters",
                msgid,
            )
        return _Envelope(
            msgid.lower(), msgid, client_id, to, kind, ChatPayload(o_id, expert, content)
        )

    def _sender(self, client_id: str, now: float) -> _Sender:
        """client_id's rate state, made most recently seen."""
        limits = self._limits
        # Buckets idle this long are full again and a warning this old has
        # expired: such a sender is as good as new, so it is forgotten.
        idle = max(limits.burst / limits.rate, _WARN_EVERY)
        while self._senders:
            oldest = next(iter(self._senders.values()))
            if now - oldest.seen < idle:
                break
            self._senders.popitem(last=False)
        sender = self._senders.pop(client_id, None)
        if sender is None:
            n = _RECEIPTS_PER_CHAT
            sender = _Sender(
                _Bucket(limits.rate, limits.burst, limits.burst, now),
                _Bucket(limits.rate * n, limits.burst * n, limits.burst * n, now),
                now,
            )
        sender.seen = now
        self._senders[client_id] = sender
        return sender

    def rate_state(self, client_id: str) -> str | None:
        """client_id's rate limits as they are now, for the node it connects to next."""
        sender = self._senders.get(client_id)
        if sender is None:
            return None
        now = self._clock.seconds()
        return _json(
            [
                sender.chats.tokens,
                sender.receipts.tokens,
                now - sender.chats.at,
                now - sender.warned,
            ]
        )

    def seed_rate(self, client_id: str, state: str) -> None:
        """Continue client_id's rate limits from rate_state() of another node."""
        try:
            chats, receipts, age, warned = (float(x) for x in json.loads(state))
        except (ValueError, TypeError):
            log.warn(
                "Ignored a bad rate state for {client}: {state!r}", client=client_id, state=state
            )
            return
        now = self._clock.seconds()
        sender = self._sender(client_id, now)
        # Ages, not times: the nodes' clocks need not agree.
        sender.chats.tokens, sender.chats.at = chats, now - age
        sender.receipts.tokens, sender.receipts.at = receipts, now - age
        sender.warned = now - warned

    def _over_rate(
        self, plan: Plan, client_id: str, sender: _Sender, now: float, msgid: str
    ) -> None:
        if now - sender.warned < _WARN_EVERY:
            # Warned already: counted only, neither stored nor logged.
            self._counter(self.metrics.refusals, "rate_limited").inc()
            return
        sender.warned = now
        self._refuse(
            plan, client_id, Refusal("rate_limited", "too many messages; slow down", msgid)
        )

    def _send(
        self,
        plan: Plan,
        user_id: str,
        frame: Mapping[str, Any] | bytes,
        kind: str,
        notice: str | None = None,
        since: float | None = None,
        required: bool = False,
    ) -> Ticket:
        """
        Queue frame (or its JSON bytes) durably for user_id's own topic; with
        a notice (encode_notice), to be pushed while it goes unacknowledged.  A chat or
        notification is ``required``: without room nothing is kept and the
        caller refuses it; a frame of _OWN_FRAMES past the headroom is
        dropped and counted.  since, when given, is when the message the
        frame answers arrived.
        """
        body = frame if isinstance(frame, bytes) else _json(frame).encode()
        message = Message(client_topic(user_id), body, 1)
        own = kind in _OWN_FRAMES
        ticket = self._broker.enqueue(
            plan, user_id, message, headroom=own, notice=notice, required=required
        )
        counter = self._counter(self.metrics.messages_out, kind)
        plan.add(None, _Counted(self, ticket, counter, since))
        return ticket

    def _counted(self, ticket: Ticket, counter: Counter, since: float | None) -> None:
        """A frame's plan is durable: count it, unless it was refused."""
        if ticket.full:
            return
        counter.inc()
        if since is not None:
            # The queueing effect before this one has written the frame,
            # unless the client's window is full.
            self.metrics.sent_latency.observe(self._clock.seconds() - since)

    def _counter(self, family: Counter, label: str) -> Counter:
        # Looking a label up costs more than counting: keep what was found.
        key = (family, label)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = family.labels(label)
        return counter

    def _send_later(
        self,
        user_id: str,
        frame: Mapping[str, Any] | bytes,
        kind: str,
        since: float | None = None,
    ) -> None:
        """Send frame in a commit of its own: an answer a store result decided."""
        plan = Plan()
        self._send(plan, user_id, frame, kind, since=since)
        self._broker.commit(plan).addErrback(
            logged(log, "Sending {kind} to {user} failed", kind=kind, user=user_id)
        )

    def _refusal(self, client_id: str, refusal: Refusal) -> dict[str, str]:
        """The error frame for refusal, counted and logged."""
        self._counter(self.metrics.refusals, refusal.code).inc()
        log.info(
            "Refused a message from {client}: {code} ({why})",
            client=client_id,
            code=refusal.code,
            why=str(refusal),
            msgid=refusal.msgid,
        )
        return {
            "msgid": refusal.msgid,
            "type": "error",
            "error": refusal.code,
            "message": str(refusal),
        }

    def _refuse(self, plan: Plan, client_id: str, refusal: Refusal) -> None:
        self._send(plan, client_id, self._refusal(client_id, refusal), "error")

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _chat(self, plan: Plan, envelope: _Envelope) -> None:
        payload = envelope.payload
        assert payload is not None
        sender, to = envelope.sender, envelope.to
        arrived = self._clock.seconds()
        received_at = int(arrived * 1000)
        text = chat_frame(envelope.msgid, sender, to, payload, received_at)
        body = text.encode()
        # The echo is 24 hex digits (_MSGID): nothing in it to escape.
        sent = f'{{"msgid":"{envelope.echo}","type":"sent"}}'.encode()
        chat = ChatRecord(envelope.msgid, sender, to, payload.o_id, text, received_at)
        inner = Plan()
        notice = chat_notice(envelope.msgid, payload.o_id, payload.content)
        self._send(inner, to, body, "order_chat", notice, required=True)
        self._send(inner, sender, sent, "sent", since=arrived)
        plan.add_guarded(
            InsertChat(chat, inner.ops, digest=payload.digest()),
            inner,
            _NotNew(self, sender, envelope.echo, sent, arrived),
            passed=_is_new,
        )

    def _not_new(
        self, found: Inserted, sender: str, echo: str, sent: bytes, arrived: float
    ) -> None:
        """Answer the sender for a chat not stored now, by what is stored."""
        if found is Inserted.REPEATED:
            # A retransmission: the sender did not see the first `sent`.
            self._send_later(sender, sent, "sent", arrived)
            return
        if found is Inserted.CONFLICT:
            refusal = Refusal(
                "duplicate_msgid",
                "you sent another message with this msgid; use a new msgid",
                echo,
            )
        else:
            # FULL: nothing is stored, so the chat is taken when sent again later.
            refusal = Refusal(
                "queue_full",
                "the recipient's queue is full; send it again later",
                echo,
            )
        self._send_later(sender, self._refusal(sender, refusal), "error")

    def _received(self, plan: Plan, envelope: _Envelope) -> None:
        msgid, recipient, sender = envelope.msgid, envelope.sender, envelope.to
        inner = Plan()
        self._send(inner, sender, {"msgid": msgid, "type": "received"}, "received")

        def unknown(_: object) -> None:
            refusal = Refusal(
                "unknown_message", f"no message {msgid} from {sender} to you", envelope.echo
            )
            self._send_later(recipient, self._refusal(recipient, refusal), "error")

        plan.add_guarded(
            MarkReceived(sender, msgid, recipient, self._now_ms(), inner.ops), inner, unknown
        )

    # -- ICallTalent: what the backend asks --------------------------------

    def notify(
        self, to: str, type: str, payload: Mapping[str, object], alert: str | None
    ) -> Deferred[str]:
        validate_user_id(to)
        validate_notification(type, payload)
        self._check_store()
        msgid = new_msgid(self._clock.seconds())
        plan = Plan()
        frame = {"msgid": msgid, "from": "system", "to": to, "type": type, "payload": dict(payload)}
        body = _json(frame).encode()
        notice = encode_notice(self._texts.notice(frame, alert))
        ticket = self._send(plan, to, body, type, notice, required=True)
        self._counter(self.metrics.messages_in, type).inc()

        def kept(_: object) -> str:
            if ticket.full:
                self._counter(self.metrics.refusals, "queue_full").inc()
                raise QueueFull(f"the queue of {to} is full; send the notification again later")
            return msgid

        return self._broker.commit(plan).addCallback(kept)

    def push_webview(
        self, users: Sequence[str] | None, tag: str | None, url: str, alert: str
    ) -> None:
        notice = PushNotice("webview", alert, url=url)
        if users is not None:
            self._pusher.push_to_users(users, notice)
        elif tag is not None:
            self._pusher.push_to_tag(tag, notice)
        else:
            raise InvalidRequest("bad_request", "give either to or tag")

    def register_device(self, device: Device) -> Deferred[None]:
        self._check_store()
        plan = Plan()
        plan.add(PutDevice(device))
        return self._broker.commit(plan)

    def log_out(self, user_id: str) -> Deferred[None]:
        validate_user_id(user_id, "userID")
        self._check_store()
        plan = Plan()
        plan.add(LogOut(user_id))
        return self._broker.commit(plan)

    def is_online(self, user_id: str) -> Deferred[bool]:
        if self.cluster is None:
            return succeed(self._broker.is_online(user_id))
        return Deferred.fromCoroutine(self.cluster.locate(user_id)).addCallback(
            lambda holder: holder is not None
        )

    def session_info(self, user_id: str) -> Deferred[SessionInfo | None]:
        return Deferred.fromCoroutine(self._session_info(user_id))

    async def _session_info(self, user_id: str) -> SessionInfo | None:
        # Connected to this node or another: in a cluster Redis knows, also
        # of a session another node opened and has not yet stored.
        status, holder = await self._status_and_holder(user_id)
        if self.cluster is not None:
            if status is None and holder is None:
                return None
            device = await self._store.get_device(user_id)
            return SessionInfo(
                online=holder is not None,
                node=None if holder is None else holder.node,
                connected_since=None if holder is None else holder.since,
                queued=0 if status is None else status.queued,
                oldest_queued_at=None if status is None else status.oldest_queued_at,
                platform=None if device is None else device.platform,
            )
        if status is None:
            return None
        device = await self._store.get_device(user_id)
        since = status.connected_since
        return SessionInfo(
            online=status.online,
            node=self.node if status.online else None,
            connected_since=None if since is None else int(since * 1000),
            queued=status.queued,
            oldest_queued_at=status.oldest_queued_at,
            platform=None if device is None else device.platform,
        )

    async def _status_and_holder(
        self, user_id: str, stored_is_enough: bool = False
    ) -> tuple[SessionStatus | None, Holder | None]:
        """
        The user's session status and, in a cluster, who holds its
        connection (not looked for when stored_is_enough and the store
        knows a session).  The store and Redis are asked at once; failures
        are as if they were asked one after the other: the store's first,
        Redis's only when its answer is used.
        """
        if self.cluster is None:
            return await self._broker.status(user_id), None
        located = Deferred.fromCoroutine(self.cluster.locate(user_id))
        try:
            status = await self._broker.status(user_id)
        except BaseException:
            located.addErrback(_unused)
            raise
        if status is not None and stored_is_enough:
            located.addErrback(_unused)
            return status, None
        return status, await located

    def disconnect(self, user_id: str, ban_seconds: int | None) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._disconnect(user_id, ban_seconds))

    async def _disconnect(self, user_id: str, ban_seconds: int | None) -> bool:
        # In a cluster, also one connected elsewhere whose session is not stored yet.
        status, holder = await self._status_and_holder(user_id, stored_is_enough=True)
        if status is None and holder is None:
            return False
        if ban_seconds is not None:
            self._check_store()
            plan = Plan()
            self._bans.set(plan, user_id, ban_seconds)
            # Durable first: a ban that could not be kept disconnects nobody.
            await self._broker.commit(plan)
        if self.cluster is not None:
            # Whichever node holds the connection closes it.
            await self.cluster.disconnect(user_id)
        else:
            self._broker.disconnect(user_id)
        return True

    def delete_user(self, user_id: str) -> Deferred[None]:
        self._check_store()
        plan = Plan()
        self._broker.remove(plan, user_id)
        plan.add(DropDevice(user_id))
        # No one could lift a ban on a user without a session.
        self._bans.set(plan, user_id, 0)
        self._senders.pop(user_id, None)
        return self._broker.commit(plan)

    def history(self, o_id: str, limit: int, before: str | None) -> Deferred[list[ChatRecord]]:
        return self._store.chat_history(o_id, limit, before)

    def _check_store(self) -> None:
        """
        Refuse backend calls at once while the store is down, rather than
        leave them waiting for it.
        """
        if not self._store.available:
            raise StoreUnavailable(f"the {self._store.name} store is unavailable")

    def health(self) -> Deferred[dict[str, bool]]:
        return Deferred.fromCoroutine(self._health())

    async def _health(self) -> dict[str, bool]:
        parts = {"store": await self._store_answers()}
        if self.cluster is not None:
            parts["redis"] = self.cluster.up
        return parts

    async def _store_answers(self) -> bool:
        try:
            self._check_store()
            # A health check must answer quickly even when the store does not.
            await self._store.ping().addTimeout(_HEALTH_TIMEOUT, self._clock)
        except Exception as e:  # noqa: BLE001 - whatever the failure, not healthy
            log.info("Health check: the store does not answer: {error!r}", error=e)
            return False
        return True


def _unused(failure: Failure) -> None:
    """A lookup whose answer is not used: its failure changes nothing either."""
