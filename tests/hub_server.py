"""A local stand-in for the Hugging Face Hub: the part of its HTTP API that huggingface_hub's ``repo_info``,
``create_repo``, ``upload_file`` / ``upload_folder`` (regular, non-LFS uploads) and ``hf_hub_download`` call.

Requests (huggingface_hub 1.x/2.x):

* ``GET /api/<type>s/<owner>/<name>[/revision/<rev>]`` → repository info with ``siblings`` (404 ``RepoNotFound``)
* ``POST /api/repos/create`` ``{"name", "organization", "type"?, "visibility"?}`` → ``{"url"}`` (409 if it exists)
* ``POST /api/<type>s/<repo>/preupload/<rev>`` ``{"files": [{"path", "sample", "size"}]}`` → every file ``regular``
* ``POST /api/<type>s/<repo>/commit/<rev>``: ndjson, a ``header`` line then ``file`` lines (base64 content)
* ``HEAD`` / ``GET /[<type>s/]<repo>/resolve/<rev>/<path>`` → the file, with ``X-Repo-Commit`` and ``ETag``

Started on 127.0.0.1 on a free port in a thread. ``upload_gate(paths)`` (optional) is polled before the preupload
request of ``paths`` (the first request of each upload) is answered, until it returns True or ``gate_timeout``
passes; ``gate_log`` records each outcome.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import unquote, urlsplit

PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclass
class Repo:
    """One repository: its type, visibility and files (path → bytes) at the head of ``main``."""

    repo_type: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        """The current commit id (40 hex digits)."""
        return self.commits[-1] if self.commits else "0" * 40


class HubServer:
    """The server; use as a context manager. ``url`` is the endpoint to give huggingface_hub."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.upload_gate: Callable[[list[str]], bool] | None = None
        self.gate_timeout = 120.0
        self.gate_log: list[tuple[list[str], bool]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files of ``repo_id`` as committed so far."""
        return dict(self.repos[repo_id].files)

    def _wait_for_gate(self, paths: list[str]) -> None:
        if self.upload_gate is None:
            return
        deadline = time.monotonic() + self.gate_timeout
        while not self.upload_gate(paths):
            if time.monotonic() > deadline:
                self.gate_log.append((paths, False))
                return
            time.sleep(0.05)
        self.gate_log.append((paths, True))


def _handler_for(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        # ---- helpers ---------------------------------------------------------------------------

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload=None, headers: dict[str, str] | None = None, body: bytes | None = None):
            data = body if body is not None else (json.dumps(payload).encode() if payload is not None else b"")
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if body is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _not_found(self, code: str):
            self._send(404, {"error": f"{code}"}, headers={"X-Error-Code": code, "X-Error-Message": code})

        def _record(self):
            hub.requests.append((self.command, self.path, self.headers.get("Authorization")))

        def _repo_url(self, repo_id: str, repo: Repo) -> str:
            prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
            return f"{hub.url}/{prefix}{repo_id}"

        # ---- API -------------------------------------------------------------------------------

        def do_GET(self):
            self._record()
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in PREFIXES:
                return self._repo_info(f"{parts[2]}/{parts[3]}", PREFIXES[parts[1]])
            return self._resolve(parts)

        def do_HEAD(self):
            self._record()
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            return self._resolve(parts)

        def do_POST(self):
            self._record()
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            body = self._body()
            if parts[:3] == ["api", "repos", "create"]:
                return self._create(json.loads(body))
            if parts[0] == "api" and len(parts) >= 5 and parts[1] in PREFIXES:
                repo_id = f"{parts[2]}/{parts[3]}"
                repo = hub.repos.get(repo_id)
                if repo is None or repo.repo_type != PREFIXES[parts[1]]:
                    return self._not_found("RepoNotFound")
                if parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    hub._wait_for_gate(sorted(f["path"] for f in files))
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False, "oid": None} for f in files]})
                if parts[4] == "commit":
                    return self._commit(repo_id, repo, body)
            self._send(400, {"error": f"not supported by the test hub: POST {self.path}"})

        def _repo_info(self, repo_id: str, repo_type: str):
            repo = hub.repos.get(repo_id)
            if repo is None or repo.repo_type != repo_type:
                return self._not_found("RepoNotFound")
            siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(repo.files.items())]
            self._send(200, {"id": repo_id, "sha": repo.sha, "private": repo.private, "siblings": siblings})

        def _create(self, payload: dict):
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") \
                else payload["name"]
            repo_type = payload.get("type") or "model"
            with hub.lock:
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this repo"})
                hub.repos[repo_id] = Repo(repo_type, private=payload.get("visibility") == "private")
            self._send(200, {"url": self._repo_url(repo_id, hub.repos[repo_id])})

        def _commit(self, repo_id: str, repo: Repo, body: bytes):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                return self._send(400, {"error": "the commit payload starts with a header line"})
            added = {}
            for line in lines[1:]:
                if line["key"] != "file" or line["value"].get("encoding") != "base64":
                    return self._send(400, {"error": f"only regular base64 files are supported, got {line['key']}"})
                added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            with hub.lock:
                repo.files.update(added)
                sha = hashlib.sha1(f"{repo.sha}{sorted(added)}{time.time()}".encode()).hexdigest()
                repo.commits.append(sha)
            self._send(200, {"commitUrl": f"{self._repo_url(repo_id, repo)}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": None})

        def _resolve(self, parts: list[str]):
            repo_type = "model"
            if parts and parts[0] in PREFIXES and parts[0] != "models":
                repo_type, parts = PREFIXES[parts[0]], parts[1:]
            if len(parts) < 5 or parts[2] != "resolve":
                return self._send(404, {"error": "not found"})
            repo_id, path = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
            repo = hub.repos.get(repo_id)
            if repo is None or repo.repo_type != repo_type:
                return self._not_found("RepoNotFound")
            if path not in repo.files:
                return self._send(404, {"error": "entry not found"},
                                  headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha})
            data = repo.files[path]
            etag = hashlib.sha1(data).hexdigest()
            self._send(200, body=data, headers={"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"'})

    return Handler
