"""A small in-memory Hugging Face Hub for tests: the endpoints huggingface_hub's upload and download use.

Start it, point the client at it, and the real client code runs against it::

    with HubServer(token="hf_test") as hub:
        # A fresh process: huggingface_hub reads HF_ENDPOINT once, at import, into
        # `constants.ENDPOINT` (HfApi's default endpoint) and `constants.HUGGINGFACE_CO_URL_TEMPLATE`
        # (the download URLs) -- so set it in the environment before the import.
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": tmp, "HF_TOKEN": "hf_test"}
        # In this process, for uploads only (HfApi reads `constants.ENDPOINT` when constructed; the download
        # URL template is already fixed): monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)

What it implements (huggingface_hub 2.4.0's wire protocol, read from `hf_api.py`, `_commit_api.py`,
`_upload_pipeline.py` and `file_download.py`):

- ``POST /api/repos/create`` (``visibility`` private/public, 409 when the repo exists),
  ``GET /api/whoami-v2``, ``POST /api/validate-yaml`` (the README front matter must parse as a YAML mapping).
- ``POST /api/models/{repo}/preupload/{rev}``: every file is ``uploadMode: "regular"`` (base64 in the commit
  payload), so neither LFS nor Xet storage is needed; ``oid`` is the git blob id of the file already at
  ``rev``, which lets the client skip unchanged files as it does against the Hub.
- ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: a header line, then ``file`` / ``deletedFile`` /
  ``deletedFolder`` lines; ``?create_pr=1`` opens a pull request at ``refs/pr/<n>``), ``POST .../branch/{name}``,
  ``POST .../discussions`` + ``GET .../discussions/{n}`` (how the Xet-enabled client opens a PR first and then
  commits to ``refs/pr/<n>``).
- ``GET /api/models/{repo}[/revision/{rev}]``, ``GET .../tree/{rev}[/{path}]``, ``POST .../paths-info/{rev}``,
  ``GET .../refs``, and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (the git
  blob id), ``Content-Length`` and ``X-Error-Code`` (``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``)
  on errors, as ``hf_hub_download`` requires.

Writes need ``Authorization: Bearer <token>`` when the server has a token (401 with the Hub's
"Invalid credentials" message otherwise); private repos are invisible (``RepoNotFound``) without it.
Every request is recorded (`HubServer.requests`) with its method, path, query, Authorization header and JSON
body, so tests can assert what the client sent (``visibility``, the revision in the path, ``create_pr``).
"""

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

MAIN = "main"


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    parent: str | None


@dataclass
class PullRequest:
    num: int
    title: str
    base: str
    created_at: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)
    """Branch name (``main``) or full ref (``refs/pr/1``) → commit oid."""
    commits: dict[str, Commit] = field(default_factory=dict)
    pulls: dict[int, PullRequest] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        for name in (revision, revision.removeprefix("refs/heads/")):
            if name in self.refs:
                return self.commits[self.refs[name]]
        return self.commits.get(revision)


@dataclass
class RecordedRequest:
    method: str
    path: str
    """Decoded path, e.g. ``/api/models/user/repo/commit/refs/pr/1``."""
    query: dict[str, str]
    authorization: str | None
    body: Any = None
    """The JSON body (the NDJSON header line for commits), or None."""


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class HubServer:
    """An in-memory Hub on ``127.0.0.1:<free port>``, served from a daemon thread."""

    def __init__(self, token: str | None = None, user: str = "tester"):
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_port}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests read ------------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = MAIN) -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id} has no revision {revision!r}")
        return dict(commit.files)

    def requests_to(self, method: str, path_part: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and path_part in r.path]

    # -- state changes (called with the lock held) ------------------------------------------------------

    def _new_commit(self, repo: Repo, files: dict[str, bytes], message: str, parent: str | None) -> Commit:
        seed = f"{repo.repo_id}\0{parent}\0{message}\0{next(self._counter)}\0" + "\0".join(
            f"{path}:{git_blob_id(content)}" for path, content in sorted(files.items())
        )
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), message, files, parent)
        repo.commits[commit.oid] = commit
        return commit

    def _create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        repo.refs[MAIN] = self._new_commit(
            repo, {".gitattributes": gitattributes}, "initial commit", None
        ).oid
        self.repos[repo_id] = repo
        return repo

    def _open_pull_request(self, repo: Repo, title: str, base: str) -> PullRequest:
        num = max([*repo.pulls, 0]) + 1
        created = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        pull = PullRequest(num, title, base, created)
        repo.pulls[num] = pull
        head = repo.resolve(base)
        assert head is not None
        repo.refs[f"refs/pr/{num}"] = head.oid
        return pull


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read `hub.requests`
        pass

    # -- plumbing -------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        # Split before decoding: a quoted revision such as refs%2Fpr%2F1 is one path segment.
        segments = [unquote(part) for part in split.path.split("/")[1:]]
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        body = self._read_body() if method == "POST" else b""
        record = RecordedRequest(method, "/" + "/".join(segments), query, self.headers.get("Authorization"))
        with self.hub._lock:
            self.hub.requests.append(record)
            try:
                self._route(method, segments, query, body, record)
            except _Error as err:
                headers = {"X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                if err.commit:
                    headers["X-Repo-Commit"] = err.commit
                self._send_json(err.status, {"error": err.message}, headers)

    def _send(self, status: int, content: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    # -- auth and lookup ------------------------------------------------------------------------------------

    def _authorized(self) -> bool:
        return self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _require_write(self) -> None:
        if self.hub.token is None:
            return
        if self.headers.get("Authorization") is None:
            raise _Error(401, "Invalid username or password.")
        if not self._authorized():
            raise _Error(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise _Error(401, "Repository not found", code="RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _Error(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    # -- routes ----------------------------------------------------------------------------------------------

    def _route(
        self, method: str, seg: list[str], query: dict[str, str], body: bytes, record: RecordedRequest
    ) -> None:
        if seg[:1] == ["api"]:
            if method == "POST" and seg[1:] == ["repos", "create"]:
                return self._create_repo(self._json(body, record))
            if method == "GET" and seg[1:] == ["whoami-v2"]:
                self._require_write()
                return self._send_json(200, {"type": "user", "name": self.hub.user, "auth": {}})
            if method == "POST" and seg[1:] == ["validate-yaml"]:
                return self._validate_yaml(self._json(body, record))
            if len(seg) >= 4 and seg[1] == "models":
                repo_id, action, rest = f"{seg[2]}/{seg[3]}", seg[4] if len(seg) > 4 else None, seg[5:]
                return self._repo_api(method, repo_id, action, rest, query, body, record)
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        raise _Error(404, f"no route for {method} {self.path}")

    def _json(self, body: bytes, record: RecordedRequest) -> Any:
        record.body = json.loads(body or b"null")
        return record.body

    def _create_repo(self, payload: dict[str, Any]) -> None:
        self._require_write()
        if payload.get("type", "model") != "model":
            raise _Error(400, "this test hub holds model repos only")
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            raise _Error(409, "You already created this model repo")
        self.hub._create_repo(repo_id, private=payload.get("visibility") == "private")
        self._send_json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        content: str = payload["content"]
        errors = []
        if content.startswith("---"):
            front = content.split("---", 2)[1] if content.count("---") >= 2 else None
            try:
                parsed = yaml.safe_load(front) if front is not None else None
                if not isinstance(parsed, dict):
                    errors.append({"message": "the metadata block is not a YAML mapping"})
            except yaml.YAMLError as err:
                errors.append({"message": f"invalid YAML: {err}"})
        self._send_json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _repo_api(
        self,
        method: str,
        repo_id: str,
        action: str | None,
        rest: list[str],
        query: dict[str, str],
        body: bytes,
        record: RecordedRequest,
    ) -> None:
        repo = self._repo(repo_id)
        if method == "GET" and action is None:
            return self._model_info(repo, MAIN)
        if method == "GET" and action == "revision":
            return self._model_info(repo, "/".join(rest))
        if method == "GET" and action == "tree":
            return self._tree(
                repo, rest[0], "/".join(rest[1:]), query.get("recursive") in ("True", "true", "1")
            )
        if method == "POST" and action == "paths-info":
            paths = parse_qs(body.decode()).get("paths", [])
            return self._paths_info(repo, rest[0], paths)
        if method == "GET" and action == "refs":
            return self._refs(repo)
        if method == "GET" and action == "discussions" and rest:
            return self._discussion(repo, int(rest[0]))
        self._require_write()
        if method == "POST" and action == "preupload":
            return self._preupload(repo, "/".join(rest), self._json(body, record))
        if method == "POST" and action == "commit":
            return self._commit_files(repo, "/".join(rest), query.get("create_pr") == "1", body, record)
        if method == "POST" and action == "branch":
            return self._create_branch(repo, "/".join(rest), self._json(body, record) or {})
        if method == "POST" and action == "discussions" and not rest:
            payload = self._json(body, record)
            if not payload.get("pullRequest"):
                raise _Error(400, "this test hub opens pull requests only")
            pull = self.hub._open_pull_request(repo, payload["title"], MAIN)
            return self._send_json(200, {"num": pull.num, "pullRequest": {"num": pull.num}})
        raise _Error(404, f"no route for {method} {self.path}")

    def _entries(self, commit: Commit, paths: list[str]) -> list[dict[str, Any]]:
        return [
            {
                "type": "file",
                "path": path,
                "oid": git_blob_id(commit.files[path]),
                "size": len(commit.files[path]),
            }
            for path in paths
            if path in commit.files
        ]

    def _model_info(self, repo: Repo, revision: str) -> None:
        commit = self._commit(repo, revision)
        self._send_json(
            200,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": commit.oid,
                "private": repo.private,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
                "tags": [],
            },
        )

    def _tree(self, repo: Repo, revision: str, folder: str, recursive: bool) -> None:
        commit = self._commit(repo, revision)
        prefix = f"{folder.strip('/')}/" if folder else ""
        files, folders = [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            inner = path[len(prefix) :]
            if recursive or "/" not in inner:
                files.append(path)
            else:
                folders.add(prefix + inner.split("/", 1)[0])
        entries = [{"type": "directory", "path": p, "oid": git_blob_id(p.encode())} for p in sorted(folders)]
        self._send_json(200, entries + self._entries(commit, files))

    def _paths_info(self, repo: Repo, revision: str, paths: list[str]) -> None:
        self._send_json(200, self._entries(self._commit(repo, revision), paths))

    def _refs(self, repo: Repo) -> None:
        def ref(name: str, full: str) -> dict[str, str]:
            return {"name": name, "ref": full, "targetCommit": repo.refs[name]}

        self._send_json(
            200,
            {
                "branches": [ref(n, f"refs/heads/{n}") for n in repo.refs if not n.startswith("refs/")],
                "converts": [],
                "tags": [],
                "pullRequests": [ref(n, n) for n in repo.refs if n.startswith("refs/pr/")],
            },
        )

    def _discussion(self, repo: Repo, num: int) -> None:
        pull = repo.pulls.get(num)
        if pull is None:
            raise _Error(404, f"discussion {num} not found")
        self._send_json(
            200,
            {
                "title": pull.title,
                "num": pull.num,
                "author": {"name": self.hub.user},
                "createdAt": pull.created_at,
                "status": "draft",
                "repo": {"name": repo.repo_id, "type": "model"},
                "isPullRequest": True,
                "events": [],
                "changes": {"base": f"refs/heads/{pull.base}"},
                "filesWithConflicts": [],
                "diff": "",
            },
        )

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> None:
        existing = self._commit(repo, revision).files
        self._send_json(
            200,
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_id(existing[f["path"]]) if f["path"] in existing else None,
                    }
                    for f in payload["files"]
                ]
            },
        )

    def _commit_files(
        self, repo: Repo, revision: str, create_pr: bool, body: bytes, record: RecordedRequest
    ) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Error(400, "a commit payload starts with a header line")
        header = lines[0]["value"]
        record.body = header
        base = self._commit(repo, revision)
        if header.get("parentCommit") not in (None, base.oid):
            raise _Error(412, "parentCommit is not the head of the revision")
        files = dict(base.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _Error(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(folder)}
            else:
                # Preupload never answers "lfs", so a well-behaved client never sends lfsFile lines.
                raise _Error(400, f"unsupported commit operation {key!r}")
        ref = revision
        pull_url = None
        if create_pr:
            pull = self.hub._open_pull_request(repo, header["summary"], revision)
            ref = f"refs/pr/{pull.num}"
            pull_url = f"{self.hub.url}/{repo.repo_id}/discussions/{pull.num}"
        elif revision not in repo.refs:
            raise _Error(400, f"cannot commit to {revision!r}: not a branch")
        commit = self.hub._new_commit(repo, files, header["summary"], base.oid)
        repo.refs[ref] = commit.oid
        self._send_json(
            200,
            {
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{commit.oid}",
                "commitOid": commit.oid,
                "pullRequestUrl": pull_url,
            },
        )

    def _create_branch(self, repo: Repo, branch: str, payload: dict[str, Any]) -> None:
        if branch in repo.refs:
            raise _Error(409, f"branch {branch!r} already exists")
        start = self._commit(repo, payload.get("startingPoint") or MAIN)
        repo.refs[branch] = start.oid
        self._send_json(200, {})

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        if path not in commit.files:
            raise _Error(404, f"{path} not found", code="EntryNotFound", commit=commit.oid)
        content = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_id(content)}"',
            "Accept-Ranges": "bytes",
        }
        status, start = 200, 0
        byte_range = self.headers.get("Range", "")
        if byte_range.startswith("bytes=") and byte_range.endswith("-"):
            start = int(byte_range[len("bytes=") : -1])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        self._send(status, content[start:], headers)
