"""
Tests for the deployment files in deploy/.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

import sktalent
from sktalent.tap import Options
from sktalent.testing.cluster import need

DEPLOY = FilePath(os.path.abspath(sktalent.__file__)).parent().parent().child("deploy")
UNIT = DEPLOY.child("sktalent.service")
TEMPLATE = DEPLOY.child("sktalent@.service")

SANDBOXING = {
    # The server says when it is up: start and a reload behind it wait for that.
    "Type": "notify",
    "User": "sktalent",
    "DynamicUser": "no",
    "EnvironmentFile": "/etc/sktalent/sktalent.env",
    "WorkingDirectory": "/var/lib/sktalent",
    "StateDirectory": "sktalent",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ReadWritePaths": "/var/lib/sktalent",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "LimitNOFILE": "65536",
}


def all_options() -> list[str]:
    """The long name of every option of the server."""
    return (
        [flag[0] for flag in Options.optFlags]
        + [parameter[0] for parameter in Options.optParameters]
        + ["listen", "refuse-subscribe"]
    )


def service_settings(unit: str) -> dict[str, str]:
    """The [Service] section's settings; a setting given twice keeps the last."""
    settings: dict[str, str] = {}
    section = ""
    for line in unit.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


class ServiceUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.unit = UNIT.getContent().decode("utf-8")
        self.settings = service_settings(self.unit)

    def test_sandboxing(self) -> None:
        """
        The unit runs unprivileged and sandboxed, with the directives the
        deployment promises.
        """
        for key, value in SANDBOXING.items():
            with self.subTest(key=key):
                self.assertEqual(self.settings.get(key), value)
        for key in ("RestartSec", "TimeoutStopSec"):
            self.assertRegex(self.settings.get(key, ""), r"\A\d+\Z")

    def test_exec_start(self) -> None:
        """
        ExecStart runs twistd from the venv by absolute path, in the
        foreground, without a pid file.
        """
        self.assertEqual(
            self.settings["ExecStart"],
            "/opt/sktalent/venv/bin/twistd -n --pidfile= sktalent",
        )

    def test_exec_reload(self) -> None:
        """systemctl reload sends the server SIGHUP, which reloads its files."""
        self.assertEqual(self.settings["ExecReload"], "/bin/kill -HUP $MAINPID")

    def test_environment_example(self) -> None:
        """
        The environment example names the variable of every server option,
        each commented out (the defaults).
        """
        example = DEPLOY.child("sktalent.env.example").getContent().decode("utf-8")
        names = re.findall(r"^#(SKTALENT_[A-Z_]+)=", example, re.MULTILINE)
        for option in all_options():
            name = "SKTALENT_" + option.upper().replace("-", "_")
            with self.subTest(name=name):
                self.assertIn(name, names)
        self.assertEqual(len(names), len(set(names)))
        self.assertNotRegex(example, r"(?m)^SKTALENT_")

    def test_readme_options(self) -> None:
        """The README's option table names every server option."""
        readme = DEPLOY.parent().child("README.md").getContent().decode("utf-8")
        table = "\n".join(line for line in readme.splitlines() if line.startswith("| `--"))
        for option in all_options():
            with self.subTest(option=option):
                self.assertIn(f"`--{option}", table)

    def test_systemd_analyze_verify(self) -> None:
        """
        systemd-analyze verify accepts the unit, with ExecStart pointed at
        this Python's twistd so that the binary exists.
        """
        verify(self, self.unit, "sktalent.service", "sktalent.service")


class TemplateUnitTests(SynchronousTestCase):
    """deploy/sktalent@.service: one cluster node per instance."""

    def setUp(self) -> None:
        self.unit = TEMPLATE.getContent().decode("utf-8")
        self.settings = service_settings(self.unit)

    def test_like_the_single_unit(self) -> None:
        """
        A node runs exactly as the single server does (user, sandboxing,
        ExecStart, reload) but for its environment files.
        """
        single = service_settings(UNIT.getContent().decode("utf-8"))
        del single["EnvironmentFile"]
        for key, value in single.items():
            with self.subTest(key=key):
                self.assertEqual(self.settings.get(key), value)

    def test_environment_files(self) -> None:
        """
        Every instance reads the shared options first, then its own, whose
        values win (systemd applies EnvironmentFile lines in order).
        """
        files = re.findall(r"(?m)^EnvironmentFile=(.*)$", self.unit)
        self.assertEqual(files, ["/etc/sktalent/sktalent.env", "/etc/sktalent/sktalent-%i.env"])

    def test_systemd_analyze_verify(self) -> None:
        """systemd-analyze verify accepts an instance of the template."""
        verify(self, self.unit, "sktalent@.service", "sktalent@1.service")


class HAProxyConfigTests(SynchronousTestCase):
    def test_haproxy_accepts_it(self) -> None:
        """haproxy -c accepts deploy/haproxy.cfg: TCP on 8075, to the nodes."""
        text = DEPLOY.child("haproxy.cfg").getContent().decode("utf-8")
        self.assertIn("mode tcp", text)
        self.assertIn("bind :8075", text)
        haproxy = need("haproxy")
        done = subprocess.run(
            [haproxy, "-c", "-f", DEPLOY.child("haproxy.cfg").path],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)


def verify(case: SynchronousTestCase, text: str, name: str, instance: str) -> None:
    """
    systemd-analyze verify accepts the unit text, saved as name and checked
    as instance, with ExecStart pointed at this Python's twistd so that the
    binary exists.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        raise SkipTest("systemd-analyze is not installed")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.access(twistd, os.X_OK):
        raise SkipTest(f"no twistd next to {sys.executable}")
    original = "ExecStart=/opt/sktalent/venv/bin/twistd "
    case.assertIn(original, text)
    copy = FilePath(case.mktemp())
    copy.makedirs()
    unit = copy.child(name)
    unit.setContent(text.replace(original, f"ExecStart={twistd} ").encode("utf-8"))
    unit.chmod(0o644)
    done = subprocess.run(
        [analyze, "verify", copy.child(instance).path],
        capture_output=True,
        text=True,
        cwd=copy.path,
        timeout=60,
    )
    case.assertEqual(done.returncode, 0, done.stderr)
    # verify exits 0 despite settings it ignores, so its warnings count.
    # Other units on the host may draw some; ours must draw none.
    case.assertNotIn(copy.path, done.stderr)
    case.assertNotIn(f"{instance}:", done.stderr)
    case.assertNotIn(f"{name}:", done.stderr)
