"""A local stand-in for the Hugging Face Hub: the endpoints huggingface_hub calls to list and
download a repository, reached through HF_ENDPOINT. Nothing leaves the machine.

- GET  /api/models/{repo}/revision/{rev}     repo_info: the commit and its files
- GET  /api/models/{repo}/tree/{rev}[/{dir}]  list_repo_tree (and list_repo_files)
- HEAD /{repo}/resolve/{rev}/{file}           a file's commit, etag and size
- GET  /{repo}/resolve/{rev}/{file}           its bytes

``fail_next`` answers that many requests with 503 first; ``requests`` records every path.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.fail_next = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_repo(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos[repo] = dict(files)

    def add_folder(self, repo: str, folder: Path) -> None:
        self.add_repo(repo, {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()})

    def sha(self, repo: str) -> str:
        files = self.repos[repo]
        return hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()
                            ).hexdigest()

    def downloads(self) -> list[str]:
        return [p for p in self.requests if p.startswith("GET ") and "/resolve/" in p]

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    # ---- serving -------------------------------------------------------------------------------
    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        with self._lock:
            self.requests.append(f"{'HEAD' if head else 'GET'} {path}")
            if self.fail_next > 0:
                self.fail_next -= 1
                return self._send(h, 503, b'{"error": "try again"}', head)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, kind, sub = "/".join(parts[2:4]), parts[4], "/".join(parts[6:])
            if repo not in self.repos:
                return self._not_found(h, head)
            if kind == "revision":
                body = {"id": repo, "modelId": repo, "sha": self.sha(repo), "private": False,
                        "siblings": [{"rfilename": f} for f in sorted(self.repos[repo])]}
            else:
                body = [{"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for f, data in sorted(self.repos[repo].items()) if not sub or f.startswith(sub + "/")]
            return self._send(h, 200, json.dumps(body).encode(), head, "application/json")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in self.repos:
                return self._not_found(h, head)
            data = self.repos[repo].get(name)
            if data is None:
                return self._send(h, 404, b'{"error": "Entry not found"}', head, "application/json",
                                  {"X-Error-Code": "EntryNotFound"})
            extra = {"X-Repo-Commit": self.sha(repo), "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self._send(h, 200, data, head, "application/octet-stream", extra)
        return self._not_found(h, head)

    def _not_found(self, h, head: bool) -> None:
        self._send(h, 401, b'{"error": "Repository not found"}', head, "application/json",
                   {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})

    @staticmethod
    def _send(h, status: int, body: bytes, head: bool, ctype: str = "application/json",
              extra: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)
