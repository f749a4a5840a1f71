"""
A store that keeps everything in this process: for tests and for running
without durability.  It is the reference for what each operation means.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TypeVar, assert_never, cast

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from zope.interface import implementer

from .interfaces import (
    NO_ROOM,
    AddInbound,
    Attach,
    ChatRecord,
    Dequeue,
    Detach,
    Device,
    DiscardSession,
    DropDevice,
    DropSession,
    Enqueue,
    Guarded,
    InsertChat,
    Inserted,
    IStore,
    LogOut,
    MarkPushed,
    MarkReceived,
    Message,
    Op,
    PendingPush,
    PutDevice,
    PutSession,
    QueueConflict,
    Queued,
    QueuedMessage,
    QueueTotals,
    Release,
    RemoveInbound,
    SessionRecord,
    SessionSummary,
    SetBan,
    SetRetained,
)

Undo = list[Callable[[], object]]
K = TypeVar("K")
V = TypeVar("V")


@attrs.define
class _Session:
    subscriptions: tuple[tuple[str, int], ...]
    queue: dict[int, QueuedMessage] = attrs.Factory(dict)
    inbound: set[int] = attrs.Factory(set)
    has_connected: bool = False
    clean: bool = False
    sent_through: int | None = 0
    next_seq: int = 1
    queued_bytes: int = 0
    notices: int = 0

    def ordered(self) -> list[QueuedMessage]:
        return [self.queue[seq] for seq in sorted(self.queue)]

    def record(self, client_id: str, queue: Sequence[QueuedMessage]) -> SessionRecord:
        return SessionRecord(
            client_id,
            self.subscriptions,
            tuple(queue),
            frozenset(self.inbound),
            self.has_connected,
            self.clean,
            self.sent_through,
        )


def _counted(queued: QueuedMessage) -> tuple[int, int]:
    """What a queued message adds to its session's byte and notice counters."""
    return len(queued.message.payload), queued.notice is not None


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
        def commit() -> list[object]:
            undo: Undo = []
            try:
                return [self._apply(op, undo) for op in ops]
            except BaseException:
                # One transaction: a batch that fails leaves nothing behind.
                self._rollback(undo, 0)
                raise

        return maybeDeferred(commit)

    @staticmethod
    def _rollback(undo: Undo, mark: int) -> None:
        while len(undo) > mark:
            undo.pop()()

    def _session(self, client_id: str, undo: Undo) -> _Session:
        # Queue entries may precede the session's own record in a batch.
        session = self._sessions.get(client_id)
        if session is None:
            session = self._sessions[client_id] = _Session(())
            undo.append(lambda: self._sessions.pop(client_id, None))
        return session

    def _set(self, target: object, undo: Undo, **values: object) -> None:
        """Set attributes of target, undoably."""
        before = {name: getattr(target, name) for name in values}
        for name, value in values.items():
            setattr(target, name, value)

        def restore() -> None:
            for name, value in before.items():
                setattr(target, name, value)

        undo.append(restore)

    def _put(self, mapping: dict[K, V], key: K, value: V, undo: Undo) -> None:
        missing = key not in mapping
        old = mapping.get(key)

        def restore() -> None:
            if missing:
                del mapping[key]
            else:
                mapping[key] = cast(V, old)

        mapping[key] = value
        undo.append(restore)

    def _pop(self, mapping: dict[K, V], key: K, undo: Undo) -> None:
        if key in mapping:
            old = mapping.pop(key)
            undo.append(lambda: mapping.__setitem__(key, old))

    def _remove(self, session: _Session, seq: int, undo: Undo) -> QueuedMessage | None:
        """Take seq out of session's queue and counters."""
        queued = session.queue.get(seq)
        if queued is not None:
            self._pop(session.queue, seq, undo)
            size, notice = _counted(queued)
            self._set(
                session,
                undo,
                queued_bytes=session.queued_bytes - size,
                notices=session.notices - notice,
            )
        return queued

    def _enqueue(self, op: Enqueue, undo: Undo) -> object:
        session = self._session(op.client_id, undo)
        queued = QueuedMessage(0, op.message, queued_at=op.queued_at, notice=op.notice)
        size, notice = _counted(queued)
        room = op.room
        if room is not None and (
            len(session.queue) >= room.messages or session.queued_bytes + size > room.bytes
        ):
            return NO_ROOM
        seq = session.next_seq if op.seq is None else op.seq
        if seq in session.queue:
            raise QueueConflict(f"seq {seq} of {op.client_id} is taken")
        self._put(session.queue, seq, attrs.evolve(queued, seq=seq), undo)
        self._set(
            session,
            undo,
            next_seq=max(session.next_seq, seq + 1),
            queued_bytes=session.queued_bytes + size,
            notices=session.notices + notice,
        )
        return Queued(seq, session.notices)

    def _then(self, then: Sequence[Op], undo: Undo) -> tuple[object, ...] | None:
        """Apply then; None, with nothing applied, when a required Enqueue found no room."""
        mark = len(undo)
        results = []
        for op in then:
            result = self._apply(op, undo)
            if result is NO_ROOM and isinstance(op, Enqueue) and op.required:
                self._rollback(undo, mark)
                return None
            results.append(result)
        return tuple(results)

    def _apply(self, op: Op, undo: Undo) -> object:
        match op:
            case PutSession(client_id, subscriptions):
                self._set(self._session(client_id, undo), undo, subscriptions=subscriptions)
            case Attach(client_id, subscriptions, clean):
                self._set(
                    self._session(client_id, undo),
                    undo,
                    subscriptions=subscriptions,
                    has_connected=True,
                    clean=clean,
                    sent_through=None,
                )
            case Detach(client_id, sent_through):
                if client_id in self._sessions:
                    self._set(self._sessions[client_id], undo, sent_through=sent_through)
            case DropSession(client_id):
                self._pop(self._sessions, client_id, undo)
            case DiscardSession(client_id, through):
                session = self._sessions.get(client_id)
                if session is not None:
                    for seq in [s for s in session.queue if s <= through]:
                        self._remove(session, seq, undo)
                    self._set(
                        session,
                        undo,
                        subscriptions=(),
                        inbound=set(),
                        has_connected=False,
                        clean=False,
                        sent_through=0,
                    )
            case Enqueue():
                return self._enqueue(op, undo)
            case MarkPushed(client_id, seq) | Release(client_id, seq):
                session = self._sessions.get(client_id)
                queued = None if session is None else session.queue.get(seq)
                if session is not None and queued is not None:
                    changed = (
                        attrs.evolve(queued, pushed=True)
                        if isinstance(op, MarkPushed)
                        else attrs.evolve(queued, released=True)
                    )
                    self._put(session.queue, seq, changed, undo)
            case Dequeue(client_id, seq):
                session = self._sessions.get(client_id)
                if session is not None:
                    self._remove(session, seq, undo)
            case AddInbound(client_id, packet_id):
                inbound = self._session(client_id, undo).inbound
                if packet_id not in inbound:
                    inbound.add(packet_id)
                    undo.append(lambda: inbound.discard(packet_id))
            case RemoveInbound(client_id, packet_id):
                found = self._sessions.get(client_id)
                if found is not None and packet_id in found.inbound:
                    inbound = found.inbound
                    inbound.discard(packet_id)
                    undo.append(lambda: inbound.add(packet_id))
            case SetRetained(topic, message):
                if message is None:
                    self._pop(self._retained, topic, undo)
                else:
                    self._put(self._retained, topic, message, undo)
            case InsertChat(chat, then, token, digest):
                key = (chat.sender, chat.msgid)
                if key in self._chats:
                    stored_token, stored_digest = self._inserts[key]
                    result = op.against(stored_token, self._chats[key].recipient, stored_digest)
                    # Its own token: an earlier attempt committed it, then and all.
                    return Guarded(result, (None,) * len(then) if result is Inserted.NEW else ())
                mark = len(undo)
                self._put(self._chats, key, chat, undo)
                self._put(self._inserts, key, (token, digest), undo)
                results = self._then(then, undo)
                if results is None:
                    self._rollback(undo, mark)
                    return Guarded(Inserted.FULL)
                return Guarded(Inserted.NEW, results)
            case MarkReceived(sender, msgid, recipient, at, then):
                stored = self._chats.get((sender, msgid))
                if stored is None or stored.recipient != recipient:
                    return Guarded(False)
                if (sender, msgid) not in self._receipts:
                    self._put(self._receipts, (sender, msgid), at, undo)
                return Guarded(True, tuple(self._apply(inner, undo) for inner in then))
            case PutDevice(device):
                self._put(self._devices, device.user_id, device, undo)
            case LogOut(user_id):
                known = self._devices.get(user_id, Device(user_id, None, None))
                self._put(self._devices, user_id, attrs.evolve(known, logged_out=True), undo)
            case DropDevice(user_id):
                self._pop(self._devices, user_id, undo)
            case SetBan(client_id, until):
                if until is None:
                    self._pop(self._bans, client_id, undo)
                else:
                    self._put(self._bans, client_id, until, undo)
            case _:
                assert_never(op)
        return None

    # -- queries ----------------------------------------------------------------

    def open_session(self, client_id: str, limit: int) -> Deferred[SessionRecord | None]:
        session = self._sessions.get(client_id)
        if session is None:
            return succeed(None)
        return succeed(session.record(client_id, session.ordered()[: max(limit, 0)]))

    def read_queue(self, client_id: str, after: int, limit: int) -> Deferred[list[QueuedMessage]]:
        session = self._sessions.get(client_id)
        if session is None:
            return succeed([])
        return succeed([q for q in session.ordered() if q.seq > after][: max(limit, 0)])

    def session_summary(self, client_id: str) -> Deferred[SessionSummary | None]:
        session = self._sessions.get(client_id)
        if session is None:
            return succeed(None)
        queue = session.ordered()
        return succeed(
            SessionSummary(
                len(queue),
                session.queued_bytes,
                queue[0].queued_at if queue else None,
                session.next_seq - 1,
            )
        )

    def pending_pushes(
        self, after: tuple[str, int] | None, limit: int, client_id: str | None = None
    ) -> Deferred[list[PendingPush]]:
        clients = sorted(self._sessions) if client_id is None else [client_id]
        found: list[PendingPush] = []
        for client in clients:
            session = self._sessions.get(client)
            if session is None or (after is not None and client < after[0]):
                continue
            for q in session.ordered():
                if after is not None and (client, q.seq) <= after:
                    continue
                if q.notice is not None and not q.pushed:
                    found.append(PendingPush(client, q.seq, q.notice, q.queued_at, session.notices))
                    if len(found) >= limit:
                        return succeed(found)
        return succeed(found)

    def expire(self, before: int, keep: Collection[tuple[str, int]]) -> Deferred[tuple[int, int]]:
        messages = 0
        undo: Undo = []
        for client_id, session in self._sessions.items():
            for q in session.ordered():
                if q.queued_at < before and (client_id, q.seq) not in keep:
                    self._remove(session, q.seq, undo)
                    messages += 1
        idle = [c for c, s in self._sessions.items() if not (s.has_connected or s.queue)]
        for client_id in idle:
            del self._sessions[client_id]
        return succeed((messages, len(idle)))

    def queue_totals(self) -> Deferred[QueueTotals]:
        sessions = self._sessions.values()
        oldest = min((q.queued_at for s in sessions for q in s.queue.values()), default=None)
        return succeed(
            QueueTotals(
                len(self._sessions),
                sum(len(s.queue) for s in sessions),
                sum(s.queued_bytes for s in sessions),
                oldest,
            )
        )

    def load_subscriptions(self) -> Deferred[list[tuple[str, tuple[tuple[str, int], ...]]]]:
        return succeed(
            [
                (c, s.subscriptions)
                for c, s in self._sessions.items()
                if s.subscriptions and not s.clean
            ]
        )

    def load_sessions(self) -> Deferred[list[SessionRecord]]:
        return succeed([s.record(c, s.ordered()) for c, s in self._sessions.items()])

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
