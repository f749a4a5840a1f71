"""
The cluster's backend in Redis, through txredisapi: one connection for
commands and one subscribed to this node's channel and everyone's, each
reconnected every half second while Redis is away.

Keys (all under ``sktalent:``, in the database the URI names):

- ``node:NAME``: the incarnation of the process that is node NAME, with a
  lease (PX) that the node renews; gone, the node is dead.
- ``incarnations``: every NAME + US + INCARNATION that held users, for the
  reaper.
- ``user:USER``: NAME + US + INCARNATION + US + SINCE of the node holding
  USER's connection; it counts only while that incarnation's lease lives.
- ``members:NAME US INCARNATION``: the users that incarnation claimed.
- ``rate:USER``: USER's rate limit state, kept a few seconds for the node it
  connects to next.

US is the unit separator (0x1f), which neither node names nor userIDs hold.
Everything that reads one key to decide on another is a Lua script, so that
it is atomic and costs one round trip for any number of users.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import txredisapi
from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import RedisAddress
from .interfaces import BackendDown, Claimed, Holder, encode_message

log = Logger()

PREFIX = "sktalent:"
US = "\x1f"
# Seconds a command may take before the connection is taken for dead.
_REPLY_TIMEOUT = 5.0
# Seconds between attempts to reach Redis: delivery between nodes resumes
# within this of its return.
_RETRY = 0.5
# Users per script call, so that no call blocks Redis for long.
_CHUNK = 500


@attrs.frozen
class Script:
    """
    A Lua script, called by its SHA1, computed here once: Redis is sent the
    text only when it does not have the script (its first call, or after a
    restart or SCRIPT FLUSH).
    """

    text: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.text.encode()).hexdigest()


_LIVE = """
local function live(p, v)
  if not v then return false end
  local node, inc = string.match(v, '^(.-)\\31(.-)\\31')
  return node ~= nil and redis.call('GET', p .. 'node:' .. node) == inc
end
"""

LEASE = Script(
    """
local key = ARGV[1] .. 'node:' .. ARGV[2]
local current = redis.call('GET', key)
if current and current ~= ARGV[3] then return current end
if tonumber(ARGV[4]) == 0 then
  redis.call('DEL', key)
  return false
end
redis.call('SET', key, ARGV[3], 'PX', ARGV[4])
redis.call('SADD', ARGV[1] .. 'incarnations', ARGV[2] .. '\\31' .. ARGV[3])
return false
"""
)

CLAIM = Script(
    _LIVE
    + """
local p, user = ARGV[1], ARGV[2]
local key = p .. 'user:' .. user
local old = redis.call('GET', key)
if not live(p, old) then old = '' end
local mine = ARGV[3] .. '\\31' .. ARGV[4]
redis.call('SET', key, mine .. '\\31' .. ARGV[5])
redis.call('SADD', p .. 'members:' .. mine, user)
return {old, redis.call('GET', p .. 'rate:' .. user) or ''}
"""
)

RELEASE = Script(
    """
local p, user = ARGV[1], ARGV[2]
local mine = ARGV[3] .. '\\31' .. ARGV[4]
local key = p .. 'user:' .. user
local current = redis.call('GET', key)
if current and string.sub(current, 1, #mine + 1) == mine .. '\\31' then
  redis.call('DEL', key)
end
redis.call('SREM', p .. 'members:' .. mine, user)
if ARGV[5] ~= '' then
  redis.call('SET', p .. 'rate:' .. user, ARGV[5], 'PX', ARGV[6])
end
return 0
"""
)

LOCATE = Script(
    _LIVE
    + """
local p, found = ARGV[1], {}
for i = 2, #ARGV do
  local v = redis.call('GET', p .. 'user:' .. ARGV[i])
  if live(p, v) then found[i - 1] = v else found[i - 1] = '' end
end
return found
"""
)

# LOCATE, and a wake published to each node holding one of the users (but
# the caller's incarnation), in one round trip: ARGV is the prefix, the
# caller's node and incarnation, the wake's hops, then each user with what
# its wake carries (a JSON list, or "").
ROUTE = Script(
    _LIVE
    + """
local p, me, hops = ARGV[1], ARGV[2] .. '\\31' .. ARGV[3], ARGV[4]
local found, wakes, order = {}, {}, {}
for i = 5, #ARGV, 2 do
  local user, carried = ARGV[i], ARGV[i + 1]
  local v = redis.call('GET', p .. 'user:' .. user)
  if live(p, v) then
    found[#found + 1] = v
    local node, inc = string.match(v, '^(.-)\\31(.-)\\31')
    if node .. '\\31' .. inc ~= me then
      local w = wakes[node]
      if not w then
        w = {users = {}, carried = {}}
        wakes[node] = w
        order[#order + 1] = node
      end
      local name = cjson.encode(user)
      w.users[#w.users + 1] = name
      if carried ~= '' then w.carried[#w.carried + 1] = name .. ':' .. carried end
    end
  else
    found[#found + 1] = ''
  end
end
for _, node in ipairs(order) do
  local w = wakes[node]
  local m = '{"k":"wake","h":' .. hops .. ',"u":[' .. table.concat(w.users, ',') .. ']'
  if #w.carried > 0 then m = m .. ',"m":{' .. table.concat(w.carried, ',') .. '}' end
  redis.call('PUBLISH', p .. 'to:' .. node, m .. '}')
end
return found
"""
)

REASSERT = Script(
    _LIVE
    + """
local p, mine = ARGV[1], ARGV[2] .. '\\31' .. ARGV[3]
local taken = {}
for i = 4, #ARGV, 2 do
  local user = ARGV[i]
  local key = p .. 'user:' .. user
  local current = redis.call('GET', key)
  if current and string.sub(current, 1, #mine + 1) ~= mine .. '\\31' and live(p, current) then
    taken[#taken + 1] = user
  else
    redis.call('SET', key, mine .. '\\31' .. ARGV[i + 1])
    redis.call('SADD', p .. 'members:' .. mine, user)
  end
end
return taken
"""
)

REAP = Script(
    """
local p, batch = ARGV[1], tonumber(ARGV[2])
local taken = {}
for _, member in ipairs(redis.call('SMEMBERS', p .. 'incarnations')) do
  if #taken >= batch then break end
  local node, inc = string.match(member, '^(.-)\\31(.*)$')
  if redis.call('GET', p .. 'node:' .. node) ~= inc then
    local members = p .. 'members:' .. member
    for _, user in ipairs(redis.call('SPOP', members, batch - #taken)) do
      local key = p .. 'user:' .. user
      local current = redis.call('GET', key)
      if current and string.sub(current, 1, #member + 1) == member .. '\\31' then
        redis.call('DEL', key)
        taken[#taken + 1] = user
      end
    end
    if redis.call('SCARD', members) == 0 then
      redis.call('SREM', p .. 'incarnations', member)
    end
  end
end
return taken
"""
)


def encode_holder(holder: Holder) -> str:
    return US.join((holder.node, holder.incarnation, str(holder.since)))


def decode_holder(value: str | None) -> Holder | None:
    if not value:
        return None
    node, incarnation, since = value.split(US)
    return Holder(node, incarnation, int(since))


def node_channel(node: str) -> str:
    return f"{PREFIX}to:{node}"


ALL_CHANNEL = f"{PREFIX}all"


class _Commands(txredisapi.BaseRedisProtocol):
    backend: RedisBackend

    def connectionMade(self) -> Deferred[None]:
        # Selecting the database and authenticating come first: ready after.
        d: Deferred[None] = super().connectionMade()
        return d.addCallback(self._made)

    def _made(self, _: object) -> None:
        if self._ready:
            self.backend._commands_ready(self)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.backend._commands_lost(self)


class _Subscriber(txredisapi.SubscriberProtocol):
    backend: RedisBackend

    def connectionMade(self) -> Deferred[None]:
        d: Deferred[None] = super().connectionMade()
        return d.addCallback(self._made)

    def _made(self, _: object) -> None:
        if self._ready:
            self.backend._subscriber_ready(self)

    def messageReceived(self, pattern: object, channel: str, message: str) -> None:
        self.backend._message(message)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.backend._subscriber_lost(self)


@attrs.define(eq=False)
class _ProtocolFactory(Factory):
    """Builds txredisapi protocols bound to the backend, on its clock."""

    # Not in the repr: the factory is named in Twisted's log lines, and the
    # backend's repr holds everything it refers to.
    backend: RedisBackend = attrs.field(repr=False)
    kind: type[txredisapi.BaseRedisProtocol]
    # What txredisapi's protocol asks of its factory.
    isLazy: bool = True
    # Not "Starting factory" at every connection attempt: while Redis is
    # down there are two a second.
    noisy: bool = False

    def buildProtocol(self, addr: object) -> txredisapi.BaseRedisProtocol:
        address = self.backend.address
        p = self.kind(
            "utf-8", replyTimeout=_REPLY_TIMEOUT, password=address.password, dbid=address.db
        )
        p.factory = self
        p.backend = self.backend
        p.callLater = self.backend.reactor.callLater
        return p

    def stopTrying(self) -> None:
        pass  # The backend keeps trying: a Redis being restarted refuses for a while.

    def connectionError(self, why: str) -> None:
        log.warn("Redis at {address}: {why}", address=str(self.backend.address), why=why)


@attrs.define(eq=False)
class RedisBackend:
    """IClusterBackend in Redis (see the module docstring for the keys)."""

    address: RedisAddress
    node: str
    reactor: Any
    _commands: txredisapi.BaseRedisProtocol | None = None
    _subscriber: txredisapi.SubscriberProtocol | None = None
    _subscribed: bool = False
    _up: bool = False
    _services: list[ClientService] = attrs.Factory(list)
    _on_message: Callable[[Mapping[str, Any]], None] | None = None
    _on_up: Callable[[], None] | None = None
    _on_down: Callable[[], None] | None = None

    @property
    def up(self) -> bool:
        return self._up

    def start(
        self,
        on_message: Callable[[Mapping[str, Any]], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
    ) -> None:
        self._on_message, self._on_up, self._on_down = on_message, on_up, on_down
        endpoint = HostnameEndpoint(
            self.reactor, self.address.host, self.address.port, timeout=_REPLY_TIMEOUT
        )
        for kind in (_Commands, _Subscriber):
            service = ClientService(
                endpoint,
                _ProtocolFactory(self, kind),
                retryPolicy=lambda _: _RETRY,
                clock=self.reactor,
            )
            service.startService()
            self._services.append(service)

    def stop(self) -> Deferred[None]:
        services, self._services = self._services, []
        self._on_down = None
        return gatherResults([s.stopService() for s in services]).addCallback(lambda _: None)

    # -- connection state -------------------------------------------------------

    def _commands_ready(self, protocol: txredisapi.BaseRedisProtocol) -> None:
        self._commands = protocol
        self._changed()

    def _commands_lost(self, protocol: txredisapi.BaseRedisProtocol) -> None:
        if self._commands is protocol:
            self._commands = None
            self._changed()

    def _subscriber_ready(self, protocol: txredisapi.SubscriberProtocol) -> None:
        self._subscriber = protocol

        def subscribed(_: object) -> None:
            if self._subscriber is protocol:
                self._subscribed = True
                self._changed()

        protocol.subscribe([node_channel(self.node), ALL_CHANNEL]).addCallbacks(
            subscribed, lambda f: log.warn("Subscribing failed: {e}", e=f.value)
        )

    def _subscriber_lost(self, protocol: txredisapi.SubscriberProtocol) -> None:
        if self._subscriber is protocol:
            self._subscriber = None
            self._subscribed = False
            self._changed()

    def _changed(self) -> None:
        up = self._commands is not None and self._subscribed
        if up == self._up:
            return
        self._up = up
        callback = self._on_up if up else self._on_down
        if callback is not None:
            callback()

    def _message(self, raw: str) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            log.warn("A cluster message that is not JSON ignored: {raw!r}", raw=raw[:200])
            return
        if self._on_message is not None:
            self._on_message(message)

    # -- commands -----------------------------------------------------------------

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        commands = self._commands
        if commands is None:
            return fail(BackendDown(f"Redis at {self.address} is unavailable"))
        d: Deferred[Any] = getattr(commands, method)(*args, **kwargs)

        def down(failure: Failure) -> Failure:
            if failure.check(txredisapi.ConnectionError):
                return Failure(BackendDown(f"Redis at {self.address}: {failure.value}"))
            return failure

        return d.addErrback(down)

    def _script(self, script: Script, *args: object) -> Deferred[Any]:
        argv = [PREFIX, *(str(a) for a in args)]

        def unknown(failure: Failure) -> Deferred[Any]:
            failure.trap(txredisapi.ScriptDoesNotExist)
            # Redis lost it (restarted, SCRIPT FLUSH) or never had it: sent
            # whole, it runs and is kept again.  NOSCRIPT ran none of it.
            return self._run("execute_command", "EVAL", script.text, 0, *argv)

        # Not txredisapi's eval(): it hashes the text at every call.
        return self._run("evalsha", script.sha, [], argv).addErrback(unknown)

    def lease(self, incarnation: str, milliseconds: int) -> Deferred[str | None]:
        return self._script(LEASE, self.node, incarnation, milliseconds)

    def claim(self, user: str, holder: Holder) -> Deferred[Claimed]:
        def claimed(reply: list[Any]) -> Claimed:
            old, rate = reply
            return Claimed(decode_holder(old), rate or None)

        d = self._script(CLAIM, user, holder.node, holder.incarnation, holder.since)
        return d.addCallback(claimed)

    def release(self, user: str, holder: Holder, rate: str | None, rate_ms: int) -> Deferred[None]:
        d = self._script(RELEASE, user, holder.node, holder.incarnation, rate or "", rate_ms)
        return d.addCallback(lambda _: None)

    def locate(self, users: Sequence[str]) -> Deferred[list[Holder | None]]:
        return Deferred.fromCoroutine(self._locate(users))

    async def _locate(self, users: Sequence[str]) -> list[Holder | None]:
        found: list[Holder | None] = []
        for i in range(0, len(users), _CHUNK):
            reply = await self._script(LOCATE, *users[i : i + _CHUNK])
            found.extend(decode_holder(value) for value in reply)
        return found

    def route(
        self,
        incarnation: str,
        hops: int,
        users: Sequence[str],
        carried: Mapping[str, Sequence[Mapping[str, Any]]],
    ) -> Deferred[list[Holder | None]]:
        return Deferred.fromCoroutine(self._route(incarnation, hops, users, carried))

    async def _route(
        self,
        incarnation: str,
        hops: int,
        users: Sequence[str],
        carried: Mapping[str, Sequence[Mapping[str, Any]]],
    ) -> list[Holder | None]:
        found: list[Holder | None] = []
        for i in range(0, len(users), _CHUNK):
            args: list[object] = [self.node, incarnation, hops]
            for user in users[i : i + _CHUNK]:
                messages = carried.get(user)
                args += [user, encode_message(messages) if messages else ""]
            reply = await self._script(ROUTE, *args)
            found.extend(decode_holder(value) for value in reply)
        return found

    def reassert(self, incarnation: str, holders: Mapping[str, Holder]) -> Deferred[list[str]]:
        return Deferred.fromCoroutine(self._reassert(incarnation, holders))

    async def _reassert(self, incarnation: str, holders: Mapping[str, Holder]) -> list[str]:
        taken: list[str] = []
        items = list(holders.items())
        for i in range(0, len(items), _CHUNK):
            pairs = [x for user, h in items[i : i + _CHUNK] for x in (user, h.since)]
            taken += await self._script(REASSERT, self.node, incarnation, *pairs)
        # Presences this node left behind while Redis was away.
        members = await self._run("smembers", f"{PREFIX}members:{self.node}{US}{incarnation}")
        for user in set(members) - set(holders):
            await self.release(user, Holder(self.node, incarnation, 0), None, 0)
        return taken

    def reap(self, batch: int) -> Deferred[list[str]]:
        return self._script(REAP, batch).addCallback(list)

    def send(self, node: str, message: Mapping[str, Any]) -> Deferred[int]:
        return self._run("publish", node_channel(node), encode_message(message))

    def broadcast(self, message: Mapping[str, Any]) -> Deferred[int]:
        return self._run("publish", ALL_CHANNEL, encode_message(message))
