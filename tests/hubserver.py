"""A small Hugging Face Hub look-alike for tests, served on 127.0.0.1 only.

It implements the endpoints the real ``huggingface_hub`` client calls for model info, tree
listing, file resolution and download, repository creation, YAML validation, preupload, the LFS
batch API (basic transfer) and the NDJSON commit endpoint, with the headers and error codes the
client reads (``X-Repo-Commit``, ``ETag``/``X-Linked-Etag``, ``X-Error-Code``). Tests drive the
real client against it through ``HF_ENDPOINT``.

Repositories are in memory: each commit is a full ``path → bytes`` snapshot. Access rules follow
the Hub's: a missing or private repository answers ``RepoNotFound`` (401 without a token, 404
with one); an unknown token answers 401 "Invalid credentials"; writing needs a token with write
rights (403 otherwise, 401 without any).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    lfs_paths: set[str] = field(default_factory=set)

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class HubError(Exception):
    def __init__(self, status: int, code: str | None = None, message: str | None = None,
                 commit: str | None = None) -> None:
        super().__init__(message or code or str(status))
        self.status, self.code, self.message, self.commit = status, code, message, commit


class FakeHub:
    """The server's state and lifecycle. ``tokens`` maps a token to its write right."""

    def __init__(self, *, lfs: bool = False) -> None:
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, bool] = {}
        self.lfs = lfs
        self.lfs_store: dict[str, bytes] = {}
        self.log: list[tuple[str, str, bool]] = []  # (method, path, authenticated)
        self.seen_headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ state
    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        with self._lock:
            repo = Repo(repo_id, private=private)
            self.repos[repo_id] = repo
            self._commit_locked(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            return repo

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main",
               deletions: tuple[str, ...] = ()) -> str:
        with self._lock:
            return self._commit_locked(self.repos[repo_id], branch, files, deletions)

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        with self._lock:
            self.repos[repo_id].refs[name] = commit

    def _commit_locked(self, repo: Repo, branch: str, files: dict[str, bytes],
                       deletions: tuple[str, ...] = (), lfs: set[str] | None = None) -> str:
        parent = repo.refs.get(branch)
        tree = dict(repo.commits[parent]) if parent else {}
        for path in deletions:
            for key in [k for k in tree if k == path or k.startswith(path.rstrip("/") + "/")]:
                del tree[key]
        tree.update(files)
        self._counter += 1
        sha = hashlib.sha1(f"{repo.repo_id}:{parent}:{self._counter}".encode()).hexdigest()
        repo.commits[sha] = tree
        repo.refs[branch] = sha
        for path in files:
            if (lfs is not None and path in lfs) or (self.lfs and path.endswith(LFS_SUFFIXES)):
                repo.lfs_paths.add(path)
        return sha


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        hub = self.server_state
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        token = self._token()
        with hub._lock:
            hub.log.append((method, split.path, token is not None))
            hub.seen_headers.append({k.lower(): v for k, v in self.headers.items()})
        try:
            if token is not None and token not in hub.tokens:
                raise HubError(401, message="Invalid credentials in Authorization header")
            self._route(method, parts, query, body, token)
        except HubError as e:
            headers = {}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.message:
                headers["X-Error-Message"] = e.message
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._send(e.status, {"error": e.message or e.code or "error"}, headers, head=method == "HEAD")

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: bytes, token: str | None) -> None:
        hub = self.server_state
        if parts[:2] == ["api", "agent-harnesses"]:
            return self._send(200, {"standardEnvVars": [], "harnesses": {}})
        if parts[:2] == ["api", "whoami-v2"]:
            if token is None:
                raise HubError(401, message="Invalid credentials in Authorization header")
            return self._send(200, {"type": "user", "name": "tester", "auth": {"type": "access_token"}})
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._send(200, {"errors": [], "warnings": []})
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"), token)
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id = f"{parts[2]}/{parts[3]}"
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                return self._model_info(repo_id, rest[1] if len(rest) > 1 else "main", token)
            if rest[0] == "tree":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query, token)
            if rest[0] == "preupload" and method == "POST":
                return self._preupload(repo_id, rest[1], json.loads(body), token)
            if rest[0] == "commit" and method == "POST":
                return self._commit(repo_id, rest[1], body, token)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), token)
        if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body), token)
        if parts[:1] == ["lfs-upload"] and method == "PUT":
            oid = parts[1]
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, message="sha256 mismatch")
            with hub._lock:
                hub.lfs_store[oid] = body
            return self._send(200, {})
        if parts[:1] == ["lfs-verify"] and method == "POST":
            oid = json.loads(body)["oid"]
            if oid not in hub.lfs_store:
                raise HubError(404, message="object not uploaded")
            return self._send(200, {"success": True})
        raise HubError(404, message=f"no route for {method} /{'/'.join(parts)}")

    # ------------------------------------------------------------------ access
    def _token(self) -> str | None:
        auth = self.headers.get("authorization") or ""
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def _repo(self, repo_id: str, token: str | None, *, write: bool = False) -> Repo:
        hub = self.server_state
        repo = hub.repos.get(repo_id)
        if repo is None or (repo.private and token is None):
            raise HubError(401 if token is None else 404, "RepoNotFound", "Repository not found")
        if write:
            if token is None:
                raise HubError(401, message="You must be authenticated to write")
            if not hub.tokens.get(token, False):
                raise HubError(403, message="You don't have the rights to write to this repository")
        return repo

    def _revision(self, repo: Repo, revision: str) -> str:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # ------------------------------------------------------------------ read endpoints
    def _model_info(self, repo_id: str, revision: str, token: str | None) -> None:
        repo = self._repo(repo_id, token)
        commit = self._revision(repo, revision)
        files = repo.commits[commit]
        self._send(200, {
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
            "siblings": [{"rfilename": path} for path in sorted(files)], "tags": [], "downloads": 0, "likes": 0,
        })

    def _entry(self, repo: Repo, path: str, data: bytes) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
        if path in repo.lfs_paths:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _tree(self, repo_id: str, revision: str, folder: str, query: dict[str, str], token: str | None) -> None:
        repo = self._repo(repo_id, token)
        files = repo.commits[self._revision(repo, revision)]
        recursive = query.get("recursive", "false").lower() == "true"
        prefix = f"{folder}/" if folder else ""
        entries, dirs = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            for i in range(1, len(rest)):
                if recursive or i == 1:
                    dirs.add(prefix + "/".join(rest[:i]))
            if recursive or len(rest) == 1:
                entries.append(self._entry(repo, path, files[path]))
        if folder and not entries and not dirs:
            raise HubError(404, "EntryNotFound", f"{folder} does not exist")
        folders = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                   for d in sorted(dirs)]
        self._send(200, folders + entries)

    def _resolve(self, method: str, repo_id: str, revision: str, path: str, token: str | None) -> None:
        repo = self._repo(repo_id, token)
        commit = self._revision(repo, revision)
        files = repo.commits[commit]
        if path not in files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist", commit=commit)
        data = files[path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_oid(data)}"'}
        if path in repo.lfs_paths:
            sha = hashlib.sha256(data).hexdigest()
            headers |= {"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)), "ETag": f'"{sha}"'}
        self._send_bytes(200, data, headers, head=method == "HEAD")

    # ------------------------------------------------------------------ write endpoints
    def _create_repo(self, payload: dict[str, Any], token: str | None) -> None:
        hub = self.server_state
        if token is None:
            raise HubError(401, message="You must be authenticated to create a repository")
        if not hub.tokens.get(token, False):
            raise HubError(403, message="You don't have the rights to create a model under this namespace")
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        if repo_id in hub.repos:
            raise HubError(409, message="You already created this model repo")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        hub.create_repo(repo_id, private=private)
        self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _preupload(self, repo_id: str, revision: str, payload: dict[str, Any], token: str | None) -> None:
        hub = self.server_state
        repo = self._repo(repo_id, token, write=True)
        head = repo.commits[self._revision(repo, revision)]
        files = []
        for f in payload["files"]:
            lfs = hub.lfs and f["path"].endswith(LFS_SUFFIXES) and f["size"] > 0
            existing = head.get(f["path"])
            oid = None
            if existing is not None:
                oid = hashlib.sha256(existing).hexdigest() if lfs else git_blob_oid(existing)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._send(200, {"files": files, "commitOid": repo.refs.get("main")})

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any], token: str | None) -> None:
        hub = self.server_state
        self._repo(repo_id, token, write=True)
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in hub.lfs_store:
                entry["actions"] = {
                    "upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{hub.url}/lfs-verify/{obj['oid']}"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _commit(self, repo_id: str, revision: str, body: bytes, token: str | None) -> None:
        hub = self.server_state
        repo = self._repo(repo_id, token, write=True)
        files: dict[str, bytes] = {}
        lfs: set[str] = set()
        deletions: list[str] = []
        header: dict[str, Any] = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in hub.lfs_store:
                    raise HubError(400, message=f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = hub.lfs_store[value["oid"]]
                lfs.add(value["path"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"])
            else:
                raise HubError(400, message=f"unknown commit operation {item['key']}")
        if not header.get("summary"):
            raise HubError(400, message="missing commit summary")
        with hub._lock:
            if revision not in repo.refs:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            sha = hub._commit_locked(repo, revision, files, tuple(deletions), lfs=lfs)
        self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True,
                         "pullRequestUrl": None})

    # ------------------------------------------------------------------ responses
    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None, *, head: bool = False) -> None:
        data = json.dumps(payload).encode()
        self._send_bytes(status, data, {"Content-Type": "application/json", **(headers or {})}, head=head)

    def _send_bytes(self, status: int, data: bytes, headers: dict[str, str], *, head: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)


# ---------------------------------------------------------------------- client configuration

DEAD_PROXY = "http://127.0.0.1:9"


def client_env(url: str, home: str) -> dict[str, str]:
    """Environment for a subprocess that must talk to the fake Hub only.

    Any request to another host goes to a closed proxy port on 127.0.0.1 and fails at once, so a
    test can never reach a real remote host.
    """
    return {
        "HF_ENDPOINT": url, "HF_HOME": home, "HF_HUB_CACHE": f"{home}/hub",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "ALL_PROXY": DEAD_PROXY,
        "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY, "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def configure_client(monkeypatch: Any, url: str, home: str) -> None:
    """Point this process's ``huggingface_hub`` at ``url`` with a fresh cache and no saved login.

    The client reads most settings into ``huggingface_hub.constants`` when it is first imported,
    so they are patched there as well as in the environment; the shared HTTP session is closed so
    the next one is built with the proxy settings above.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent, _http

    for key, value in client_env(url, home).items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", home)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", f"{home}/hub")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", f"{home}/token")
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", f"{home}/stored_tokens")
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", f"{home}/.agent_harnesses.json")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_detect_agent, "_registry", None)
    _http.close_session()


def reset_client() -> None:
    """Drop the client's shared HTTP session, so no later test inherits this one's proxy settings."""
    from huggingface_hub.utils import _http

    _http.close_session()
