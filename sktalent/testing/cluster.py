"""
Real Redis and HAProxy processes for cluster tests and benchmarks, on free ports of
127.0.0.1, each in a directory of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sktalent.testing.server import free_port, listening, wait_for


def need(program: str) -> str:
    """program's path; skip without it, except in CI, which must have it."""
    path = shutil.which(program) or next(
        (p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}") if os.access(p, os.X_OK)),
        None,
    )
    if path is None:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"CI must provide {program}")
        raise SkipTest(f"{program} is not installed")
    return path


@attrs.define(eq=False)
class RedisProcess:
    """A redis-server that keeps its data across its own restarts (stop, start)."""

    port: int = attrs.Factory(free_port)
    directory: Path = attrs.Factory(lambda: Path(tempfile.mkdtemp(prefix="sktalent-redis-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        command = [
            need("redis-server"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        wait_for(lambda: listening(self.port), 10, "redis-server to listen")
        return self

    def stop(self) -> None:
        """Stop it (its data is lost: Redis comes back empty, the hard case)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def running_redis(case: SynchronousTestCase) -> RedisProcess:
    redis = RedisProcess()
    case.addCleanup(shutil.rmtree, redis.directory, True)
    case.addCleanup(redis.stop)
    return redis.start()


@attrs.define(eq=False)
class HAProxyProcess:
    """HAProxy in TCP mode on a free port, in front of the given MQTT ports."""

    backends: Sequence[int]
    port: int = attrs.Factory(free_port)
    directory: Path = attrs.Factory(lambda: Path(tempfile.mkdtemp(prefix="sktalent-haproxy-")))
    process: subprocess.Popen[bytes] | None = None

    def config(self, template: str) -> str:
        """
        deploy/haproxy.cfg's text with this test's ports, its own servers,
        no syslog and connection limits a test machine allows.
        """
        servers = "".join(
            f"    server node{i} 127.0.0.1:{port}\n" for i, port in enumerate(self.backends, 1)
        )
        text = re.sub(r"(?m)^    server .*\n", "", template)
        text = re.sub(r"(?m)^(    default-server .*\n)", lambda m: m[1] + servers, text)
        text = re.sub(r"(?m)^\s*log /dev/log.*\n", "", text)
        text = re.sub(r"maxconn \d+", "maxconn 2000", text)
        return text.replace("bind :8075", f"bind 127.0.0.1:{self.port}")

    def start(self, template: str) -> HAProxyProcess:
        path = self.directory / "haproxy.cfg"
        path.write_text(self.config(template))
        haproxy = need("haproxy")
        subprocess.run([haproxy, "-c", "-q", "-f", str(path)], check=True)
        with open(self.directory / "haproxy.log", "wb") as out:
            self.process = subprocess.Popen(
                [haproxy, "-db", "-f", str(path)], stdout=out, stderr=subprocess.STDOUT
            )
        wait_for(lambda: listening(self.port), 10, "haproxy to listen")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
