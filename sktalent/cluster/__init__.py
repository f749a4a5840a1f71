"""
Cluster mode (INTERFACE section 10): several processes, one MongoDB store,
one Redis for presence, routing between nodes and takeover.

This module only checks the options: importing it loads no Redis code, so
that a server without ``--cluster`` pays nothing for it.
"""

from __future__ import annotations

import re

import attrs

# What a node name may hold: it goes into Redis keys and channel names.
_NODE = re.compile(r"[A-Za-z0-9._:@-]{1,100}")
_URI = re.compile(
    r"redis://(?::(?P<password>[^@]*)@)?(?P<host>[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?(?:/(?P<db>[0-9]{1,2})?)?"
)


@attrs.frozen
class RedisAddress:
    """Where the cluster's Redis is: ``redis://[:PASSWORD@]HOST[:PORT][/DB]``."""

    host: str
    port: int = 6379
    db: int = 0
    password: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def parse(cls, uri: str) -> RedisAddress:
        """The address uri gives; ValueError, in one sentence, for a bad one."""
        match = _URI.fullmatch(uri)
        if match is None:
            raise ValueError(f"{uri!r} is not of the form redis://HOST:PORT/DB")
        port = int(match["port"] or 6379)
        if not 0 < port < 65536:
            raise ValueError(f"{uri!r} names port {port}, which is not a TCP port")
        db = int(match["db"] or 0)
        if db > 15:
            raise ValueError(f"{uri!r} names database {db}; Redis has 0 to 15")
        return cls(match["host"].strip("[]"), port, db, match["password"])

    def __str__(self) -> str:
        # Never the password: this goes into logs and messages.
        return f"redis://{self.host}:{self.port}/{self.db}"


def check_node_name(name: str) -> str:
    """name, if it can name a node; ValueError otherwise."""
    if not _NODE.fullmatch(name):
        raise ValueError(f"{name!r} is not a node name: 1 to 100 letters, digits and . _ : @ -")
    return name
