"""A local fake of the Hugging Face Hub's HTTP API (the part an upload uses), on 127.0.0.1, for tests.

It answers ``huggingface_hub``'s real requests — create a repository, ask each file's upload mode, commit the
files as NDJSON — and records what arrived (repositories, their visibility, files with their bytes, the token
sent).  ``refuse_token`` makes every request answer 401, as the Hub does for a bad token.  Nothing leaves the
machine: tests point ``huggingface_hub.constants.ENDPOINT`` at :attr:`FakeHub.url`.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeHub:
    """What the fake Hub received; ``url`` is its endpoint while the server runs."""

    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, token
    cards: list[str] = field(default_factory=list)
    refuse_token: bool = False
    url: str = ""

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        self.requests.append((method, path.split("?")[0], headers.get("authorization", "").removeprefix("Bearer ")))
        if self.refuse_token:
            return 401, {"error": "Invalid credentials in Authorization header"}
        parts = path.split("?")[0].strip("/").split("/")
        if method == "POST" and parts == ["api", "repos", "create"]:
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            visibility = req.get("visibility") or {True: "private", False: "public"}.get(req.get("private"))
            self.repos[repo_id] = {"visibility": visibility, "type": req.get("type", "model")}
            self.files.setdefault(repo_id, {})
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if method == "POST" and parts == ["api", "validate-yaml"]:  # the model card's metadata, before the commit
            self.cards.append(json.loads(body)["content"])
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            repo_id = "/".join(parts[2:4])
            if repo_id not in self.repos:
                return 404, {"error": f"Repository not found: {repo_id}"}
            paths = [f["path"] for f in json.loads(body)["files"]]
            return 200, {"files": [{"path": p, "uploadMode": "regular", "shouldIgnore": False} for p in paths]}
        if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo_id = "/".join(parts[2:4])
            if repo_id not in self.repos:
                return 404, {"error": f"Repository not found: {repo_id}"}
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    self.files[repo_id][value["path"]] = base64.b64decode(value["content"])
            return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/0123abcd", "commitOid": "0123abcd"}
        return 404, {"error": f"the fake Hub does not serve {method} {path}"}

    def tokens(self) -> set[str]:
        """The tokens sent with the requests that write (create a repository, commit files)."""
        return {tok for _m, path, tok in self.requests if path.startswith("/api/repos/") or "/commit/" in path
                or "/preupload/" in path}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def _answer(self, method: str) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        status, payload = self.hub.handle(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self._answer("POST")

    def do_GET(self) -> None:  # noqa: N802
        self._answer("GET")

    def log_message(self, *args: Any) -> None:
        pass


class serve:  # noqa: N801 - used as a context manager: `with serve() as hub:`
    """Run a :class:`FakeHub` on a free loopback port for the ``with`` block."""

    def __enter__(self) -> FakeHub:
        self.hub = FakeHub()
        handler = type("Handler", (_Handler,), {"hub": self.hub})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
