"""
Offline pushes through Umeng's send API (seed sections 3 and 6).

Callers only queue.  A bounded queue feeds a few concurrent deliveries; each
finds the user's platform, builds and signs the Umeng body, and retries what
may succeed later.  Chat delivery never waits for any of it: a push to a user
tells when it is settled (IPusher) through the Deferred it answers.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ..metrics import Metrics
from ..store.interfaces import Device, IStore
from .config import DeliveryPolicy, UmengApp, UmengConfig
from .interfaces import IPusher, PushNotice, Wanted, all_settled

log = Logger()

TICKER = "问答CallTalent，您有一条新消息！"
TITLE = "问答CallTalent"
ELLIPSIS = "…"

# Umeng caps the payload at 2012 bytes for iOS and 1840 for Android.  The
# whole request body is held to that, so the payload inside always fits.
BODY_LIMITS = {"ios": 2012, "android": 1840}

# What a push of each kind carries besides its action: seed 6.1 and 6.2 for
# order_chat, order, note and webview; feedback and expert are ours.
KIND_FIELDS: Mapping[str, tuple[str, ...]] = {
    "order_chat": ("o_id",),
    "order": ("o_id", "status"),
    "note": ("note_id", "status"),
    "feedback": (),
    "expert": ("status",),
    "webview": ("url",),
}

# Umeng error codes (data.error_code of a "FAIL" answer).
TIMESTAMP_EXPIRED = "2028"
NO_DEVICE = "2010"  # no device carries the alias
TEMPORARY_CODES = frozenset(
    {
        "2020",  # service being upgraded
        "2026",  # more than 3 tasks in a minute
        "3000",  # 3000-3004: database errors
        "3001",
        "3002",
        "3003",
        "3004",
        "4000",  # system error
        "4001",  # system busy
        "4002",  # operation failed
        "4009",  # server queue full
        "4013",  # asynchronous send failed
        "4021",  # internal service timeout
        "4023",  # server network error
    }
)


class Verdict(Enum):
    """What one answer from Umeng means; the value is the metric label."""

    SENT = "sent"
    RETRY = "retried"
    RESIGN = "resigned"
    FAILED = "failed"
    NO_DEVICE = "no_device"


_FINAL = (Verdict.SENT, Verdict.FAILED, Verdict.NO_DEVICE)

# Outcomes in the normal course of things, logged at info; the rest warn.
_NORMAL = frozenset({"sent", "retried", "resigned", "no_device", "logged_out", "withdrawn"})

# The failure label of a request that got no answer at all.
NETWORK = "network"


@attrs.frozen
class Judgement:
    """Umeng's answer to one request, judged."""

    verdict: Verdict
    # For logs: the message id, or the HTTP status and Umeng's error.
    reason: str
    # The failure metric label: Umeng's data.error_code, else "http_STATUS";
    # None when sent.
    code: str | None


def classify(status: int, content: bytes) -> Judgement:
    """Judge Umeng's answer to one request."""
    try:
        answer = json.loads(content)
    except ValueError:
        answer = None
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, dict):
        data = {}
    if status == 200 and isinstance(answer, dict) and answer.get("ret") == "SUCCESS":
        return Judgement(Verdict.SENT, f"id {data.get('msg_id') or data.get('task_id')}", None)
    error = data.get("error_code")
    code = None if error is None else str(error)
    reason = f"HTTP {status}"
    if code is not None:
        reason += f", Umeng error {code} {data.get('error_msg', '')}".rstrip()
    label = f"http_{status}" if code is None else code
    if code == TIMESTAMP_EXPIRED:
        return Judgement(Verdict.RESIGN, reason, label)
    if code in TEMPORARY_CODES or (code is None and (status >= 500 or status == 429)):
        return Judgement(Verdict.RETRY, reason, label)
    if code == NO_DEVICE:
        return Judgement(Verdict.NO_DEVICE, reason, label)
    return Judgement(Verdict.FAILED, reason, label)


def backoff_delay(attempt: int, policy: DeliveryPolicy, draw: float) -> float:
    """
    Seconds to wait after failed attempt number ``attempt`` (from 1): full
    jitter, draw in [0, 1) times the capped exponential step.
    """
    step = policy.backoff_base * 2.0 ** min(attempt - 1, 64)
    return draw * min(policy.backoff_cap, step)


def sign(endpoint: str, body: bytes, secret: str) -> str:
    """Umeng's request signature over the exact body bytes sent."""
    signed = b"POST" + endpoint.encode() + body + secret.encode()
    return hashlib.md5(signed, usedforsecurity=False).hexdigest()


def fit(text: str, fits: Callable[[str], bool]) -> str | None:
    """
    text when it fits, else its longest prefix that fits with an ellipsis
    (slicing a str never splits a code point); None when nothing fits.
    """
    if fits(text):
        return text
    if not fits(ELLIPSIS):
        return None
    lo, hi = 0, max(len(text) - 1, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(text[:mid] + ELLIPSIS):
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + ELLIPSIS


def _extras(notice: PushNotice) -> dict[str, str]:
    # The msgid lets the app drop a push for a message it already has.
    names = (*KIND_FIELDS[notice.kind], "msgid")
    fields = ((name, getattr(notice, name)) for name in names)
    return {name: value for name, value in fields if value is not None}


def ios_payload(notice: PushNotice, alert: str, app: UmengApp) -> dict[str, object]:
    """Seed 6.1: the alert, sound and badge in aps, the rest beside it."""
    aps: dict[str, object] = {"alert": alert, "sound": "default"}
    if notice.badge is not None:
        aps["badge"] = notice.badge
    return {"aps": aps, "action": notice.kind, **_extras(notice)}


def android_payload(notice: PushNotice, alert: str, app: UmengApp) -> dict[str, object]:
    """Seed 6.2: a notification opening the app's activity, or the url."""
    extra = _extras(notice)
    url = extra.pop("url", None)
    opening = (
        {"after_open": "go_url", "url": url}
        if notice.kind == "webview"
        else {"after_open": "go_activity", "activity": app.activity}
    )
    return {
        "display_type": "notification",
        "body": {
            "ticker": TICKER,
            "title": TITLE,
            "text": alert,
            "play_vibrate": "true",
            "play_lights": "true",
            "play_sound": "true",
            **opening,
        },
        "extra": {**extra, "action": notice.kind},
    }


_PAYLOADS = {"ios": ios_payload, "android": android_payload}


def customizedcast(config: UmengConfig, user_id: str) -> dict[str, object]:
    return {"type": "customizedcast", "alias": user_id, "alias_type": config.alias_type}


def groupcast(tag: str) -> dict[str, object]:
    return {"type": "groupcast", "filter": {"where": {"and": [{"tag": tag}]}}}


@attrs.frozen
class UmengRequest:
    """One call of the send API, given a fresh timestamp at each attempt."""

    app: UmengApp
    fields: Mapping[str, object] = attrs.field(eq=False)

    def body(self, timestamp: str) -> bytes:
        """The JSON body, serialized once: what is signed is what is sent."""
        whole = {"appkey": self.app.appkey, "timestamp": timestamp, **self.fields}
        return json.dumps(whole, ensure_ascii=False, separators=(",", ":")).encode()


def build_request(
    config: UmengConfig,
    app: UmengApp,
    target: Mapping[str, object],
    notice: PushNotice,
    timestamp: str,
) -> UmengRequest | None:
    """
    The request to app for target (customizedcast or groupcast fields), its
    alert cut so that the body fits Umeng's limit; None if nothing fits.
    Timestamps keep their 13 digits, so a fresh one keeps the body's size.
    """
    mode = "true" if config.production_mode else "false"

    def request(alert: str) -> UmengRequest:
        payload = _PAYLOADS[app.platform](notice, alert, app)
        return UmengRequest(app, {**target, "payload": payload, "production_mode": mode})

    limit = BODY_LIMITS[app.platform]
    alert = fit(notice.alert, lambda a: len(request(a).body(timestamp)) <= limit)
    return None if alert is None else request(alert)


class HTTPPoster(Protocol):
    """The part of treq (the module or an HTTPClient) that pushes use."""

    def post(self, url: str, /, *, data: bytes, headers: Headers) -> Deferred[Any]: ...


@attrs.frozen
class _Item:
    """A queued push: to one user, or to everyone with a tag."""

    notice: PushNotice
    user_id: str | None = None
    tag: str | None = None
    wanted: Wanted | None = None
    # Fired when a push to a user is settled, or not (IPusher).
    settled: Deferred[bool] | None = attrs.field(default=None, eq=False)

    def settle(self, settled: bool) -> None:
        if self.settled is not None:
            self.settled.callback(settled)


@implementer(IPusher)
@attrs.define
class UmengPusher:
    _clock: IReactorTime
    _http: HTTPPoster
    _store: IStore
    _config: UmengConfig
    _metrics: Metrics
    # Draws in [0, 1) for the backoff jitter.
    _random: Callable[[], float] = random.random
    _pending: deque[_Item] = attrs.field(factory=deque, init=False)
    _running: set[Deferred[None]] = attrs.field(factory=set, init=False)
    _pumping: bool = attrs.field(default=False, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    def push_to_users(
        self, user_ids: Sequence[str], notice: PushNotice, wanted: Wanted | None = None
    ) -> Deferred[bool]:
        settled = []
        for user_id in user_ids:
            item = _Item(notice, user_id=user_id, wanted=wanted, settled=Deferred())
            self._queue(item)
            assert item.settled is not None
            settled.append(item.settled)
        return all_settled(settled)

    def push_to_tag(self, tag: str, notice: PushNotice) -> None:
        self._queue(_Item(notice, tag=tag))

    def reconfigure(self, config: UmengConfig) -> None:
        """Push through config from now on; pushes under way finish as they began."""
        self._config = config
        self._pump()

    def stop(self) -> None:
        """Drop what is queued and cancel deliveries with their timers."""
        self._stopped = True
        while self._pending:
            item = self._pending.popleft()
            self._outcome("cancelled", item, None, "stopping")
            item.settle(False)
        for running in list(self._running):
            running.cancel()

    def _queue(self, item: _Item) -> None:
        notice = item.notice
        if self._stopped:
            self._outcome("cancelled", item, None, "pusher stopped")
            item.settle(False)
        elif notice.kind not in KIND_FIELDS or (notice.kind == "webview" and notice.url is None):
            self._outcome("invalid", item, None, f"bad notice {notice!r}")
            item.settle(True)
        elif len(self._pending) >= self._config.delivery.queue_size:
            # Given up without trying: what bounds memory in a long outage.
            self._outcome("dropped", item, None, "queue full")
            item.settle(True)
        else:
            self._pending.append(item)
            self._pump()

    def _pump(self) -> None:
        # A delivery may end at once; its end must not recurse into here.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._pending and len(self._running) < self._config.delivery.concurrency:
                item = self._pending.popleft()
                running = Deferred.fromCoroutine(self._deliver(item))
                self._running.add(running)
                running.addBoth(self._finished, running, item)
        finally:
            self._pumping = False

    def _finished(self, result: None | Failure, running: Deferred[None], item: _Item) -> None:
        self._running.discard(running)
        if self._stopped:
            self._outcome("cancelled", item, None, "stopping")
            item.settle(False)
            return
        broke = isinstance(result, Failure)
        if broke:
            log.failure("Umeng push to {target} broke", result, target=_target(item))
        # A push that broke is not settled: it comes again after a restart.
        item.settle(not broke)
        self._pump()

    async def _deliver(self, item: _Item) -> None:
        apps: tuple[UmengApp, ...]
        if item.tag is not None:
            apps = self._config.apps
            target = groupcast(item.tag)
        else:
            assert item.user_id is not None
            if item.wanted is not None and not item.wanted():
                self._outcome("withdrawn", item, None, "no longer wanted")
                return
            device = await self._device(item.user_id)
            if device is not None and device.logged_out:
                self._outcome("logged_out", item, None, "the user logged out")
                return
            platform = None if device is None else device.platform
            apps = tuple(app for app in self._config.apps if app.platform == platform)
            apps = apps or self._config.apps
            target = customizedcast(self._config, item.user_id)
        for app in apps:
            await self._send(item, app, target)

    async def _device(self, user_id: str) -> Device | None:
        """The user's device, read when the push is sent: a logout stops it."""
        try:
            return await self._store.get_device(user_id)
        except Exception:
            if self._stopped:
                raise
            log.failure("Device of {user_id} unknown, pushing to both apps", user_id=user_id)
            return None

    async def _send(self, item: _Item, app: UmengApp, target: Mapping[str, object]) -> None:
        policy = self._config.delivery
        request = build_request(self._config, app, target, item.notice, self._timestamp())
        if request is None:
            self._outcome("too_large", item, app, "no alert fits the size limit")
            return
        for attempt in range(1, policy.max_attempts + 1):
            judged = await self._attempt(request)
            if judged.code is not None:
                self._metrics.push_failures.labels(code=judged.code).inc()
            if judged.verdict in _FINAL:
                self._outcome(judged.verdict.value, item, app, judged.reason)
                return
            if attempt == policy.max_attempts:
                break
            delay = backoff_delay(attempt, policy, self._random())
            self._outcome(
                judged.verdict.value, item, app, f"{judged.reason}; again in {delay:.3f}s"
            )
            await deferLater(self._clock, delay)
        self._outcome("given_up", item, app, f"{judged.reason} after {attempt} attempts")

    async def _attempt(self, request: UmengRequest) -> Judgement:
        # Signed anew each time: a retry after "timestamp expired" is fresh.
        endpoint = self._config.endpoint
        body = request.body(self._timestamp())
        url = f"{endpoint}?sign={sign(endpoint, body, request.app.app_master_secret)}"
        started = self._clock.seconds()
        exchange = Deferred.fromCoroutine(self._post(url, body))
        try:
            status, content = await exchange.addTimeout(self._config.delivery.timeout, self._clock)
        except Exception as e:
            if self._stopped:
                raise
            judged = Judgement(Verdict.RETRY, f"{type(e).__name__}: {e}", NETWORK)
        else:
            judged = classify(status, content)
        self._metrics.push_latency.observe(self._clock.seconds() - started)
        return judged

    async def _post(self, url: str, body: bytes) -> tuple[int, bytes]:
        # A Headers of its own: treq may add to what it is given.
        headers = Headers({b"Content-Type": [b"application/json"]})
        response = await self._http.post(url, data=body, headers=headers)
        content: bytes = await response.content()
        return response.code, content

    def _timestamp(self) -> str:
        return str(int(self._clock.seconds() * 1000))

    def _outcome(self, outcome: str, item: _Item, app: UmengApp | None, reason: str) -> None:
        self._metrics.pushes.labels(outcome=outcome).inc()
        emit = log.info if outcome in _NORMAL else log.warn
        emit(
            "Umeng push {kind} to {target} via {app}: {outcome} ({reason})",
            kind=item.notice.kind,
            target=_target(item),
            app="both apps" if app is None else app.platform,
            outcome=outcome,
            reason=reason,
        )


def _target(item: _Item) -> str:
    return f"tag {item.tag}" if item.tag is not None else f"user {item.user_id}"
