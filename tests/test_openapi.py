"""
docs/openapi.yaml: a valid OpenAPI document, naming every route the server
has and every error code it answers with, and borne out by property-based
requests (schemathesis) against a real server.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import yaml
from openapi_spec_validator import validate
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import sktalent
from sktalent.api.resource import ApiResource
from sktalent.calltalent.interfaces import ICallTalent
from sktalent.testing.server import ROOT, ServerProcess, running

from .helpers import paho_user

DOCUMENT = ROOT / "docs" / "openapi.yaml"
TOKEN = "schemathesis-Token.1"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
# Requests per route and phase: enough to find a mismatch, bounded in time.
EXAMPLES = 50


def document() -> dict[str, Any]:
    loaded = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


class DocumentTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """The document is valid OpenAPI 3.1."""
        validate(document())

    def test_version(self) -> None:
        """The document describes this version of the server."""
        self.assertEqual(document()["info"]["version"], sktalent.__version__)

    def test_every_route(self) -> None:
        """The document has exactly the server's routes, each with its method."""
        resource = ApiResource(cast(ICallTalent, None), Clock(), None)
        served = {(method.lower(), template) for method, template in resource.routes}
        documented = {
            (method, path)
            for path, item in document()["paths"].items()
            for method in item
            if method in METHODS
        }
        self.assertEqual(documented, served)

    def test_every_error_code(self) -> None:
        """Every error code the API code can answer with is in the document."""
        text = DOCUMENT.read_text(encoding="utf-8")
        source = "\n".join(
            path.read_text(encoding="utf-8")
            for path in (ROOT / "sktalent").rglob("*.py")
            if "api" in path.parts or "calltalent" in path.parts
        )
        codes = set(
            re.findall(
                r'(?:_Refusal\(\s*\d+,\s*|_error_body\(\s*|InvalidRequest\(\s*)"([a-z_]+)"', source
            )
        )
        self.assertIn("bad_payload", codes)
        for code in sorted(codes | {"bad_request"}):
            with self.subTest(code=code):
                self.assertTrue(f"`{code}`" in text, f"{code} is not in {DOCUMENT.name}")


class SchemathesisTests(SynchronousTestCase):
    def test_server_conforms(self) -> None:
        """
        schemathesis, with every check, sends requests generated from the
        document (examples, edge cases and fuzzing; a fixed number per
        route) to a real server on 127.0.0.1: no answer is a server error,
        none contradicts the document (status, headers, media type, body),
        what the document allows is accepted and what it forbids refused.
        """
        directory = Path(tempfile.mkdtemp(prefix="sktalent-openapi-"))
        (directory / "tokens").write_text(f"{TOKEN}\n")
        server = running(
            self,
            ServerProcess(["--api-token-file", str(directory / "tokens")], directory=directory),
        )
        # The document's example order gets a real chat, so the history
        # answers are checked with a message in them.
        alice = paho_user(self, server, "alice")
        alice.send(
            {
                "msgid": "65f1c0a2e4b0a1b2c3d4e5f6",
                "from": "alice",
                "to": "u1001",
                "type": "order_chat",
                "payload": {"o_id": "o-5521", "expert": True, "content": "你好"},
            }
        )
        self.assertEqual(alice.frames(1)[0]["type"], "sent")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                str(DOCUMENT),
                "--url",
                f"http://127.0.0.1:{server.api_port}",
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--checks",
                "all",
                "--max-examples",
                str(EXAMPLES),
                "--seed",
                "20240313",
                "--generation-database",
                "none",
                "--workers",
                "1",
                "--request-timeout",
                "10",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            cwd=directory,
            timeout=600,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("11 selected / 11 total", done.stdout)
