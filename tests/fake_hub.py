"""A tiny local Hugging Face hub for download tests (no network): an `http.server` thread on
127.0.0.1 serving model repos from local folders through the endpoints huggingface_hub's
`snapshot_download` calls (huggingface_hub 2.x):

- `GET /api/models/<repo>/revision/<revision>`: the repo's info, its commit `sha` and `siblings`;
- `GET /api/models/<repo>/tree/<revision>?recursive=...`: every file (path, size, git `oid`, and for
  `.safetensors` an `lfs` entry with its sha256), one page (no `Link` header);
- `HEAD`/`GET /<repo>/resolve/<revision>/<file>`: the file, with the headers `get_hf_file_metadata`
  reads (`X-Repo-Commit`, `ETag`: the git blob sha1, or the sha256 for an LFS file, `Content-Length`).

`write_cached_repo` instead writes a repo straight into a Hugging Face cache folder in
huggingface_hub's own layout (`models--org--name/{blobs,refs/main,snapshots/<commit>}`), as a
finished download leaves it: what offline resolution (`local_files_only`, try_to_load_from_cache)
reads, with no server at all.

Every request path is logged (`hub.requests`), so a test can say which files were fetched. A repo
that is not served is a 404 with `X-Error-Code: RepoNotFound`, as the real hub answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # one commit per repo: 40 hex digits, as the hub's


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_cached_repo(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Put every file of `folder` into the HF cache `cache` (HF_HUB_CACHE) as repo `repo_id` at `commit`:
    blobs named by their ETag (sha256 for LFS files, else the git blob sha1), `refs/main` holding the
    commit, the snapshot's files relative links to the blobs. Returns the snapshot folder."""
    repo = Repo(Path(folder))
    root = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name, data in repo.files.items():
        blob = root / "blobs" / repo.etag(name)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


class Repo:
    def __init__(self, folder: Path):
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    def lfs(self, name: str) -> bool:
        return name.endswith((".safetensors", ".bin"))

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if self.lfs(name) else git_blob_sha1(data)

    def tree(self) -> list:
        entries = []
        for name, data in self.files.items():
            entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
            if self.lfs(name):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries


class FakeHub:
    """`with FakeHub({"org/name": folder}) as hub:` serves at `hub.endpoint` until the block ends."""

    def __init__(self, repos: dict):
        self.repos = {repo_id: Repo(Path(folder)) for repo_id, folder in repos.items()}
        self.requests: list = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the test reads hub.requests
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def fetched(self) -> list:
        """The repo files whose content was sent (GET on resolve/), in request order."""
        return [path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and "/resolve/" in path]

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            for repo_id, repo in self.repos.items():
                if rest.startswith(repo_id + "/revision/"):
                    info = {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False, "gated": False,
                            "disabled": False, "tags": [], "siblings": [{"rfilename": n} for n in repo.files]}
                    return self.send(handler, 200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
                if rest.startswith(repo_id + "/tree/"):
                    return self.send(handler, 200, json.dumps(repo.tree()).encode(), body,
                                     {"Content-Type": "application/json"})
            return self.not_found(handler, body)
        for repo_id, repo in self.repos.items():
            prefix = f"/{repo_id}/resolve/"
            if path.startswith(prefix):
                _revision, _, name = path[len(prefix):].partition("/")
                if name not in repo.files:
                    return self.send(handler, 404, b"Entry not found", body, {"X-Error-Code": "EntryNotFound"})
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{repo.etag(name)}"',
                           "Content-Type": "application/octet-stream"}
                return self.send(handler, 200, repo.files[name], body, headers)
        return self.not_found(handler, body)

    def not_found(self, handler, body: bool) -> None:
        self.send(handler, 404, b'{"error":"Repository not found"}', body,
                  {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"})

    @staticmethod
    def send(handler, status: int, data: bytes, body: bool, headers: dict) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
