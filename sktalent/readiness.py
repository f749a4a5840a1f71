"""
systemd's readiness notification (sd_notify): under ``Type=notify`` systemd
holds ``systemctl start``, and a ``systemctl reload`` queued behind it, until
the server says it is ready, so that a reload never meets a server still
starting.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.logger import Logger

log = Logger()


def notify_ready(environ: Mapping[str, str] = os.environ) -> None:
    """Tell systemd the server is ready, when it runs under systemd's notify protocol."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return
    # "@name" is a socket in the abstract namespace.
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(b"READY=1", target)
    except OSError as e:
        log.warn(
            "Could not tell systemd the server is ready at {address}: {error}",
            address=address,
            error=e,
        )
