"""
twistd plugin: options and the service tree of the server.

    twistd -n sktalent [options]
"""

from __future__ import annotations

import difflib
import gc
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

from .api.resource import ApiResource, api_site, load_tokens
from .authsign import load_or_create_secret, read_secret
from .calltalent.app import AppLimits, CallTalent
from .calltalent.auth import AuthSignChecker, HookChecker
from .calltalent.delivery import PushDelivery
from .calltalent.pushtexts import PushTexts, TextTable, load_texts
from .calltalent.rules import CallTalentRules
from .cluster import RedisAddress, check_node_name
from .failures import StartFailure, logged
from .logs import FORMATS, check_twistd_options, json_file_observer
from .metrics import Metrics, QueueFigures
from .mqtt.auth import AllowEveryone, AllowEverything, portal_for
from .mqtt.bans import Bans
from .mqtt.broker import Broker
from .mqtt.interfaces import IApplication, IAuthorizer
from .mqtt.protocol import Limits, MQTTFactory
from .mqtt.router import NOTHING_RETAINED, RetainedLimits
from .mqtt.session import QueueLimits
from .push.coalesce import Coalescer
from .push.config import UmengConfig, load_config
from .push.disabled import DisabledPusher
from .push.interfaces import IPusher
from .push.umeng import UmengPusher
from .readiness import notify_ready
from .reload import Reloadable, Reloader
from .retention import Retention
from .store import check_store_uri, open_store
from .store.interfaces import IStore, StoreUnavailable
from .store.sqlite import SQLiteStore, StoreDamaged

if TYPE_CHECKING:
    from .cluster.node import ClusterNode

log = Logger()

_RETAINED = RetainedLimits()
# The cyclic collector's thresholds once started (see tune_collector).
GC_THRESHOLDS = (50_000, 20, 10)


def _log_format(value: str) -> str:
    if value not in FORMATS:
        raise ValueError(f"{value!r} is not one of {', '.join(FORMATS)}")
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if number <= 0:
        raise ValueError(f"{value} is not a positive whole number")
    return number


def _positive_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not 0 < number < math.inf:
        raise ValueError(f"{value} is not a positive number of seconds")
    return number


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
# Options given more than once: whitespace-separated in the environment.
_REPEATABLE = ("listen", "refuse-subscribe")


class _NamedCoerce(usage.CoerceParameter):
    """Converts an option's value; a bad one is refused naming the option."""

    def dispatch(self, parameterName: str, value: str) -> None:
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{parameterName}: {e}") from None


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "CallTalent messaging server: MQTT 3.1.1 for the app, an HTTP API for the "
        "backend, offline push through Umeng. Every option can also be given in the "
        "environment as SKTALENT_<NAME> (--store: SKTALENT_STORE); the command line wins."
    )
    optFlags: list[list[Any]] = [
        ["anonymous", None, "Development only: no authSign check, any topic: a plain broker."],
    ]
    optParameters: list[list[Any]] = [
        ["api", None, "tcp:8076:interface=127.0.0.1", "HTTP API listener (endpoint description)."],
        [
            "store",
            None,
            "sqlite:sktalent.sqlite3",
            "sqlite:PATH or mongodb://HOST:PORT/DB (memory: keeps nothing, for development).",
        ],
        [
            "auth-secret-file",
            None,
            "sktalent.secret",
            "Shared secret for authSign; created (0600) if absent.",
        ],
        ["auth-url", None, None, "Verify authSign with this HTTP hook instead of the secret."],
        ["api-token-file", None, None, "Bearer tokens for /v1/*, one per line."],
        ["umeng-config", None, None, "Umeng push configuration (JSON)."],
        ["push-texts", None, None, "JSON overriding the default push texts."],
        ["max-packet", None, 65536, "Largest MQTT packet accepted, in bytes.", _positive_int],
        ["max-content", None, 4000, "Longest chat content, in characters.", _positive_int],
        [
            "max-queued",
            None,
            10000,
            "Messages queued per user; past it chat and notifications are refused.",
            _positive_int,
        ],
        [
            "max-queued-bytes",
            None,
            16 * 1024 * 1024,
            "Payload bytes queued per user, at least --max-packet; past it likewise.",
            _positive_int,
        ],
        [
            "retention-days",
            None,
            30,
            "Days chat history and queued messages are kept.",
            _positive_int,
        ],
        [
            "push-after",
            None,
            5.0,
            "Seconds a message may wait unacknowledged on a live connection before it is pushed.",
            _positive_seconds,
        ],
        [
            "max-retained",
            None,
            _RETAINED.max_count,
            "With --anonymous: retained messages kept, at most.",
            _positive_int,
        ],
        [
            "max-retained-bytes",
            None,
            _RETAINED.max_bytes,
            "With --anonymous: bytes of retained messages (topics and payloads) kept, at most.",
            _positive_int,
        ],
        [
            "chat-rate",
            None,
            20,
            "Messages a user may send per second (bursts of 3x).",
            _positive_int,
        ],
        [
            "cluster",
            None,
            None,
            "redis://HOST:PORT/DB: be one node of a cluster sharing this Redis and the"
            " MongoDB store.",
        ],
        [
            "node",
            None,
            None,
            "With --cluster: this node's name, unique in the cluster"
            " [default: host name and first MQTT port].",
        ],
        [
            "log-format",
            None,
            "text",
            "text, or json: one JSON object a line, where twistd would log.",
            _log_format,
        ],
    ]
    compData = usage.Completions(
        optActions={"store": usage.CompleteFiles(), "auth-secret-file": usage.CompleteFiles()}
    )

    def __init__(self) -> None:
        super().__init__()
        # usage's own converter does not say which option a bad value is for.
        for name, handler in self._dispatch.items():
            if isinstance(handler, usage.CoerceParameter):
                self._dispatch[name] = _NamedCoerce(self, handler.coerce)
        self["listen"] = []
        self["refuse-subscribe"] = []
        self._listen_from_command_line = False

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse the environment, then the command line.  A bad value stops the
        start with one line naming it (twistd would bury it under the usage).
        """
        try:
            self._parse(options)
        except usage.UsageError as e:
            raise SystemExit(f"sktalent: {e}") from None

    def _parse(self, options: Sequence[str] | None) -> None:
        self._warn_unknown_variables()
        for name, _, _, _, *coerce in self.optParameters:
            value = os.environ.get(_env_name(name))
            if value is not None:
                try:
                    self[name] = coerce[0](value) if coerce else value
                except ValueError as e:
                    raise usage.UsageError(f"{_env_name(name)}: {e}") from None
        for name, *_ in self.optFlags:
            value = os.environ.get(_env_name(name))
            if value is None:
                continue
            if value.strip().lower() not in _TRUE + _FALSE:
                raise usage.UsageError(
                    f"{_env_name(name)}={value!r} is neither true (1, true, yes, on)"
                    " nor false (0, false, no, off, empty)"
                )
            self[name] = int(value.strip().lower() in _TRUE)
        if os.environ.get("SKTALENT_LISTEN"):
            self["listen"] = os.environ["SKTALENT_LISTEN"].split()
        self["refuse-subscribe"] = os.environ.get("SKTALENT_REFUSE_SUBSCRIBE", "").split()
        super().parseOptions(options)

    def _warn_unknown_variables(self) -> None:
        # A misspelt variable would otherwise leave its option silently at the default.
        options = [
            *(flag[0] for flag in self.optFlags),
            *(parameter[0] for parameter in self.optParameters),
            *_REPEATABLE,
        ]
        known = {_env_name(option) for option in options}
        for name in sorted(os.environ):
            # SKTALENT_TEST_*: the test suite's own settings, passed through.
            if (
                name in known
                or not name.startswith("SKTALENT_")
                or name.startswith("SKTALENT_TEST_")
            ):
                continue
            # Compared without the prefix that every name shares.
            option = name.removeprefix("SKTALENT_").lower().replace("_", "-")
            nearest = difflib.get_close_matches(option, options, 1)
            log.warn(
                "Unknown variable {name} ignored: {hint}",
                name=name,
                hint=(
                    f"did you mean {_env_name(nearest[0])} (--{nearest[0]})?"
                    if nearest
                    else "no option has that name"
                ),
            )

    def opt_refuse_subscribe(self, topic_filter: str) -> None:
        """With --anonymous: answer SUBSCRIBE to this filter with 0x80, repeatable."""
        self["refuse-subscribe"].append(topic_filter)

    def opt_listen(self, description: str) -> None:
        """MQTT listener (endpoint description), repeatable [default: tcp:8075]."""
        if not self._listen_from_command_line:
            self["listen"], self._listen_from_command_line = [], True
        self["listen"].append(description)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = ["tcp:8075"]
        # Endpoint strings are parsed here so that a typo stops the start.
        from twisted.internet import reactor

        for description in [*self["listen"], self["api"]]:
            try:
                endpoints.serverFromString(reactor, description)
            except Exception as e:  # noqa: BLE001 - parsers raise all kinds; each is a bad value
                raise usage.UsageError(f"bad listener {description!r}: {e}") from None
        try:
            check_store_uri(self["store"])
            _check_writable(self["store"])
        except ValueError as e:
            raise usage.UsageError(f"--store: {e}") from None
        self["secret"] = (
            None if self["anonymous"] else _load(self, "auth-secret-file", load_or_create_secret)
        )
        self["tokens"] = _load(self, "api-token-file", load_tokens)
        self["umeng"] = _load(self, "umeng-config", load_config)
        self["texts"] = _load(self, "push-texts", load_texts) or TextTable()
        if self["max-queued-bytes"] < self["max-packet"]:
            # Else a message as large as a packet could never be queued.
            raise usage.UsageError(
                f"--max-queued-bytes ({self['max-queued-bytes']}) must be at least"
                f" --max-packet ({self['max-packet']})"
            )
        if self["refuse-subscribe"] and not self["anonymous"]:
            raise usage.UsageError("--refuse-subscribe goes with --anonymous only")
        self["retained"] = RetainedLimits(self["max-retained"], self["max-retained-bytes"])
        if self["retained"] != _RETAINED and not self["anonymous"]:
            raise usage.UsageError(
                "--max-retained and --max-retained-bytes go with --anonymous only:"
                " CallTalent clients retain nothing"
            )
        self._check_cluster()
        if self["auth-url"] and not self["auth-url"].startswith(("http://", "https://")):
            raise usage.UsageError(f"--auth-url must be an http(s) URL, not {self['auth-url']!r}")
        if self["log-format"] == "json":
            try:
                check_twistd_options(self.twistd)
            except ValueError as e:
                raise usage.UsageError(str(e)) from None

    def _check_cluster(self) -> None:
        if not self["cluster"]:
            if self["node"]:
                raise usage.UsageError("--node goes with --cluster only")
            self["redis"] = None
            self["node"] = node_name(self["listen"])
            return
        try:
            self["redis"] = RedisAddress.parse(self["cluster"])
        except ValueError as e:
            raise usage.UsageError(f"--cluster: {e}") from None
        if not self["store"].startswith("mongodb://"):
            raise usage.UsageError(
                f"--cluster needs a MongoDB store that every node shares"
                f" (--store mongodb://HOST:PORT/DB), not {self['store']!r}"
            )
        if self["anonymous"]:
            raise usage.UsageError("--cluster serves CallTalent clients; not with --anonymous")
        try:
            self["node"] = check_node_name(self["node"] or node_name(self["listen"]))
        except ValueError as e:
            raise usage.UsageError(f"--node: {e}") from None

    @property
    def twistd(self) -> Mapping[str, Any]:
        """twistd's own options (--logfile, -n, ...); empty outside twistd."""
        parent = getattr(self, "parent", None)
        return {} if parent is None else parent


def _load(options: Options, option: str, loader: Callable[[str], Any]) -> Any:
    """The content of the file an option names (None without one)."""
    if not options[option]:
        return None
    try:
        return loader(options[option])
    except (OSError, ValueError) as e:
        raise usage.UsageError(f"--{option}: {e}") from None


def _check_writable(store: str) -> None:
    # SQLite creates its -wal and -shm files next to the store's file.
    if store.startswith("sqlite:"):
        directory = os.path.dirname(os.path.abspath(store.removeprefix("sqlite:")))
        if not os.path.isdir(directory):
            raise ValueError(f"the directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ValueError(
                f"the directory {directory} is not writable: the store's file,"
                " and SQLite's -wal and -shm files next to it, are created there"
            )


def node_name(listen: Sequence[str]) -> str:
    """This server's name for operators: the host name and the first MQTT port."""
    port = re.match(r"(?:tcp6?|ssl):(?:port=)?(\d+)", listen[0]) if listen else None
    host = socket.gethostname()
    return host if port is None else f"{host}:{port[1]}"


def _env_name(option: str) -> str:
    return "SKTALENT_" + option.upper().replace("-", "_")


@attrs.frozen
class Listener:
    """A listener to open, named by its option so that a failure says which."""

    option: str
    description: str
    factory: IProtocolFactory


class Root(service.MultiService):
    """
    The root of the service tree.  Adding it to twistd's application is a
    plugin's only say in how twistd logs: the application's ILogObserver
    is used unless twistd's --logger names another.
    """

    def __init__(self, observer: ILogObserver | None) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        if self.observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def log_observer(options: Options, reactor: Any) -> ILogObserver | None:
    """
    The observer for --log-format json, writing where twistd would have:
    --logfile (rotated on SIGUSR1, as twistd does), or stdout with -n and no
    --logfile (the journal, under systemd).  None for text: twistd's own.
    """
    if options["log-format"] != "json":
        return None
    twistd = options.twistd
    name = twistd.get("logfile") or ""
    if not twistd or name == "-" or (not name and twistd.get("nodaemon")):
        return json_file_observer(sys.stdout)
    try:
        log_file = LogFile.fromFullPath(name or "twistd.log")
    except OSError as e:
        raise SystemExit(f"sktalent: cannot write the log file: {e}") from None
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(log_file.rotate))
    return json_file_observer(log_file)


def tune_collector() -> None:
    """
    Keep the cyclic garbage collector off the hot path, once started: what
    the start loaded (modules, classes: about 100,000 objects) is frozen out
    of its generations, and the youngest is collected every 50,000 net
    allocations rather than every 700.  A chat keeps dozens of objects alive
    until its commit lands, so with the defaults they were traversed over
    and over, and full collections walked the whole interpreter each time:
    nearly half the reactor's CPU for a durable chat.  Cycles are still
    collected, a full collection every 10 million allocations or so.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@attrs.define(eq=False, repr=False)
class Core(service.Service):
    """
    The store, the broker and the listeners: the listeners open once the
    store is open (no session is loaded: a CONNECT reads its own), and a
    store that cannot be used stops the start before any of them opens.
    """

    _reactor: Any
    _store: IStore
    _broker: Broker
    _factory: MQTTFactory
    _listeners: Sequence[Listener]
    _pusher: IPusher
    _retention: Retention
    _delivery: PushDelivery
    _figures: QueueFigures
    _cluster: ClusterNode | None = None
    # Called once the listeners are open: what is loaded by then stays.
    _settle: Callable[[], object] = tune_collector
    _starting: Deferred[None] | None = None
    _ports: list[IListeningPort] = attrs.Factory(list)

    def startService(self) -> None:
        service.Service.startService(self)
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._failed)

    async def _start(self) -> None:
        await self._store.start()
        if self._cluster is not None:
            await self._cluster.start()
        await self._broker.start()
        for listener in self._listeners:
            endpoint = endpoints.serverFromString(self._reactor, listener.description)
            # A listener that cannot listen fails the start: no silent half-server.
            try:
                self._ports.append(await endpoint.listen(listener.factory))
            except CannotListenError as e:
                raise StartFailure(f"{listener.option} {listener.description}: {e}") from e
            log.info(
                "Listening on {where} ({option})",
                where=listener.description,
                option=listener.option,
            )
        self._retention.start()
        self._figures.start()
        self._delivery.recover().addErrback(logged(log, "Pushing what a restart found owed failed"))
        self._settle()
        notify_ready()

    def _failed(self, failure: Any) -> None:
        if failure.check(CancelledError):
            return  # Stopped while starting: nothing failed.
        if failure.check(StartFailure, StoreUnavailable):
            # The operator's to fix, and the message says what: no traceback.
            log.critical("Cannot start: {why}", why=failure.getErrorMessage())
        else:
            log.failure("The server could not start", failure)
        self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        # A store that answers at once fails the start before the reactor runs.
        self._reactor.callWhenRunning(self._reactor.stop)

    async def _stop(self) -> None:
        # twistd re-raises the stopping signal at exit; an orderly stop on
        # SIGTERM is a success, and operators expect status 0 for it.
        if hasattr(self._reactor, "_exitSignal"):
            self._reactor._exitSignal = None
        if self._starting is not None:
            self._starting.cancel()
        self._retention.stop()
        self._figures.stop()
        service.Service.stopService(self)
        ports, self._ports = self._ports, []
        for port in ports:
            await maybeDeferred(port.stopListening)
        self._delivery.stop()
        self._factory.close_all()
        self._pusher.stop()
        if self._cluster is not None:
            await self._cluster.stop()
        # Acknowledgements read last wait to be committed with others.
        self._broker.flush_later()
        await self._store.stop()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


def _cannot_go_on(damaged: StoreDamaged) -> None:
    """
    The store's file turned out to be damaged while the server ran (a start
    reads only what it needs, so damage deep in a file shows later): stop
    at once, with one line, before anything more is promised or logged.
    """
    log.critical("Cannot go on: {why}", why=str(damaged))
    os._exit(1)


def _checker(options: Options, reactor: Any, http: Any) -> ICredentialsChecker:
    if options["anonymous"]:
        return AllowEveryone()
    if options["auth-url"]:
        return HookChecker(options["auth-url"], http, reactor)
    return AuthSignChecker(options["secret"], reactor)


def _pusher(
    config: UmengConfig | None, reactor: IReactorTime, http: Any, store: IStore, metrics: Metrics
) -> IPusher:
    if config is None:
        log.warn("No --umeng-config: offline push is off")
        return DisabledPusher(metrics)
    return UmengPusher(reactor, http, store, config, metrics)


def _reloadable(
    options: Options,
    reactor: Any,
    portal: Portal,
    pusher: IPusher,
    api: ApiResource,
    texts: PushTexts,
) -> list[Reloadable[Any]]:
    """The files SIGHUP reloads: those the server started with, each with its apply step."""
    files: list[Reloadable[Any]] = []
    if isinstance(portal.checkers[IUsernamePassword], AuthSignChecker):
        files.append(
            Reloadable(
                "--auth-secret-file",
                options["auth-secret-file"],
                read_secret,
                lambda secret: portal.registerChecker(AuthSignChecker(secret, reactor)),
            )
        )
    if options["tokens"] is not None:
        files.append(
            Reloadable(
                "--api-token-file", options["api-token-file"], load_tokens, api.replace_tokens
            )
        )
    if isinstance(pusher, UmengPusher):
        files.append(
            Reloadable("--umeng-config", options["umeng-config"], load_config, pusher.reconfigure)
        )
    if options["push-texts"]:
        files.append(Reloadable("--push-texts", options["push-texts"], load_texts, texts.use))
    return files


def _cluster(
    address: RedisAddress,
    node: str,
    reactor: Any,
    broker: Broker,
    calltalent: CallTalent,
    delivery: PushDelivery,
) -> ClusterNode:
    # Only a cluster node loads the Redis client.
    from .cluster.local import LocalServer
    from .cluster.node import ClusterNode
    from .cluster.redis import RedisBackend

    log.info("Cluster node {node}, Redis at {address}", node=node, address=str(address))
    cluster = ClusterNode(node, RedisBackend(address, node, reactor), reactor)
    cluster.attach(LocalServer(broker, calltalent, delivery))
    broker.gate = cluster
    calltalent.cluster = cluster
    delivery.cluster = cluster
    return cluster


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    import treq.client
    from twisted.web.client import Agent

    http = treq.client.HTTPClient(Agent(reactor))
    node = options["node"]
    metrics = Metrics(node=node)
    store = open_store(
        options["store"],
        reactor,
        latency=metrics.store_latency,
        retention_days=options["retention-days"],
    )
    authorizer: IAuthorizer = (
        AllowEverything(frozenset(options["refuse-subscribe"]))
        if options["anonymous"]
        else CallTalentRules()
    )
    plain = bool(options["anonymous"])
    broker = Broker(
        store,
        authorizer,
        metrics,
        reactor,
        limits=QueueLimits(options["max-queued"], options["max-queued-bytes"]),
        retained_limits=options["retained"] if plain else NOTHING_RETAINED,
        # A plain broker routes by topic and lets clean sessions end with
        # their connections; CallTalent addresses users by id and keeps
        # what it promised a sender.
        route_offline=plain,
        clean_in_memory=plain,
    )
    if isinstance(store, SQLiteStore):
        store.on_damaged = lambda damaged: reactor.callFromThread(_cannot_go_on, damaged)
    figures = QueueFigures(reactor, store)
    metrics.watch_store(lambda: store.available, lambda: store.outages)
    metrics.watch_queues(lambda: figures.last, reactor.seconds)
    bans = Bans(store, broker, reactor)
    umeng = _pusher(options["umeng"], reactor, http, store, metrics)
    pusher = Coalescer(reactor, umeng, metrics)
    delivery = PushDelivery(broker, store, pusher, reactor, options["push-after"])
    if not options["anonymous"]:
        broker.watch(delivery)
    texts = PushTexts(options["texts"])
    calltalent = CallTalent(
        broker,
        store,
        pusher,
        reactor,
        metrics,
        AppLimits(
            max_content=options["max-content"],
            rate=options["chat-rate"],
            burst=options["chat-rate"] * 3,
        ),
        texts,
        node=node,
        bans=bans,
    )
    cluster = None
    if options["redis"] is not None:
        cluster = _cluster(options["redis"], node, reactor, broker, calltalent, delivery)
    app: IApplication | None = None if options["anonymous"] else calltalent
    if options["anonymous"]:
        log.critical("ANONYMOUS MODE: no authentication, every topic open. Development only!")
    portal = portal_for(_checker(options, reactor, http))
    factory = MQTTFactory(
        broker,
        portal,
        authorizer,
        app,
        reactor,
        metrics,
        Limits(max_packet_size=options["max-packet"]),
        bans=bans,
    )
    site = api_site(calltalent, options["tokens"], reactor=reactor)
    # The API first: once MQTT clients can connect, the backend can too.
    listeners = [Listener("--api", options["api"], site)]
    listeners += [Listener("--listen", d, factory) for d in options["listen"]]
    root = Root(log_observer(options, reactor))
    retention = Retention(reactor, store, broker, metrics, options["retention-days"])
    core = Core(
        reactor, store, broker, factory, listeners, pusher, retention, delivery, figures, cluster
    )
    core.setServiceParent(root)
    reloadable = _reloadable(options, reactor, portal, umeng, site.resource, texts)
    Reloader(reactor, reloadable).setServiceParent(root)
    return root
