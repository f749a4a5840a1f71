"""
A store that keeps everything in this process: for tests and for running
without durability.  It is the reference for what each operation means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import assert_never

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from zope.interface import implementer

from .interfaces import (
    AddInbound,
    ChatRecord,
    ChatStored,
    Dequeue,
    Device,
    DropDevice,
    DropSession,
    Enqueue,
    InsertChat,
    Inserted,
    IStore,
    LogOut,
    MarkPushed,
    MarkReceived,
    Message,
    Op,
    PutDevice,
    PutSession,
    QueuedMessage,
    Release,
    RemoveInbound,
    SessionRecord,
    SetBan,
    SetRetained,
)


@attrs.define
class _Session:
    subscriptions: tuple[tuple[str, int], ...]
    queue: dict[int, QueuedMessage] = attrs.Factory(dict)
    inbound: set[int] = attrs.Factory(set)
    has_connected: bool = False


@implementer(IStore)
@attrs.define
class MemoryStore:
    name = "memory"
    available = True
    outages = 0
    _sessions: dict[str, _Session] = attrs.Factory(dict)
    _retained: dict[str, Message] = attrs.Factory(dict)
    # (sender, msgid) -> chat, in insertion order.
    _chats: dict[tuple[str, str], ChatRecord] = attrs.Factory(dict)
    # (sender, msgid) -> (InsertChat token, digest).
    _inserts: dict[tuple[str, str], tuple[str, str]] = attrs.Factory(dict)
    _receipts: dict[tuple[str, str], int] = attrs.Factory(dict)
    _devices: dict[str, Device] = attrs.Factory(dict)
    # client id -> when its ban ends.
    _bans: dict[str, int] = attrs.Factory(dict)

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def submit(self, ops: Sequence[Op]) -> Deferred[list[object]]:
        return maybeDeferred(lambda: [self._apply(op) for op in ops])

    def _session(self, client_id: str) -> _Session:
        # Queue entries may precede the session's own record in a batch.
        return self._sessions.setdefault(client_id, _Session(()))

    def _queue(self, client_id: str) -> dict[int, QueuedMessage]:
        # Removals on an unknown session change nothing: an empty queue, not kept.
        session = self._sessions.get(client_id)
        return {} if session is None else session.queue

    def _apply(self, op: Op) -> object:
        match op:
            case PutSession(client_id, subscriptions, has_connected):
                session = self._session(client_id)
                session.subscriptions = subscriptions
                session.has_connected |= has_connected
            case DropSession(client_id):
                self._sessions.pop(client_id, None)
            case Enqueue(client_id, seq, message, queued_at, notice):
                queued = QueuedMessage(seq, message, queued_at=queued_at, notice=notice)
                self._session(client_id).queue[seq] = queued
            case MarkPushed(client_id, seq):
                queue = self._queue(client_id)
                if seq in queue:
                    queue[seq] = attrs.evolve(queue[seq], pushed=True)
            case Release(client_id, seq):
                queue = self._queue(client_id)
                if seq in queue:
                    queue[seq] = attrs.evolve(queue[seq], released=True)
            case Dequeue(client_id, seq):
                self._queue(client_id).pop(seq, None)
            case AddInbound(client_id, packet_id):
                self._session(client_id).inbound.add(packet_id)
            case RemoveInbound(client_id, packet_id):
                if client_id in self._sessions:
                    self._sessions[client_id].inbound.discard(packet_id)
            case SetRetained(topic, message):
                if message is None:
                    self._retained.pop(topic, None)
                else:
                    self._retained[topic] = message
            case InsertChat(chat, then, token, digest):
                key = (chat.sender, chat.msgid)
                if key in self._chats:
                    stored_token, stored_digest = self._inserts[key]
                    result = op.against(stored_token, self._chats[key].recipient, stored_digest)
                    if result is not Inserted.NEW:
                        return result
                self._chats[key] = chat
                self._inserts[key] = (token, digest)
                for inner in then:
                    self._apply(inner)
                return Inserted.NEW
            case ChatStored(sender, msgid):
                key = (sender, msgid)
                if key not in self._chats:
                    return None
                return op.against(self._chats[key].recipient, self._inserts[key][1])
            case MarkReceived(sender, msgid, recipient, at, then):
                found = self._chats.get((sender, msgid))
                if found is None or found.recipient != recipient:
                    return False
                self._receipts.setdefault((sender, msgid), at)
                for inner in then:
                    self._apply(inner)
                return True
            case PutDevice(device):
                self._devices[device.user_id] = device
            case LogOut(user_id):
                known = self._devices.get(user_id, Device(user_id, None, None))
                self._devices[user_id] = attrs.evolve(known, logged_out=True)
            case DropDevice(user_id):
                self._devices.pop(user_id, None)
            case SetBan(client_id, until):
                if until is None:
                    self._bans.pop(client_id, None)
                else:
                    self._bans[client_id] = until
            case _:
                assert_never(op)
        return None

    def load_sessions(self) -> Deferred[list[SessionRecord]]:
        return succeed(
            [
                SessionRecord(
                    client_id,
                    s.subscriptions,
                    tuple(s.queue[k] for k in sorted(s.queue)),
                    frozenset(s.inbound),
                    s.has_connected,
                )
                for client_id, s in self._sessions.items()
            ]
        )

    def load_retained(self) -> Deferred[list[Message]]:
        return succeed(list(self._retained.values()))

    def chat_history(self, o_id: str, limit: int, before: str | None) -> Deferred[list[ChatRecord]]:
        chats = sorted(
            (c for c in self._chats.values() if c.o_id == o_id),
            key=lambda c: (c.received_at, c.msgid),
        )
        if before is not None:
            cut = next((i for i, c in enumerate(chats) if c.msgid == before), None)
            chats = [] if cut is None else chats[:cut]
        return succeed(chats[-limit:] if limit > 0 else [])

    def get_device(self, user_id: str) -> Deferred[Device | None]:
        return succeed(self._devices.get(user_id))

    def get_ban(self, client_id: str) -> Deferred[int | None]:
        return succeed(self._bans.get(client_id))

    def ping(self) -> Deferred[None]:
        return succeed(None)

    def purge(self, older_than: int) -> Deferred[int]:
        old = [k for k, c in self._chats.items() if c.received_at < older_than]
        for key in old:
            del self._chats[key]
            del self._inserts[key]
            self._receipts.pop(key, None)
        self._bans = {c: until for c, until in self._bans.items() if until >= older_than}
        return succeed(len(old))
