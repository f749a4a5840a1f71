"""
The MongoDB store (also FerretDB), through txmongo with journaled writes.

There are no multi-document transactions to lean on, so each batch is written
in an order where a crash part way can only cause a redelivery, or leave a
session's counters too high (put right when the session is next opened),
never a loss: a chat message or receipt is written only after the operations
that depend on it (its ``then``), and whether it is new is decided from one
read at the start.  Writes are grouped into one bulk request per collection
where order allows.

Commits have a connection of their own, and no deadline: one request at a time
goes over a connection, so a commit abandoned for being slow would go on in
the server ahead of its own retry.  A commit is given up only when the server
stops answering pings on the other connection, which also serves every read,
so /healthz and the API are not queued behind commits.

Queues.  A session document keeps its counters (queued, queued_bytes,
notices) and ``next_seq``, a hint of the next free seq that never goes down.
An Enqueue first reserves its room: one conditional ``$inc`` per client and
batch, that holds only when every message of the batch for that client fits
its room, and marks the document with the batch's token, so the batch reads
back which reservations took (and the hint, in the same read); a client
whose messages do not all fit then reserves them one by one
(find_one_and_update), at its limit only.  Several
processes reserving for one client never exceed its room between them.  Then
the messages are inserted at seqs from the hint, in seq order, in one ordered
bulk: the insert is what allocates a seq (the _id is unique), so a seq
another process took is a duplicate key, retried above the highest seq in
the queue, and a message becomes visible only after every one below it that
was allocated before it.  The hint is raised past them with the batch's
other session writes, after.

A seq must never be used twice: a message put at a seq already read and
dequeued is below every reader's cursor, and an acknowledgement of the old
message still on its way deletes the new one.  The session document's hint
can go back on FerretDB, which loses one of two updates of a document made
at once (a node's Dequeue counting down while another raises the hint).
So the seqs a batch will use are first reserved in a document of their own
in ``seqs``, which only the processes inserting for that client write, and
only ever raise, before any of them is inserted: what a reader sees is
always below it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Awaitable, Collection, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, assert_never

import attrs
from bson import Binary
from prometheus_client import Histogram
from pymongo import DeleteMany, DeleteOne, InsertOne, ReplaceOne, UpdateOne
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
)
from pymongo.uri_parser import parse_uri
from twisted.internet import error as netError
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    ensureDeferred,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from txmongo import filter as qf
from txmongo.connection import ConnectionPool
from txmongo.database import Database
from txmongo.errors import TimeExceeded
from zope.interface import implementer

from ..failures import every
from .group import GroupCommitter
from .interfaces import (
    NO_ROOM,
    AddInbound,
    Attach,
    Ban,
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
    QueueEntry,
    QueueTotals,
    Receipt,
    Release,
    RemoveInbound,
    SessionRecord,
    SessionSummary,
    SetBan,
    SetRetained,
    StoredChat,
    StoredSession,
    StoreUnavailable,
    every_op,
)

_T = TypeVar("_T")
_Write = UpdateOne | ReplaceOne | DeleteOne | DeleteMany | InsertOne
# What MongoStore.copy_in stores; copy_prune clears these collections.
_PRUNED = ("queue", "inbound")
Copied = StoredSession | QueueEntry | StoredChat | Receipt | Device | Ban | Message
_Key = tuple[str, str]

_UNAVAILABLE = (
    ConnectionFailure,
    TimeExceeded,
    TimeoutError,
    netError.ConnectError,
    netError.ConnectionClosed,
)
_NOT_IMPLEMENTED = 238
_INDEX_OPTIONS_CONFLICT = 85
_DUPLICATE_KEY = 11000
# Bounds the size of one $or query or $in list.
_CHUNK = 500
# Statements in one write command.  FerretDB's SQLite handler holds one
# connection of its pool (100, shared by every client) for each update or
# delete of a command until the command ends, and waits for ever for one
# more past that: a few commands of a hundred statements wedge it.
_BULK = 16
# Seconds after which a reservation mark can only be a dead batch's: no
# batch takes that long while the store answers.
STALE_MARK = 600.0
# The schema version this store writes (the "schema" document of "meta").
_SCHEMA = 2
# Every process using the store says so in "servers" this often (seconds),
# by the database server's clock; one not heard of for LIVE is gone.
BEAT = 5.0
LIVE = 3 * BEAT

_CHAT_FIELDS = ("msgid", "sender", "recipient", "o_id", "envelope", "received_at")
_COUNTERS = {"next_seq": 1, "queued": 0, "queued_bytes": 0, "notices": 0}
# A session document as a message or packet id makes it, but its subscriptions.
_NEW = {"has_connected": False, "clean": False, "sent_through": 0, **_COUNTERS}


def database_name(uri: str) -> str:
    """The database a mongodb:// URI names; ValueError if it names none."""
    try:
        name = parse_uri(uri)["database"]
    except ConfigurationError as e:
        raise ValueError(f"bad MongoDB store URI {uri!r}: {e}") from None
    if not name:
        raise ValueError(f"MongoDB store URI {uri!r} names no database: use mongodb://HOST:PORT/DB")
    return str(name)


def where(uri: str) -> str:
    """HOST:PORT/DB of a mongodb:// URI, for messages: never its credentials."""
    parsed = parse_uri(uri)
    hosts = ",".join(f"{host}:{port}" for host, port in parsed["nodelist"])
    return f"{hosts}/{parsed['database']}"


def _date(ms: int) -> datetime:
    # What a TTL index counts from.
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _message_doc(m: Message) -> dict[str, Any]:
    return {"topic": m.topic, "payload": Binary(m.payload), "qos": m.qos, "retain": m.retain}


def _message(doc: dict[str, Any]) -> Message:
    return Message(doc["topic"], bytes(doc["payload"]), doc["qos"], doc["retain"])


def _queued(doc: dict[str, Any]) -> QueuedMessage:
    return QueuedMessage(
        doc["seq"],
        _message(doc),
        doc["released"],
        doc["queued_at"],
        doc.get("notice"),
        doc.get("pushed", False),
    )


def _queue_doc(client_id: str, queued: QueuedMessage) -> dict[str, Any]:
    return {
        "_id": _id(client_id, queued.seq),
        "client_id": client_id,
        "seq": queued.seq,
        "released": queued.released,
        "queued_at": queued.queued_at,
        "notice": queued.notice,
        "pushed": queued.pushed,
        "size": len(queued.message.payload),
    } | _message_doc(queued.message)


def _chat_doc(chat: ChatRecord, token: str | None, digest: str | None) -> dict[str, Any]:
    doc = attrs.asdict(chat) | {"time": _date(chat.received_at), "token": token, "digest": digest}
    return {"_id": _id(chat.sender, chat.msgid), **doc}


def _receipt_doc(sender: str, msgid: str, at: int) -> dict[str, Any]:
    return {"sender": sender, "msgid": msgid, "at": at, "time": _date(at)}


def _device_doc(device: Device) -> dict[str, Any]:
    return {"platform": device.platform, "token": device.token, "logged_out": device.logged_out}


def _session_doc(stored: StoredSession) -> dict[str, Any]:
    record = stored.record
    return {
        "_id": record.client_id,
        "subscriptions": _stored_subscriptions(record.subscriptions),
        "has_connected": record.has_connected,
        "clean": record.clean,
        "sent_through": record.sent_through,
        "next_seq": stored.next_seq,
        "queued": stored.queued,
        "queued_bytes": stored.queued_bytes,
        "notices": stored.notices,
    }


def _copied(item: Copied) -> tuple[str, dict[str, Any]]:
    """The collection and document that item is stored as."""
    match item:
        case StoredSession():
            return "sessions", _session_doc(item)
        case QueueEntry(client_id, queued):
            return "queue", _queue_doc(client_id, queued)
        case StoredChat(chat, token, digest):
            return "chats", _chat_doc(chat, token, digest)
        case Receipt(sender, msgid, at):
            return "receipts", {"_id": _id(sender, msgid), **_receipt_doc(sender, msgid, at)}
        case Device():
            return "devices", {"_id": item.user_id, **_device_doc(item)}
        case Ban(client_id, until):
            return "bans", {"_id": client_id, "until": until}
        case Message():
            return "retained", {"_id": item.topic, **_message_doc(item)}
        case _:
            assert_never(item)


def _chat_keys(ops: Sequence[Op]) -> Iterator[_Key]:
    for op in every_op(ops):
        if isinstance(op, InsertChat):
            yield (op.chat.sender, op.chat.msgid)
        elif isinstance(op, MarkReceived):
            yield (op.sender, op.msgid)


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


async def _bulk_write(collection: Any, writes: Sequence[_Write], ordered: bool = True) -> None:
    """writes, _BULK statements a command, one command after the other (in order)."""
    for chunk in _chunks(writes, _BULK):
        await collection.bulk_write(list(chunk), ordered=ordered)


def _id(*parts: object) -> str:
    """
    A document id made of its key fields.  Every lookup and upsert goes by _id
    because that is the one index FerretDB v1 uses for them; without it each
    write scans the collection.
    """
    return json.dumps(parts, ensure_ascii=False)


def _ids_in(keys: Sequence[_Key]) -> dict[str, Any]:
    return {"_id": {"$in": [_id(s, m) for s, m in keys]}}


def _subscriptions(doc: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    # FerretDB stores no nested arrays, hence documents.
    return tuple((s["filter"], s["qos"]) for s in doc.get("subscriptions", ()))


def _stored_subscriptions(subscriptions: tuple[tuple[str, int], ...]) -> list[dict[str, Any]]:
    return [{"filter": f, "qos": q} for f, q in subscriptions]


@attrs.frozen
class _Stored:
    recipient: str
    # None for a chat stored before tokens or digests existed.
    token: str | None
    digest: str | None


@attrs.define(eq=False)
class _Enq:
    """One Enqueue of a batch, as the batch decides it."""

    op: Enqueue
    # Room reserved for it (None: not decided yet).
    ok: bool | None = None
    seq: int | None = None
    notices: int = 0
    # Committed by an earlier attempt of the same batch.
    landed: bool = False

    @property
    def size(self) -> int:
        return len(self.op.message.payload)


@attrs.define
class _Plan:
    """
    A batch as bulk writes.  ``early`` writes (everything but chats,
    receipts and new queue entries) touch disjoint documents per
    collection, so collections may go in any order; ``late`` runs follow
    them strictly in order.  ``enqueues`` decides each Enqueue: the first
    walk over the batch (``dry``) only finds them.
    """

    # (sender, msgid) -> what is stored of every chat that exists at this point.
    _chats: dict[_Key, _Stored]
    enqueues: dict[int, _Enq]
    dry: bool
    early: dict[str, list[_Write]] = attrs.Factory(dict)
    late: list[tuple[str, list[_Write]]] = attrs.Factory(list)
    # The Enqueues to insert, in order.
    accepted: list[_Enq] = attrs.Factory(list)
    # Reserved, then not stored: their room is given back.
    released: list[_Enq] = attrs.Factory(list)

    def add_all(self, ops: Sequence[Op]) -> list[object]:
        return [self.add(op) for op in ops]

    def _write(self, collection: str, write: _Write) -> None:
        if not self.dry:
            self.early.setdefault(collection, []).append(write)

    def _write_late(self, collection: str, write: _Write) -> None:
        if self.dry:
            return
        if self.late and self.late[-1][0] == collection:
            self.late[-1][1].append(write)
        else:
            self.late.append((collection, [write]))

    def _touch(self, client_id: str) -> None:
        # A packet id may arrive before the session's own record.
        new = {"subscriptions": [], **_NEW}
        self._write("sessions", UpdateOne({"_id": client_id}, {"$setOnInsert": new}, upsert=True))

    def _enqueue(self, op: Enqueue) -> object:
        found = self.enqueues.get(id(op))
        if self.dry:
            if found is None:
                self.enqueues[id(op)] = _Enq(op)
            return None
        if found is None or not found.ok:
            return NO_ROOM
        if not found.landed:
            self.accepted.append(found)
        return found

    def _release(self, then: Sequence[Op]) -> None:
        """then is not stored: the room reserved for its Enqueues goes back."""
        for op in every_op(then):
            found = self.enqueues.get(id(op))
            if found is not None and found.ok and not found.landed:
                self.released.append(found)

    def add(self, op: Op) -> object:
        match op:
            case PutSession(client_id, subscriptions):
                update = {
                    "$set": {"subscriptions": _stored_subscriptions(subscriptions)},
                    "$setOnInsert": _NEW,
                }
                self._write("sessions", UpdateOne({"_id": client_id}, update, upsert=True))
            case Attach(client_id, subscriptions, clean):
                attached = {
                    "subscriptions": _stored_subscriptions(subscriptions),
                    "has_connected": True,
                    "clean": clean,
                    "sent_through": None,
                }
                update = {"$set": attached, "$setOnInsert": _COUNTERS}
                self._write("sessions", UpdateOne({"_id": client_id}, update, upsert=True))
            case Detach(client_id, sent_through):
                self._write(
                    "sessions",
                    UpdateOne({"_id": client_id}, {"$set": {"sent_through": sent_through}}),
                )
            case DropSession() | DiscardSession():
                raise AssertionError("a session is dropped or discarded in a run of its own")
            case Enqueue():
                return self._enqueue(op)
            case MarkPushed(client_id, seq):
                self._write(
                    "queue", UpdateOne({"_id": _id(client_id, seq)}, {"$set": {"pushed": True}})
                )
            case Release(client_id, seq):
                self._write(
                    "queue",
                    UpdateOne({"_id": _id(client_id, seq)}, {"$set": {"released": True}}),
                )
            case Dequeue(client_id, seq):
                self._write("queue", DeleteOne({"_id": _id(client_id, seq)}))
            case AddInbound(client_id, packet_id):
                self._touch(client_id)
                entry = {"client_id": client_id, "packet_id": packet_id}
                self._write(
                    "inbound", ReplaceOne({"_id": _id(client_id, packet_id)}, entry, upsert=True)
                )
            case RemoveInbound(client_id, packet_id):
                self._write("inbound", DeleteOne({"_id": _id(client_id, packet_id)}))
            case SetRetained(topic, message):
                if message is None:
                    self._write("retained", DeleteOne({"_id": topic}))
                else:
                    doc = _message_doc(message)
                    self._write("retained", ReplaceOne({"_id": topic}, doc, upsert=True))
            case InsertChat():
                return self._insert_chat(op)
            case MarkReceived(sender, msgid, recipient, at, then):
                stored = self._chats.get((sender, msgid))
                if stored is None or stored.recipient != recipient:
                    return Guarded(False)
                results = tuple(self.add(inner) for inner in then)
                self._write_late(
                    "receipts",
                    UpdateOne(
                        {"_id": _id(sender, msgid)},
                        {"$setOnInsert": _receipt_doc(sender, msgid, at)},
                        upsert=True,
                    ),
                )
                return Guarded(True, results)
            case PutDevice(device):
                doc = _device_doc(device)
                self._write("devices", ReplaceOne({"_id": device.user_id}, doc, upsert=True))
            case LogOut(user_id):
                # A user without a device gets one with neither platform nor token.
                self._write(
                    "devices",
                    UpdateOne({"_id": user_id}, {"$set": {"logged_out": True}}, upsert=True),
                )
            case DropDevice(user_id):
                self._write("devices", DeleteOne({"_id": user_id}))
            case SetBan(client_id, until):
                if until is None:
                    self._write("bans", DeleteOne({"_id": client_id}))
                else:
                    doc = {"until": until}
                    self._write("bans", ReplaceOne({"_id": client_id}, doc, upsert=True))
            case _:
                assert_never(op)
        return None

    def _insert_chat(self, op: InsertChat) -> object:
        chat, then = op.chat, op.then
        key = (chat.sender, chat.msgid)
        stored = self._chats.get(key)
        if stored is not None:
            result = op.against(stored.token, stored.recipient, stored.digest)
            if result is not Inserted.NEW:
                return Guarded(result)
            # Its own token: an earlier attempt committed it, then and all.
            return Guarded(result, tuple(self._landed(inner) for inner in then))
        if not self.dry and any(
            isinstance(inner, Enqueue)
            and inner.required
            and self._enqueue_decided(inner) is not True
            for inner in then
        ):
            self._release(then)
            return Guarded(Inserted.FULL)
        self._chats[key] = _Stored(chat.recipient, op.token, op.digest)
        results = tuple(self.add(inner) for inner in then)
        doc = _chat_doc(chat, op.token, op.digest)
        self._write_late(
            "chats",
            UpdateOne({"_id": doc.pop("_id")}, {"$setOnInsert": doc}, upsert=True),
        )
        return Guarded(Inserted.NEW, results)

    def _enqueue_decided(self, op: Enqueue) -> bool | None:
        found = self.enqueues.get(id(op))
        return None if found is None else found.ok

    def _landed(self, op: Op) -> object:
        """The result of an operation an earlier attempt committed, where it is known."""
        found = self.enqueues.get(id(op))
        return found if isinstance(op, Enqueue) and found is not None and found.landed else None


def _chat(doc: dict[str, Any]) -> ChatRecord:
    return ChatRecord(*(doc[f] for f in _CHAT_FIELDS))


def _result(result: object) -> object:
    """What a submit answers for what the plan answered."""
    if isinstance(result, _Enq):
        return None if result.seq is None else Queued(result.seq, result.notices)
    if isinstance(result, Guarded):
        return Guarded(result.outcome, tuple(_result(r) for r in result.then))
    return result


def _counted(docs: Sequence[dict[str, Any]]) -> dict[str, int]:
    """A queue's counters, counted from its entries (which they must match)."""
    counted = {"queued": 0, "queued_bytes": 0, "notices": 0}
    for doc in docs:
        counted["queued"] += 1
        counted["queued_bytes"] += doc.get("size", 0)
        counted["notices"] += doc.get("notice") is not None
    return counted


def _marked_at(token: str) -> int:
    """When a reservation mark was made, in ms (0 if it does not say)."""
    made, _, _ = token.partition("-")
    return int(made) if made.isdigit() else 0


def _runs(ops: Sequence[Op]) -> Iterator[Sequence[Op]]:
    """ops cut so that each DropSession and DiscardSession is a run of its own."""
    start = 0
    for i, op in enumerate(ops):
        if isinstance(op, DropSession | DiscardSession):
            if i > start:
                yield ops[start:i]
            yield ops[i : i + 1]
            start = i + 1
    if start < len(ops):
        yield ops[start:]


@implementer(IStore)
@attrs.define
class MongoStore:
    name = "mongodb"
    _reactor: IReactorTime
    _uri: str
    _latency: Histogram | None = None
    _retention_days: int = 30
    # Seconds before an unanswered request counts as "store unavailable".
    _timeout: float = 10.0
    # What this process says of itself in "servers" while it uses the store.
    _holder: str = attrs.Factory(lambda: f"sktalent on {socket.gethostname()} pid {os.getpid()}")
    # Opened to copy a store in (python -m sktalent.migrate): while such a
    # process is heard of, no other may start on the store.
    _copying: bool = False
    _token: str = attrs.field(factory=lambda: secrets.token_hex(8), init=False)
    _beating: LoopingCall | None = attrs.field(default=None, init=False)
    _database: str = attrs.field(init=False)
    _where: str = attrs.field(init=False)
    _committer: GroupCommitter = attrs.field(init=False)
    _writes: ConnectionPool | None = attrs.field(default=None, init=False)
    _reads: ConnectionPool | None = attrs.field(default=None, init=False)
    # The batches (by identity) attempted and not yet committed: one tried
    # again may have landed in part.
    _attempted: set[int] = attrs.field(factory=set, init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._database = database_name(self._uri)
        self._where = where(self._uri)
        self._committer = GroupCommitter(
            lambda ops: self._guard(self._commit(ops)),
            self._reactor,
            self.name,
            self._latency,
            alive=self.ping,
            patience=self._timeout,
        )

    @property
    def committer(self) -> GroupCommitter:
        return self._committer

    @property
    def available(self) -> bool:
        return self._committer.available

    @property
    def outages(self) -> int:
        return self._committer.outages

    @property
    def _db(self) -> Database:
        """The database as reads and pings reach it."""
        assert self._reads is not None, "MongoStore used before start()"
        return self._reads[self._database]

    @property
    def _writing(self) -> Database:
        """The database as commits (and purges) reach it."""
        assert self._writes is not None, "MongoStore used before start()"
        return self._writes[self._database]

    def _connect(self) -> None:
        # txmongo connects when a pool is made, so not before it is used.
        # Each pool reconnects on its own: within half the timeout of the
        # server's return, so that neither waits on the other's backoff.
        if self._writes is None:
            self._writes, self._reads = (
                ConnectionPool(self._uri, w=1, j=True, max_delay=self._timeout / 2)
                for _ in range(2)
            )

    def start(self) -> Deferred[None]:
        self._connect()
        return self._guard(self._start())

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self._committer.stop()
        await self._unregister()
        for pool in (self._writes, self._reads):
            if pool is not None:
                await pool.disconnect()
        self._writes = self._reads = None

    def submit(self, ops: Sequence[Op]) -> Deferred[list[object]]:
        return self._committer.submit(ops)

    def open_session(self, client_id: str, limit: int) -> Deferred[SessionRecord | None]:
        return self._guard(self._open_session(client_id, limit))

    def read_queue(self, client_id: str, after: int, limit: int) -> Deferred[list[QueuedMessage]]:
        return self._guard(self._read_queue(client_id, after, limit))

    def session_summary(self, client_id: str) -> Deferred[SessionSummary | None]:
        return self._guard(self._session_summary(client_id))

    def pending_pushes(
        self, after: tuple[str, int] | None, limit: int, client_id: str | None = None
    ) -> Deferred[list[PendingPush]]:
        return self._guard(self._pending_pushes(after, limit, client_id))

    def expire(self, before: int, keep: Collection[tuple[str, int]]) -> Deferred[tuple[int, int]]:
        return self._guard(self._expire(before, frozenset(keep)))

    def queue_totals(self) -> Deferred[QueueTotals]:
        return self._guard(self._queue_totals())

    def load_subscriptions(self) -> Deferred[list[tuple[str, tuple[tuple[str, int], ...]]]]:
        return self._guard(self._load_subscriptions())

    def load_sessions(self) -> Deferred[list[SessionRecord]]:
        return self._guard(self._load_sessions())

    def load_retained(self) -> Deferred[list[Message]]:
        return self._guard(self._load_retained())

    def chat_history(self, o_id: str, limit: int, before: str | None) -> Deferred[list[ChatRecord]]:
        return self._guard(self._chat_history(o_id, limit, before))

    def get_device(self, user_id: str) -> Deferred[Device | None]:
        return self._guard(self._get_device(user_id))

    def get_ban(self, client_id: str) -> Deferred[int | None]:
        return self._guard(self._get_ban(client_id))

    def ping(self) -> Deferred[None]:
        return self._guard(self._ping())

    def purge(self, older_than: int) -> Deferred[int]:
        return self._guard(self._purge(older_than))

    def _guard(self, work: Awaitable[_T]) -> Deferred[_T]:
        async def guarded() -> _T:
            try:
                return await work
            except TimeoutError as e:
                raise StoreUnavailable(
                    f"MongoDB store {self._where}: no answer within {self._timeout:g} s"
                ) from e
            except _UNAVAILABLE as e:
                raise StoreUnavailable(f"MongoDB store {self._where}: {e!r}") from e

        return Deferred.fromCoroutine(guarded())

    def _q(self, d: Deferred[_T]) -> Deferred[_T]:
        # txmongo waits for a connection forever; a store must answer.
        return d.addTimeout(self._timeout, self._reactor)

    # -- schema -----------------------------------------------------------------

    async def _start(self) -> None:
        await self._create_indexes()
        await self._upgrade()
        # On record before looking for a copy, as a copy is before looking
        # for users: of two starting together, at least one sees the other.
        self._beating = every(
            self._reactor,
            BEAT,
            self._beat,
            self._log,
            "Marking the MongoDB store in use stopped",
            now=False,
        )
        await self._beat()
        if not self._copying:
            copies = [who for who, _, copying in await self._heard() if copying]
            if copies:
                await self._unregister()
                raise StoreUnavailable(
                    f"MongoDB store {self._where}: a copy into it is under way ({copies[0]});"
                    " start once it has finished"
                )

    async def _unregister(self) -> None:
        if self._beating is not None:
            self._beating.stop()
            self._beating = None
            # Gone at once: no tool need wait for the beat to age.
            await self._quietly(self._db.servers.delete_one({"_id": self._token}))

    def _beat(self) -> Deferred[None]:
        """Say in the store that this process uses it, by the database server's clock."""
        mark = self._db.servers.update_one(
            {"_id": self._token},
            {
                "$set": {"holder": self._holder, "copying": self._copying},
                "$currentDate": {"at": True},
            },
            upsert=True,
        )
        return Deferred.fromCoroutine(self._quietly(mark))

    async def _quietly(self, work: Deferred[Any]) -> None:
        # While the store is unreachable it cannot be told anything.
        try:
            await self._guard(self._q(work))
        except StoreUnavailable:
            pass

    def others(self, forget: bool = True) -> Deferred[list[tuple[str, float]]]:
        """
        Every other process that used the store within LIVE seconds: what
        it says of itself, and how many seconds ago it last said it.  The
        records of processes gone are removed, unless not forget: then the
        store is only read, and may be asked before start(), whether to
        start on it at all.
        """
        self._connect()
        return self._guard(self._others(forget))

    async def _others(self, forget: bool) -> list[tuple[str, float]]:
        return [(who, ago) for who, ago, _ in await self._heard(forget)]

    async def _heard(self, forget: bool = True) -> list[tuple[str, float, bool]]:
        """Every other process heard of within LIVE: holder, seconds ago, copying."""
        now = (await self._q(self._db.command("isMaster")))["localTime"]
        found, gone = [], []
        for doc in await self._q(self._db.servers.find({"_id": {"$ne": self._token}})):
            ago = (now - doc["at"]).total_seconds()
            if ago < LIVE:
                found.append((str(doc.get("holder")), max(ago, 0.0), bool(doc.get("copying"))))
            else:
                gone.append(doc["_id"])
        if gone and forget:
            # Processes that died without taking their record back.
            await self._q(self._db.servers.delete_many({"_id": {"$in": gone}}))
        return found

    def copy_in(self, items: Sequence[Copied]) -> Deferred[None]:
        """
        Store items as they are, each replacing what is stored under its
        key.  A session's queue follows as QueueEntry items; copy_prune
        then removes what else was queued for it.
        """
        return self._guard(self._copy_in(items))

    async def _copy_in(self, items: Sequence[Copied]) -> None:
        docs: dict[str, list[dict[str, Any]]] = {}
        for item in items:
            collection, doc = _copied(item)
            docs.setdefault(collection, []).append(doc)
            if isinstance(item, StoredSession):
                client_id = item.record.client_id
                docs.setdefault("inbound", []).extend(
                    {"_id": _id(client_id, p), "client_id": client_id, "packet_id": p}
                    for p in sorted(item.record.inbound)
                )
        for collection, all_docs in docs.items():
            for some in _chunks(all_docs):
                if collection in _PRUNED:
                    # Told from what was stored before (copy_prune).
                    some = [doc | {"copied": self._token} for doc in some]
                await self._put(collection, some)

    def copy_prune(self, clients: Sequence[str]) -> Deferred[None]:
        """
        Once the sessions of clients and their queues are copied in, remove
        the queued messages and inbound packet ids stored for them before.
        """
        return self._guard(self._copy_prune(list(clients)))

    async def _copy_prune(self, clients: list[str]) -> None:
        db = self._writing
        for collection in _PRUNED:
            # Deleted by _id, a bounded number at a time: FerretDB deletes
            # by any other field many times slower.
            while found := await db[collection].find(
                {"client_id": {"$in": clients}, "copied": {"$ne": self._token}},
                {"_id": 1},
                limit=10 * _CHUNK,
            ):
                for ids in _chunks([doc["_id"] for doc in found]):
                    await db[collection].delete_many({"_id": {"$in": list(ids)}})

    async def _put(self, collection: str, docs: Sequence[dict[str, Any]]) -> None:
        """
        Store docs, each replacing the one with its _id: inserted, which is
        many times faster where nothing is stored yet, and those whose _id
        is taken replaced.
        """
        try:
            await self._writing[collection].bulk_write([InsertOne(d) for d in docs], ordered=False)
        except BulkWriteError as e:
            errors = e.details["writeErrors"]
            if any(error.get("code") != _DUPLICATE_KEY for error in errors):
                raise
            taken = [docs[error["index"]] for error in errors]
            await _bulk_write(
                self._writing[collection],
                [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in taken],
                ordered=False,
            )

    async def _create_indexes(self) -> None:
        db = self._db
        asc = qf.ASCENDING
        for collection, fields, unique in (
            ("queue", ("client_id", "seq"), True),
            ("queue", ("queued_at",), False),
            ("queue", ("pushed", "client_id", "seq"), False),
            ("queue", ("token",), False),
            ("inbound", ("client_id", "packet_id"), True),
            ("chats", ("sender", "msgid"), True),
            ("chats", ("o_id", "received_at", "msgid"), False),
            ("chats", ("received_at",), False),
            ("receipts", ("sender", "msgid"), True),
            ("bans", ("until",), False),
        ):
            keys = asc(fields[0])
            for f in fields[1:]:
                keys += asc(f)
            await self._q(db[collection].create_index(qf.sort(keys), unique=unique))
        for collection in ("chats", "receipts"):
            await self._create_ttl_index(collection)

    async def _create_ttl_index(self, collection: str) -> None:
        index = self._db[collection]
        seconds = self._retention_days * 86400
        try:
            await self._q(
                index.create_index(qf.sort(qf.ASCENDING("time")), expireAfterSeconds=seconds)
            )
        except OperationFailure as e:
            if e.code == _NOT_IMPLEMENTED:
                self._log.warn(
                    "MongoDB server has no TTL indexes: {collection} older than"
                    " {days} days is removed only by purge",
                    collection=collection,
                    days=self._retention_days,
                )
            elif e.code == _INDEX_OPTIONS_CONFLICT:
                # The retention changed since the index was made.
                await self._q(index.drop_index(qf.sort(qf.ASCENDING("time"))))
                await self._q(
                    index.create_index(qf.sort(qf.ASCENDING("time")), expireAfterSeconds=seconds)
                )
            else:
                raise

    async def _upgrade(self) -> None:
        """
        Bring documents written by an older server up to this one, once: each
        session gets its counters from its queue, and each queue entry its
        size and the time it was queued (those without count from now).
        """
        db = self._writing
        schema = await self._q(db.meta.find_one({"_id": "schema"}))
        if schema is not None and schema.get("version", 0) >= _SCHEMA:
            return
        now = int(self._reactor.seconds() * 1000)
        await self._q(
            db.queue.update_many({"queued_at": {"$exists": False}}, {"$set": {"queued_at": now}})
        )
        counters: dict[str, dict[str, int]] = {}
        sizes: list[_Write] = []
        fields = {"client_id": 1, "seq": 1, "payload": 1, "notice": 1, "size": 1}
        for doc in await self._q(db.queue.find({}, fields)):
            size = doc.get("size")
            if size is None:
                size = len(doc["payload"])
                sizes.append(UpdateOne({"_id": doc["_id"]}, {"$set": {"size": size}}))
            c = counters.setdefault(doc["client_id"], dict(_COUNTERS))
            c["next_seq"] = max(c["next_seq"], doc["seq"] + 1)
            c["queued"] += 1
            c["queued_bytes"] += size
            c["notices"] += doc.get("notice") is not None
        for chunk in _chunks(sizes, _BULK):
            await self._q(db.queue.bulk_write(list(chunk), ordered=False))
        # Sessions kept before the flag existed are taken to have connected;
        # what they sent is unknown.
        for field, value in (("has_connected", True), ("clean", False), ("sent_through", None)):
            await self._q(
                db.sessions.update_many({field: {"$exists": False}}, {"$set": {field: value}})
            )
        # A crash between writes can leave queue entries without their
        # session document; they still belong to a session.
        upgrades = [
            UpdateOne(
                {"_id": client_id},
                {"$set": c, "$setOnInsert": {"subscriptions": [], "has_connected": False}},
                upsert=True,
            )
            for client_id, c in counters.items()
        ]
        for chunk in _chunks(upgrades, _BULK):
            await self._q(db.sessions.bulk_write(list(chunk), ordered=False))
        await self._q(
            db.sessions.update_many({"next_seq": {"$exists": False}}, {"$set": _COUNTERS})
        )
        try:
            await self._q(
                db.meta.update_one({"_id": "schema"}, {"$set": {"version": _SCHEMA}}, upsert=True)
            )
        except DuplicateKeyError:
            pass  # Another node starting on the same database recorded it first.

    # -- commits ----------------------------------------------------------------

    async def _commit(self, ops: Sequence[Op]) -> list[object]:
        try:
            return await self._apply(ops)
        except CancelledError:
            # Given up because the server stopped answering: what was sent
            # must not run ahead of the retry if it comes back.
            assert self._writes is not None
            for connection in self._writes.getprotocols():
                if connection.instance is not None:
                    connection.instance.transport.abortConnection()
            raise

    async def _apply(self, ops: Sequence[Op]) -> list[object]:
        batch = id(ops)
        retried = batch in self._attempted
        self._attempted.add(batch)
        db = self._writing
        known: dict[_Key, _Stored] = {}
        fields = {"sender": 1, "msgid": 1, "recipient": 1, "token": 1, "digest": 1}
        for chunk in _chunks(list(dict.fromkeys(_chat_keys(ops)))):
            for doc in await db.chats.find(_ids_in(chunk), fields):
                known[(doc["sender"], doc["msgid"])] = _Stored(
                    doc["recipient"], doc.get("token"), doc.get("digest")
                )
        landed = await self._landed(ops) if retried else {}
        results: list[object] = []
        for run in _runs(ops):
            results += await self._commit_run(run, known, landed)
        self._attempted.discard(batch)
        return results

    async def _landed(self, ops: Sequence[Op]) -> dict[str, _Enq]:
        """The Enqueues of a batch tried again that an earlier attempt stored, by token."""
        tokens = [op.token for op in every_op(ops) if isinstance(op, Enqueue)]
        found: dict[str, _Enq] = {}
        for chunk in _chunks(tokens):
            for doc in await self._writing.queue.find(
                {"token": {"$in": list(chunk)}}, {"client_id": 1, "seq": 1, "token": 1}
            ):
                found[doc["token"]] = _Enq(
                    Enqueue(doc["client_id"], Message("", b"", 1)), True, doc["seq"], landed=True
                )
        return found

    async def _commit_run(
        self, ops: Sequence[Op], known: dict[_Key, _Stored], landed: dict[str, _Enq]
    ) -> list[object]:
        db = self._writing
        match ops:
            case [DropSession(client_id)]:
                await db.sessions.delete_one({"_id": client_id})
                # Nobody reads a dropped session's queue: its seqs start again.
                await db.seqs.delete_one({"_id": client_id})
                for collection in ("queue", "inbound"):
                    await db[collection].delete_many({"client_id": client_id})
                return [None]
            case [DiscardSession(client_id, through)]:
                await self._discard(client_id, through)
                return [None]
        # First the Enqueues and the room they need, then what is decided.
        enqueues: dict[int, _Enq] = {}
        for op in every_op(ops):
            if isinstance(op, Enqueue) and op.token in landed:
                enqueues[id(op)] = attrs.evolve(landed[op.token], op=op)
        _Plan(dict(known), enqueues, dry=True).add_all(ops)
        reserving = [e for e in enqueues.values() if not e.landed]
        # What is dequeued is read meanwhile: it does not touch what is reserved.
        dequeued = ensureDeferred(self._dequeued(ops))
        try:
            marked, hints = await self._reserve(reserving) if reserving else ([], {})
        finally:
            removed = await dequeued
        plan = _Plan(known, enqueues, dry=False)
        results = plan.add_all(ops)
        sessions = plan.early.setdefault("sessions", [])
        sessions += await self._insert(plan.accepted, hints)
        self._counted(plan)
        sessions += removed
        # Last (the bulk is ordered): while a mark is on, the counters may
        # be ahead of the queue, and are not put right (_open_session).
        sessions += marked
        # One command at a time, so that a store's pool serves every node (_BULK).
        for name, writes in [*plan.early.items(), *plan.late]:
            await _bulk_write(db[name], writes)
        return [_result(r) for r in results]

    async def _reserve(self, enqueues: list[_Enq]) -> tuple[list[_Write], dict[str, int]]:
        """
        Count the Enqueues in their sessions where they have room, and
        decide which: each client's together in one conditional update,
        one by one for a client whose messages do not all fit.  Answer the
        writes that take the batch's marks out again, and each client's
        next seq as its session said (a hint).
        """
        by_client: dict[str, list[_Enq]] = {}
        for enq in enqueues:
            by_client.setdefault(enq.op.client_id, []).append(enq)
        # When it was made, so that one a crash left behind can be told.
        token = f"{int(self._reactor.seconds() * 1000)}-{secrets.token_hex(6)}"
        marked: list[_Write] = []
        hints: dict[str, int] = {}
        docs = await self._reserve_groups(by_client, token)
        missing = [c for c in by_client if c not in docs]
        if missing:
            # Sessions made by these messages: made first (not by an upsert,
            # which two processes racing for one session may both fail).
            made = [InsertOne({"_id": c, "subscriptions": [], **_NEW}) for c in missing]
            try:
                await self._writing.sessions.bulk_write(made, ordered=False)
            except BulkWriteError as e:
                if any(w.get("code") != _DUPLICATE_KEY for w in e.details["writeErrors"]):
                    raise
            docs |= await self._reserve_groups({c: by_client[c] for c in missing}, token)
        for client_id, group in by_client.items():
            doc = docs.get(client_id, {})
            hints[client_id] = doc.get("next_seq", 1)
            marked.append(UpdateOne({"_id": client_id}, {"$pull": {"reserved": token}}))
            if token in doc.get("reserved", ()):
                for enq in group:
                    enq.ok, enq.notices = True, doc.get("notices", 0)
                continue
            # At its limit: message by message, as far as each fits.
            for enq in group:
                one = await self._writing.sessions.find_one_and_update(
                    {"_id": client_id, **self._fits([enq])},
                    {
                        "$inc": {
                            "queued": 1,
                            "queued_bytes": enq.size,
                            "notices": int(enq.op.notice is not None),
                        },
                        "$addToSet": {"reserved": token},
                    },
                    return_document=True,
                )
                enq.ok = one is not None
                enq.notices = 0 if one is None else one.get("notices", 0)
                if one is not None:
                    hints[client_id] = max(hints[client_id], one.get("next_seq", 1))
        return marked, hints

    async def _reserve_groups(
        self, by_client: dict[str, list[_Enq]], token: str
    ) -> dict[str, dict[str, Any]]:
        """
        Try each client's group at once, marking the session with token
        where it took; answer the session documents found, after.
        """
        if not by_client:
            return {}
        sessions = self._writing.sessions
        writes: list[_Write] = [
            UpdateOne(
                {"_id": client_id, **self._fits(group)},
                {
                    "$inc": {
                        "queued": len(group),
                        "queued_bytes": sum(e.size for e in group),
                        "notices": sum(e.op.notice is not None for e in group),
                    },
                    # Taken out once the batch is written.
                    "$addToSet": {"reserved": token},
                },
            )
            for client_id, group in by_client.items()
        ]
        await _bulk_write(sessions, writes, ordered=False)
        docs: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(list(by_client)):
            found = sessions.find(
                {"_id": {"$in": list(chunk)}}, {"reserved": 1, "notices": 1, "next_seq": 1}
            )
            for doc in await found:
                docs[doc["_id"]] = doc
        return docs

    @staticmethod
    def _fits(group: list[_Enq]) -> dict[str, Any]:
        """The condition under which a session has room for every message of group, in turn."""
        messages = bytes_ = None
        total = 0
        for i, enq in enumerate(group):
            total += enq.size
            room = enq.op.room
            if room is not None:
                left = room.messages - (i + 1)
                left_bytes = room.bytes - total
                messages = left if messages is None else min(messages, left)
                bytes_ = left_bytes if bytes_ is None else min(bytes_, left_bytes)
        condition: dict[str, Any] = {}
        if messages is not None and bytes_ is not None:
            condition = {"queued": {"$lte": messages}, "queued_bytes": {"$lte": bytes_}}
        return condition

    async def _insert(self, accepted: list[_Enq], hints: dict[str, int]) -> list[_Write]:
        """
        Insert the accepted messages in order, each at the next free seq of
        its client from the hint: a seq taken meanwhile is retried above the
        highest in the queue; one given by the Enqueue must be free.  Answer
        the writes that raise the hints past what was inserted.
        """
        if not accepted:
            return []
        db = self._writing
        clients = list(dict.fromkeys(e.op.client_id for e in accepted))
        hints = {c: hints.get(c, 1) for c in clients}
        await self._raise_hints(hints, "seqs", "next")
        pending = list(accepted)
        while pending:
            await self._reserve_seqs(pending, hints)
            docs = []
            for enq in pending:
                client_id, op = enq.op.client_id, enq.op
                if enq.seq is None:
                    enq.seq = hints[client_id] if op.seq is None else op.seq
                hints[client_id] = max(hints[client_id], enq.seq + 1)
                queued = QueuedMessage(
                    enq.seq, op.message, queued_at=op.queued_at, notice=op.notice
                )
                docs.append(InsertOne(_queue_doc(client_id, queued) | {"token": op.token}))
            try:
                await db.queue.bulk_write(docs)
            except BulkWriteError as e:
                [error, *_] = e.details["writeErrors"]
                index = error["index"]
                taken = pending[index]
                if error.get("code") != _DUPLICATE_KEY:
                    raise
                if taken.op.seq is not None:
                    raise QueueConflict(f"seq {taken.seq} of {taken.op.client_id} is taken") from e
                # Another process took the seq: this client's messages from
                # here go above the highest in its queue, in order.
                client_id = taken.op.client_id
                top = await db.queue.find(
                    {"client_id": client_id},
                    {"seq": 1},
                    sort=qf.sort(qf.DESCENDING("seq")),
                    limit=1,
                )
                hints[client_id] = (top[0]["seq"] if top else 0) + 1
                await self._raise_hints(hints, "seqs", "next", [client_id])
                pending = pending[index:]
                for enq in pending:
                    if enq.op.client_id == client_id and enq.op.seq is None:
                        enq.seq = None
                continue
            pending = []
        return [UpdateOne({"_id": c}, {"$max": {"next_seq": hints[c]}}) for c in clients]

    async def _raise_hints(
        self,
        hints: dict[str, int],
        collection: str,
        field: str,
        clients: Collection[str] | None = None,
    ) -> None:
        """Raise hints (of clients, or all) to what collection's field holds, if higher."""
        wanted = list(hints) if clients is None else list(clients)
        for chunk in _chunks(wanted):
            for doc in await self._writing[collection].find(
                {"_id": {"$in": list(chunk)}}, {field: 1}
            ):
                hints[doc["_id"]] = max(hints[doc["_id"]], doc.get(field, 1))

    async def _reserve_seqs(self, pending: Sequence[_Enq], hints: dict[str, int]) -> None:
        """
        Raise each client's reserved seqs past those pending will take from
        hints, before any of them is inserted.
        """
        top = dict(hints)
        for enq in pending:
            client_id, given = enq.op.client_id, enq.op.seq
            seq = enq.seq if enq.seq is not None else top[client_id] if given is None else given
            top[client_id] = max(top[client_id], seq + 1)
        writes = [UpdateOne({"_id": c}, {"$max": {"next": n}}, upsert=True) for c, n in top.items()]
        try:
            await _bulk_write(self._writing.seqs, writes, ordered=False)
        except (BulkWriteError, KeyError):
            # Two processes made a client's document at once and one upsert
            # lost with a duplicate key (FerretDB's answer then lacks the
            # nModified that txmongo reads, a KeyError).  It exists now, and
            # $max can be applied again.
            await _bulk_write(self._writing.seqs, writes, ordered=False)

    def _counted(self, plan: _Plan) -> None:
        """Give back the room reserved for what was not stored."""
        for enq in plan.released:
            plan.early.setdefault("sessions", []).append(
                UpdateOne(
                    {"_id": enq.op.client_id},
                    {
                        "$inc": {
                            "queued": -1,
                            "queued_bytes": -enq.size,
                            "notices": -int(enq.op.notice is not None),
                        }
                    },
                )
            )

    async def _dequeued(self, ops: Sequence[Op]) -> list[_Write]:
        """The writes that take what is dequeued, and found, out of its session's counters."""
        keys = [_id(op.client_id, op.seq) for op in ops if isinstance(op, Dequeue)]
        if not keys:
            return []
        removed: dict[str, list[int]] = {}
        for chunk in _chunks(keys):
            for doc in await self._writing.queue.find(
                {"_id": {"$in": list(chunk)}},
                {"client_id": 1, "seq": 1, "size": 1, "notice": 1},
            ):
                r = removed.setdefault(doc["client_id"], [0, 0, 0, 0])
                r[0] += 1
                r[1] += doc.get("size", 0)
                r[2] += doc.get("notice") is not None
                r[3] = max(r[3], doc["seq"] + 1)
        return [
            UpdateOne(
                {"_id": client_id},
                {
                    "$inc": {"queued": -n, "queued_bytes": -size, "notices": -notices},
                    # A seq once used is never used again, even if the hint lagged.
                    "$max": {"next_seq": above},
                },
            )
            for client_id, (n, size, notices, above) in removed.items()
        ]

    async def _discard(self, client_id: str, through: int) -> None:
        db = self._writing
        await db.queue.delete_many({"client_id": client_id, "seq": {"$lte": through}})
        await db.inbound.delete_many({"client_id": client_id})
        counted = _counted(await db.queue.find({"client_id": client_id}, {"size": 1, "notice": 1}))
        update = {
            "subscriptions": [],
            "has_connected": False,
            "clean": False,
            "sent_through": 0,
            **counted,
        }
        await db.sessions.update_one(
            {"_id": client_id},
            {"$set": update, "$max": {"next_seq": through + 1}},
        )

    async def _open_session(self, client_id: str, limit: int) -> SessionRecord | None:
        db = self._db
        doc = await self._q(db.sessions.find_one({"_id": client_id}))
        if doc is None:
            return None
        await self._repair(doc)
        queue = await self._read_queue(client_id, 0, limit)
        inbound = await self._q(db.inbound.find({"client_id": client_id}, {"packet_id": 1}))
        return self._record(doc, queue, inbound)

    async def _repair(self, doc: dict[str, Any]) -> None:
        """
        Put right the counters a crash left off the queue (a batch that
        died between its writes): only while no reservation is under way,
        and only if they did not change since doc was read.  A mark older
        than STALE_MARK is a dead batch's, and taken off.
        """
        db = self._db
        reserved = doc.get("reserved", [])
        oldest = int((self._reactor.seconds() - STALE_MARK) * 1000)
        stale = [t for t in reserved if _marked_at(t) < oldest]
        if len(stale) < len(reserved):
            return
        entries = db.queue.find({"client_id": doc["_id"]}, {"size": 1, "notice": 1})
        counted = _counted(await self._q(entries))
        if not stale and all(doc.get(k, 0) == v for k, v in counted.items()):
            return
        unchanged = {k: doc.get(k, 0) for k in counted} | {"reserved": reserved}
        if "reserved" not in doc:
            unchanged["reserved"] = {"$exists": False}
        update: dict[str, Any] = {"$set": counted | {"reserved": []}}
        await self._q(db.sessions.update_one({"_id": doc["_id"], **unchanged}, update))

    @staticmethod
    def _record(
        doc: dict[str, Any], queue: Sequence[QueuedMessage], inbound: Sequence[dict[str, Any]]
    ) -> SessionRecord:
        return SessionRecord(
            doc["_id"],
            _subscriptions(doc),
            tuple(queue),
            frozenset(d["packet_id"] for d in inbound),
            doc.get("has_connected", True),
            doc.get("clean", False),
            doc.get("sent_through"),
        )

    async def _read_queue(self, client_id: str, after: int, limit: int) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        docs = await self._q(
            self._db.queue.find(
                {"client_id": client_id, "seq": {"$gt": after}},
                sort=qf.sort(qf.ASCENDING("seq")),
                limit=limit,
            )
        )
        return [_queued(d) for d in docs]

    async def _session_summary(self, client_id: str) -> SessionSummary | None:
        db = self._db
        doc = await self._q(db.sessions.find_one({"_id": client_id}))
        if doc is None:
            return None
        first = await self._q(
            db.queue.find(
                {"client_id": client_id},
                {"queued_at": 1},
                sort=qf.sort(qf.ASCENDING("seq")),
                limit=1,
            )
        )
        return SessionSummary(
            doc.get("queued", 0),
            doc.get("queued_bytes", 0),
            first[0]["queued_at"] if first else None,
            doc.get("next_seq", 1) - 1,
        )

    async def _pending_pushes(
        self, after: tuple[str, int] | None, limit: int, client_id: str | None
    ) -> list[PendingPush]:
        if limit <= 0:
            return []
        db = self._db
        query: dict[str, Any] = {"pushed": False, "notice": {"$ne": None}}
        if client_id is not None:
            query["client_id"] = client_id
            if after is not None:
                query["seq"] = {"$gt": after[1]}
        elif after is not None:
            query["$or"] = [
                {"client_id": {"$gt": after[0]}},
                {"client_id": after[0], "seq": {"$gt": after[1]}},
            ]
        order = qf.sort(qf.ASCENDING("client_id") + qf.ASCENDING("seq"))
        docs = await self._q(
            db.queue.find(
                query,
                {"client_id": 1, "seq": 1, "notice": 1, "queued_at": 1},
                sort=order,
                limit=limit,
            )
        )
        clients = list(dict.fromkeys(d["client_id"] for d in docs))
        badges: dict[str, int] = {}
        for chunk in _chunks(clients):
            for s in await self._q(db.sessions.find({"_id": {"$in": list(chunk)}}, {"notices": 1})):
                badges[s["_id"]] = s.get("notices", 0)
        return [
            PendingPush(
                d["client_id"], d["seq"], d["notice"], d["queued_at"], badges.get(d["client_id"], 0)
            )
            for d in docs
        ]

    async def _expire(self, before: int, keep: frozenset[tuple[str, int]]) -> tuple[int, int]:
        db = self._writing
        old = await self._q(
            db.queue.find(
                {"queued_at": {"$lt": before}},
                {"client_id": 1, "seq": 1, "size": 1, "notice": 1},
            )
        )
        old = [d for d in old if (d["client_id"], d["seq"]) not in keep]
        removed: dict[str, list[int]] = {}
        for chunk in _chunks(old):
            result = await self._q(
                db.queue.delete_many({"_id": {"$in": [d["_id"] for d in chunk]}})
            )
            if result.deleted_count:
                for d in chunk:
                    r = removed.setdefault(d["client_id"], [0, 0, 0, 0])
                    r[0] += 1
                    r[1] += d.get("size", 0)
                    r[2] += d.get("notice") is not None
                    r[3] = max(r[3], d["seq"] + 1)
        writes: list[_Write] = [
            UpdateOne(
                {"_id": c},
                {
                    "$inc": {"queued": -n, "queued_bytes": -size, "notices": -notices},
                    "$max": {"next_seq": above},
                },
            )
            for c, (n, size, notices, above) in removed.items()
        ]
        for chunk in _chunks(writes, _BULK):
            await self._q(db.sessions.bulk_write(list(chunk), ordered=False))
        idle = await self._q(db.sessions.delete_many({"has_connected": False, "queued": 0}))
        return len(old), idle.deleted_count

    async def _queue_totals(self) -> QueueTotals:
        db = self._db
        # Summed in the server: a million sessions are not sent over.  One
        # sum per request: FerretDB computes only the first of a $group.
        sums: list[int] = []
        for field in ("queued", "queued_bytes"):
            group = {"$group": {"_id": "all", "sum": {"$sum": f"${field}"}}}
            [summed] = await self._q(db.sessions.aggregate([group])) or [{}]
            sums.append(summed.get("sum", 0))
        messages, size = sums
        sessions = await self._q(db.sessions.count_documents({}))
        first = await self._q(
            db.queue.find({}, {"queued_at": 1}, sort=qf.sort(qf.ASCENDING("queued_at")), limit=1)
        )
        return QueueTotals(sessions, messages, size, first[0]["queued_at"] if first else None)

    async def _load_subscriptions(self) -> list[tuple[str, tuple[tuple[str, int], ...]]]:
        docs = await self._q(self._db.sessions.find({}, {"subscriptions": 1, "clean": 1}))
        return [
            (d["_id"], _subscriptions(d))
            for d in docs
            if d.get("subscriptions") and not d.get("clean", False)
        ]

    async def _load_sessions(self) -> list[SessionRecord]:
        db = self._db
        queues: dict[str, list[QueuedMessage]] = {}
        by_seq = qf.sort(qf.ASCENDING("client_id") + qf.ASCENDING("seq"))
        for doc in await self._q(db.queue.find({}, sort=by_seq)):
            queues.setdefault(doc["client_id"], []).append(_queued(doc))
        inbound: dict[str, list[dict[str, Any]]] = {}
        for doc in await self._q(db.inbound.find({})):
            inbound.setdefault(doc["client_id"], []).append(doc)
        docs = await self._q(db.sessions.find({}, sort=qf.sort(qf.ASCENDING("_id"))))
        return [
            self._record(doc, queues.get(doc["_id"], ()), inbound.get(doc["_id"], ()))
            for doc in docs
        ]

    async def _load_retained(self) -> list[Message]:
        return [_message(doc) for doc in await self._q(self._db.retained.find({}))]

    async def _chat_history(self, o_id: str, limit: int, before: str | None) -> list[ChatRecord]:
        if limit <= 0:
            return []
        chats = self._db.chats
        query: dict[str, Any] = {"o_id": o_id}
        if before is not None:
            oldest_first = qf.sort(qf.ASCENDING("received_at") + qf.ASCENDING("msgid"))
            pivot = await self._q(
                chats.find_one({"o_id": o_id, "msgid": before}, sort=oldest_first)
            )
            if pivot is None:
                return []
            t = pivot["received_at"]
            query["$or"] = [
                {"received_at": {"$lt": t}},
                {"received_at": t, "msgid": {"$lt": before}},
            ]
        newest_first = qf.sort(qf.DESCENDING("received_at") + qf.DESCENDING("msgid"))
        docs = await self._q(chats.find(query, sort=newest_first, limit=limit))
        return [_chat(doc) for doc in reversed(docs)]

    async def _get_device(self, user_id: str) -> Device | None:
        doc = await self._q(self._db.devices.find_one({"_id": user_id}))
        if doc is None:
            return None
        # Devices stored before logging out existed have no logged_out field.
        return Device(user_id, doc.get("platform"), doc.get("token"), doc.get("logged_out", False))

    async def _get_ban(self, client_id: str) -> int | None:
        doc = await self._q(self._db.bans.find_one({"_id": client_id}))
        return None if doc is None else int(doc["until"])

    async def _ping(self) -> None:
        await self._q(self._db.command("ping"))

    async def _purge(self, older_than: int) -> int:
        db = self._writing
        await self._q(db.bans.delete_many({"until": {"$lt": older_than}}))
        old = await self._q(
            db.chats.find({"received_at": {"$lt": older_than}}, {"sender": 1, "msgid": 1})
        )
        removed = 0
        for chunk in _chunks(old):
            # Receipts first: a crash here leaves a chat without its receipt,
            # never a receipt without its chat.
            await self._q(
                db.receipts.delete_many(_ids_in([(d["sender"], d["msgid"]) for d in chunk]))
            )
            result = await self._q(
                db.chats.delete_many({"_id": {"$in": [d["_id"] for d in chunk]}})
            )
            removed += result.deleted_count
        return removed
