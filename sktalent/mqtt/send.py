"""
Output sent to the socket in the call that writes it, when nothing is
waiting to go out before it.

A Twisted TCP transport buffers every write and sends it once epoll next
says the socket is writable: an epoll registration, a reactor turn and an
unregistration for each write.  What a commit makes durable (PUBACKs,
`sent` frames, deliveries) is one small write per connection, which an
idle socket takes whole; so the server sends such a write itself and leaves
the transport only what the socket did not take (or an error, which the
transport then meets and reports as the connection's loss).

The answers to a read still go through the transport's write pass: sent at
once, a fast publisher's PUBACKs would let it run ever further ahead of the
subscribers it publishes to, whose deliveries wait on their own reads.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.interfaces import ITransport


def write(transport: ITransport, data: bytes) -> None:
    """Write data to transport, sending what the socket takes at once."""
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataLen
        and not transport.dataBuffer
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Full (EAGAIN), interrupted, or broken: the transport's write
            # retries when the socket is writable, or reports the loss.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
