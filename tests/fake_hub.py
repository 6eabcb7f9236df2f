"""An in-process stand-in for the Hub's HTTP API, at the transport of huggingface_hub's httpx2 client.

``huggingface_hub.set_client_factory`` makes every Hub call of the real client (``create_repo``,
``create_branch``, ``upload_folder`` with its YAML validation, preupload and NDJSON commit) go to
:meth:`FakeHub.handler` instead of the network. Preupload answers "regular" for every file, so file
contents travel inline (base64) in the commit payload and can be reassembled into a folder: what the
Hub would have stored. (Real Hubs send large files through Xet; that Rust client is not exercised.)
"""

from __future__ import annotations

import base64
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import httpx2
import yaml
from huggingface_hub.utils import _http


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]


@dataclass
class FakeHub:
    """Records requests; ``fail`` maps a route (create, branch, validate, preupload, commit) to a status or exception."""

    fail: dict[str, int | Exception] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None, bytes]] = field(default_factory=list)
    repos: dict[str, dict] = field(default_factory=dict)
    branches: set[tuple[str, str]] = field(default_factory=set)
    validated_yaml: list[str] = field(default_factory=list)
    pull_requests: list[tuple[str, str]] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)

    # -- routing ---------------------------------------------------------------------------------------
    def _route(self, request: httpx2.Request) -> tuple[str, dict]:
        path = unquote(request.url.path)
        if path == "/api/repos/create":
            return "create", {}
        if path == "/api/validate-yaml":
            return "validate", {}
        if path.startswith("/api/models/") and "/discussions" in path:
            repo, _, num = path.removeprefix("/api/models/").partition("/discussions")
            return ("discussion" if num.strip("/") else "discussions"), {"repo_id": repo, "num": num.strip("/")}
        for kind in ("preupload", "commit", "branch"):
            marker = f"/{kind}/"
            if path.startswith("/api/models/") and marker in path:
                repo, _, rev = path.removeprefix("/api/models/").partition(marker)
                return kind, {"repo_id": repo, "revision": rev}
        return "other", {}

    def _failure(self, route: str) -> httpx2.Response | None:
        failure = self.fail.get(route)
        if failure is None:
            return None
        if isinstance(failure, Exception):
            raise failure
        return httpx2.Response(failure, json={"error": f"fake hub: {route} refused with {failure}"})

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        body = request.content
        self.requests.append((request.method, unquote(request.url.path), request.headers.get("authorization"), body))
        route, info = self._route(request)
        if (refused := self._failure(route)) is not None:
            return refused
        if route == "create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            self.repos.setdefault(repo_id, {"visibility": payload.get("visibility")})
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo_id}", "name": repo_id})
        if route == "validate":
            content = json.loads(body)["content"]
            self.validated_yaml.append(content)
            header = content.split("---")[1] if content.startswith("---") else ""
            ok = isinstance(yaml.safe_load(header), dict)
            return httpx2.Response(200 if ok else 400, json={} if ok else {"error": "invalid YAML metadata"})
        if route == "branch":
            self.branches.add((info["repo_id"], info["revision"]))
            return httpx2.Response(200, json={})
        if route == "discussions":  # create_pr: the upload pipeline opens the PR, then commits to its ref
            self.pull_requests.append((info["repo_id"], json.loads(body)["title"]))
            return httpx2.Response(200, json={"num": len(self.pull_requests)})
        if route == "discussion":
            num = int(info["num"])
            return httpx2.Response(
                200,
                json={
                    "num": num, "title": self.pull_requests[num - 1][1], "author": {"name": "me"},
                    "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft", "isPullRequest": True,
                    "repo": {"name": info["repo_id"], "type": "model"}, "events": [],
                    "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [],
                },
            )  # fmt: skip
        if route == "preupload":
            files = json.loads(body)["files"]
            return httpx2.Response(
                200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if route == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            commit = Commit(info["repo_id"], info["revision"], header["summary"], header.get("description", ""), files)
            self.commits.append(commit)
            oid = f"{len(self.commits):040x}"
            return httpx2.Response(
                200,
                json={"commitUrl": f"https://huggingface.co/{info['repo_id']}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
            )
        return httpx2.Response(404, json={"error": f"fake hub: no route for {request.method} {request.url.path}"})

    # -- inspection ------------------------------------------------------------------------------------
    def routes(self) -> list[str]:
        return [self._route(httpx2.Request(m, "https://huggingface.co" + p))[0] for m, p, _, _ in self.requests]

    def materialize(self, dest: Path, commit: int = -1) -> Path:
        """Write the files of one commit to ``dest`` (what a download of that revision would give)."""
        dest.mkdir(parents=True, exist_ok=True)
        for name, content in self.commits[commit].files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(content)
        return dest

    @contextlib.contextmanager
    def installed(self):
        """Route huggingface_hub's HTTP client to this fake for the duration of the block."""
        _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(self.handler)))
        try:
            yield self
        finally:
            _http.set_client_factory(_http.default_client_factory)
