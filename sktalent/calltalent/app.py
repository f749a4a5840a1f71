"""
The CallTalent application on the MQTT core: the envelope of seed section 2,
chat with sent and received (section 4), notifications (section 5), and the
offline push that stands in for a missing connection.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from prometheus_client import Counter
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ..failures import logged
from ..metrics import Metrics
from ..mqtt.broker import Broker, Plan
from ..mqtt.interfaces import IApplication
from ..push.interfaces import IPusher, PushNotice
from ..store.interfaces import (
    ChatRecord,
    Device,
    InsertChat,
    IStore,
    LogOut,
    MarkReceived,
    Message,
    PutDevice,
    StoreUnavailable,
)
from .auth import valid_user_id
from .interfaces import ICallTalent, InvalidRequest
from .notifications import validate_notification, validate_user_id
from .pushtexts import PushTexts
from .rules import SERVER_TOPIC, client_topic

log = Logger()

_MSGID = re.compile(r"[0-9a-f]{24}\Z")
# Compact UTF-8 JSON, as the apps send it.
_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

_HEALTH_TIMEOUT = 2.0


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
    tokens: float
    at: float


def _text_field(payload: Mapping[str, Any], name: str, msgid: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise Refusal("bad_payload", f"payload.{name} must be a non-empty string", msgid)
    return value


@implementer(IApplication, ICallTalent)
@attrs.define(eq=False)
class CallTalent:
    _broker: Broker
    _store: IStore
    _pusher: IPusher
    _clock: IReactorTime
    metrics: Metrics
    _limits: AppLimits = AppLimits()
    _texts: PushTexts = attrs.Factory(PushTexts)
    _buckets: dict[str, _Bucket] = attrs.Factory(dict)
    _counters: dict[tuple[Counter, str], Counter] = attrs.Factory(dict)

    # -- IApplication: what clients publish --------------------------------

    def owns(self, topic: str) -> bool:
        return topic == SERVER_TOPIC

    def handle(self, client_id: str, message: Message, plan: Plan) -> None:
        try:
            envelope = self._parse(client_id, message.payload)
            self._take_token(client_id, envelope["msgid"])
        except Refusal as refusal:
            self._refuse(plan, client_id, refusal)
            return
        kind = envelope["type"]
        self._counter(self.metrics.messages_in, kind).inc()
        if kind == "order_chat":
            self._chat(plan, envelope)
        else:
            self._received(plan, envelope)

    def _parse(self, client_id: str, raw: bytes) -> dict[str, Any]:
        try:
            envelope = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: absurd nesting
            raise Refusal("bad_json", "the message is not UTF-8 JSON") from None
        if not isinstance(envelope, dict):
            raise Refusal("bad_envelope", "the message must be a JSON object")
        msgid = envelope.get("msgid")
        if not isinstance(msgid, str) or not _MSGID.match(msgid):
            raise Refusal(
                "bad_msgid",
                "msgid must be 24 lowercase hex characters",
                msgid if isinstance(msgid, str) else "",
            )
        if envelope.get("from") != client_id:
            raise Refusal("from_mismatch", "from must be your own userID", msgid)
        kind = envelope.get("type")
        if kind not in ("order_chat", "received"):
            raise Refusal("unknown_type", "type must be order_chat or received", msgid)
        to = envelope.get("to")
        if not isinstance(to, str) or not valid_user_id(to) or to == client_id:
            raise Refusal("bad_envelope", "to must be another user's userID", msgid)
        if kind == "order_chat":
            payload = envelope.get("payload")
            if not isinstance(payload, dict):
                raise Refusal("bad_payload", "payload must be a JSON object", msgid)
            _text_field(payload, "o_id", msgid)
            if not isinstance(payload.get("expert"), bool):
                raise Refusal("bad_payload", "payload.expert must be true or false", msgid)
            content = _text_field(payload, "content", msgid)
            if len(content) > self._limits.max_content:
                raise Refusal(
                    "too_large",
                    f"payload.content is longer than {self._limits.max_content} characters",
                    msgid,
                )
        return envelope

    def _take_token(self, client_id: str, msgid: str) -> None:
        now = self._clock.seconds()
        bucket = self._buckets.get(client_id)
        if bucket is None:
            bucket = self._buckets[client_id] = _Bucket(self._limits.burst, now)
        bucket.tokens = min(
            self._limits.burst, bucket.tokens + (now - bucket.at) * self._limits.rate
        )
        bucket.at = now
        if bucket.tokens < 1:
            raise Refusal("rate_limited", "too many messages; slow down", msgid)
        bucket.tokens -= 1

    def _send(self, plan: Plan, user_id: str, frame: Mapping[str, Any] | str, kind: str) -> None:
        """Queue frame (or its JSON text) durably for user_id's own topic."""
        self._broker.ensure_session(plan, user_id)
        body = (frame if isinstance(frame, str) else _json(frame)).encode()
        counter = self._counter(self.metrics.messages_out, kind)
        self._broker.route(plan, Message(client_topic(user_id), body, 1))
        plan.add(None, lambda _: counter.inc())

    def _counter(self, family: Counter, label: str) -> Counter:
        # Looking a label up costs more than counting: keep what was found.
        key = (family, label)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = family.labels(label)
        return counter

    def _refuse(self, plan: Plan, client_id: str, refusal: Refusal) -> None:
        self._counter(self.metrics.refusals, refusal.code).inc()
        log.info(
            "Refused a message from {client}: {code} ({why})",
            client=client_id,
            code=refusal.code,
            why=str(refusal),
        )
        frame = {
            "msgid": refusal.msgid,
            "type": "error",
            "error": refusal.code,
            "message": str(refusal),
        }
        self._send(plan, client_id, frame, "error")

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _chat(self, plan: Plan, envelope: dict[str, Any]) -> None:
        msgid, sender, to = envelope["msgid"], envelope["from"], envelope["to"]
        payload = envelope["payload"]
        received_at = self._now_ms()
        delivered = dict(envelope, payload=dict(payload, t=str(received_at)))
        text = _json(delivered)
        chat = ChatRecord(msgid, sender, to, payload["o_id"], text, received_at)
        self._broker.ensure_session(plan, to)
        inner = Plan()
        self._send(inner, to, text, "order_chat")
        inner.add(None, lambda _: self._push_if_offline(to, delivered))
        plan.add(InsertChat(chat, inner.ops), inner.apply_if_true)
        # Also for a retransmission: the sender did not see the first one.
        self._send(plan, sender, {"msgid": msgid, "type": "sent"}, "sent")

    def _received(self, plan: Plan, envelope: dict[str, Any]) -> None:
        msgid, recipient, sender = envelope["msgid"], envelope["from"], envelope["to"]
        inner = Plan()
        self._send(inner, sender, {"msgid": msgid, "type": "received"}, "received")

        def answered(known: object) -> None:
            if known:
                inner.apply_if_true(known)
                return
            refusal = Refusal("unknown_message", f"no message {msgid} from {sender} to you", msgid)
            later = Plan()
            self._refuse(later, recipient, refusal)
            self._broker.commit(later).addErrback(
                logged(log, "Refusing {msgid} failed", msgid=msgid)
            )

        plan.add(MarkReceived(sender, msgid, recipient, self._now_ms(), inner.ops), answered)

    def _push_if_offline(
        self, user_id: str, frame: Mapping[str, Any], alert: str | None = None
    ) -> None:
        """Push frame, just queued for user_id, when the user is not connected."""
        if self._broker.is_online(user_id):
            return
        session = self._broker.session(user_id)
        badge = None if session is None else len(session.queue)
        self._pusher.push_to_users([user_id], self._texts.notice(frame, alert, badge=badge))

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
        self._send(plan, to, frame, type)
        plan.add(None, lambda _: self._push_if_offline(to, frame, alert))
        self._counter(self.metrics.messages_in, type).inc()
        return self._broker.commit(plan).addCallback(lambda _: msgid)

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

    def is_online(self, user_id: str) -> bool:
        return self._broker.is_online(user_id)

    def history(self, o_id: str, limit: int, before: str | None) -> Deferred[list[ChatRecord]]:
        return self._store.chat_history(o_id, limit, before)

    def _check_store(self) -> None:
        """
        Refuse backend calls at once while the store is down, rather than
        leave them waiting for it.
        """
        if not self._store.available:
            raise StoreUnavailable(f"the {self._store.name} store is unavailable")

    def health(self) -> Deferred[None]:
        try:
            self._check_store()
        except StoreUnavailable as e:
            return fail(e)
        # A health check must answer quickly even when the store does not.
        return self._store.ping().addTimeout(_HEALTH_TIMEOUT, self._clock)
