"""The Hub HTTP API of the dev Hub, independent of the HTTP server plumbing (see server.py).

Routes, payloads and response shapes follow what the `huggingface_hub` 2.x client sends and parses
(hf_api.py, _commit_api.py, lfs.py, file_download.py, community.py).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import hmac
import html
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

from . import rules
from .auth import Identity, TokenRegistry
from .faults import FaultInjector, RequestLog
from .storage import (
    SHA256_RE,
    RepoRef,
    Storage,
    StorageError,
    lfs_pointer,
    lfs_tree_entry,
    utcnow_iso,
    validate_name,
    validate_repo_path,
)

TYPE_PLURALS = {"models": "model", "datasets": "dataset", "spaces": "space"}
MAX_JSON_BODY = 64 * 1024 * 1024
MAX_COMMIT_BODY = 1024 * 1024 * 1024
TREE_PAGE = 1000
TREE_PAGE_EXPAND = 50
COMMITS_PAGE = 50
DISCUSSIONS_PAGE = 50
UPLOAD_URL_TTL = 3600
_REF_NAME_RE = re.compile(r"^(?!/)(?!.*//)(?!.*\.\.)(?!.*@\{)(?!-)[^\x00-\x20~^:?*\[\\\x7f]{1,200}(?<![/.])$")


class HubError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


class BodyStream:
    """Interface the server passes as `Request.body`: `read(n)` returns b"" at the end of the body."""

    def read(self, n: int = -1) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Request:
    method: str
    target: str  # raw request target (path + query), as received
    raw_path: str  # still percent-encoded
    query: dict[str, list[str]]
    headers: Message
    body: Any  # BodyStream
    base_url: str
    identity: Identity | None = None
    token_given: bool = False

    @property
    def segments(self) -> list[str]:
        return self.raw_path.split("/")[1:]

    def q(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def int_q(self, name: str, default: int) -> int:
        raw = self.q(name)
        try:
            value = default if raw in (None, "") else int(raw)
        except ValueError:
            raise HubError(400, f"Query parameter {name!r} must be an integer") from None
        if value < 0:
            raise HubError(400, f"Query parameter {name!r} must be >= 0")
        return value

    def flag(self, name: str) -> bool:
        return (self.q(name) or "").lower() in ("1", "true", "yes", "on")

    def read_all(self, limit: int = MAX_JSON_BODY) -> bytes:
        data = self.body.read(limit + 1)
        if len(data) > limit:
            raise HubError(413, f"Request body too large (limit {limit} bytes)")
        return data

    def json(self, *, required: bool = True) -> Any:
        raw = self.read_all()
        if not raw.strip():
            if required:
                raise HubError(400, "Expected a JSON body")
            return {}
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise HubError(400, f"Invalid JSON body: {e}") from None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # stream this file instead of `body`
    offset: int = 0
    length: int = 0
    close: bool = False


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status=status,
        body=json.dumps(obj).encode(),
        headers={"Content-Type": "application/json; charset=utf-8", **(headers or {})},
    )


def error_response(err: HubError) -> Response:
    headers = dict(err.headers)
    if err.code:
        headers["X-Error-Code"] = err.code
    headers["X-Error-Message"] = _header_safe(err.message)
    return json_response({"error": err.message, **err.extra}, status=err.status, headers=headers)


def _header_safe(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", " ", text)[:1000]


def _not_found_repo(req: Request) -> HubError:
    # Anonymous: 401 like the Hub (it doesn't reveal whether a private repo exists); the client maps
    # `X-Error-Code: RepoNotFound` to RepositoryNotFoundError either way.
    status = 404 if req.identity is not None else 401
    return HubError(status, "Repository not found", code="RepoNotFound")


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes", "on")


def _comment_html(raw: str) -> str:
    return "<p>" + html.escape(raw).replace("\n", "<br>") + "</p>"


class HubApp:
    def __init__(
        self,
        storage: Storage,
        tokens: TokenRegistry,
        *,
        secret: bytes,
        faults: FaultInjector,
        request_log: RequestLog,
        lfs_threshold: int = rules.LFS_SIZE_THRESHOLD,
    ):
        self.storage = storage
        self.tokens = tokens
        self.secret = secret
        self.faults = faults
        self.request_log = request_log
        self.lfs_threshold = lfs_threshold

    # ================================================================== routing
    def dispatch(self, req: Request) -> Response:
        try:
            return self._route(req)
        except HubError as e:
            return error_response(e)

    def _route(self, req: Request) -> Response:
        segs = req.segments
        m = req.method
        if not segs or segs == [""]:
            return json_response({"name": "hubconv devhub", "api": "/api"})
        head = segs[0]
        if head == "api" and len(segs) >= 2:
            if segs[1] == "whoami-v2" and m == "GET":
                return self.whoami(req)
            if segs[1] == "validate-yaml" and m == "POST":
                return self.validate_yaml(req)
            if segs[1] == "repos" and len(segs) == 3:
                if segs[2] == "create" and m == "POST":
                    return self.create_repo(req)
                if segs[2] == "delete" and m == "DELETE":
                    return self.delete_repo(req)
            if segs[1] in TYPE_PLURALS and len(segs) >= 4:
                repo = self._repo_ref(req, TYPE_PLURALS[segs[1]], segs[2], segs[3])
                return self._route_repo_api(req, repo, segs[4:])
            raise HubError(404, f"No API route for {m} {req.raw_path}")
        if head == "_devhub":
            return self._route_admin(req, segs[1:])
        # Web-style repo routes: /[datasets/|spaces/]{ns}/{name}/resolve/... and /{ns}/{name}.git/info/lfs/...
        rtype = "model"
        if head in ("datasets", "spaces") and len(segs) >= 3:
            rtype, segs = TYPE_PLURALS[head], segs[1:]
        if len(segs) >= 3:
            ns, name, rest = segs[0], segs[1], segs[2:]
            if name.endswith(".git") and rest == ["info", "lfs", "objects", "batch"] and m == "POST":
                return self.lfs_batch(req, self._repo_ref(req, rtype, ns, name[:-4]))
            if rest[0] in ("resolve", "raw") and m in ("GET", "HEAD") and len(rest) >= 3:
                repo = self._repo_ref(req, rtype, ns, name)
                rev, path_segs = self._take_rev(rest[1:])
                path = "/".join(unquote(s) for s in path_segs)
                return self.resolve_file(req, repo, rev, path, raw=rest[0] == "raw")
        raise HubError(404, f"Not found: {m} {req.raw_path}")

    def _route_repo_api(self, req: Request, repo: RepoRef, rest: list[str]) -> Response:
        m = req.method
        if not rest:
            if m == "GET":
                return self.repo_info(req, repo, None)
            raise HubError(405, "Method not allowed")
        op, args = rest[0], rest[1:]
        if op == "revision" and m == "GET" and args:
            return self.repo_info(req, repo, "/".join(unquote(s) for s in args))
        if op == "refs" and m == "GET" and not args:
            return self.list_refs(req, repo)
        if op == "tree" and m == "GET" and args:
            rev, path_segs = self._take_rev(args)
            return self.list_tree(req, repo, rev, "/".join(unquote(s) for s in path_segs))
        if op == "paths-info" and m == "POST" and args:
            return self.paths_info(req, repo, "/".join(unquote(s) for s in args))
        if op == "commits" and m == "GET" and args:
            return self.list_commits(req, repo, "/".join(unquote(s) for s in args))
        if op == "preupload" and m == "POST" and args:
            return self.preupload(req, repo, "/".join(unquote(s) for s in args))
        if op == "commit" and m == "POST" and args:
            return self.commit(req, repo, "/".join(unquote(s) for s in args))
        if op == "tag" and args:
            name = "/".join(unquote(s) for s in args)
            if m == "POST":
                return self.create_tag(req, repo, name)
            if m == "DELETE":
                return self.delete_tag(req, repo, name)
        if op == "branch" and args:
            name = "/".join(unquote(s) for s in args)
            if m == "POST":
                return self.create_branch(req, repo, name)
            if m == "DELETE":
                return self.delete_branch(req, repo, name)
        if op == "settings" and m == "PUT" and not args:
            return self.update_settings(req, repo)
        if op == "discussions":
            return self._route_discussions(req, repo, args)
        if op in ("xet-write-token", "xet-read-token"):
            raise HubError(
                501,
                "This dev Hub does not implement Xet storage: set HF_HUB_DISABLE_XET=1 in the client environment",
            )
        raise HubError(404, f"No API route for {m} {req.raw_path}")

    def _route_discussions(self, req: Request, repo: RepoRef, args: list[str]) -> Response:
        m = req.method
        if not args:
            if m == "GET":
                return self.list_discussions(req, repo)
            if m == "POST":
                return self.create_discussion(req, repo)
            raise HubError(405, "Method not allowed")
        try:
            num = int(args[0])
        except ValueError:
            raise HubError(404, "Discussion not found") from None
        rest = args[1:]
        if not rest and m == "GET":
            return self.discussion_details(req, repo, num)
        if m == "POST" and rest == ["comment"]:
            return self.discussion_comment(req, repo, num)
        if m == "POST" and rest == ["title"]:
            return self.discussion_title(req, repo, num)
        if m == "POST" and rest == ["status"]:
            return self.discussion_status(req, repo, num)
        if m == "POST" and rest == ["merge"]:
            return self.merge_pull_request(req, repo, num)
        if m == "POST" and len(rest) == 3 and rest[0] == "comment" and rest[2] in ("edit", "hide"):
            return self.discussion_comment_change(req, repo, num, unquote(rest[1]), rest[2])
        raise HubError(404, f"No API route for {m} {req.raw_path}")

    # ================================================================== helpers
    @staticmethod
    def _take_rev(rest: list[str]) -> tuple[str, list[str]]:
        """Split `{rev}/{path...}`; the client percent-encodes the revision, but accept raw `refs/pr/N` too."""
        if not rest or not rest[0]:
            raise HubError(404, "Missing revision", code="RevisionNotFound")
        if rest[0] == "refs" and len(rest) >= 3 and rest[1] in ("pr", "heads", "tags", "convert"):
            return f"refs/{rest[1]}/{unquote(rest[2])}", rest[3:]
        return unquote(rest[0]), rest[1:]

    @staticmethod
    def _repo_ref(req: Request, rtype: str, ns: str, name: str) -> RepoRef:
        ns, name = unquote(ns), unquote(name)
        try:
            validate_name(ns, "namespace")
            validate_name(name, "repo name")
        except StorageError:
            raise _not_found_repo(req) from None
        return RepoRef(rtype, ns, name)

    def _require_identity(self, req: Request, *, write: bool) -> Identity:
        if req.identity is None:
            raise HubError(401, "You must be authenticated to access this endpoint (missing Bearer token)")
        if write and not req.identity.can_write:
            raise HubError(403, "You must use a write token for this operation (this token is read-only)")
        return req.identity

    def _visible(self, identity: Identity | None, repo: RepoRef, meta: dict[str, Any]) -> bool:
        if not meta.get("private"):
            return True
        return identity is not None and (identity.member_of(repo.namespace) or identity.user == meta.get("owner"))

    def _can_write(self, identity: Identity | None, repo: RepoRef) -> bool:
        return identity is not None and identity.can_write and identity.member_of(repo.namespace)

    def _load(self, req: Request, repo: RepoRef) -> dict[str, Any]:
        meta = self.storage.get_repo(repo)
        if meta is None or not self._visible(req.identity, repo, meta):
            raise _not_found_repo(req)
        return meta

    def _require_repo_write(self, req: Request, repo: RepoRef) -> Identity:
        ident = self._require_identity(req, write=True)
        self._load(req, repo)
        if not self._can_write(ident, repo):
            raise HubError(403, f"You don't have write access to {repo.type} {repo.repo_id}")
        return ident

    def _resolve(self, repo: RepoRef, rev: str) -> tuple[str, str]:
        found = self.storage.resolve(repo, rev)
        if found is None:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return found

    def _tree(self, repo: RepoRef, sha: str) -> dict[str, dict[str, Any]]:
        return self.storage.read_commit(repo, sha)["tree"]

    def _repo_url(self, req: Request, repo: RepoRef) -> str:
        return f"{req.base_url}/{repo.url_prefix}{repo.repo_id}"

    def _regular_text(self, entry: dict[str, Any] | None, limit: int = 1 << 20) -> str | None:
        if not entry or entry.get("lfs") or entry["size"] > limit:
            return None
        try:
            return self.storage.read_entry(entry).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    # ================================================================== account
    def whoami(self, req: Request) -> Response:
        ident = self._require_identity(req, write=False)
        return json_response(ident.whoami())

    def validate_yaml(self, req: Request) -> Response:
        body = req.json()
        content = body.get("content")
        if not isinstance(content, str):
            raise HubError(400, '"content" must be a string', extra={"errors": [{"message": "content required"}]})
        errors, warnings, _ = rules.validate_readme(content)
        payload = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
        if errors:
            return json_response({"error": "Invalid metadata in README.md", **payload}, status=400)
        return json_response(payload)

    # ================================================================== repos
    def _repo_from_body(self, req: Request, body: dict[str, Any], ident: Identity) -> RepoRef:
        rtype = body.get("type") or "model"
        if rtype not in ("model", "dataset", "space"):
            raise HubError(400, f"Invalid repo type {rtype!r}")
        name = body.get("name")
        ns = body.get("organization") or ident.user
        if not isinstance(name, str) or not isinstance(ns, str):
            raise HubError(400, '"name" (and optional "organization") must be strings')
        try:
            validate_name(ns, "namespace")
            validate_name(name, "repo name")
        except StorageError as e:
            raise HubError(400, str(e)) from None
        return RepoRef(rtype, ns, name)

    def create_repo(self, req: Request) -> Response:
        ident = self._require_identity(req, write=True)
        body = req.json()
        repo = self._repo_from_body(req, body, ident)
        if not ident.member_of(repo.namespace):
            raise HubError(
                403, f'You don\'t have the rights to create a {repo.type} under the namespace "{repo.namespace}"'
            )
        visibility = body.get("visibility")
        private = visibility == "private" if visibility is not None else _parse_bool(body.get("private", False))
        if repo.type == "space" and not body.get("sdk"):
            raise HubError(400, "A Space needs an sdk")
        try:
            created, _meta = self.storage.create_repo(repo, private=private, owner=ident.user, sdk=body.get("sdk"))
        except StorageError as e:
            raise HubError(400, str(e)) from None
        url = self._repo_url(req, repo)
        if not created:
            return json_response({"error": f"You already created this {repo.type} repo", "url": url}, status=409)
        return json_response({"url": url, "name": repo.repo_id, "id": repo.repo_id})

    def delete_repo(self, req: Request) -> Response:
        ident = self._require_identity(req, write=True)
        repo = self._repo_from_body(req, req.json(), ident)
        self._require_repo_write(req, repo)
        if not self.storage.delete_repo(repo):
            raise _not_found_repo(req)
        return Response(status=200, body=b"")

    def update_settings(self, req: Request, repo: RepoRef) -> Response:
        self._require_repo_write(req, repo)
        body = req.json()
        changes: dict[str, Any] = {}
        if "visibility" in body:
            if body["visibility"] not in ("public", "private"):
                raise HubError(400, "visibility must be 'public' or 'private'")
            changes["private"] = body["visibility"] == "private"
        if "private" in body:
            changes["private"] = _parse_bool(body["private"])
        if "gated" in body:
            changes["gated"] = body["gated"]
        self.storage.update_repo(repo, **changes)
        return json_response({})

    def repo_info(self, req: Request, repo: RepoRef, rev: str | None) -> Response:
        meta = self._load(req, repo)
        sha, _ = self._resolve(repo, rev or "main")
        commit = self.storage.read_commit(repo, sha)
        blobs = req.flag("blobs")
        siblings = []
        for path in sorted(commit["tree"]):
            entry = commit["tree"][path]
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=entry["size"], blobId=entry["oid"])
                if entry.get("lfs"):
                    lfs = entry["lfs"]
                    sib["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sib)
        card_data = None
        readme = self._regular_text(commit["tree"].get("README.md"))
        if readme is not None:
            _errors, _warnings, card_data = rules.validate_readme(readme)
        info: dict[str, Any] = {
            "_id": meta["_id"],
            "id": repo.repo_id,
            "author": repo.namespace,
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": bool(meta.get("private")),
            "gated": meta.get("gated", False),
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [t for t in (card_data or {}).get("tags") or [] if isinstance(t, str)]
            if isinstance((card_data or {}).get("tags"), list)
            else [],
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in commit["tree"].values()),
        }
        if card_data is not None:
            info["cardData"] = card_data
        if repo.type == "model":
            info["modelId"] = repo.repo_id
            info["spaces"] = []
            if card_data and isinstance(card_data.get("library_name"), str):
                info["library_name"] = card_data["library_name"]
            if card_data and isinstance(card_data.get("pipeline_tag"), str):
                info["pipeline_tag"] = card_data["pipeline_tag"]
        elif repo.type == "space":
            info["sdk"] = meta.get("sdk")
        return json_response(info)

    # ================================================================== refs
    def list_refs(self, req: Request, repo: RepoRef) -> Response:
        self._load(req, repo)
        refs = self.storage.read_refs(repo)
        data: dict[str, Any] = {
            "branches": [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in sorted(refs["heads"].items())
            ],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(refs["tags"].items())],
            "converts": [],
        }
        if req.flag("include_prs"):
            data["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                for n, s in sorted(refs["pr"].items(), key=lambda kv: int(kv[0]))
            ]
        return json_response(data)

    def _check_ref_name(self, name: str, what: str) -> None:
        if not _REF_NAME_RE.match(name) or name.startswith("refs/") or name.endswith(".lock"):
            raise HubError(400, f"Invalid {what} name: {name!r}")

    def create_tag(self, req: Request, repo: RepoRef, rev: str) -> Response:
        self._require_repo_write(req, repo)
        body = req.json()
        tag = body.get("tag")
        if not isinstance(tag, str):
            raise HubError(400, '"tag" must be a string')
        self._check_ref_name(tag, "tag")
        with self.storage.lock(repo):
            sha, _ = self._resolve(repo, rev)
            refs = self.storage.read_refs(repo)
            if tag in refs["tags"]:
                raise HubError(409, f"Tag reference {tag} already exists")
            refs["tags"][tag] = sha
            if body.get("message"):
                refs["tag_messages"][tag] = str(body["message"])
            self.storage.write_refs(repo, refs)
        return json_response({"tag": tag, "targetCommit": sha})

    def delete_tag(self, req: Request, repo: RepoRef, tag: str) -> Response:
        self._require_repo_write(req, repo)
        with self.storage.lock(repo):
            refs = self.storage.read_refs(repo)
            if tag not in refs["tags"]:
                raise HubError(404, f"Invalid rev id: {tag}", code="RevisionNotFound")
            del refs["tags"][tag]
            refs["tag_messages"].pop(tag, None)
            self.storage.write_refs(repo, refs)
        return json_response({})

    def create_branch(self, req: Request, repo: RepoRef, branch: str) -> Response:
        self._require_repo_write(req, repo)
        body = req.json(required=False)
        self._check_ref_name(branch, "branch")
        with self.storage.lock(repo):
            refs = self.storage.read_refs(repo)
            if branch in refs["heads"]:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            start = body.get("startingPoint")
            if body.get("emptyBranch"):
                sha = self.storage.write_commit(
                    repo, parents=[], tree={}, title="empty branch", message="", authors=[req.identity.user]
                )
            else:
                sha, _ = self._resolve(repo, start or "main")
            refs["heads"][branch] = sha
            self.storage.write_refs(repo, refs)
        return json_response({"branch": branch, "targetCommit": sha})

    def delete_branch(self, req: Request, repo: RepoRef, branch: str) -> Response:
        self._require_repo_write(req, repo)
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        with self.storage.lock(repo):
            refs = self.storage.read_refs(repo)
            if branch not in refs["heads"]:
                raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            del refs["heads"][branch]
            self.storage.write_refs(repo, refs)
        return json_response({})

    # ================================================================== tree / paths-info / commits
    @staticmethod
    def _dirs(tree: dict[str, dict[str, Any]]) -> dict[str, str]:
        """Directory path -> synthetic tree oid (sha1 over the entries below it)."""
        below: dict[str, list[str]] = {}
        for path in sorted(tree):
            parts = path.split("/")
            for i in range(1, len(parts)):
                below.setdefault("/".join(parts[:i]), []).append(f"{path}:{tree[path]['oid']}")
        return {
            d: hashlib.sha1("\n".join(lines).encode(), usedforsecurity=False).hexdigest() for d, lines in below.items()
        }

    @staticmethod
    def _file_item(path: str, entry: dict[str, Any]) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry.get("lfs"):
            item["lfs"] = dict(entry["lfs"])
        return item

    def _last_commits(self, repo: RepoRef, head: str, paths: list[tuple[str, bool]]) -> dict[str, dict[str, Any]]:
        """For each (path, is_dir): the newest first-parent commit that changed it."""
        pending = dict(paths)
        out: dict[str, dict[str, Any]] = {}
        sha: str | None = head
        while sha and pending:
            commit = self.storage.read_commit(repo, sha)
            parent = commit["parents"][0] if commit["parents"] else None
            ptree = self._tree(repo, parent) if parent else {}
            tree = commit["tree"]
            changed = {p for p in set(tree) | set(ptree) if tree.get(p) != ptree.get(p)}
            info = {"id": commit["sha"], "title": commit["title"], "date": commit["date"]}
            for path, is_dir in list(pending.items()):
                hit = any(c.startswith(path + "/") for c in changed) if is_dir else path in changed
                if hit or parent is None:
                    out[path] = info
                    del pending[path]
            sha = parent
        return out

    def _items(
        self, repo: RepoRef, sha: str, tree: dict[str, Any], selected: list[tuple[str, bool]], expand: bool
    ) -> list[dict[str, Any]]:
        dirs = self._dirs(tree)
        items = []
        for path, is_dir in selected:
            if is_dir:
                items.append({"type": "directory", "oid": dirs[path], "size": 0, "path": path})
            else:
                items.append(self._file_item(path, tree[path]))
        if expand and items:
            last = self._last_commits(repo, sha, selected)
            for item in items:
                if item["path"] in last:
                    item["lastCommit"] = last[item["path"]]
        return items

    def _page_links(self, req: Request, page: int, has_next: bool) -> dict[str, str]:
        if not has_next:
            return {}
        query = {k: v[-1] for k, v in req.query.items() if k != "p"}
        query["p"] = str(page + 1)
        return {"Link": f'<{req.base_url}{req.raw_path}?{urlencode(query)}>; rel="next"'}

    def list_tree(self, req: Request, repo: RepoRef, rev: str, path: str) -> Response:
        self._load(req, repo)
        sha, _ = self._resolve(repo, rev)
        tree = self._tree(repo, sha)
        dirs = self._dirs(tree)
        path = path.strip("/")
        if path and path not in dirs:
            raise HubError(404, f"Entry not found: {path} is not a folder at {rev}", code="EntryNotFound")
        prefix = f"{path}/" if path else ""
        recursive, expand = req.flag("recursive"), req.flag("expand")
        selected: list[tuple[str, bool]] = []
        for d in sorted(dirs):
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :]):
                selected.append((d, True))
        for f in sorted(tree):
            if f.startswith(prefix) and (recursive or "/" not in f[len(prefix) :]):
                selected.append((f, False))
        limit = TREE_PAGE_EXPAND if expand else TREE_PAGE
        page = req.int_q("p", 0)
        chunk = selected[page * limit : (page + 1) * limit]
        items = self._items(repo, sha, tree, chunk, expand)
        return json_response(items, headers=self._page_links(req, page, (page + 1) * limit < len(selected)))

    def paths_info(self, req: Request, repo: RepoRef, rev: str) -> Response:
        self._load(req, repo)
        ctype = (req.headers.get("Content-Type") or "").lower()
        raw = req.read_all()
        if "json" in ctype:
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise HubError(400, "Invalid JSON body") from None
            paths, expand = body.get("paths") or [], _parse_bool(body.get("expand", False))
        else:
            form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
            paths, expand = form.get("paths", []), _parse_bool((form.get("expand") or ["false"])[-1])
        if isinstance(paths, str):
            paths = [paths]
        if len(paths) > 1000:
            raise HubError(413, "too many parameters")
        sha, _ = self._resolve(repo, rev)
        tree = self._tree(repo, sha)
        dirs = self._dirs(tree)
        selected: list[tuple[str, bool]] = []
        for p in dict.fromkeys(str(p).strip("/") for p in paths):
            if p in tree:
                selected.append((p, False))
            elif p in dirs:
                selected.append((p, True))
        return json_response(self._items(repo, sha, tree, selected, expand))

    def list_commits(self, req: Request, repo: RepoRef, rev: str) -> Response:
        self._load(req, repo)
        sha, _ = self._resolve(repo, rev)
        history = self.storage.history(repo, sha)
        page = req.int_q("p", 0)
        limit = max(1, min(req.int_q("limit", COMMITS_PAGE), 1000))
        formatted = "formatted" in (req.query.get("expand[]", []) + req.query.get("expand", []))
        items = []
        for c in history[page * limit : (page + 1) * limit]:
            item: dict[str, Any] = {
                "id": c["sha"],
                "title": c["title"],
                "message": c["message"],
                "authors": [{"user": a, "avatar": ""} for a in c["authors"]],
                "date": c["date"],
            }
            if formatted:
                item["formatted"] = {"title": _comment_html(c["title"]), "message": _comment_html(c["message"])}
            items.append(item)
        return json_response(items, headers=self._page_links(req, page, (page + 1) * limit < len(history)))

    # ================================================================== uploads
    def preupload(self, req: Request, repo: RepoRef, rev: str) -> Response:
        self._require_identity(req, write=True)
        self._load(req, repo)
        body = req.json()
        files = body.get("files")
        if not isinstance(files, list):
            raise HubError(400, '"files" must be a list')
        sha, _ = self._resolve(repo, rev)
        tree = self._tree(repo, sha)
        patterns = rules.lfs_patterns(self._regular_text(tree.get(".gitattributes")))
        gitignore = body.get("gitIgnore")
        if gitignore is None:
            gitignore = self._regular_text(tree.get(".gitignore"))
        out = []
        for f in files:
            if not isinstance(f, dict) or not isinstance(f.get("path"), str):
                raise HubError(400, "Each file needs a string 'path'")
            path = f["path"]
            try:
                validate_repo_path(path)
            except StorageError as e:
                raise HubError(400, str(e)) from None
            try:
                size = int(f.get("size", 0))
                sample = base64.b64decode(f.get("sample") or "", validate=True)
            except (TypeError, ValueError, binascii.Error):
                raise HubError(400, f"Invalid size/sample for {path!r}") from None
            mode = "lfs" if size >= self.lfs_threshold else rules.upload_mode(path, size, sample, patterns)
            existing = tree.get(path)
            item: dict[str, Any] = {
                "path": path,
                "uploadMode": mode,
                "shouldIgnore": rules.is_ignored(path, gitignore),
            }
            if existing is not None:
                item["oid"] = existing["lfs"]["oid"] if existing.get("lfs") else existing["oid"]
            out.append(item)
        return json_response({"files": out, "commitOid": sha})

    def _sign(self, repo: RepoRef, oid: str, size: int, expires: int) -> str:
        msg = f"{repo.key}\n{oid}\n{size}\n{expires}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def lfs_batch(self, req: Request, repo: RepoRef) -> Response:
        ident = self._require_identity(req, write=True)
        self._load(req, repo)
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(422, "This dev Hub only supports the LFS 'upload' operation (downloads use /resolve)")
        transfers = body.get("transfers") or ["basic"]
        if "basic" not in transfers:
            raise HubError(422, f"No supported transfer adapter in {transfers!r} (supported: basic)")
        if body.get("hash_algo", "sha256") != "sha256":
            raise HubError(409, "Only sha256 is supported")
        ref = (body.get("ref") or {}).get("name")
        if ref is not None:
            found = self.storage.resolve(repo, ref)
            if found is None:
                raise HubError(404, f"Invalid rev id: {ref}", code="RevisionNotFound")
            if found[1] == "branch" and not self._can_write(ident, repo):
                raise HubError(403, f"You don't have write access to {repo.type} {repo.repo_id}")
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise HubError(422, '"objects" must be a list')
        out = []
        expires = int(time.time()) + UPLOAD_URL_TTL
        for obj in objects:
            oid, size = (obj or {}).get("oid"), (obj or {}).get("size")
            if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                out.append(
                    {
                        "oid": str(oid),
                        "size": size if isinstance(size, int) else -1,
                        "error": {"code": 422, "message": "Invalid oid (expected sha256 hex) or size"},
                    }
                )
                continue
            if self.storage.repo_has_lfs(repo, oid):
                out.append({"oid": oid, "size": size, "authenticated": True})
                continue
            query = urlencode({"size": size, "expires": expires, "sig": self._sign(repo, oid, size, expires)})
            out.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {
                            "href": f"{req.base_url}/_devhub/lfs/upload/{repo.key}/{oid}?{query}",
                            "expires_in": UPLOAD_URL_TTL,
                        },
                        "verify": {
                            "href": f"{req.base_url}/_devhub/lfs/verify/{repo.key}",
                            "expires_in": UPLOAD_URL_TTL,
                        },
                    },
                }
            )
        return json_response(
            {"transfer": "basic", "objects": out, "hash_algo": "sha256"},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def lfs_upload(self, req: Request, args: list[str]) -> Response:
        # PUT /_devhub/lfs/upload/{type}s/{ns}/{name}/{oid}?size=&expires=&sig=  (signed URL: no Authorization)
        if len(args) != 4 or args[0] not in TYPE_PLURALS:
            raise HubError(404, "Not found")
        repo = self._repo_ref(req, TYPE_PLURALS[args[0]], args[1], args[2])
        oid = args[3]
        try:
            size, expires = int(req.q("size") or ""), int(req.q("expires") or "")
        except ValueError:
            raise HubError(403, "Invalid upload URL") from None
        sig = req.q("sig") or ""
        if not SHA256_RE.match(oid) or not hmac.compare_digest(sig, self._sign(repo, oid, size, expires)):
            raise HubError(403, "Invalid upload URL signature")
        if expires < time.time():
            raise HubError(403, "Upload URL expired")
        if self.storage.get_repo(repo) is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        declared = req.headers.get("Content-Length")
        if declared is not None and int(declared) != size:
            raise HubError(400, f"Content-Length {declared} does not match the object size {size}")
        try:
            self.storage.ingest_lfs(req.body, oid=oid, size=size)
        except StorageError as e:
            raise HubError(400, str(e)) from None
        self.storage.link_lfs(repo, oid)
        return Response(status=200, headers={"ETag": f'"{oid}"'})

    def lfs_verify(self, req: Request, args: list[str]) -> Response:
        if len(args) != 3 or args[0] not in TYPE_PLURALS:
            raise HubError(404, "Not found")
        repo = self._repo_ref(req, TYPE_PLURALS[args[0]], args[1], args[2])
        self._require_identity(req, write=True)
        self._load(req, repo)
        body = req.json()
        oid, size = body.get("oid"), body.get("size")
        if not isinstance(oid, str) or not self.storage.repo_has_lfs(repo, oid):
            raise HubError(404, f"Object {oid} not found")
        actual = self.storage.lfs_path(oid).stat().st_size
        if size != actual:
            raise HubError(422, f"Object {oid} has size {actual}, not {size}")
        return json_response({"message": "Object verified"})

    # ================================================================== commit
    def _parse_commit_payload(self, raw: bytes) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
        text = raw.decode("utf-8", "strict") if raw else ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise HubError(400, "Empty commit payload")
        try:
            first = json.loads(lines[0])
        except ValueError:
            raise HubError(400, "Invalid ndjson commit payload") from None
        if len(lines) == 1 and isinstance(first, dict) and "summary" in first:  # legacy JSON payload
            ops = []
            for key, field_name in (
                ("file", "files"),
                ("lfsFile", "lfsFiles"),
                ("deletedFile", "deletedFiles"),
                ("deletedFolder", "deletedFolders"),
            ):
                items = first.get(field_name) or []
                if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                    raise HubError(400, f'"{field_name}" must be a list of objects')
                ops += [(key, i) for i in items]
            return first, ops
        header = None
        ops = []
        for i, line in enumerate(lines):
            try:
                item = json.loads(line) if i else first
            except ValueError:
                raise HubError(400, f"Invalid ndjson line {i + 1}") from None
            if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                raise HubError(400, f"Invalid ndjson line {i + 1}: expected {{'key': ..., 'value': {{...}}}}")
            if item.get("key") == "header":
                if i != 0:
                    raise HubError(400, "The header must be the first line of the payload")
                header = item["value"]
            elif item.get("key") in ("file", "lfsFile", "deletedFile", "deletedFolder"):
                ops.append((item["key"], item["value"]))
            else:
                raise HubError(400, f"Unknown operation {item.get('key')!r} on line {i + 1}")
        if header is None:
            raise HubError(400, "Missing commit header")
        return header, ops

    def commit(self, req: Request, repo: RepoRef, rev: str) -> Response:
        ident = self._require_identity(req, write=True)
        self._load(req, repo)
        create_pr = req.flag("create_pr")
        header, raw_ops = self._parse_commit_payload(req.read_all(MAX_COMMIT_BODY))
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HubError(400, "A commit summary is required")
        description = header.get("description") or ""
        parent = header.get("parentCommit")

        # Validate and stage content (blobs are content-addressed: storing them early is harmless).
        ops: list[tuple[str, str, dict[str, Any] | None]] = []
        missing_lfs = []
        for key, value in raw_ops:
            path = value.get("path")
            try:
                validate_repo_path(path.rstrip("/") if key == "deletedFolder" and isinstance(path, str) else path)
            except StorageError as e:
                raise HubError(400, str(e)) from None
            if key == "file":
                encoding = value.get("encoding", "base64")
                content = value.get("content", "")
                try:
                    data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
                except (binascii.Error, ValueError, AttributeError):
                    raise HubError(400, f"Invalid base64 content for {path!r}") from None
                if len(data) >= self.lfs_threshold:
                    raise HubError(
                        400, f"{path}: files of {self.lfs_threshold} bytes or more must be uploaded with LFS"
                    )
                if rules.is_binary(data[:512]):
                    raise HubError(400, f"{path}: binary files must be uploaded with LFS, not as regular git files")
                ops.append(("add", path, {"oid": self.storage.put_blob(data), "size": len(data)}))
            elif key == "lfsFile":
                oid = value.get("oid")
                if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not SHA256_RE.match(oid):
                    raise HubError(400, f"{path}: invalid LFS oid")
                if not self.storage.repo_has_lfs(repo, oid):
                    missing_lfs.append(path)
                    continue
                actual = self.storage.lfs_path(oid).stat().st_size
                if value.get("size") is not None and value.get("size") != actual:
                    raise HubError(400, f"{path}: LFS object {oid} has size {actual}, not {value.get('size')}")
                ops.append(("add", path, lfs_tree_entry(oid, actual)))
            elif key == "deletedFile":
                ops.append(("delete", path, None))
            else:
                ops.append(("delete_folder", path.rstrip("/"), None))
        if missing_lfs:
            raise HubError(
                400,
                "Your push was rejected because an LFS pointer pointed to a file that does not exist"
                " (upload it first with the LFS batch API). Offending file(s): " + ", ".join(missing_lfs),
                code="LfsObjectMissing",
            )

        found = self.storage.resolve(repo, rev)
        if found is None:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        kind = found[1]
        pr_num: int | None = None
        if create_pr:
            if kind not in ("branch",):
                raise HubError(400, f"Pull requests can only target a branch, not {rev!r}")
        elif kind == "branch":
            if not self._can_write(ident, repo):
                raise HubError(
                    403, f"You don't have write access to {repo.type} {repo.repo_id} (open a PR with create_pr=1)"
                )
        elif kind == "pr":
            pr_num = int(rev.rsplit("/", 1)[-1])
        else:
            raise HubError(400, f"Invalid rev id: {rev} (commits can only be made to a branch or refs/pr/N)")

        with self.storage.lock(repo):
            if self.storage.get_repo(repo) is None:
                raise _not_found_repo(req)
            head, _ = self._resolve(repo, rev)
            base = head
            if parent:
                if not isinstance(parent, str) or not re.fullmatch(r"[0-9a-f]{5,40}", parent):
                    raise HubError(400, f"Invalid parentCommit {parent!r}")
                if create_pr:
                    matches = [c["sha"] for c in self.storage.history(repo, head) if c["sha"].startswith(parent)]
                    if len(matches) != 1:
                        raise HubError(412, f"parentCommit {parent} is not an ancestor of {rev}")
                    base = matches[0]
                elif not head.startswith(parent):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            disc = None
            if pr_num is not None:
                disc = self.storage.get_discussion(repo, pr_num)
                if disc is None or not disc.get("isPullRequest"):
                    raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
                if disc["status"] not in ("open", "draft"):
                    raise HubError(400, f"Pull request #{pr_num} is {disc['status']}: it cannot receive commits")
                if not (self._can_write(ident, repo) or disc["author"]["name"] == ident.user):
                    raise HubError(403, f"Only the author of PR #{pr_num} or repo writers can push to it")

            tree = dict(self._tree(repo, base))
            for action, path, entry in ops:
                if action == "add":
                    tree[path] = entry  # type: ignore[assignment]
                elif action == "delete":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                    del tree[path]
                else:
                    doomed = [p for p in tree if p.startswith(path + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                    for p in doomed:
                        del tree[p]
            conflicts = [p for p in tree if any(q.startswith(p + "/") for q in tree)]
            if conflicts:
                raise HubError(400, f"Path conflict: {conflicts[0]} is both a file and a folder")
            readme = tree.get("README.md")
            if readme is not None and readme != self._tree(repo, base).get("README.md"):
                text = self._regular_text(readme, limit=self.lfs_threshold)
                errors = rules.validate_readme(text)[0] if text is not None else []
                if errors:
                    raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))

            sha = self.storage.write_commit(
                repo, parents=[base], tree=tree, title=summary.strip(), message=description, authors=[ident.user]
            )
            refs = self.storage.read_refs(repo)
            pr_url = None
            if create_pr:
                pr_num = self.storage.next_discussion_num(repo)
                disc = self._new_discussion(
                    repo, pr_num, summary.strip(), ident, description or summary.strip(), pull_request=True
                )
                disc["status"] = "open"
                disc["changes"] = {"base": f"refs/heads/{rev.removeprefix('refs/heads/')}"}
                disc["_baseCommit"] = base
                disc["events"].append(self._commit_event(ident, summary.strip(), sha))
                self.storage.save_discussion(repo, disc)
                refs["pr"][str(pr_num)] = sha
                pr_url = f"{self._repo_url(req, repo)}/discussions/{pr_num}"
            elif kind == "branch":
                refs["heads"][rev.removeprefix("refs/heads/")] = sha
            else:
                assert disc is not None and pr_num is not None
                disc["events"].append(self._commit_event(ident, summary.strip(), sha))
                self.storage.save_discussion(repo, disc)
                refs["pr"][str(pr_num)] = sha
                pr_url = f"{self._repo_url(req, repo)}/discussions/{pr_num}"
            self.storage.write_refs(repo, refs)  # <- the commit becomes visible here (atomic rename)
        return json_response(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._repo_url(req, repo)}/commit/{sha}",
                "commitMessage": summary.strip(),
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    # ================================================================== downloads
    def resolve_file(self, req: Request, repo: RepoRef, rev: str, path: str, *, raw: bool = False) -> Response:
        self._load(req, repo)
        sha, _ = self._resolve(repo, rev)
        entry = self._tree(repo, sha).get(path)
        if entry is None:
            raise HubError(
                404, f"Entry not found: {path} at {rev}", code="EntryNotFound", headers={"X-Repo-Commit": sha}
            )
        headers = {
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
            "Cache-Control": "private, max-age=0" if sha != rev else "public, max-age=31536000, immutable",
        }
        if entry.get("lfs") and raw:
            body = lfs_pointer(entry["lfs"]["oid"], entry["lfs"]["size"])
            headers["ETag"] = f'"{entry["oid"]}"'
            return Response(status=200, body=body, headers=headers)
        if entry.get("lfs"):
            etag = entry["lfs"]["oid"]  # sha256 for LFS files, like the Hub
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(entry["lfs"]["size"])
        else:
            etag = entry["oid"]  # git blob sha1 for regular files
        headers["ETag"] = f'"{etag}"'
        file_path, size = self.storage.open_entry(entry)
        start, end = 0, size - 1
        status = 200
        range_header = req.headers.get("Range")
        if range_header:
            rng = _parse_range(range_header, size)
            if rng is None:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            start, end = rng
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return Response(status=status, headers=headers, file=file_path, offset=start, length=max(0, end - start + 1))

    # ================================================================== discussions
    def _author(self, ident: Identity) -> dict[str, Any]:
        return {"name": ident.user, "fullname": ident.user, "type": "user", "avatarUrl": "", "isOwner": False}

    def _comment_event(self, ident: Identity, raw: str) -> dict[str, Any]:
        now = utcnow_iso()
        latest = {"raw": raw, "html": _comment_html(raw), "updatedAt": now, "author": {"name": ident.user}}
        return {
            "id": secrets.token_hex(12),
            "type": "comment",
            "createdAt": now,
            "author": self._author(ident),
            "data": {
                "edited": False,
                "hidden": False,
                "latest": latest,
                "numEdits": 0,
                "editors": [ident.user],
                "editReactions": [],
                "reactions": [],
                "identifiedLanguage": {"language": "en", "probability": 1.0},
                "isReport": False,
                "history": [dict(latest)],
            },
        }

    def _event(self, ident: Identity, etype: str, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": secrets.token_hex(12),
            "type": etype,
            "createdAt": utcnow_iso(),
            "author": self._author(ident),
            "data": data,
        }

    def _commit_event(self, ident: Identity, subject: str, oid: str) -> dict[str, Any]:
        return self._event(ident, "commit", {"subject": subject, "oid": oid})

    def _new_discussion(
        self, repo: RepoRef, num: int, title: str, ident: Identity, description: str, *, pull_request: bool
    ) -> dict[str, Any]:
        return {
            "num": num,
            "title": title,
            "status": "draft" if pull_request else "open",
            "isPullRequest": pull_request,
            "createdAt": utcnow_iso(),
            "author": self._author(ident),
            "repo": {"name": repo.repo_id, "type": repo.type},
            "pinned": False,
            "locked": False,
            "events": [self._comment_event(ident, description)],
        }

    def _get_discussion(self, req: Request, repo: RepoRef, num: int) -> dict[str, Any]:
        self._load(req, repo)
        disc = self.storage.get_discussion(repo, num)
        if disc is None:
            raise HubError(404, f"Discussion #{num} not found")
        return disc

    @staticmethod
    def _public(disc: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in disc.items() if not k.startswith("_")}

    def _pr_state(self, repo: RepoRef, disc: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict, dict]:
        """(merged tree, conflicting files, base tree, PR tree) of a pull request against its target branch."""
        refs = self.storage.read_refs(repo)
        target = disc["changes"]["base"].removeprefix("refs/heads/")
        ours_sha = refs["heads"].get(target)
        theirs_sha = refs["pr"].get(str(disc["num"]))
        if ours_sha is None or theirs_sha is None:
            raise HubError(400, f"Target branch {target!r} or PR ref is missing")
        base = self._tree(repo, disc.get("_baseCommit") or ours_sha)
        ours, theirs = self._tree(repo, ours_sha), self._tree(repo, theirs_sha)
        merged: dict[str, Any] = {}
        conflicts = []
        for path in sorted(set(base) | set(ours) | set(theirs)):
            b, o, t = base.get(path), ours.get(path), theirs.get(path)
            if t == b:
                result = o
            elif o == b or o == t:
                result = t
            else:
                conflicts.append(path)
                result = o
            if result is not None:
                merged[path] = result
        return merged, conflicts, ours, theirs

    def _diff(self, before: dict[str, Any], after: dict[str, Any]) -> str:
        chunks = []
        for path in sorted(set(before) | set(after)):
            b, a = before.get(path), after.get(path)
            if b == a:
                continue
            chunks.append(f"diff --git a/{path} b/{path}\n")
            bt, at = self._regular_text(b) if b else "", self._regular_text(a) if a else ""
            if bt is None or at is None:
                chunks.append("Binary files differ\n")
                continue
            chunks.extend(
                difflib.unified_diff(
                    bt.splitlines(keepends=True),
                    at.splitlines(keepends=True),
                    fromfile=f"a/{path}" if b else "/dev/null",
                    tofile=f"b/{path}" if a else "/dev/null",
                )
            )
        return "".join(chunks)

    def list_discussions(self, req: Request, repo: RepoRef) -> Response:
        self._load(req, repo)
        dtype, status, author = req.q("type", "all"), req.q("status", "all"), req.q("author")
        items = []
        for d in self.storage.list_discussions(repo):
            if (dtype == "pull_request" and not d["isPullRequest"]) or (dtype == "discussion" and d["isPullRequest"]):
                continue
            if status == "open" and d["status"] not in ("open", "draft"):
                continue
            if status == "closed" and d["status"] not in ("closed", "merged"):
                continue
            if author and d["author"]["name"] != author:
                continue
            items.append(d)
        page = req.int_q("p", 0)
        chunk = items[page * DISCUSSIONS_PAGE : (page + 1) * DISCUSSIONS_PAGE]
        out = [
            {
                "num": d["num"],
                "title": d["title"],
                "status": d["status"],
                "isPullRequest": d["isPullRequest"],
                "createdAt": d["createdAt"],
                "author": d["author"],
                "repo": d["repo"],
                "pinned": d.get("pinned", False),
                "numComments": sum(1 for e in d["events"] if e["type"] == "comment"),
                "topReactions": [],
            }
            for d in chunk
        ]
        return json_response(
            {
                "discussions": out,
                "count": len(items),
                "start": page * DISCUSSIONS_PAGE,
                "numClosedDiscussions": sum(1 for d in items if d["status"] in ("closed", "merged")),
            }
        )

    def discussion_details(self, req: Request, repo: RepoRef, num: int) -> Response:
        disc = self._get_discussion(req, repo, num)
        out = self._public(disc)
        if disc["isPullRequest"]:
            conflicts_out: list[str] | bool = []
            if disc["status"] in ("open", "draft"):
                try:
                    with self.storage.lock(repo):
                        _merged, conflicts, _ours, theirs = self._pr_state(repo, disc)
                    conflicts_out = conflicts
                    if req.flag("diff"):
                        base_sha = disc.get("_baseCommit") or self.storage.read_refs(repo)["heads"]["main"]
                        out["diff"] = self._diff(self._tree(repo, base_sha), theirs)
                except HubError:  # target branch deleted: conflicts can't be computed (community.py allows True)
                    conflicts_out = True
            out["filesWithConflicts"] = conflicts_out
        return json_response(out)

    def create_discussion(self, req: Request, repo: RepoRef) -> Response:
        ident = self._require_identity(req, write=True)
        self._load(req, repo)
        body = req.json()
        title = str(body.get("title") or "").strip()
        if len(title) < 3:
            raise HubError(400, "The title must be at least 3 characters long")
        description = str(body.get("description") or "").strip() or title
        pull_request = _parse_bool(body.get("pullRequest", False))
        with self.storage.lock(repo):
            num = self.storage.next_discussion_num(repo)
            disc = self._new_discussion(repo, num, title, ident, description, pull_request=pull_request)
            if pull_request:
                refs = self.storage.read_refs(repo)
                head = refs["heads"]["main"]
                disc["changes"] = {"base": "refs/heads/main"}
                disc["_baseCommit"] = head
                self.storage.save_discussion(repo, disc)
                refs["pr"][str(num)] = head
                self.storage.write_refs(repo, refs)
            else:
                self.storage.save_discussion(repo, disc)
        return json_response({"num": num, "url": f"{self._repo_url(req, repo)}/discussions/{num}"})

    def _mutate_discussion(
        self, req: Request, repo: RepoRef, num: int, fn: Callable[[Identity, dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any]:
        ident = self._require_identity(req, write=True)
        with self.storage.lock(repo):
            disc = self._get_discussion(req, repo, num)
            result = fn(ident, disc)
            self.storage.save_discussion(repo, disc)
        return result

    def discussion_comment(self, req: Request, repo: RepoRef, num: int) -> Response:
        body = req.json()
        comment = str(body.get("comment") or "").strip()
        if not comment:
            raise HubError(400, "The comment can't be empty")

        def fn(ident: Identity, disc: dict[str, Any]) -> dict[str, Any]:
            if disc.get("locked"):
                raise HubError(403, "This discussion is locked")
            event = self._comment_event(ident, comment)
            disc["events"].append(event)
            return event

        return json_response({"newMessage": self._mutate_discussion(req, repo, num, fn)})

    def _author_or_writer(self, ident: Identity, repo: RepoRef, disc: dict[str, Any]) -> None:
        if not (disc["author"]["name"] == ident.user or self._can_write(ident, repo)):
            raise HubError(403, "Only the author or repo writers can do this")

    def discussion_title(self, req: Request, repo: RepoRef, num: int) -> Response:
        title = str(req.json().get("title") or "").strip()
        if len(title) < 3:
            raise HubError(400, "The title must be at least 3 characters long")

        def fn(ident: Identity, disc: dict[str, Any]) -> dict[str, Any]:
            self._author_or_writer(ident, repo, disc)
            event = self._event(ident, "title-change", {"from": disc["title"], "to": title})
            disc["title"] = title
            disc["events"].append(event)
            return event

        return json_response({"newTitle": self._mutate_discussion(req, repo, num, fn)})

    def discussion_status(self, req: Request, repo: RepoRef, num: int) -> Response:
        body = req.json()
        status = body.get("status")
        if status not in ("open", "closed"):
            raise HubError(400, "status must be 'open' or 'closed'")
        comment = str(body.get("comment") or "").strip()

        def fn(ident: Identity, disc: dict[str, Any]) -> dict[str, Any]:
            self._author_or_writer(ident, repo, disc)
            if disc["status"] == "merged":
                raise HubError(400, "A merged pull request can't change status")
            if comment:
                disc["events"].append(self._comment_event(ident, comment))
            event = self._event(ident, "status-change", {"status": status})
            disc["status"] = status
            disc["events"].append(event)
            return event

        return json_response({"newStatus": self._mutate_discussion(req, repo, num, fn)})

    def discussion_comment_change(self, req: Request, repo: RepoRef, num: int, comment_id: str, op: str) -> Response:
        content = str(req.json().get("content") or "") if op == "edit" else ""
        if op == "edit" and not content.strip():
            raise HubError(400, "The comment can't be empty")

        def fn(ident: Identity, disc: dict[str, Any]) -> dict[str, Any]:
            event = next((e for e in disc["events"] if e["id"] == comment_id and e["type"] == "comment"), None)
            if event is None:
                raise HubError(404, f"Comment {comment_id} not found")
            data = event["data"]
            if op == "edit":
                if event["author"]["name"] != ident.user:
                    raise HubError(403, "Only the author of a comment can edit it")
                if data["hidden"]:
                    raise HubError(400, "A hidden comment can't be edited")
                latest = {
                    "raw": content,
                    "html": _comment_html(content),
                    "updatedAt": utcnow_iso(),
                    "author": {"name": ident.user},
                }
                data["latest"] = latest
                data["edited"] = True
                data["numEdits"] = data.get("numEdits", 0) + 1
                data["history"] = [dict(latest), *data.get("history", [])]
            else:
                if not (event["author"]["name"] == ident.user or self._can_write(ident, repo)):
                    raise HubError(403, "Only the author or repo writers can hide a comment")
                data["hidden"] = True
                data["latest"] = {**data["latest"], "raw": "", "html": ""}
                data["history"] = []
            return event

        return json_response({"updatedComment": self._mutate_discussion(req, repo, num, fn)})

    def merge_pull_request(self, req: Request, repo: RepoRef, num: int) -> Response:
        ident = self._require_repo_write(req, repo)
        body = req.json(required=False) or {}
        with self.storage.lock(repo):
            disc = self._get_discussion(req, repo, num)
            if not disc["isPullRequest"]:
                raise HubError(400, f"#{num} is not a pull request")
            if disc["status"] not in ("open", "draft"):
                raise HubError(400, f"Pull request #{num} is {disc['status']}")
            merged, conflicts, _ours, _theirs = self._pr_state(repo, disc)
            if conflicts:
                raise HubError(
                    409, "Merge conflict in: " + ", ".join(conflicts), extra={"filesWithConflicts": conflicts}
                )
            refs = self.storage.read_refs(repo)
            target = disc["changes"]["base"].removeprefix("refs/heads/")
            subjects = [e["data"]["subject"] for e in disc["events"] if e["type"] == "commit"]
            sha = self.storage.write_commit(
                repo,
                parents=[refs["heads"][target]],
                tree=merged,
                title=f"{disc['title']} (#{num})",
                message="\n".join(f"- {s}" for s in subjects),
                authors=sorted({disc["author"]["name"], ident.user}),
            )
            if body.get("comment"):
                disc["events"].append(self._comment_event(ident, str(body["comment"])))
            disc["events"].append(self._event(ident, "status-change", {"status": "merged"}))
            disc["status"] = "merged"
            disc["changes"]["mergeCommitId"] = sha
            self.storage.save_discussion(repo, disc)
            refs["heads"][target] = sha
            self.storage.write_refs(repo, refs)
        return json_response({"mergeCommitId": sha})

    # ================================================================== admin (/_devhub/...)
    def _route_admin(self, req: Request, segs: list[str]) -> Response:
        m = req.method
        if segs == ["health"] and m == "GET":
            return json_response({"ok": True})
        if len(segs) >= 2 and segs[0] == "lfs":
            if segs[1] == "upload" and m == "PUT":
                return self.lfs_upload(req, segs[2:])
            if segs[1] == "verify" and m == "POST":
                return self.lfs_verify(req, segs[2:])
            raise HubError(404, "Not found")
        ident = req.identity
        if ident is None:
            raise HubError(401, "The admin API needs the dev Hub's write token")
        if not ident.admin:
            raise HubError(403, "The admin API needs the dev Hub's write token")
        if segs == ["faults"]:
            if m == "GET":
                return json_response({"faults": self.faults.list()})
            if m == "DELETE":
                self.faults.clear()
                return json_response({"faults": []})
            if m == "POST":
                body = req.json()
                specs = body if isinstance(body, list) else [body]
                try:
                    rules_ = [self.faults.add(**spec) for spec in specs]
                except (TypeError, ValueError, re.error) as e:
                    raise HubError(400, f"Invalid fault rule: {e}") from None
                return json_response({"faults": [r.public() for r in rules_]})
        if len(segs) == 2 and segs[0] == "faults" and m == "DELETE":
            if not self.faults.remove(int(segs[1]) if segs[1].isdigit() else -1):
                raise HubError(404, "No such fault rule")
            return json_response({})
        if segs == ["requests"]:
            if m == "GET":
                since = req.int_q("since", 0)
                entries = self.request_log.entries(method=req.q("method"), path=req.q("path"), since=since)
                return json_response({"requests": entries, "lastId": self.request_log.last_id()})
            if m == "DELETE":
                self.request_log.clear()
                return json_response({})
        raise HubError(404, f"No admin route for {m} {req.raw_path}")


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """Single `bytes=a-b` / `bytes=a-` / `bytes=-n` range -> inclusive (start, end); None if unsatisfiable."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value, re.IGNORECASE)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):
        n = int(m.group(2))
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)
