"""
A listening site whose connections a test can count and wait for.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, gatherResults
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.server import Site


class ConnectionTracker(WrappingFactory):
    """
    Counts the server's connections and tells when all have closed, so
    that tests end with a clean reactor.
    """

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.accepted = 0
        self._open: dict[ProtocolWrapper, Deferred[None]] = {}

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)
        self.accepted += 1
        self._open[p] = Deferred()

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        self._open.pop(p).callback(None)

    def all_closed(self) -> Deferred[list[None]]:
        return gatherResults(list(self._open.values()))
