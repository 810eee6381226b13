"""A stand-in for the Hugging Face hub on 127.0.0.1: the few endpoints huggingface_hub's downloads use.

- ``GET /api/{models,datasets}/{repo}/revision/{rev}``: repo info (the commit ``sha`` and the files)
- ``GET /api/{models,datasets}/{repo}/tree/{rev}``: the file listing (``snapshot_download`` asks for it)
- ``HEAD|GET /{repo}/resolve/{rev}/{file}`` (``/datasets/{repo}/...`` for datasets): a file, with the
  ``ETag``/``X-Repo-Commit`` headers and ``Range`` requests (a resumed download); a ``*.safetensors`` file
  is a redirect (``X-Linked-Etag``/``X-Linked-Size``) to ``http://localhost:{port}/cdn/{sha256}`` (another
  host name of this server), as the hub sends LFS files to its CDN

A gated repo answers 401 unless the request carries its token; an unknown repo 404. ``drop_once`` names files
whose first GET stops half-way (the connection is closed), to test resuming.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    """One repository: commits (sha -> files), refs (branch/tag -> sha), and an optional access token
    (``gated``: a gated repo, else a private one, answered as the hub does: 401 RepoNotFound)."""

    commits: dict[str, dict[str, bytes]]
    refs: dict[str, str]
    token: str | None = None
    gated: bool = True

    @classmethod
    def from_files(cls, files: dict[str, bytes], token: str | None = None, gated: bool = True) -> Repo:
        sha = commit_sha(files)
        return cls({sha: files}, {"main": sha}, token, gated)

    def add_commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        sha = commit_sha(files)
        self.commits[sha] = files
        self.refs[ref] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        return revision if revision in self.commits else self.refs.get(revision)


def commit_sha(files: dict[str, bytes]) -> str:
    h = hashlib.sha1()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name])
    return h.hexdigest()


def dir_files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``, by its path relative to it."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@dataclass
class HubServer:
    """The stand-in server; ``models``/``datasets`` map repo ids to :class:`Repo`."""

    models: dict[str, Repo] = field(default_factory=dict)
    datasets: dict[str, Repo] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)
    #: file name -> byte offset where every GET of it stops (the connection is closed): a download that
    #: cannot complete until the entry is removed
    cut: dict[str, int] = field(default_factory=dict)
    #: file name -> how many metadata requests (HEAD) for it to wait for before its content is sent:
    #: holds a download open until that many clients are fetching the file at once (at most 60 s)
    hold: dict[str, int] = field(default_factory=dict)
    #: every request: (method, path, Range header or None)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    connections: list[socket.socket] = field(default_factory=list)
    #: sha256 -> content of the files served through the CDN route
    blobs: dict[str, bytes] = field(default_factory=dict)

    def start(self) -> HubServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                server.connections.append(self.connection)

            def do_GET(self) -> None:
                server.handle(self, head=False)

            def do_HEAD(self) -> None:
                server.handle(self, head=True)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        """Stop listening and drop the open (keep-alive) connections: the hub is gone."""
        self.httpd.shutdown()
        self.httpd.server_close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def requested(self, pattern: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.log if re.search(pattern, r[1])]

    # -- routing -----------------------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.log.append((h.command, path, h.headers.get("Range")))
        cdn = re.fullmatch(r"/cdn/(\w+)/(.+)", path)
        if cdn:
            return self.send_file(h, self.blobs[cdn.group(1)], cdn.group(2), None, head)
        api = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        resolve = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if api:
            kind, repo_id, what, revision = api.group(1), api.group(2), api.group(3), api.group(4)
            repos = self.models if kind == "models" else self.datasets
        elif resolve:
            repos = self.datasets if resolve.group(1) else self.models
            repo_id, revision, filename = resolve.group(2), resolve.group(3), resolve.group(4)
        else:
            return self.error(h, 404, "EntryNotFound", f"no route {path}")
        repo = repos.get(repo_id)
        if repo is None:
            return self.error(h, 404, "RepoNotFound", f"Repository {repo_id} not found")
        if repo.token and h.headers.get("Authorization") != f"Bearer {repo.token}":
            code = "GatedRepo" if repo.gated else "RepoNotFound"
            return self.error(h, 401, code, f"Access to {repo_id} is restricted")
        sha = repo.resolve(revision)
        if sha is None:
            return self.error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[sha]
        if api and what == "revision":
            siblings = [{"rfilename": name} for name in sorted(files)]
            return self.json(h, {"id": repo_id, "sha": sha, "siblings": siblings, "private": False})
        if api:
            tree = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in sorted(files.items())
            ]
            return self.json(h, tree)
        if filename not in files:
            return self.error(h, 404, "EntryNotFound", f"{filename} not in {repo_id}")
        if filename.endswith(".safetensors"):
            return self.redirect_to_cdn(h, files[filename], filename, sha)
        self.send_file(h, files[filename], filename, sha, head)

    # -- answers -----------------------------------------------------------------------------------------
    def error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def wait_for_heads(self, name: str) -> None:
        deadline = time.monotonic() + 60
        pattern = re.compile(rf"/resolve/[^/]+/{re.escape(name)}$")
        while time.monotonic() < deadline:
            if sum(1 for r in self.log if r[0] == "HEAD" and pattern.search(r[1])) >= self.hold[name]:
                return
            time.sleep(0.05)

    def json(self, h: BaseHTTPRequestHandler, payload: object) -> None:
        body = json.dumps(payload).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def redirect_to_cdn(self, h: BaseHTTPRequestHandler, data: bytes, name: str, sha: str) -> None:
        digest = hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        h.send_response(302)
        # another host name for this same server: huggingface_hub follows a redirect to its CDN only on GET
        h.send_header("Location", f"http://localhost:{self.httpd.server_address[1]}/cdn/{digest}/{name}")
        h.send_header("X-Linked-Etag", f'"{digest}"')
        h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", sha)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def send_file(
        self, h: BaseHTTPRequestHandler, data: bytes, name: str, sha: str | None, head: bool
    ) -> None:
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if ranged and not head:
            start = int(ranged.group(1))
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        if sha is not None:
            h.send_header("X-Repo-Commit", sha)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(body)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        if name in self.hold:
            self.wait_for_heads(name)
        if name in self.cut:
            h.wfile.write(data[start : max(start, self.cut[name])])
            h.wfile.flush()
            h.close_connection = True
            return
        if name in self.drop_once and len(body) > 1:
            self.drop_once.discard(name)
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)
