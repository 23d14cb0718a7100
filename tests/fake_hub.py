"""A stand-in for the Hugging Face Hub's HTTP API, enough for huggingface_hub's create_repo and upload_folder.

The real Hub cannot be reached from the test machines, so the push tests point HF_ENDPOINT at this server. It
listens on 127.0.0.1 only, answers a bounded number of requests, and stops itself after a time limit. It keeps
repos in memory and implements the routes huggingface_hub 2.x uses on the non-Xet path (HF_HUB_DISABLE_XET=1):

    POST /api/repos/create                              create_repo (409 when it exists)
    POST /api/validate-yaml                             README.md metadata check before an upload
    GET  /api/models/{repo}[/revision/{rev}]            repo_info
    POST /api/models/{repo}/branch/{branch}             create_branch
    GET  /api/models/{repo}/tree/{rev}[/{path}]         list_repo_tree (size, git oid, lfs sha256)
    POST /api/models/{repo}/preupload/{rev}             upload mode per file (lfs for *.safetensors and *.png
                                                        and anything over 1 MiB, else regular) and remote oid
    POST /{repo}.git/info/lfs/objects/batch             LFS batch: an upload action unless the object is stored
    PUT  /_lfs/{oid}                                    LFS content (basic transfer; checked against its sha256)
    POST /_lfs/verify                                   LFS verify
    POST /api/models/{repo}/commit/{rev}                NDJSON commit: header, file (base64), lfsFile, deletedFile

Tokens: any token in `tokens` may write; `read_only_tokens` get 403 on writes; anything else 401.
`fail_commits=N` makes the next N commit requests fail like a dropped connection, after the request body
(and any LFS content before it) has arrived.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 1 << 20
LFS_SUFFIXES = (".safetensors", ".png", ".bin")


def git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": len(self.content)}
        if self.lfs:
            sha = hashlib.sha256(self.content).hexdigest()
            pointer = lfs_pointer(sha, len(self.content))
            entry["oid"] = git_oid(pointer)
            entry["lfs"] = {"oid": sha, "size": len(self.content), "pointerSize": len(pointer)}
        else:
            entry["oid"] = git_oid(self.content)
        return entry

    def preupload_oid(self) -> str:
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_oid(self.content)


@dataclass
class Repo:
    repo_id: str
    private: bool
    gated: bool = False
    branches: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)


class FakeHub:
    """Start with `with FakeHub() as hub:`; hub.endpoint is the HF_ENDPOINT to use."""

    def __init__(self, tokens=("hf_test_write",), read_only_tokens=("hf_test_read",), user="tester",
                 max_requests: int = 400, time_limit: float = 300.0):
        self.tokens = set(tokens)
        self.read_only_tokens = set(read_only_tokens)
        self.user = user
        self.max_requests = max_requests
        self.time_limit = time_limit
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.content_bytes_received = 0  # file content: LFS PUT bodies and base64-decoded regular files
        self.lfs_puts: list[str] = []
        self.downloads: list[tuple[str, str]] = []  # (branch, path) served whole by resolve
        self.range_headers: list = []
        self.range_requests: list[tuple[str, int]] = []  # (path, first byte) of resumed downloads
        self.cut_downloads: dict[str, int] = {}  # path -> bytes sent before the connection drops (once)
        self.fail_commits = 0
        self.lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._timer: Optional[threading.Timer] = None
        self._endpoint = ""

    # -- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> "FakeHub":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        host, port = self._server.server_address[:2]
        self._endpoint = f"http://{host}:{port}"
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.time_limit, self.stop)  # never outlives a hung test
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._timer is not None:
            self._timer.cancel()

    @property
    def endpoint(self) -> str:
        return self._endpoint

    # -- inspection ------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, gated: bool = False,
                 branch: str = "main") -> str:
        """Seed a repo directly (as if pushed); *.safetensors and *.gguf are stored as LFS files. Returns the
        head commit of `branch`."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private, gated))
            repo.branches[branch] = {name: StoredFile(data, lfs=name.endswith((".safetensors", ".gguf")))
                                     for name, data in files.items()}
            repo.heads[branch] = hashlib.sha1(f"{repo_id}{branch}{len(files)}{time.time_ns()}".encode()).hexdigest()
            return repo.heads[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return {p: f.content for p, f in self.repos[repo_id].branches[revision].items()}

    def lfs_paths(self, repo_id: str, revision: str = "main") -> set[str]:
        return {p for p, f in self.repos[repo_id].branches[revision].items() if f.lfs}

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(pattern, p))


_REPO = r"(?P<repo>[^/]+/[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, headers: Optional[dict[str, str]] = None) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: Optional[str] = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _drop(self) -> None:
        """Close the connection without an answer, as a network failure would."""
        self.close_connection = True
        try:
            self.connection.shutdown(2)
        except OSError:
            pass

    def _token_ok(self) -> bool:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        return token in self.hub.tokens or token in self.hub.read_only_tokens

    def _auth(self, write: bool) -> bool:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token in self.hub.tokens:
            return True
        if token in self.hub.read_only_tokens:
            if not write:
                return True
            self._error(403, "You don't have the rights to write to this repository")
            return False
        self._error(401, "Invalid credentials in Authorization header")
        return False

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        with hub.lock:
            hub.requests.append((method, url.path))
            over = len(hub.requests) > hub.max_requests
        body = self._body() if method in ("POST", "PUT") else b""
        if over:
            self._error(503, "fake hub: request limit reached")
            return
        for route_method, pattern, handler in ROUTES:
            if route_method == method:
                m = re.fullmatch(pattern, url.path)
                if m:
                    args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                    try:
                        handler(self, body=body, query=parse_qs(url.query), **args)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
        self._error(404, f"fake hub: no route for {method} {url.path}")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_HEAD(self):
        self._dispatch("HEAD")

    # -- routes ----------------------------------------------------------------------------------------------

    def create_repo(self, body: bytes, query, **_):
        if not self._auth(write=True):
            return
        data = json.loads(body)
        if data.get("type", "model") != "model":
            return self._error(400, "fake hub: model repos only")
        repo_id = f"{data.get('organization') or self.hub.user}/{data['name']}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._send(409, {"error": "You already created this model repo",
                                        "url": f"{self.hub.endpoint}/{repo_id}"},
                                  {"X-Error-Message": "You already created this model repo"})
            repo = Repo(repo_id, data.get("visibility") == "private" or bool(data.get("private")))
            attrs = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            repo.branches["main"] = {".gitattributes": StoredFile(attrs, lfs=False)}
            repo.heads["main"] = hashlib.sha1(repo_id.encode()).hexdigest()
            self.hub.repos[repo_id] = repo
        self._send(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, body: bytes, query, **_):
        content = json.loads(body).get("content", "")
        if content.startswith("---\n"):
            try:
                meta = yaml.safe_load(content.split("---\n")[1])
                if meta is not None and not isinstance(meta, dict):
                    raise ValueError("metadata must be a mapping")
            except Exception as e:  # noqa: BLE001
                return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
        self._send(200, {"errors": [], "warnings": []})

    def _repo(self, repo: str, revision: Optional[str] = None, write: bool = False):
        r = self.hub.repos.get(repo)
        anonymous_read = not write and r is not None and not r.private and not r.gated
        if r is not None and r.gated and not write and not self._token_ok():
            self._error(401, f"Access to model {repo} is restricted. You must have access to it and be "
                             "authenticated to access it. Please log in.", "GatedRepo")
            return None
        if not anonymous_read and not self._auth(write=write):
            return None
        if r is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if revision is not None and _branch_of(r, revision) is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return None
        return r

    def resolve(self, body, query, repo: str, rev: str, path: str, **_):
        """File download (GET) and metadata (HEAD), by branch name or by a branch's head commit."""
        r = self._repo(repo)
        if r is None:
            return
        branch = rev if rev in r.branches else next((b for b, h in r.heads.items() if h == rev), None)
        if branch is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        f = r.branches[branch].get(path)
        if f is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound")
        etag = hashlib.sha256(f.content).hexdigest() if f.lfs else git_oid(f.content)
        start = 0
        with self.hub.lock:
            self.hub.range_headers.append((self.command, path, self.headers.get("Range")))
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "") or "")
        if rng and self.command == "GET":
            start = min(int(rng.group(1)), len(f.content))
            with self.hub.lock:
                self.hub.range_requests.append((path, start))
        body = f.content[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(f.content) - 1}/{len(f.content)}")
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", r.heads[branch])
        if f.lfs:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(f.content)))
        self.end_headers()
        if self.command != "HEAD":
            with self.hub.lock:
                cut = self.hub.cut_downloads.pop(path, None)
            if cut is not None:  # the connection drops after `cut` bytes, as a flaky network would
                self.wfile.write(body[:cut])
                self.wfile.flush()
                return self._drop()
            self.wfile.write(body)
            with self.hub.lock:
                self.hub.downloads.append((branch, path))

    def repo_info(self, body, query, repo: str, rev: str = "main", **_):
        r = self._repo(repo, rev)
        if r is None:
            return
        rev = _branch_of(r, rev)
        files = r.branches[rev]
        self._send(200, {"id": r.repo_id, "sha": r.heads[rev], "private": r.private, "gated": r.gated,
                         "siblings": [{"rfilename": p} for p in sorted(files)]})

    def create_branch(self, body, query, repo: str, branch: str, **_):
        r = self._repo(repo, write=True)
        if r is None:
            return
        with self.hub.lock:
            if branch in r.branches:
                return self._error(409, "Reference already exists")
            r.branches[branch] = dict(r.branches["main"])
            r.heads[branch] = r.heads["main"]
        self._send(200, {})

    def tree(self, body, query, repo: str, rev: str, path: str = "", **_):
        r = self._repo(repo, rev)
        if r is None:
            return
        rev = _branch_of(r, rev)
        prefix = path.strip("/")
        entries = [f.tree_entry(p) for p, f in sorted(r.branches[rev].items())
                   if not prefix or p.startswith(prefix + "/")]
        self._send(200, entries)

    def preupload(self, body, query, repo: str, rev: str, **_):
        r = self._repo(repo, rev, write=True)
        if r is None:
            return
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > LFS_THRESHOLD
            existing = r.branches[rev].get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": existing.preupload_oid() if existing is not None else None})
        self._send(200, {"files": files, "commitOid": r.heads[rev]})

    def lfs_batch(self, body, query, repo: str, **_):
        if self._repo(repo, write=True) is None:
            return
        data = json.loads(body)
        objects = []
        for obj in data["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/_lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.endpoint}/_lfs/verify"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, body: bytes, query, oid: str, **_):
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "fake hub: content does not match its sha256")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = body
            self.hub.content_bytes_received += len(body)
            self.hub.lfs_puts.append(oid)
        self._send(200, None)

    def lfs_verify(self, body: bytes, query, **_):
        data = json.loads(body)
        stored = self.hub.lfs_objects.get(data["oid"])
        if stored is None or len(stored) != data["size"]:
            return self._error(404, "fake hub: object not found")
        self._send(200, {})

    def commit(self, body: bytes, query, repo: str, rev: str, **_):
        r = self._repo(repo, rev, write=True)
        if r is None:
            return
        with self.hub.lock:
            if self.hub.fail_commits > 0:
                self.hub.fail_commits -= 1
                return self._drop()
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "fake hub: the commit must start with a header")
        changes: dict[str, Optional[StoredFile]] = {}
        received = 0
        for item in lines[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                content = base64.b64decode(value["content"])
                received += len(content)
                changes[value["path"]] = StoredFile(content, lfs=False)
            elif key == "lfsFile":
                content = self.hub.lfs_objects.get(value["oid"])
                if content is None:
                    return self._error(400, f"fake hub: LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = StoredFile(content, lfs=True)
            elif key == "deletedFile":
                changes[value["path"]] = None
            else:
                return self._error(400, f"fake hub: unsupported commit operation {key}")
        with self.hub.lock:
            files = r.branches[rev]
            for path, f in changes.items():
                if f is None:
                    files.pop(path, None)
                else:
                    files[path] = f
            oid = hashlib.sha1(f"{r.heads[rev]}{time.time_ns()}".encode()).hexdigest()
            r.heads[rev] = oid
            r.commits.append({"revision": rev, "oid": oid, "summary": lines[0]["value"].get("summary"),
                              "paths": sorted(changes)})
            self.hub.content_bytes_received += received
        self._send(200, {"commitUrl": f"{self.hub.endpoint}/{r.repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})


def _branch_of(r: Repo, rev: str) -> Optional[str]:
    """The branch a revision names: a branch name, or a branch's head commit."""
    if rev in r.branches:
        return rev
    return next((b for b, h in r.heads.items() if h == rev), None)


ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("GET", rf"/api/models/{_REPO}", _Handler.repo_info),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", _Handler.repo_info),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", _Handler.tree),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", _Handler.preupload),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", _Handler.lfs_put),
    ("POST", r"/_lfs/verify", _Handler.lfs_verify),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", _Handler.commit),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler.resolve),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler.resolve),
]
