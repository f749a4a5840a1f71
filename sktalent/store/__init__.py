"""
Durable state: choose a back end by URI.
"""

from __future__ import annotations

from prometheus_client import Histogram
from twisted.internet.interfaces import IReactorTime

from .interfaces import IStore
from .memory import MemoryStore


def check_store_uri(uri: str) -> None:
    """
    Raise ValueError, in one sentence, unless uri is of a form a store can
    be opened from: ``memory:``, ``sqlite:PATH`` or ``mongodb://HOST:PORT/DB``.
    """
    if uri == "memory:":
        return
    if uri.startswith("sqlite:"):
        if not uri.removeprefix("sqlite:"):
            raise ValueError(f"store URI {uri!r} has no file name: use sqlite:PATH")
        return
    if uri.startswith("mongodb://"):
        from .mongo import database_name

        database_name(uri)
        return
    raise ValueError(
        f"unknown store URI {uri!r}: use memory:, sqlite:PATH or mongodb://HOST:PORT/DB"
    )


def open_store(
    uri: str,
    reactor: IReactorTime,
    *,
    latency: Histogram | None = None,
    retention_days: int = 30,
) -> IStore:
    """
    A store for ``memory:``, ``sqlite:PATH`` or ``mongodb://HOST:PORT/DB``,
    not yet started.  ``latency`` receives each submit's time to durability;
    ``retention_days`` sets MongoDB's TTL index (purge() is the caller's).
    """
    check_store_uri(uri)
    if uri.startswith("sqlite:"):
        from .sqlite import SQLiteStore

        return SQLiteStore(reactor, uri.removeprefix("sqlite:"), latency)
    if uri.startswith("mongodb://"):
        # pymongo costs tens of MiB: only a server that uses MongoDB pays.
        from .mongo import MongoStore

        return MongoStore(reactor, uri, latency, retention_days)
    return MemoryStore()
