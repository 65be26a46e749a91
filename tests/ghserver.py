"""A loopback GitHub REST server for tests (stdlib ``http.server`` on a thread).

Implements only the endpoints ``hubconv.github.Bot`` uses, with JSON shaped like GitHub's (the fields PyGithub
parses: ``id``, ``node_id``, ``url``, ``html_url``, ``body``, ``user{login,id,type}``, ``draft``, ``prerelease``,
``name``, ``tag_name``, ...). Every request is recorded for assertions. Supports a GitHub Enterprise style base path
(``/api/v3``), Link-header pagination, and one-shot fault injection (502, 403 rate limit).

Release assets: ``add_release(..., assets=[(name, bytes)])`` or ``add_asset(tag, name, data)``;
``GET /repos/{o}/{r}/releases/{id}/assets`` (paginated) and ``GET /repos/{o}/{r}/releases/assets/{id}`` (JSON, or with
``Accept: application/octet-stream`` a 302 to a second loopback "storage" server on another port, which serves the
bytes with ``Range`` support and answers 400 to any request carrying an ``Authorization`` header, like S3 does).

Behaviour copied from github.com that matters to the bot:
- ``GET /repos/{o}/{r}/releases/tags/{tag}`` only finds *published* releases (drafts → 404), drafts are only visible
  through ``GET /repos/{o}/{r}/releases``;
- ``PATCH`` on a release/comment updates only the fields sent;
- a wrong token gets ``401 {"message": "Bad credentials"}`` on every endpoint;
- an installation token (``GITHUB_TOKEN``) gets ``403 Resource not accessible by integration`` on ``GET /user``.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HTML_ROOT = "https://github.example"


@dataclass
class Request:
    method: str
    path: str  # full request path without query (including any base prefix)
    route: str  # path with the base prefix removed
    query: dict[str, str]
    body: Any  # decoded JSON body, or None
    auth_ok: bool
    authorization: str | None = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # lower-cased names
    storage: bool = False  # served by the storage server (asset bytes), not the API


@dataclass
class _Fault:
    kind: str  # "502" | "rate_limit"
    method: str
    route_re: re.Pattern[str]
    retry_after: str | None


class FakeGitHub:
    """Start with ``with FakeGitHub(...) as gh:``; point PyGithub at ``gh.api_url``."""

    def __init__(
        self,
        *,
        token: str = "ghp_fake_token_0123456789",
        login: str = "hubconv-bot",
        owner: str = "acme",
        repo: str = "models",
        prefix: str = "",
        installation_token: bool = False,
        per_page: int = 30,
    ) -> None:
        self.token = token
        self.login = login
        self.owner = owner
        self.repo = repo
        self.prefix = prefix.rstrip("/")
        self.installation_token = installation_token  # GET /user → 403, like GITHUB_TOKEN
        self.per_page = per_page
        self.requests: list[Request] = []
        self.comments: dict[int, list[dict[str, Any]]] = {}
        self.releases: list[dict[str, Any]] = []
        self.asset_data: dict[int, bytes] = {}
        self._faults: list[_Fault] = []
        self._ids = 1000
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._storage_server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeGitHub:
        handler = type("_Handler", (_Handler,), {"gh": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="fake-github", daemon=True
        )
        self._thread.start()
        storage_handler = type("_StorageHandler", (_Handler,), {"gh": self, "storage": True})
        self._storage_server = ThreadingHTTPServer(("127.0.0.1", 0), storage_handler)
        self._storage_server.daemon_threads = True
        threading.Thread(
            target=self._storage_server.serve_forever, args=(0.02,), name="fake-github-storage", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._storage_server is not None:
            self._storage_server.shutdown()
            self._storage_server.server_close()
            self._storage_server = None

    def __enter__(self) -> FakeGitHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    @property
    def storage_url(self) -> str:
        assert self._storage_server is not None, "server not started"
        return f"http://127.0.0.1:{self._storage_server.server_address[1]}"

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.repo}"

    # ------------------------------------------------------------------ seeding / faults / inspection
    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _user(self, login: str) -> dict[str, Any]:
        is_bot = login.endswith("[bot]")
        uid = 41898282 if login == "github-actions[bot]" else abs(hash(login)) % 10_000_000
        return {
            "login": login,
            "id": uid,
            "node_id": f"U_{uid}",
            "type": "Bot" if is_bot else "User",
            "url": f"{self.api_url}/users/{urllib.parse.quote(login)}",
            "html_url": f"{HTML_ROOT}/{login}",
            "site_admin": False,
        }

    def add_comment(self, issue: int, body: str, login: str | None = None) -> dict[str, Any]:
        with self._lock:
            return self._new_comment(issue, body, login or self.login)

    def _new_comment(self, issue: int, body: str, login: str) -> dict[str, Any]:
        cid = self._next_id()
        base = f"{self.api_url}/repos/{self.full_name}"
        now = _now()
        comment = {
            "id": cid,
            "node_id": f"IC_{cid}",
            "url": f"{base}/issues/comments/{cid}",
            "html_url": f"{HTML_ROOT}/{self.full_name}/pull/{issue}#issuecomment-{cid}",
            "issue_url": f"{base}/issues/{issue}",
            "body": body,
            "user": self._user(login),
            "author_association": "NONE" if login.endswith("[bot]") else "MEMBER",
            "created_at": now,
            "updated_at": now,
        }
        self.comments.setdefault(issue, []).append(comment)
        return comment

    def add_release(
        self,
        tag: str,
        *,
        body: str | None = "",
        name: str | None = None,
        draft: bool = False,
        prerelease: bool = False,
        assets: list[tuple[str, bytes]] | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            rid = self._next_id()
            base = f"{self.api_url}/repos/{self.full_name}"
            html_tag = f"untagged-{rid:x}" if draft else tag
            release = {
                "id": rid,
                "node_id": f"RE_{rid}",
                "url": f"{base}/releases/{rid}",
                "html_url": f"{HTML_ROOT}/{self.full_name}/releases/tag/{html_tag}",
                "assets_url": f"{base}/releases/{rid}/assets",
                "upload_url": f"{base}/releases/{rid}/assets{{?name,label}}",
                "tarball_url": f"{base}/tarball/{tag}",
                "zipball_url": f"{base}/zipball/{tag}",
                "tag_name": tag,
                "target_commitish": "main",
                "name": name,
                "body": body,
                "draft": draft,
                "prerelease": prerelease,
                "created_at": _now(),
                "published_at": None if draft else _now(),
                "author": self._user(self.login),
                "assets": [],
            }
            self.releases.append(release)
        for asset_name, data in assets or []:
            self.add_asset(tag, asset_name, data)
        return release

    def add_asset(self, tag: str, name: str, data: bytes, *, digest: str | None = None) -> dict[str, Any]:
        """Attach an asset to the release with ``tag`` (drafts included). ``digest`` is the asset's
        ``"sha256:<hex>"`` field (GitHub's, computed on upload); None leaves it null like older assets."""
        with self._lock:
            release = next(r for r in self.releases if r["tag_name"] == tag)
            aid = self._next_id()
            base = f"{self.api_url}/repos/{self.full_name}"
            asset = {
                "id": aid,
                "node_id": f"RA_{aid}",
                "url": f"{base}/releases/assets/{aid}",
                "browser_download_url": f"{HTML_ROOT}/{self.full_name}/releases/download/{tag}/{name}",
                "name": name,
                "label": "",
                "state": "uploaded",
                "content_type": "application/octet-stream",
                "size": len(data),
                "digest": digest,
                "download_count": 0,
                "created_at": _now(),
                "updated_at": _now(),
                "uploader": self._user(self.login),
            }
            release["assets"].append(asset)
            self.asset_data[aid] = data
            return asset

    def set_asset_data(self, asset_id: int, data: bytes) -> None:
        """Change the stored bytes (not the metadata): simulates a tampered/corrupted download."""
        with self._lock:
            self.asset_data[asset_id] = data

    def inject(
        self, kind: str, *, method: str = "GET", route: str = ".*", times: int = 1, retry_after: str | None = "0"
    ) -> None:
        """Answer the next ``times`` matching requests with a fault: ``"502"`` or ``"rate_limit"`` (403)."""
        assert kind in ("502", "rate_limit"), kind
        with self._lock:
            for _ in range(times):
                self._faults.append(_Fault(kind, method.upper(), re.compile(route), retry_after))

    def calls(self, method: str | None = None, route: str | None = None) -> list[Request]:
        """Recorded requests, filtered by method and a regex that must match the whole route."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method.upper()) and (route is None or re.fullmatch(route, r.route))
        ]

    # ------------------------------------------------------------------ request handling
    def _auth_ok(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() in ("token", "bearer") and value.strip() == self.token

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], raw_body: bytes, storage: bool = False
    ) -> _Response:
        if storage:
            return self._storage(method, raw_path, headers)
        parsed = urllib.parse.urlsplit(raw_path)
        path = parsed.path
        query = dict(urllib.parse.parse_qsl(parsed.query))
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = None
        authorization = headers.get("authorization")
        auth_ok = self._auth_ok(authorization)
        in_prefix = path == self.prefix or path.startswith(self.prefix + "/")
        route = path[len(self.prefix) :] if in_prefix else path
        with self._lock:
            self.requests.append(Request(method, path, route, query, body, auth_ok, authorization, dict(headers)))
            for fault in self._faults:
                if fault.method == method and fault.route_re.fullmatch(route):
                    self._faults.remove(fault)
                    return self._fault_response(fault)
            if not in_prefix:
                return _json(404, {"message": "Not Found"})
            if not auth_ok:
                return _json(401, {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"})
            return self._route(method, route, query, body, headers)

    def _storage(self, method: str, raw_path: str, headers: dict[str, str]) -> _Response:
        parsed = urllib.parse.urlsplit(raw_path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        authorization = headers.get("authorization")
        with self._lock:
            self.requests.append(
                Request(method, parsed.path, parsed.path, query, None, False, authorization, dict(headers), True)
            )
            if authorization:  # like S3: a presigned URL plus an Authorization header is rejected
                return _Response(400, b"<Error>Only one auth mechanism allowed</Error>", {"Content-Type": "text/xml"})
            m = re.fullmatch(r"/storage/(\d+)", parsed.path)
            if method != "GET" or not m or int(m.group(1)) not in self.asset_data or query.get("sig") != "ok":
                return _Response(404, b"Not Found", {"Content-Type": "text/plain"})
            data = self.asset_data[int(m.group(1))]
        octet = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        rng = headers.get("range")
        if not rng:
            return _Response(200, data, octet)
        mr = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
        if not mr or int(mr.group(1)) >= len(data):
            return _Response(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        start = int(mr.group(1))
        end = min(int(mr.group(2)), len(data) - 1) if mr.group(2) else len(data) - 1
        octet["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _Response(206, data[start : end + 1], octet)

    def _fault_response(self, fault: _Fault) -> _Response:
        if fault.kind == "502":
            return _json(502, {"message": "Server Error"})
        headers = {
            "X-RateLimit-Limit": "5000",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Used": "5000",
            "X-RateLimit-Reset": str(int(time.time())),
        }
        if fault.retry_after is not None:
            headers["Retry-After"] = fault.retry_after
        return _json(
            403,
            {
                "message": "API rate limit exceeded for installation ID 1.",
                "documentation_url": "https://docs.github.com/rest/overview/resources-in-the-rest-api#rate-limiting",
            },
            headers,
        )

    def _route(
        self, method: str, route: str, query: dict[str, str], body: Any, headers: dict[str, str] | None = None
    ) -> _Response:
        if method == "GET" and route == "/user":
            if self.installation_token:
                return _json(403, {"message": "Resource not accessible by integration"})
            return _json(200, self._user(self.login))
        m = re.fullmatch(r"/repos/([^/]+)/([^/]+)(/.*)?", route)
        if not m or (m.group(1), m.group(2)) != (self.owner, self.repo):
            return _json(404, {"message": "Not Found"})
        rest = m.group(3) or ""
        base = f"{self.api_url}/repos/{self.full_name}"

        if method == "GET" and rest == "":
            return _json(
                200,
                {
                    "id": 1,
                    "node_id": "R_1",
                    "name": self.repo,
                    "full_name": self.full_name,
                    "owner": self._user(self.owner),
                    "private": False,
                    "url": base,
                    "html_url": f"{HTML_ROOT}/{self.full_name}",
                    "default_branch": "main",
                },
            )
        if mm := re.fullmatch(r"/issues/(\d+)", rest):
            if method != "GET":
                return _json(405, {"message": "Method not allowed"})
            n = int(mm.group(1))
            return _json(
                200,
                {
                    "id": 500_000 + n,
                    "node_id": f"I_{n}",
                    "number": n,
                    "url": f"{base}/issues/{n}",
                    "html_url": f"{HTML_ROOT}/{self.full_name}/pull/{n}",
                    "comments_url": f"{base}/issues/{n}/comments",
                    "title": f"PR {n}",
                    "state": "open",
                    "user": self._user("contributor"),
                    "body": "",
                    "comments": len(self.comments.get(n, [])),
                    "pull_request": {"url": f"{base}/pulls/{n}"},
                },
            )
        if mm := re.fullmatch(r"/issues/(\d+)/comments", rest):
            n = int(mm.group(1))
            if method == "GET":
                return self._paginated(f"{base}/issues/{n}/comments", list(self.comments.get(n, [])), query)
            if method == "POST":
                if not isinstance(body, dict) or not isinstance(body.get("body"), str):
                    return _json(422, {"message": "Validation Failed"})
                if len(body["body"]) > 65536:
                    return _json(422, {"message": "Validation Failed", "errors": [{"code": "too_long"}]})
                return _json(201, self._new_comment(n, body["body"], self.login))
        if mm := re.fullmatch(r"/issues/comments/(\d+)", rest):
            cid = int(mm.group(1))
            comment = next((c for cs in self.comments.values() for c in cs if c["id"] == cid), None)
            if comment is None:
                return _json(404, {"message": "Not Found"})
            if method == "GET":
                return _json(200, comment)
            if method == "PATCH":
                if not isinstance(body, dict) or not isinstance(body.get("body"), str):
                    return _json(422, {"message": "Validation Failed"})
                if len(body["body"]) > 65536:
                    return _json(422, {"message": "Validation Failed", "errors": [{"code": "too_long"}]})
                comment["body"] = body["body"]
                comment["updated_at"] = _now()
                return _json(200, comment)
        if method == "GET" and rest == "/releases":
            return self._paginated(f"{base}/releases", list(reversed(self.releases)), query)
        if method == "GET" and (mm := re.fullmatch(r"/releases/tags/(.+)", rest)):
            tag = urllib.parse.unquote(mm.group(1))
            found = next((r for r in self.releases if r["tag_name"] == tag and not r["draft"]), None)
            return _json(200, found) if found else _json(404, {"message": "Not Found"})
        if method == "GET" and (mm := re.fullmatch(r"/releases/(\d+)/assets", rest)):
            release = next((r for r in self.releases if r["id"] == int(mm.group(1))), None)
            if release is None:
                return _json(404, {"message": "Not Found"})
            return self._paginated(f"{base}/releases/{release['id']}/assets", list(release["assets"]), query)
        if method == "GET" and (mm := re.fullmatch(r"/releases/assets/(\d+)", rest)):
            aid = int(mm.group(1))
            asset = next((a for r in self.releases for a in r["assets"] if a["id"] == aid), None)
            if asset is None:
                return _json(404, {"message": "Not Found"})
            if (headers or {}).get("accept", "").strip().lower() == "application/octet-stream":
                location = f"{self.storage_url}/storage/{aid}?sig=ok"
                return _Response(302, b"", {"Location": location, "Content-Type": "text/plain"})
            return _json(200, asset)
        if mm := re.fullmatch(r"/releases/(\d+)", rest):
            rid = int(mm.group(1))
            release = next((r for r in self.releases if r["id"] == rid), None)
            if release is None:
                return _json(404, {"message": "Not Found"})
            if method == "GET":
                return _json(200, release)
            if method == "PATCH":
                if not isinstance(body, dict):
                    return _json(422, {"message": "Validation Failed"})
                for key in ("tag_name", "name", "body", "draft", "prerelease", "target_commitish"):
                    if key in body:
                        release[key] = body[key]
                if not release["draft"] and release["published_at"] is None:
                    release["published_at"] = _now()
                return _json(200, release)
        return _json(404, {"message": "Not Found"})

    def _paginated(self, url: str, items: list[dict[str, Any]], query: dict[str, str]) -> _Response:
        per_page = int(query.get("per_page", self.per_page))
        page = int(query.get("page", 1))
        last = max(1, -(-len(items) // per_page))
        chunk = items[(page - 1) * per_page : page * per_page]
        links = []
        if page < last:
            links.append(f'<{url}?per_page={per_page}&page={page + 1}>; rel="next"')
            links.append(f'<{url}?per_page={per_page}&page={last}>; rel="last"')
        if page > 1:
            links.append(f'<{url}?per_page={per_page}&page=1>; rel="first"')
            links.append(f'<{url}?per_page={per_page}&page={page - 1}>; rel="prev"')
        return _json(200, chunk, {"Link": ", ".join(links)} if links else None)


@dataclass
class _Response:
    status: int
    body: bytes
    headers: dict[str, str]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Response:
    hdrs = {
        "Content-Type": "application/json; charset=utf-8",
        "X-RateLimit-Limit": "5000",
        "X-RateLimit-Remaining": "4999",
        "X-RateLimit-Reset": str(int(time.time()) + 3600),
    }
    hdrs.update(headers or {})
    return _Response(status, json.dumps(payload).encode(), hdrs)


class _Handler(BaseHTTPRequestHandler):
    gh: FakeGitHub
    storage: bool = False
    protocol_version = "HTTP/1.1"
    wbufsize = -1  # one write per response (headers + body): avoids Nagle/delayed-ACK stalls on keep-alive

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        resp = self.gh.handle(self.command, self.path, headers, raw, self.storage)
        self.send_response(resp.status)
        for k, v in resp.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        self.wfile.write(resp.body)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr access log
        pass
