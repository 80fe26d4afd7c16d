"""A made-up Hugging Face Hub on a loopback port, for tests without the internet.

Serves model repos from local folders in the Hub's layout: the routes huggingface_hub 2.x calls for
``snapshot_download``, ``hf_hub_download``, ``model_info`` and ``parse_safetensors_file_metadata``:

* ``GET /api/models/{repo}[/revision/{rev}]``: the repo's info (``sha`` = its commit, ``siblings``);
* ``GET /api/models/{repo}/tree/{rev}``: the file listing (git blob ids, LFS sha256 for safetensors);
* ``HEAD|GET /{repo}/resolve/{rev}/{file}``: a file, with ``X-Repo-Commit``, ``ETag`` (``X-Linked-Etag``
  for LFS files), ``Content-Length`` and ``Range`` support.

Errors the way the Hub answers them: an unknown repo ``401`` + ``X-Error-Code: RepoNotFound``, an
unknown revision ``404`` + ``RevisionNotFound``, a gated repo's files without its token ``401`` +
``GatedRepo``. Every request is logged (method, path) in :attr:`Mirror.requests`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    folder: Path
    commit: str = "c0ffee" * 6 + "c0ff"  # 40 hex digits
    tags: tuple[str, ...] = ("main",)
    token: str | None = None  # a gated repo: its files need "Authorization: Bearer <token>"

    def __post_init__(self) -> None:
        assert re.fullmatch(r"[0-9a-f]{40}", self.commit)

    def files(self) -> dict[str, Path]:
        return {p.relative_to(self.folder).as_posix(): p for p in sorted(self.folder.rglob("*")) if p.is_file()}

    def commit_of(self, revision: str) -> str | None:
        return self.commit if revision in (*self.tags, self.commit) else None


def lfs(name: str) -> bool:
    return name.endswith(".safetensors")


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Mirror:
    repos: dict[str, Repo]
    requests: list[tuple[str, str]] = field(default_factory=list)
    connections: set[socket.socket] = field(default_factory=set)  # open client connections (keep-alive)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Mirror":
        mirror = self

        class Handler(_Handler):
            pass

        Handler.mirror = mirror
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-mirror", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Down, like a Hub out of reach: no new connections, and the kept-alive ones cut."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            for conn in list(self.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._thread.join(10)
            self._server = None

    def downloaded(self, repo: str) -> set[str]:
        """Files of ``repo`` whose body was requested (a whole-file GET; header range reads apart)."""
        return self._files(repo, "GET")

    def header_reads(self, repo: str) -> set[str]:
        """Files of ``repo`` read in part (a Range GET: a safetensors header)."""
        return self._files(repo, "GET-RANGE")

    def _files(self, repo: str, kind: str) -> set[str]:
        prefix = f"/{repo}/resolve/"
        return {path[len(prefix):].split("/", 1)[1] for method, path in self.requests
                if method == kind and path.startswith(prefix)}


class _Handler(BaseHTTPRequestHandler):
    mirror: Mirror
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.mirror.connections.add(self.connection)

    def finish(self) -> None:
        self.mirror.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def _route(self, method: str) -> None:
        path = unquote(urlparse(self.path).path)
        ranged = method == "GET" and "range" in {k.lower() for k in self.headers.keys()}
        self.mirror.requests.append(("GET-RANGE" if ranged else method, path))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/.*)?)?", path)
        if api:
            return self._api(api.group(1), api.group(2) or "revision", api.group(3) or "main")
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve:
            return self._file(method, *resolve.groups())
        self._error(404, "EntryNotFound", "no such route")

    def _repo(self, name: str, revision: str) -> tuple[Repo, str] | None:
        repo = self.mirror.repos.get(name)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        commit = repo.commit_of(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return None
        return repo, commit

    def _api(self, name: str, kind: str, revision: str) -> None:
        found = self._repo(name, revision)
        if found is None:
            return
        repo, commit = found
        files = repo.files()
        if kind == "tree":
            body = [self._tree_entry(rel, p.read_bytes()) for rel, p in files.items()]
        else:
            body = {"id": name, "modelId": name, "sha": commit, "private": False,
                    "gated": "manual" if repo.token else False, "siblings": [{"rfilename": rel} for rel in files]}
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    @staticmethod
    def _tree_entry(rel: str, data: bytes) -> dict:
        entry = {"type": "file", "path": rel, "size": len(data), "oid": git_oid(data)}
        if lfs(rel):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _file(self, method: str, name: str, revision: str, rel: str) -> None:
        found = self._repo(name, revision)
        if found is None:
            return
        repo, commit = found
        if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(401, "GatedRepo", f"Access to model {name} is restricted.")
        path = repo.files().get(rel)
        if path is None:
            return self._error(404, "EntryNotFound", f"{rel} does not exist")
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if lfs(rel) else git_oid(data)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if lfs(rel):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        status, body = 200, data
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if method == "GET" and wanted:
            first = int(wanted.group(1))
            last = min(int(wanted.group(2)) if wanted.group(2) else len(data) - 1, len(data) - 1)
            status, body = 206, data[first : last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        self._send(status, body if method == "GET" else b"", headers, length=len(body))

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"})

    def _send(self, status: int, body: bytes, headers: dict[str, str], length: int | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
