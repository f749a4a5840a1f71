"""
A real server process for end-to-end tests and benchmarks: `twistd -n
sktalent` on free ports of 127.0.0.1, in a directory of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
from twisted.trial.unittest import SynchronousTestCase

T = TypeVar("T")
# Where the server imports sktalent (and its twistd plugin) from: this code's.
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return False
    return True


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, what: str = "condition") -> T:
    """Poll predicate until it returns something true; bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def running(case: SynchronousTestCase, server: ServerProcess) -> ServerProcess:
    """Start server for case: stopped, and its directory removed, at the end."""
    case.addCleanup(shutil.rmtree, server.directory, True)
    case.addCleanup(server.stop)
    return server.start()


@attrs.define(eq=False)
class ServerProcess:
    """
    One server.  ``args`` are extra sktalent options, ``twistd_args``
    twistd's own; the store, listeners and secret are chosen here unless
    given.  ``env`` adds environment variables (the tests' own SKTALENT_* are
    not passed on otherwise), and ``umask`` is the process's umask if given.
    """

    args: Sequence[str] = ()
    store: str | None = None
    directory: Path = attrs.Factory(lambda: Path(tempfile.mkdtemp(prefix="sktalent-")))
    mqtt_port: int = attrs.Factory(free_port)
    api_port: int = attrs.Factory(free_port)
    process: subprocess.Popen[bytes] | None = None
    env: Mapping[str, str] = attrs.Factory(dict)
    umask: int = -1
    twistd_args: Sequence[str] = ()

    @property
    def secret(self) -> bytes:
        return (self.directory / "sktalent.secret").read_bytes().rstrip(b"\n")

    @property
    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> ServerProcess:
        self.spawn()
        wait_for(self._ready, what=f"the server to listen\n{self.log}")
        return self

    def start_failing(self, *taken: int, timeout: float = 30.0) -> int:
        """
        Start a server that must not start: its exit status, once it has
        exited.  None of its ports but those in taken (held by the test)
        may accept a connection meanwhile.
        """
        self.spawn()
        assert self.process is not None
        ports = {self.mqtt_port, self.api_port} - set(taken)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            opened = [port for port in ports if listening(port)]
            if opened or time.monotonic() > deadline:
                self.process.kill()
                self.process.wait(5)
                raise AssertionError(f"the server listened on {opened} or ran on:\n{self.log}")
            time.sleep(0.02)
        return self.process.returncode

    def run_to_exit(self, timeout: float = 30.0) -> int:
        """Start the server and wait, at most timeout seconds, for it to exit: its status."""
        self.spawn()
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"the server ran on:\n{self.log}") from None

    def spawn(self) -> None:
        """Start the process, not waiting for anything."""
        command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            *self.twistd_args,
            "sktalent",
            "--listen",
            f"tcp:{self.mqtt_port}:interface=127.0.0.1",
            "--api",
            f"tcp:{self.api_port}:interface=127.0.0.1",
            "--store",
            self.store or f"sqlite:{self.directory / 'store.sqlite3'}",
            *self.args,
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for name in list(env):
            if name.startswith("SKTALENT_") and not name.startswith("SKTALENT_TEST_"):
                del env[name]
        env.update(self.env)
        with open(self.directory / "server.log", "ab") as out:
            self.process = subprocess.Popen(
                command,
                cwd=self.directory,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                umask=self.umask,
            )

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited {self.process.returncode}:\n{self.log}")
        return listening(self.mqtt_port)

    def api(
        self, path: str, method: str = "GET", body: object = None, token: str | None = None
    ) -> tuple[int, bytes]:
        """Call the HTTP API: the status and body of the answer."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", method=method)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if body is not None:
            request.data = json.dumps(body).encode()
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        """SIGTERM, and the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"the server ignored SIGTERM:\n{self.log}") from None

    def restarted(self) -> ServerProcess:
        """The same server, started again on the same store and ports."""
        return ServerProcess(
            self.args,
            self.store,
            self.directory,
            self.mqtt_port,
            self.api_port,
            env=self.env,
            umask=self.umask,
            twistd_args=self.twistd_args,
        ).start()
