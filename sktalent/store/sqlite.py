"""
The embedded store: one SQLite file in WAL mode with synchronous=FULL, so a
commit is on disk when it returns.  All SQLite calls run on one worker thread
that owns the connection; the reactor only sees Deferreds.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import sqlite3
import struct
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, assert_never, cast

import attrs
from prometheus_client import Histogram
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from zope.interface import implementer

from ..failures import StartFailure
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
from .worker import Worker

_T = TypeVar("_T")
# Sessions whose counters one statement reads or writes.
_CHUNK = 500
# Queue rows one statement writes or deletes.
_ROWS = 100
# Expired messages dropped per transaction.
_EXPIRE_SLICE = 10_000
# Seconds at least between the starts of two commits (GroupCommitter): a
# commit, with its fsync and its hand-offs between threads, costs the server
# about 250 us of CPU; at 1,000 chats a second a commit per chat spent
# 15 % more CPU than this spacing does, which adds at most 2 ms to a chat.
COMMIT_SPACING = 0.002

# Schema versions, oldest first; version N is MIGRATIONS[N - 1].  Only ever
# append: a file records the versions applied to it in schema_migrations.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        client_id TEXT PRIMARY KEY,
        subscriptions TEXT NOT NULL  -- JSON [[filter, qos], ...]
    );
    CREATE TABLE queue (
        client_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        released INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (client_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE inbound (
        client_id TEXT NOT NULL,
        packet_id INTEGER NOT NULL,
        PRIMARY KEY (client_id, packet_id)
    ) WITHOUT ROWID;
    CREATE TABLE retained (
        topic TEXT PRIMARY KEY,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL
    );
    CREATE TABLE chats (
        id INTEGER PRIMARY KEY,
        sender TEXT NOT NULL,
        msgid TEXT NOT NULL,
        recipient TEXT NOT NULL,
        o_id TEXT NOT NULL,
        envelope TEXT NOT NULL,
        received_at INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX chats_by_sender_msgid ON chats (sender, msgid);
    CREATE INDEX chats_by_order ON chats (o_id, received_at, msgid);
    CREATE INDEX chats_by_age ON chats (received_at);
    CREATE TABLE receipts (
        sender TEXT NOT NULL,
        msgid TEXT NOT NULL,
        at INTEGER NOT NULL,
        PRIMARY KEY (sender, msgid)
    ) WITHOUT ROWID;
    CREATE TABLE devices (
        user_id TEXT PRIMARY KEY,
        platform TEXT NOT NULL,
        token TEXT NOT NULL
    );
    """,
    # The InsertChat token: a retried commit recognises its own chat.
    """
    ALTER TABLE chats ADD COLUMN token TEXT;
    """,
    # The InsertChat digest: a msgid reused for other content is told apart
    # from a retransmission.
    """
    ALTER TABLE chats ADD COLUMN digest TEXT;
    """,
    # Logging out: a device may be logged out, and a user who logged out
    # without ever registering one has a device of no platform.
    """
    CREATE TABLE devices_new (
        user_id TEXT PRIMARY KEY,
        platform TEXT,
        token TEXT,
        logged_out INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO devices_new (user_id, platform, token)
        SELECT user_id, platform, token FROM devices;
    DROP TABLE devices;
    ALTER TABLE devices_new RENAME TO devices;
    """,
    # Queued messages: when they were queued (those already queued count from
    # the upgrade), what to push for them and whether it went out.  Sessions:
    # whether their client ever connected (those already kept are taken to).
    """
    ALTER TABLE queue ADD COLUMN queued_at INTEGER NOT NULL DEFAULT 0;
    UPDATE queue SET queued_at = CAST(strftime('%s', 'now') AS INTEGER) * 1000;
    ALTER TABLE queue ADD COLUMN notice TEXT;
    ALTER TABLE queue ADD COLUMN pushed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN has_connected INTEGER NOT NULL DEFAULT 1;
    """,
    # Operators' bans, kept across restarts; ended ones go with the purge.
    """
    CREATE TABLE bans (
        client_id TEXT PRIMARY KEY,
        until INTEGER NOT NULL
    );
    CREATE INDEX bans_by_end ON bans (until);
    """,
    # The store as the source of truth: each session keeps its seq counter
    # and its queue's counters (checked where an Enqueue commits), whether
    # it is clean, and what its last connection sent (NULL: unknown).  The
    # indexes serve expiry and the pushes still owed, without scanning.
    """
    ALTER TABLE sessions ADD COLUMN next_seq INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE sessions ADD COLUMN queued INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN queued_bytes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN notices INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN clean INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN sent_through INTEGER DEFAULT 0;
    UPDATE sessions SET sent_through = NULL WHERE has_connected;
    INSERT OR IGNORE INTO sessions (client_id, subscriptions, has_connected)
        SELECT DISTINCT client_id, '[]', 0 FROM queue;
    UPDATE sessions SET (next_seq, queued, queued_bytes, notices) = (
        SELECT max(seq) + 1, count(*), sum(length(payload)), count(notice)
        FROM queue WHERE queue.client_id = sessions.client_id)
    WHERE client_id IN (SELECT client_id FROM queue);
    CREATE INDEX queue_by_age ON queue (queued_at);
    CREATE INDEX queue_unpushed ON queue (client_id, seq) WHERE notice IS NOT NULL AND NOT pushed;
    """,
)

# Errors that say "the file cannot be used right now", not "this batch is bad".
_UNAVAILABLE = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)


class SchemaTooNew(StartFailure):
    """The file was written by a newer server than this one."""


class StoreDamaged(StartFailure):
    """The file is damaged, found while reading it: waiting will not mend it."""


def create_private(path: str) -> None:
    """
    Create an empty file at path readable by its owner only, whatever the
    umask, unless something is there: SQLite gives its -wal and -shm files
    the mode of the store's file.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _damaged(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)


def _unusable(path: str, error: Exception) -> str:
    """Why the file at path cannot be the store, in words an operator can act on."""
    if os.path.isdir(path):
        return "it is a directory, not a file"
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_READONLY:
        return "it is read-only, and the server must write it"
    if isinstance(error, sqlite3.Error) and _damaged(error):
        return f"it is not an SQLite database, or it is damaged or truncated ({error})"
    if code == sqlite3.SQLITE_CANTOPEN:
        return (
            f"it cannot be opened ({error}): the file and its directory must be"
            " readable and writable by the server, which keeps -wal and -shm files there"
        )
    if isinstance(error, OSError):
        return f"it cannot be created: {error.strerror}"
    return str(error)


def connect(path: str, busy_timeout: float = 5.0) -> sqlite3.Connection:
    """
    Open path with the durability settings the store relies on; transactions
    are left to the caller (autocommit mode, explicit BEGIN/COMMIT).
    """
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if mode != "wal":
        conn.close()
        raise ValueError(f"SQLite store {path!r} cannot use WAL journaling (got {mode!r})")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def migrate(conn: sqlite3.Connection, path: str, migrations: Sequence[str]) -> None:
    """Bring the schema up to len(migrations), one transaction per version."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
    )
    (current,) = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    if current > len(migrations):
        raise SchemaTooNew(
            f"SQLite store {path!r} has schema version {current}, newer than"
            f" version {len(migrations)} that this server knows: run a newer"
            " server or use another file"
        )
    for version, script in enumerate(migrations[current:], start=current + 1):
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{script}\n"
                "INSERT INTO schema_migrations (version, applied_at)"
                f" VALUES ({version}, CAST(strftime('%s', 'now') AS INTEGER));\n"
                "COMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


@contextmanager
def _transaction(conn: sqlite3.Connection, mode: str) -> Iterator[None]:
    conn.execute(f"BEGIN {mode}")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _unavailable(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:
        # No code: the connection was closed underneath us.
        return isinstance(error, sqlite3.ProgrammingError)
    return code & 0xFF in _UNAVAILABLE


_QUEUE_COLUMNS = "seq, topic, payload, qos, retain, released, queued_at, notice, pushed"
# A queue row as an Enqueue writes it: its fields, then the rest as new.
_QUEUE_INSERT = "client_id, seq, topic, payload, qos, retain, queued_at, notice, released, pushed"
_QUEUE_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, 0, 0)"


def _queued(row: Sequence[object]) -> QueuedMessage:
    seq, topic, payload, qos, retain, released, at, notice, pushed = row
    return QueuedMessage(
        cast(int, seq),
        Message(cast(str, topic), cast(bytes, payload), cast(int, qos), bool(retain)),
        bool(released),
        cast(int, at),
        cast("str | None", notice),
        bool(pushed),
    )


@attrs.define
class _Counts:
    """A session's counters as a transaction leaves them."""

    next_seq: int
    queued: int
    queued_bytes: int
    notices: int

    def fits(self, op: Enqueue) -> bool:
        room = op.room
        return room is None or (
            self.queued < room.messages
            and self.queued_bytes + len(op.message.payload) <= room.bytes
        )

    def add(self, size: int, notice: bool, sign: int = 1) -> None:
        self.queued += sign
        self.queued_bytes += sign * size
        self.notices += sign * notice


@attrs.define
class _Writer:
    """
    One transaction's operations.  The counters of the sessions it queues
    in or dequeues from are read in one statement before (prefetch) and
    written back in one after (flush), however many messages it moves; the
    messages it queues are written in one statement, and a run of them
    taken off in another: each statement costs both threads a hand-over of
    the GIL, and SQLite its own work per statement.
    """

    conn: sqlite3.Connection
    # client id -> its counters, read and changed in this transaction.
    _counts: dict[str, _Counts] = attrs.Factory(dict)
    _changed: set[str] = attrs.Factory(set)
    # Rows of Enqueues whose seq the counters chose, not yet written: they
    # go in one statement, before anything else reads or changes the queue.
    _rows: list[tuple[object, ...]] = attrs.Factory(list)

    def write_rows(self) -> None:
        """Write the queue rows held back."""
        if not self._rows:
            return  # Asked before every operation that may touch the queue.
        rows, self._rows = self._rows, []
        for i in range(0, len(rows), _ROWS):
            chunk = rows[i : i + _ROWS]
            try:
                self.conn.execute(
                    f"INSERT INTO queue ({_QUEUE_INSERT}) VALUES "
                    + ",".join([_QUEUE_VALUES] * len(chunk)),
                    [field for row in chunk for field in row],
                )
            except sqlite3.IntegrityError as e:
                if e.sqlite_errorcode != sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
                    raise
                taken = (
                    f"seq {chunk[0][1]} of {chunk[0][0]}"
                    if len(chunk) == 1
                    else f"a seq of {sorted({str(row[0]) for row in chunk})}"
                )
                raise QueueConflict(f"{taken} is taken") from e

    def prefetch(self, clients: Iterable[str]) -> None:
        """Read the counters of these clients' sessions (those that have one)."""
        wanted = [c for c in dict.fromkeys(clients) if c not in self._counts]
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for client_id, *counts in self.conn.execute(
                "SELECT client_id, next_seq, queued, queued_bytes, notices FROM sessions"
                f" WHERE client_id IN ({marks})",
                chunk,
            ):
                self._counts[client_id] = _Counts(*counts)

    def _peek(self, client_id: str) -> _Counts | None:
        """The client's counters as they stand, or None without a session."""
        if client_id not in self._counts:
            self.prefetch([client_id])
        return self._counts.get(client_id)

    def _session(self, client_id: str) -> _Counts:
        """The client's counters, its session made if it has none."""
        counts = self._peek(client_id)
        if counts is None:
            self._touch(client_id)
            counts = self._counts[client_id] = _Counts(1, 0, 0, 0)
        return counts

    def flush(self, client_id: str | None = None) -> None:
        """Write the counters changed (all, or client_id's) and forget them."""
        clients = list(self._changed) if client_id is None else [client_id]
        rows = []
        for client in clients:
            counts = self._counts.pop(client, None)
            if counts is not None and client in self._changed:
                c = counts
                rows.append((client, c.next_seq, c.queued, c.queued_bytes, c.notices))
            self._changed.discard(client)
        for i in range(0, len(rows), _CHUNK):
            chunk = rows[i : i + _CHUNK]
            values = ",".join(["(?, ?, ?, ?, ?)"] * len(chunk))
            self.conn.execute(
                "UPDATE sessions SET next_seq = v.column2, queued = v.column3,"
                " queued_bytes = v.column4, notices = v.column5"
                f" FROM (VALUES {values}) AS v WHERE sessions.client_id = v.column1",
                [field for row in chunk for field in row],
            )

    def forget(self, client_id: str) -> None:
        """client_id's counters are changed in SQL: write none of them."""
        self._counts.pop(client_id, None)
        self._changed.discard(client_id)

    def _touch(self, client_id: str) -> None:
        """Make the client's session if it has none."""
        self.conn.execute(
            "INSERT OR IGNORE INTO sessions (client_id, subscriptions, has_connected)"
            " VALUES (?, '[]', 0)",
            (client_id,),
        )

    def enqueue(self, op: Enqueue) -> object:
        counts = self._session(op.client_id)
        if not counts.fits(op):
            return NO_ROOM
        message = op.message
        seq = counts.next_seq if op.seq is None else op.seq
        row = (
            op.client_id,
            seq,
            message.topic,
            message.payload,
            message.qos,
            message.retain,
            op.queued_at,
            op.notice,
        )
        self._rows.append(row)
        if op.seq is not None:
            # A seq chosen elsewhere may be taken: written now, a conflict
            # fails this operation, not a later one.
            self.write_rows()
        counts.next_seq = max(counts.next_seq, seq + 1)
        counts.add(len(message.payload), op.notice is not None)
        self._changed.add(op.client_id)
        return Queued(seq, counts.notices)

    def dequeue(self, ops: Sequence[Dequeue]) -> None:
        """Take these messages off their queues (those still there)."""
        self.write_rows()
        for i in range(0, len(ops), _ROWS):
            chunk = ops[i : i + _ROWS]
            # Not "notice IS NOT NULL": SQLite 3.40 answers it wrongly in a
            # RETURNING clause here (the partial index on that condition).
            rows = self.conn.execute(
                "DELETE FROM queue WHERE "
                + " OR ".join(["client_id = ? AND seq = ?"] * len(chunk))
                + " RETURNING client_id, length(payload), length(notice)",
                [field for op in chunk for field in (op.client_id, op.seq)],
            ).fetchall()
            for client_id, size, notice in rows:
                counts = self._peek(client_id)
                if counts is not None:
                    counts.add(size, notice is not None, -1)
                    self._changed.add(client_id)

    def _full(self, then: Sequence[Op]) -> bool | None:
        """
        Whether a required Enqueue of then would find no room, counted
        ahead; None when then holds other operations before one, whose
        effect only applying them tells.
        """
        # client id -> (messages, bytes) the Enqueues before add to its queue.
        ahead: dict[str, tuple[int, int]] = {}
        for i, op in enumerate(then):
            if not isinstance(op, Enqueue):
                later = then[i + 1 :]
                if any(isinstance(o, Enqueue) and o.required for o in later):
                    return None
                continue
            counts = self._peek(op.client_id)
            added, added_bytes = ahead.get(op.client_id, (0, 0))
            messages, size = added, added_bytes
            if counts is not None:
                messages += counts.queued
                size += counts.queued_bytes
            room, more = op.room, len(op.message.payload)
            if room is None or (messages < room.messages and size + more <= room.bytes):
                ahead[op.client_id] = (added + 1, added_bytes + more)
            elif op.required:
                return True
        return False

    def then(self, chat_row: int, then: Sequence[Op]) -> tuple[object, ...] | None:
        """
        Apply then, the operations of the chat just inserted as chat_row;
        None, with the chat and all of then undone, when a required Enqueue
        finds no room.
        """
        full = self._full(then)
        if full:
            self.conn.execute("DELETE FROM chats WHERE id = ?", (chat_row,))
            return None
        if full is False:
            return tuple(self.apply(inner) for inner in then)
        # Decided only by applying: under a savepoint.
        self.write_rows()
        self.conn.execute("SAVEPOINT chat")
        counts = {c: attrs.evolve(n) for c, n in self._counts.items()}
        changed = set(self._changed)
        results = []
        for inner in then:
            result = self.apply(inner)
            if result is NO_ROOM and isinstance(inner, Enqueue) and inner.required:
                self._rows.clear()  # Made under the savepoint, and not written.
                self.conn.execute("ROLLBACK TO chat")
                self.conn.execute("RELEASE chat")
                self._counts, self._changed = counts, changed
                self.conn.execute("DELETE FROM chats WHERE id = ?", (chat_row,))
                return None
            results.append(result)
        self.write_rows()
        self.conn.execute("RELEASE chat")
        return tuple(results)

    def apply(self, op: Op) -> object:
        conn = self.conn
        if not isinstance(op, Enqueue | InsertChat):
            # Every other operation may read or change the queue.
            self.write_rows()
        match op:
            case PutSession(client_id, subscriptions):
                conn.execute(
                    "INSERT INTO sessions (client_id, subscriptions, has_connected)"
                    " VALUES (?, ?, 0) ON CONFLICT (client_id)"
                    " DO UPDATE SET subscriptions = excluded.subscriptions",
                    (client_id, json.dumps(subscriptions)),
                )
            case Attach(client_id, subscriptions, clean):
                conn.execute(
                    "INSERT INTO sessions (client_id, subscriptions, has_connected, clean,"
                    " sent_through) VALUES (?, ?, 1, ?, NULL) ON CONFLICT (client_id) DO UPDATE"
                    " SET subscriptions = excluded.subscriptions, has_connected = 1,"
                    " clean = excluded.clean, sent_through = NULL",
                    (client_id, json.dumps(subscriptions), clean),
                )
            case Detach(client_id, sent_through):
                conn.execute(
                    "UPDATE sessions SET sent_through = ? WHERE client_id = ?",
                    (sent_through, client_id),
                )
            case DropSession(client_id):
                self.forget(client_id)
                for table in ("sessions", "queue", "inbound"):
                    conn.execute(f"DELETE FROM {table} WHERE client_id = ?", (client_id,))
            case DiscardSession(client_id, through):
                # Its seq counter written first; the rest is counted again.
                self.flush(client_id)
                conn.execute(
                    "DELETE FROM queue WHERE client_id = ? AND seq <= ?", (client_id, through)
                )
                conn.execute("DELETE FROM inbound WHERE client_id = ?", (client_id,))
                conn.execute(
                    "UPDATE sessions SET subscriptions = '[]', has_connected = 0, clean = 0,"
                    " sent_through = 0, (queued, queued_bytes, notices) = (SELECT count(*),"
                    " coalesce(sum(length(payload)), 0), count(notice) FROM queue"
                    " WHERE client_id = ?1) WHERE client_id = ?1",
                    (client_id,),
                )
            case Enqueue():
                return self.enqueue(op)
            case MarkPushed(client_id, seq):
                conn.execute(
                    "UPDATE queue SET pushed = 1 WHERE client_id = ? AND seq = ?", (client_id, seq)
                )
            case Release(client_id, seq):
                conn.execute(
                    "UPDATE queue SET released = 1 WHERE client_id = ? AND seq = ?",
                    (client_id, seq),
                )
            case Dequeue():
                self.dequeue([op])
            case AddInbound(client_id, packet_id):
                self._touch(client_id)
                conn.execute(
                    "INSERT OR IGNORE INTO inbound (client_id, packet_id) VALUES (?, ?)",
                    (client_id, packet_id),
                )
            case RemoveInbound(client_id, packet_id):
                conn.execute(
                    "DELETE FROM inbound WHERE client_id = ? AND packet_id = ?",
                    (client_id, packet_id),
                )
            case SetRetained(topic, message):
                if message is None:
                    conn.execute("DELETE FROM retained WHERE topic = ?", (topic,))
                else:
                    conn.execute(
                        "INSERT OR REPLACE INTO retained (topic, payload, qos, retain)"
                        " VALUES (?, ?, ?, ?)",
                        (topic, message.payload, message.qos, message.retain),
                    )
            case InsertChat(chat, then, token, digest):
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO chats"
                    " (sender, msgid, recipient, o_id, envelope, received_at, token, digest)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        chat.sender,
                        chat.msgid,
                        chat.recipient,
                        chat.o_id,
                        chat.envelope,
                        chat.received_at,
                        token,
                        digest,
                    ),
                )
                if cursor.rowcount == 0:
                    stored = conn.execute(
                        "SELECT token, recipient, digest FROM chats WHERE sender = ? AND msgid = ?",
                        (chat.sender, chat.msgid),
                    ).fetchone()
                    result = op.against(*stored)
                    # Its own token: an earlier attempt committed it, then and all.
                    return Guarded(result, (None,) * len(then) if result is Inserted.NEW else ())
                assert cursor.lastrowid is not None
                results = self.then(cursor.lastrowid, then)
                if results is None:
                    return Guarded(Inserted.FULL)
                return Guarded(Inserted.NEW, results)
            case MarkReceived(sender, msgid, recipient, at, then):
                found = conn.execute(
                    "SELECT 1 FROM chats WHERE sender = ? AND msgid = ? AND recipient = ?",
                    (sender, msgid, recipient),
                ).fetchone()
                if found is None:
                    return Guarded(False)
                conn.execute(
                    "INSERT OR IGNORE INTO receipts (sender, msgid, at) VALUES (?, ?, ?)",
                    (sender, msgid, at),
                )
                return Guarded(True, tuple(self.apply(inner) for inner in then))
            case PutDevice(device):
                conn.execute(
                    "INSERT OR REPLACE INTO devices (user_id, platform, token, logged_out)"
                    " VALUES (?, ?, ?, ?)",
                    (device.user_id, device.platform, device.token, device.logged_out),
                )
            case LogOut(user_id):
                conn.execute(
                    "INSERT INTO devices (user_id, logged_out) VALUES (?, 1)"
                    " ON CONFLICT (user_id) DO UPDATE SET logged_out = 1",
                    (user_id,),
                )
            case DropDevice(user_id):
                conn.execute("DELETE FROM devices WHERE user_id = ?", (user_id,))
            case SetBan(client_id, None):
                conn.execute("DELETE FROM bans WHERE client_id = ?", (client_id,))
            case SetBan(client_id, until):
                conn.execute(
                    "INSERT OR REPLACE INTO bans (client_id, until) VALUES (?, ?)",
                    (client_id, until),
                )
            case _:
                assert_never(op)
        return None


def _commit(conn: sqlite3.Connection, ops: Sequence[Op]) -> list[object]:
    with _transaction(conn, "IMMEDIATE"):
        writer = _Writer(conn)
        writer.prefetch(op.client_id for op in every_op(ops) if isinstance(op, Enqueue | Dequeue))
        results: list[object] = []
        # Acknowledgements come in runs (at a submit's front): one statement a run.
        for dequeues, run in itertools.groupby(ops, lambda op: isinstance(op, Dequeue)):
            if dequeues:
                taken = cast("list[Dequeue]", list(run))
                writer.dequeue(taken)
                results.extend([None] * len(taken))
            else:
                results.extend(writer.apply(op) for op in run)
        writer.write_rows()
        writer.flush()
        return results


def _record(conn: sqlite3.Connection, client_id: str, limit: int | None) -> SessionRecord | None:
    row = conn.execute(
        "SELECT subscriptions, has_connected, clean, sent_through FROM sessions"
        " WHERE client_id = ?",
        (client_id,),
    ).fetchone()
    if row is None:
        return None
    subscriptions, has_connected, clean, sent_through = row
    queue = conn.execute(
        f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE client_id = ? ORDER BY seq LIMIT ?",
        (client_id, -1 if limit is None else limit),
    )
    inbound = conn.execute("SELECT packet_id FROM inbound WHERE client_id = ?", (client_id,))
    return SessionRecord(
        client_id,
        tuple((f, q) for f, q in json.loads(subscriptions)),
        tuple(_queued(r) for r in queue),
        frozenset(packet_id for (packet_id,) in inbound),
        bool(has_connected),
        bool(clean),
        sent_through,
    )


def _open_session(conn: sqlite3.Connection, client_id: str, limit: int) -> SessionRecord | None:
    with _transaction(conn, "DEFERRED"):
        return _record(conn, client_id, max(limit, 0))


def _read_queue(
    conn: sqlite3.Connection, client_id: str, after: int, limit: int
) -> list[QueuedMessage]:
    rows = conn.execute(
        f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE client_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        (client_id, after, max(limit, 0)),
    )
    return [_queued(r) for r in rows]


def _session_summary(conn: sqlite3.Connection, client_id: str) -> SessionSummary | None:
    row = conn.execute(
        "SELECT queued, queued_bytes, (SELECT queued_at FROM queue WHERE client_id = ?1"
        " ORDER BY seq LIMIT 1), next_seq - 1 FROM sessions WHERE client_id = ?1",
        (client_id,),
    ).fetchone()
    return None if row is None else SessionSummary(*row)


def _pending_pushes(
    conn: sqlite3.Connection, after: tuple[str, int] | None, limit: int, client_id: str | None
) -> list[PendingPush]:
    # The conditions of the partial index queue_unpushed, word for word.
    sql = (
        "SELECT q.client_id, q.seq, q.notice, q.queued_at, s.notices FROM queue q"
        " JOIN sessions s ON s.client_id = q.client_id"
        " WHERE q.notice IS NOT NULL AND NOT q.pushed"
    )
    params: list[object] = []
    if client_id is not None:
        sql += " AND q.client_id = ? AND q.seq > ?"
        params += [client_id, -1 if after is None else after[1]]
    elif after is not None:
        sql += " AND (q.client_id, q.seq) > (?, ?)"
        params += list(after)
    sql += " ORDER BY q.client_id, q.seq LIMIT ?"
    params.append(max(limit, 0))
    return [PendingPush(*row) for row in conn.execute(sql, params)]


def _expire_some(
    conn: sqlite3.Connection, before: int, keep: Collection[tuple[str, int]], limit: int
) -> tuple[int, int]:
    """
    Drop up to limit messages queued before ``before`` (but those in keep):
    how many went, and how many of the oldest were looked at.
    """
    with _transaction(conn, "IMMEDIATE"):
        rows = conn.execute(
            "SELECT client_id, seq FROM queue WHERE queued_at < ? ORDER BY queued_at LIMIT ?",
            (before, limit + len(keep)),
        ).fetchall()
        writer = _Writer(conn)
        writer.prefetch(client_id for client_id, _ in rows)
        gone = [Dequeue(c, seq) for c, seq in rows if (c, seq) not in keep][:limit]
        writer.dequeue(gone)
        writer.flush()
        return len(gone), len(rows)


def _drop_idle(conn: sqlite3.Connection) -> int:
    with _transaction(conn, "IMMEDIATE"):
        return conn.execute("DELETE FROM sessions WHERE NOT has_connected AND queued = 0").rowcount


def _queue_totals(conn: sqlite3.Connection) -> QueueTotals:
    with _transaction(conn, "DEFERRED"):
        sessions, messages, size = conn.execute(
            "SELECT count(*), coalesce(sum(queued), 0), coalesce(sum(queued_bytes), 0)"
            " FROM sessions"
        ).fetchone()
        (oldest,) = conn.execute("SELECT min(queued_at) FROM queue").fetchone()
    return QueueTotals(sessions, messages, size, oldest)


def _load_subscriptions(conn: sqlite3.Connection) -> list[tuple[str, tuple[tuple[str, int], ...]]]:
    return [
        (client_id, tuple((f, q) for f, q in json.loads(subscriptions)))
        for client_id, subscriptions in conn.execute(
            "SELECT client_id, subscriptions FROM sessions"
            " WHERE subscriptions != '[]' AND NOT clean"
        )
    ]


def _load_sessions(conn: sqlite3.Connection) -> list[SessionRecord]:
    with _transaction(conn, "DEFERRED"):
        clients = [c for (c,) in conn.execute("SELECT client_id FROM sessions ORDER BY client_id")]
        records = [_record(conn, c, None) for c in clients]
    return [r for r in records if r is not None]


def _load_retained(conn: sqlite3.Connection) -> list[Message]:
    return [
        Message(topic, payload, qos, bool(retain))
        for topic, payload, qos, retain in conn.execute(
            "SELECT topic, payload, qos, retain FROM retained"
        )
    ]


def _chat_history(
    conn: sqlite3.Connection, o_id: str, limit: int, before: str | None
) -> list[ChatRecord]:
    columns = "msgid, sender, recipient, o_id, envelope, received_at"
    if before is None:
        rows = conn.execute(
            f"SELECT {columns} FROM chats WHERE o_id = ?"
            " ORDER BY received_at DESC, msgid DESC LIMIT ?",
            (o_id, limit),
        ).fetchall()
    else:
        # An unknown `before` compares with NULL and so selects nothing.
        rows = conn.execute(
            f"SELECT {columns} FROM chats WHERE o_id = ? AND (received_at, msgid) < ("
            "  SELECT received_at, msgid FROM chats WHERE o_id = ? AND msgid = ?"
            "  ORDER BY received_at, msgid LIMIT 1)"
            " ORDER BY received_at DESC, msgid DESC LIMIT ?",
            (o_id, o_id, before, limit),
        ).fetchall()
    return [ChatRecord(*row) for row in reversed(rows)]


def _get_device(conn: sqlite3.Connection, user_id: str) -> Device | None:
    row = conn.execute(
        "SELECT user_id, platform, token, logged_out FROM devices WHERE user_id = ?", (user_id,)
    ).fetchone()
    return None if row is None else Device(row[0], row[1], row[2], bool(row[3]))


def _get_ban(conn: sqlite3.Connection, client_id: str) -> int | None:
    row = conn.execute("SELECT until FROM bans WHERE client_id = ?", (client_id,)).fetchone()
    return None if row is None else int(row[0])


def _ping(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT 1").fetchone()


def _purge(conn: sqlite3.Connection, older_than: int) -> int:
    with _transaction(conn, "IMMEDIATE"):
        conn.execute(
            "DELETE FROM receipts WHERE (sender, msgid) IN"
            " (SELECT sender, msgid FROM chats WHERE received_at < ?)",
            (older_than,),
        )
        conn.execute("DELETE FROM bans WHERE until < ?", (older_than,))
        return conn.execute("DELETE FROM chats WHERE received_at < ?", (older_than,)).rowcount


@implementer(IStore)
@attrs.define
class SQLiteStore:
    name = "sqlite"
    # Used as a clock and to hand results back from the worker thread.
    _reactor: IReactorTime
    _path: str
    _latency: Histogram | None = None
    _busy_timeout: float = 5.0
    _migrations: Sequence[str] = MIGRATIONS
    _worker: Worker = attrs.field(init=False)
    _committer: GroupCommitter = attrs.field(init=False)
    # Told, on the worker thread and before any caller hears of it, that the
    # file turned out to be damaged: nothing more it holds can be relied on.
    on_damaged: Callable[[StoreDamaged], object] | None = attrs.field(default=None, init=False)
    # Touched only on the worker thread; None until (re)opened there.
    _conn: sqlite3.Connection | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        # The reactor provides IReactorFromThreads as well as IReactorTime.
        self._worker = Worker(cast(IReactorFromThreads, self._reactor), "sktalent-sqlite")
        self._committer = GroupCommitter(
            lambda ops: self._call(_commit, ops),
            self._reactor,
            self.name,
            self._latency,
            spacing=COMMIT_SPACING,
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

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self._worker.start()
        try:
            await self._in_thread(self._open)
        except BaseException:
            self._worker.stop()
            raise

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self._committer.stop()
        if not self._worker.started:
            return
        await self._in_thread(self._close)
        self._worker.stop()

    def submit(self, ops: Sequence[Op]) -> Deferred[list[object]]:
        return self._committer.submit(ops)

    def open_session(self, client_id: str, limit: int) -> Deferred[SessionRecord | None]:
        return self._call(_open_session, client_id, limit)

    def read_queue(self, client_id: str, after: int, limit: int) -> Deferred[list[QueuedMessage]]:
        return self._call(_read_queue, client_id, after, limit)

    def session_summary(self, client_id: str) -> Deferred[SessionSummary | None]:
        return self._call(_session_summary, client_id)

    def pending_pushes(
        self, after: tuple[str, int] | None, limit: int, client_id: str | None = None
    ) -> Deferred[list[PendingPush]]:
        return self._call(_pending_pushes, after, limit, client_id)

    def expire(self, before: int, keep: Collection[tuple[str, int]]) -> Deferred[tuple[int, int]]:
        return Deferred.fromCoroutine(self._expire(before, frozenset(keep)))

    async def _expire(self, before: int, keep: frozenset[tuple[str, int]]) -> tuple[int, int]:
        # In slices, each a transaction of its own, so commits are not held up.
        messages = 0
        while True:
            gone, looked = await self._call(_expire_some, before, keep, _EXPIRE_SLICE)
            messages += gone
            if looked < _EXPIRE_SLICE + len(keep):
                break
        return messages, await self._call(_drop_idle)

    def queue_totals(self) -> Deferred[QueueTotals]:
        return self._call(_queue_totals)

    def load_subscriptions(self) -> Deferred[list[tuple[str, tuple[tuple[str, int], ...]]]]:
        return self._call(_load_subscriptions)

    def load_sessions(self) -> Deferred[list[SessionRecord]]:
        return self._call(_load_sessions)

    def load_retained(self) -> Deferred[list[Message]]:
        return self._call(_load_retained)

    def chat_history(self, o_id: str, limit: int, before: str | None) -> Deferred[list[ChatRecord]]:
        return self._call(_chat_history, o_id, max(limit, 0), before)

    def get_device(self, user_id: str) -> Deferred[Device | None]:
        return self._call(_get_device, user_id)

    def get_ban(self, client_id: str) -> Deferred[int | None]:
        return self._call(_get_ban, client_id)

    def ping(self) -> Deferred[None]:
        return self._call(_ping)

    def purge(self, older_than: int) -> Deferred[int]:
        return self._call(_purge, older_than)

    def _open(self) -> None:
        try:
            create_private(self._path)
            self._conn = connect(self._path, self._busy_timeout)
            migrate(self._conn, self._path, self._migrations)
            # A read-only file opens and reads: only a write finds it out.
            self._conn.execute("DELETE FROM schema_migrations WHERE 0")
        except (sqlite3.Error, OSError) as e:
            self._close()
            if isinstance(e, sqlite3.Error) and not (_unavailable(e) or _damaged(e)):
                raise
            raise StoreUnavailable(
                f"the SQLite store {os.path.abspath(self._path)} cannot be used:"
                f" {_unusable(self._path, e)}"
            ) from e

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _call(self, f: Callable[..., _T], *args: object) -> Deferred[_T]:
        return self._in_thread(self._guarded, f, *args)

    def _in_thread(self, f: Callable[..., _T], *args: object) -> Deferred[_T]:
        return self._worker.call(f, *args)

    def _guarded(self, f: Callable[..., _T], *args: object) -> _T:
        """Run f with the connection, on the worker thread."""
        try:
            if self._conn is None:
                self._conn = connect(self._path, self._busy_timeout)
            return f(self._conn, *args)
        except sqlite3.Error as e:
            if _damaged(e):
                damaged = StoreDamaged(
                    f"the SQLite store {os.path.abspath(self._path)} is damaged: {e}"
                )
                if self.on_damaged is not None:
                    self.on_damaged(damaged)
                raise damaged from e
            if not _unavailable(e):
                raise
            # Start afresh next time: the old connection may be wedged.
            self._close()
            raise StoreUnavailable(f"SQLite store {self._path!r}: {e}") from e


# -- reading a store to copy it (python -m sktalent.migrate) ----------------

# The byte of a -shm file that every connection to a database in WAL mode
# holds a read lock on for as long as it is open (SQLite's "DMS" lock).
_SHM_DMS = 128
_FLOCK = "hhqqi"  # struct flock: type, whence, start, len, pid


def holder(path: str) -> int | None:
    """
    The pid of another process that has the store at path open (a running
    server), or None: found from SQLite's own lock on the -shm file, so a
    server needs no mark of its own.  Call it before this process opens
    the file: closing any descriptor of a file drops this process's locks
    on it.
    """
    try:
        fd = os.open(path + "-shm", os.O_RDONLY)
    except FileNotFoundError:
        # The last connection to close removes it.
        return None
    try:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _SHM_DMS, 1, 0)
        kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    finally:
        os.close(fd)
    return None if kind == fcntl.F_UNLCK else int(pid)


_SESSION_COLUMNS = (
    "subscriptions, has_connected, clean, sent_through, next_seq, queued, queued_bytes, notices"
)


@attrs.define
class Snapshot:
    """
    A store's content as of one moment, read in pages of bounded size over
    a read-only connection: the file is never written.
    """

    _conn: sqlite3.Connection

    @classmethod
    def open(cls, path: str) -> Snapshot:
        """The store at path; ValueError, in one sentence, if it is not one this server reads."""
        where = os.path.abspath(path)
        if not os.path.isfile(where):
            why = "it is a directory" if os.path.isdir(where) else "there is no such file"
            raise ValueError(f"the SQLite store {where} cannot be read: {why}")
        uri = f"file:{urllib.parse.quote(where)}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        try:
            # One read transaction: every page comes from the same snapshot.
            conn.execute("BEGIN")
            (version,) = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        except sqlite3.Error as e:
            conn.close()
            if "no such table" in str(e):
                raise ValueError(f"{where} is an SQLite database but not a sktalent store") from e
            raise ValueError(
                f"the SQLite store {where} cannot be read: {_unusable(where, e)}"
            ) from e
        if version != len(MIGRATIONS):
            conn.close()
            raise ValueError(
                f"the SQLite store {where} has schema version {version}, and this"
                f" version reads version {len(MIGRATIONS)} only: "
                + (
                    "start and stop a server of this version on it once to bring it up to date"
                    if (version or 0) < len(MIGRATIONS)
                    else "use the version of sktalent that wrote it"
                )
            )
        return cls(conn)

    def close(self) -> None:
        self._conn.close()

    def counts(self) -> dict[str, int]:
        """How many rows each table holds."""
        tables = ("sessions", "queue", "chats", "receipts", "devices", "bans", "retained")
        return {
            table: self._conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in tables
        }

    def _pages(
        self, table: str, key: Sequence[str], columns: str, size: int
    ) -> Iterator[list[tuple[Any, ...]]]:
        """The rows of table in key order, size at a time, key columns first."""
        keys = ", ".join(key)
        after: Sequence[object] = ()
        while True:
            where = f"WHERE ({keys}) > ({', '.join('?' * len(key))})" if after else ""
            rows = self._conn.execute(
                f"SELECT {keys}, {columns} FROM {table} {where} ORDER BY {keys} LIMIT ?",
                (*after, size),
            ).fetchall()
            if rows:
                yield rows
            if len(rows) < size:
                return
            after = rows[-1][: len(key)]

    def sessions(self, size: int) -> Iterator[list[StoredSession]]:
        """Every session (its queue apart), in client id order."""
        for rows in self._pages("sessions", ("client_id",), _SESSION_COLUMNS, size):
            inbound: dict[str, set[int]] = {}
            marks = ",".join("?" * len(rows))
            for client_id, packet_id in self._conn.execute(
                f"SELECT client_id, packet_id FROM inbound WHERE client_id IN ({marks})",
                [row[0] for row in rows],
            ):
                inbound.setdefault(client_id, set()).add(packet_id)
            yield [
                StoredSession(
                    SessionRecord(
                        client_id,
                        tuple((f, q) for f, q in json.loads(subscriptions)),
                        (),
                        frozenset(inbound.get(client_id, ())),
                        bool(connected),
                        bool(clean),
                        sent_through,
                    ),
                    *counts,
                )
                for client_id, subscriptions, connected, clean, sent_through, *counts in rows
            ]

    def queue(
        self, after: tuple[str, int] | None, through: str | None, size: int
    ) -> list[QueueEntry]:
        """
        Up to size queued messages after ``after`` in (client id, seq) order,
        of clients up to ``through`` when given.
        """
        rows = self._conn.execute(
            f"SELECT client_id, {_QUEUE_COLUMNS} FROM queue"
            " WHERE (client_id, seq) > (?1, ?2) AND (?3 IS NULL OR client_id <= ?3)"
            " ORDER BY client_id, seq LIMIT ?4",
            (*(after or ("", -1)), through, size),
        )
        return [QueueEntry(row[0], _queued(row[1:])) for row in rows]

    def chats(self, size: int) -> Iterator[list[StoredChat]]:
        columns = "msgid, sender, recipient, o_id, envelope, received_at, token, digest"
        for rows in self._pages("chats", ("id",), columns, size):
            yield [StoredChat(ChatRecord(*row[1:7]), row[7], row[8]) for row in rows]

    def receipts(self, size: int) -> Iterator[list[Receipt]]:
        for rows in self._pages("receipts", ("sender", "msgid"), "at", size):
            yield [Receipt(*row) for row in rows]

    def devices(self, size: int) -> Iterator[list[Device]]:
        for rows in self._pages("devices", ("user_id",), "platform, token, logged_out", size):
            yield [Device(u, platform, token, bool(out)) for u, platform, token, out in rows]

    def bans(self, size: int) -> Iterator[list[Ban]]:
        for rows in self._pages("bans", ("client_id",), "until", size):
            yield [Ban(*row) for row in rows]

    def retained(self, size: int) -> Iterator[list[Message]]:
        for rows in self._pages("retained", ("topic",), "payload, qos, retain", size):
            yield [Message(t, payload, qos, bool(retain)) for t, payload, qos, retain in rows]
