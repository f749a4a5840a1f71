"""
The MongoDB store (also FerretDB), through txmongo with journaled writes.

There are no multi-document transactions to lean on, so each batch is written
in an order where a crash part way can only cause a redelivery, never a loss:
a chat message or receipt is written only after the operations that depend on
it (its ``then``), and whether it is new is decided from one read at the start.
Writes are grouped into one bulk request per collection where order allows.

Commits have a connection of their own, and no deadline: one request at a time
goes over a connection, so a commit abandoned for being slow would go on in
the server ahead of its own retry.  A commit is given up only when the server
stops answering pings on the other connection, which also serves every read,
so /healthz and the API are not queued behind commits.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, assert_never

import attrs
from bson import Binary
from prometheus_client import Histogram
from pymongo import DeleteMany, DeleteOne, ReplaceOne, UpdateOne
from pymongo.errors import ConfigurationError, ConnectionFailure, OperationFailure
from pymongo.uri_parser import parse_uri
from twisted.internet import error as netError
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    TimeoutError,
    gatherResults,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from txmongo import filter as qf
from txmongo.connection import ConnectionPool
from txmongo.database import Database
from txmongo.errors import TimeExceeded
from zope.interface import implementer

from .group import GroupCommitter
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
    StoreUnavailable,
)

_T = TypeVar("_T")
_Write = UpdateOne | ReplaceOne | DeleteOne | DeleteMany
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
# Bounds the size of one $or query or $in list.
_CHUNK = 500

_CHAT_FIELDS = ("msgid", "sender", "recipient", "o_id", "envelope", "received_at")


def database_name(uri: str) -> str:
    """The database a mongodb:// URI names; ValueError if it names none."""
    try:
        name = parse_uri(uri)["database"]
    except ConfigurationError as e:
        raise ValueError(f"bad MongoDB store URI {uri!r}: {e}") from None
    if not name:
        raise ValueError(f"MongoDB store URI {uri!r} names no database: use mongodb://HOST:PORT/DB")
    return str(name)


def _where(uri: str) -> str:
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


def _chat_keys(ops: Sequence[Op]) -> Iterator[_Key]:
    for op in ops:
        match op:
            case InsertChat(chat, then, _, _):
                yield (chat.sender, chat.msgid)
                yield from _chat_keys(then)
            case MarkReceived(sender, msgid, _, _, then):
                yield (sender, msgid)
                yield from _chat_keys(then)
            case ChatStored(sender, msgid):
                yield (sender, msgid)
            case (
                PutSession()
                | DropSession()
                | Enqueue()
                | MarkPushed()
                | Release()
                | Dequeue()
                | AddInbound()
                | RemoveInbound()
                | SetRetained()
                | PutDevice()
                | LogOut()
                | DropDevice()
                | SetBan()
            ):
                pass  # No chat to look up.
            case _:
                assert_never(op)


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _id(*parts: object) -> str:
    """
    A document id made of its key fields.  Every lookup and upsert goes by _id
    because that is the one index FerretDB v1 uses for them; without it each
    write scans the collection.
    """
    return json.dumps(parts, ensure_ascii=False)


def _ids_in(keys: Sequence[_Key]) -> dict[str, Any]:
    return {"_id": {"$in": [_id(s, m) for s, m in keys]}}


@attrs.frozen
class _Stored:
    recipient: str
    # None for a chat stored before tokens or digests existed.
    token: str | None
    digest: str | None


@attrs.define
class _Plan:
    """
    A batch as bulk writes.  ``early`` writes (everything but chats and
    receipts) touch disjoint documents per collection, so collections may go
    in any order; ``late`` runs follow them strictly in order.
    """

    # (sender, msgid) -> what is stored of every chat that exists at this point.
    _chats: dict[_Key, _Stored]
    early: dict[str, list[_Write]] = attrs.Factory(dict)
    late: list[tuple[str, list[_Write]]] = attrs.Factory(list)
    _touched: set[str] = attrs.Factory(set)

    def _write(self, collection: str, write: _Write) -> None:
        self.early.setdefault(collection, []).append(write)

    def _write_late(self, collection: str, write: _Write) -> None:
        if self.late and self.late[-1][0] == collection:
            self.late[-1][1].append(write)
        else:
            self.late.append((collection, [write]))

    def _touch(self, client_id: str) -> None:
        # A message or packet id may arrive before the session's own record.
        if client_id not in self._touched:
            self._touched.add(client_id)
            new = {"subscriptions": [], "has_connected": False}
            self._write(
                "sessions", UpdateOne({"_id": client_id}, {"$setOnInsert": new}, upsert=True)
            )

    def add(self, op: Op) -> object:
        match op:
            case PutSession(client_id, subscriptions, has_connected):
                self._touched.add(client_id)
                # FerretDB stores no nested arrays, hence documents.
                subs = [{"filter": f, "qos": q} for f, q in subscriptions]
                update: dict[str, Any] = {"$set": {"subscriptions": subs}}
                if has_connected:
                    update["$set"]["has_connected"] = True
                else:
                    update["$setOnInsert"] = {"has_connected": False}
                self._write("sessions", UpdateOne({"_id": client_id}, update, upsert=True))
            case DropSession(client_id):
                self._touched.discard(client_id)
                self._write("sessions", DeleteOne({"_id": client_id}))
                self._write("queue", DeleteMany({"client_id": client_id}))
                self._write("inbound", DeleteMany({"client_id": client_id}))
            case Enqueue(client_id, seq, message, queued_at, notice):
                self._touch(client_id)
                doc = {
                    "client_id": client_id,
                    "seq": seq,
                    "released": False,
                    "queued_at": queued_at,
                    "notice": notice,
                    "pushed": False,
                }
                doc |= _message_doc(message)
                self._write("queue", ReplaceOne({"_id": _id(client_id, seq)}, doc, upsert=True))
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
            case InsertChat(chat, then, token, digest):
                key = (chat.sender, chat.msgid)
                stored = self._chats.get(key)
                if stored is not None:
                    result = op.against(stored.token, stored.recipient, stored.digest)
                    if result is not Inserted.NEW:
                        return result
                self._chats[key] = _Stored(chat.recipient, token, digest)
                for inner in then:
                    self.add(inner)
                doc = attrs.asdict(chat) | {
                    "time": _date(chat.received_at),
                    "token": token,
                    "digest": digest,
                }
                self._write_late(
                    "chats",
                    UpdateOne(
                        {"_id": _id(chat.sender, chat.msgid)},
                        {"$setOnInsert": doc},
                        upsert=True,
                    ),
                )
                return Inserted.NEW
            case ChatStored(sender, msgid):
                stored = self._chats.get((sender, msgid))
                return None if stored is None else op.against(stored.recipient, stored.digest)
            case MarkReceived(sender, msgid, recipient, at, then):
                stored = self._chats.get((sender, msgid))
                if stored is None or stored.recipient != recipient:
                    return False
                for inner in then:
                    self.add(inner)
                self._write_late(
                    "receipts",
                    UpdateOne(
                        {"_id": _id(sender, msgid)},
                        {
                            "$setOnInsert": {
                                "sender": sender,
                                "msgid": msgid,
                                "at": at,
                                "time": _date(at),
                            }
                        },
                        upsert=True,
                    ),
                )
                return True
            case PutDevice(device):
                doc = {
                    "platform": device.platform,
                    "token": device.token,
                    "logged_out": device.logged_out,
                }
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


def _chat(doc: dict[str, Any]) -> ChatRecord:
    return ChatRecord(*(doc[f] for f in _CHAT_FIELDS))


@implementer(IStore)
@attrs.define
class MongoStore:
    name = "mongodb"
    _reactor: IReactorTime
    _uri: str
    _latency: Histogram | None = None
    _retention_days: int = 30
    # Seconds before an unanswered read or ping counts as "store unavailable",
    # and a commit's wait before pings are asked whether the store is there.
    _timeout: float = 10.0
    _database: str = attrs.field(init=False)
    _where: str = attrs.field(init=False)
    _committer: GroupCommitter = attrs.field(init=False)
    _writes: ConnectionPool | None = attrs.field(default=None, init=False)
    _reads: ConnectionPool | None = attrs.field(default=None, init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._database = database_name(self._uri)
        self._where = _where(self._uri)
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

    def start(self) -> Deferred[None]:
        # txmongo connects when a pool is made, so not before start().  Each
        # pool reconnects on its own: within half the timeout of the server's
        # return, so that neither waits on the other's backoff.
        self._writes, self._reads = (
            ConnectionPool(self._uri, w=1, j=True, max_delay=self._timeout / 2) for _ in range(2)
        )
        return self._guard(self._create_indexes())

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self._committer.stop()
        for pool in (self._writes, self._reads):
            if pool is not None:
                await pool.disconnect()
        self._writes = self._reads = None

    def submit(self, ops: Sequence[Op]) -> Deferred[list[object]]:
        return self._committer.submit(ops)

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

    async def _create_indexes(self) -> None:
        db = self._db
        asc = qf.ASCENDING
        for collection, fields, unique in (
            ("queue", ("client_id", "seq"), True),
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
        # Messages queued before their time was recorded count from now.
        now = int(self._reactor.seconds() * 1000)
        await self._q(
            db.queue.update_many({"queued_at": {"$exists": False}}, {"$set": {"queued_at": now}})
        )

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
        db = self._writing
        known: dict[_Key, _Stored] = {}
        fields = {"sender": 1, "msgid": 1, "recipient": 1, "token": 1, "digest": 1}
        for chunk in _chunks(list(dict.fromkeys(_chat_keys(ops)))):
            for doc in await db.chats.find(_ids_in(chunk), fields):
                known[(doc["sender"], doc["msgid"])] = _Stored(
                    doc["recipient"], doc.get("token"), doc.get("digest")
                )
        plan = _Plan(known)
        results = [plan.add(op) for op in ops]
        try:
            await gatherResults(
                [db[name].bulk_write(writes) for name, writes in plan.early.items()],
                consumeErrors=True,
            )
        except FirstError as e:
            e.subFailure.raiseException()
        for name, writes in plan.late:
            await db[name].bulk_write(writes)
        return results

    async def _load_sessions(self) -> list[SessionRecord]:
        db = self._db
        subscriptions = {}
        has_connected = set()
        for doc in await self._q(db.sessions.find({})):
            subs = doc.get("subscriptions", ())
            subscriptions[doc["_id"]] = tuple((s["filter"], s["qos"]) for s in subs)
            # Sessions kept before the flag existed are taken to have connected.
            if doc.get("has_connected", True):
                has_connected.add(doc["_id"])
        queues: dict[str, list[QueuedMessage]] = {}
        by_seq = qf.sort(qf.ASCENDING("client_id") + qf.ASCENDING("seq"))
        for doc in await self._q(db.queue.find({}, sort=by_seq)):
            queues.setdefault(doc["client_id"], []).append(
                QueuedMessage(
                    doc["seq"],
                    _message(doc),
                    doc["released"],
                    doc["queued_at"],
                    doc.get("notice"),
                    doc.get("pushed", False),
                )
            )
        inbound: dict[str, set[int]] = {}
        for doc in await self._q(db.inbound.find({})):
            inbound.setdefault(doc["client_id"], set()).add(doc["packet_id"])
        # A crash between writes can leave queue entries without their
        # session document; they still belong to a session.
        clients = sorted(subscriptions.keys() | queues.keys() | inbound.keys())
        return [
            SessionRecord(
                c,
                subscriptions.get(c, ()),
                tuple(queues.get(c, ())),
                frozenset(inbound.get(c, ())),
                c in has_connected,
            )
            for c in clients
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
