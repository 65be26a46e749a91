"""On-disk, content-addressed storage for the dev Hub.

Layout under ``root``::

    objects/lfs/ab/cd/<sha256>        LFS objects (content addressed, shared by all repos)
    objects/blobs/ab/<git-sha1>       regular-file blobs (git blob sha1 of the content, shared)
    repos/<type>s/<ns>/<name>/
        repo.json                     repo metadata (private, owner, createdAt, ...)
        refs.json                     {"heads": {...}, "tags": {...}, "pr": {"1": sha}, "tag_messages": {...}}
        commits/<sha>.json            immutable commit objects: parents, tree, title, message, authors, date
        lfs/<sha256>                  empty marker: the object was uploaded to (or is referenced by) this repo
        discussions/<num>.json        discussions and pull requests, with their events
    tmp/                              in-flight uploads and temp files of atomic writes
    trash/                            deleted repos, removed right after the rename

Every write is atomic (write to a temp file, fsync, ``os.replace``). Mutations of a repo (refs, discussions) happen
under a per-repo lock; a commit object is written before the ref that points to it moves, so readers never see a
ref to a missing commit and a crash in between leaves only an unreferenced (harmless) commit file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

REPO_TYPES = ("model", "dataset", "space")
RESERVED_NAMESPACES = frozenset({"api", "datasets", "spaces", "models", "_devhub", "docs", "settings", "new"})
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
LFS_POINTER_TEMPLATE = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"

# What the Hub puts in the `.gitattributes` of every new repo (initial "system" commit).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip


class StorageError(Exception):
    """Raised for invalid input to the storage layer (bad names, bad paths, size/hash mismatches)."""


def utcnow_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob (what the Hub reports as `oid`/`blobId` of a file)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return LFS_POINTER_TEMPLATE.format(oid=oid, size=size).encode()


def lfs_tree_entry(oid: str, size: int) -> dict[str, Any]:
    pointer = lfs_pointer(oid, size)
    return {"oid": git_blob_sha1(pointer), "size": size, "lfs": {"oid": oid, "size": size, "pointerSize": len(pointer)}}


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def validate_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value) or "--" in value or ".." in value:
        raise StorageError(f"Invalid {what} {value!r}: use letters, digits, '-', '_', '.' (max 96 chars)")
    return value


def validate_repo_path(path: str) -> str:
    """Validate a file path inside a repo (posix, relative, no `..`, nothing under `.git/`)."""
    if not isinstance(path, str) or not path or len(path) > 1024:
        raise StorageError(f"Invalid path in repo: {path!r}")
    if "\0" in path or "\\" in path or path.startswith("/") or path.endswith("/"):
        raise StorageError(f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise StorageError(f"Invalid path in repo: {path!r}")
    return path


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class RepoRef:
    """Identifies a repo: type is singular ("model", "dataset", "space")."""

    type: str
    namespace: str
    name: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def key(self) -> str:
        return f"{self.type}s/{self.namespace}/{self.name}"

    @property
    def url_prefix(self) -> str:
        """Prefix used in web/resolve URLs ("" for models, "datasets/" for datasets, ...)."""
        return "" if self.type == "model" else f"{self.type}s/"


class Storage:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()
        for sub in ("objects/lfs", "objects/blobs", "repos", "tmp", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()

    # ------------------------------------------------------------------ helpers
    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def _tmp_path(self, prefix: str = "w") -> Path:
        return self.tmp_dir / f"{prefix}-{uuid.uuid4().hex}"

    def atomic_write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            _fsync_write(tmp, data)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def atomic_write_json(self, path: Path, obj: Any) -> None:
        self.atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())

    @staticmethod
    def read_json(path: Path) -> Any:
        with open(path, "rb") as f:
            return json.load(f)

    @contextlib.contextmanager
    def lock(self, repo: RepoRef) -> Iterator[None]:
        with self._locks_guard:
            lk = self._locks.setdefault(repo.key, threading.RLock())
        with lk:
            yield

    # ------------------------------------------------------------------ repos
    def repo_dir(self, repo: RepoRef) -> Path:
        if repo.type not in REPO_TYPES:
            raise StorageError(f"Invalid repo type {repo.type!r}")
        validate_name(repo.namespace, "namespace")
        validate_name(repo.name, "repo name")
        return self.root / "repos" / f"{repo.type}s" / repo.namespace / repo.name

    def get_repo(self, repo: RepoRef) -> dict[str, Any] | None:
        try:
            path = self.repo_dir(repo) / "repo.json"
        except StorageError:
            return None
        try:
            return self.read_json(path)
        except FileNotFoundError:
            return None

    def list_repos(self) -> list[RepoRef]:
        out = []
        for tdir in sorted((self.root / "repos").iterdir()):
            for nsdir in sorted(tdir.iterdir()):
                for rdir in sorted(nsdir.iterdir()):
                    if (rdir / "repo.json").is_file():
                        out.append(RepoRef(tdir.name[:-1], nsdir.name, rdir.name))
        return out

    def create_repo(
        self, repo: RepoRef, *, private: bool, owner: str, sdk: str | None = None
    ) -> tuple[bool, dict[str, Any]]:
        """Create the repo with the Hub's initial `.gitattributes` commit. Returns (created, meta)."""
        if repo.namespace.lower() in RESERVED_NAMESPACES:
            raise StorageError(f"Namespace {repo.namespace!r} is reserved")
        rdir = self.repo_dir(repo)
        with self.lock(repo):
            existing = self.get_repo(repo)
            if existing is not None:
                return False, existing
            staging = self._tmp_path("repo")
            staging.mkdir(parents=True)
            try:
                (staging / "commits").mkdir()
                (staging / "discussions").mkdir()
                (staging / "lfs").mkdir()
                meta = {
                    "_id": uuid.uuid4().hex[:24],
                    "id": repo.repo_id,
                    "type": repo.type,
                    "private": bool(private),
                    "owner": owner,
                    "createdAt": utcnow_iso(),
                    "sdk": sdk,
                }
                content = DEFAULT_GITATTRIBUTES.encode()
                blob = self.put_blob(content)
                commit = {
                    "parents": [],
                    "tree": {".gitattributes": {"oid": blob, "size": len(content)}},
                    "title": "initial commit",
                    "message": "",
                    "authors": ["system"],
                    "date": meta["createdAt"],
                }
                sha = hashlib.sha1(canonical_json(commit), usedforsecurity=False).hexdigest()
                self.atomic_write(staging / "commits" / f"{sha}.json", canonical_json({**commit, "sha": sha}))
                self.atomic_write_json(staging / "refs.json", {"heads": {"main": sha}, "tags": {}, "pr": {}})
                self.atomic_write_json(staging / "repo.json", meta)
                rdir.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging, rdir)  # atomic publication of the whole repo
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
            return True, meta

    def update_repo(self, repo: RepoRef, **changes: Any) -> dict[str, Any]:
        with self.lock(repo):
            meta = self.get_repo(repo)
            if meta is None:
                raise KeyError(repo.key)
            meta.update(changes)
            self.atomic_write_json(self.repo_dir(repo) / "repo.json", meta)
            return meta

    def delete_repo(self, repo: RepoRef) -> bool:
        with self.lock(repo):
            if self.get_repo(repo) is None:
                return False
            trash = self.root / "trash" / uuid.uuid4().hex
            os.rename(self.repo_dir(repo), trash)  # atomic disappearance
        shutil.rmtree(trash, ignore_errors=True)
        return True

    # ------------------------------------------------------------------ refs
    def read_refs(self, repo: RepoRef) -> dict[str, dict[str, str]]:
        refs = self.read_json(self.repo_dir(repo) / "refs.json")
        refs.setdefault("tag_messages", {})
        return refs

    def write_refs(self, repo: RepoRef, refs: dict[str, Any]) -> None:
        self.atomic_write_json(self.repo_dir(repo) / "refs.json", refs)

    def resolve(self, repo: RepoRef, rev: str) -> tuple[str, str] | None:
        """Resolve a revision to (commit sha, kind) where kind is 'branch', 'tag', 'pr' or 'commit'."""
        refs = self.read_refs(repo)
        if rev in refs["heads"]:
            return refs["heads"][rev], "branch"
        if rev in refs["tags"]:
            return refs["tags"][rev], "tag"
        for prefix, table, kind in (("refs/heads/", "heads", "branch"), ("refs/tags/", "tags", "tag")):
            if rev.startswith(prefix) and rev[len(prefix) :] in refs[table]:
                return refs[table][rev[len(prefix) :]], kind
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and m.group(1) in refs["pr"]:
            return refs["pr"][m.group(1)], "pr"
        if SHA1_RE.match(rev) and self.has_commit(repo, rev):
            return rev, "commit"
        return None

    # ------------------------------------------------------------------ commits
    def has_commit(self, repo: RepoRef, sha: str) -> bool:
        return bool(SHA1_RE.match(sha)) and (self.repo_dir(repo) / "commits" / f"{sha}.json").is_file()

    def read_commit(self, repo: RepoRef, sha: str) -> dict[str, Any]:
        if not SHA1_RE.match(sha):
            raise KeyError(sha)
        try:
            return self.read_json(self.repo_dir(repo) / "commits" / f"{sha}.json")
        except FileNotFoundError:
            raise KeyError(sha) from None

    def write_commit(
        self,
        repo: RepoRef,
        *,
        parents: list[str],
        tree: dict[str, dict[str, Any]],
        title: str,
        message: str,
        authors: list[str],
    ) -> str:
        """Write an immutable commit object; its sha is the sha1 of its canonical JSON."""
        commit = {
            "parents": list(parents),
            "tree": tree,
            "title": title,
            "message": message,
            "authors": list(authors),
            "date": utcnow_iso(),
        }
        sha = hashlib.sha1(canonical_json(commit), usedforsecurity=False).hexdigest()
        path = self.repo_dir(repo) / "commits" / f"{sha}.json"
        if not path.exists():
            self.atomic_write(path, canonical_json({**commit, "sha": sha}))
        return sha

    def history(self, repo: RepoRef, head: str) -> list[dict[str, Any]]:
        """All ancestors of `head` (inclusive), newest first."""
        seen: dict[str, dict[str, Any]] = {}
        stack = [head]
        while stack:
            sha = stack.pop()
            if sha in seen:
                continue
            commit = self.read_commit(repo, sha)
            seen[sha] = commit
            stack.extend(commit["parents"])
        return sorted(seen.values(), key=lambda c: (c["date"], c["sha"]), reverse=True)

    # ------------------------------------------------------------------ blobs (regular files)
    def blob_path(self, sha1: str) -> Path:
        if not SHA1_RE.match(sha1):
            raise StorageError(f"Invalid blob id {sha1!r}")
        return self.root / "objects" / "blobs" / sha1[:2] / sha1

    def put_blob(self, data: bytes) -> str:
        sha1 = git_blob_sha1(data)
        path = self.blob_path(sha1)
        if not path.exists():
            self.atomic_write(path, data)
        return sha1

    # ------------------------------------------------------------------ LFS objects
    def lfs_path(self, oid: str) -> Path:
        if not SHA256_RE.match(oid):
            raise StorageError(f"Invalid LFS oid {oid!r}")
        return self.root / "objects" / "lfs" / oid[:2] / oid[2:4] / oid

    def has_lfs_object(self, oid: str) -> bool:
        return SHA256_RE.match(oid) is not None and self.lfs_path(oid).is_file()

    def repo_has_lfs(self, repo: RepoRef, oid: str) -> bool:
        return (
            SHA256_RE.match(oid) is not None
            and (self.repo_dir(repo) / "lfs" / oid).is_file()
            and self.has_lfs_object(oid)
        )

    def link_lfs(self, repo: RepoRef, oid: str) -> None:
        marker = self.repo_dir(repo) / "lfs" / oid
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def ingest_lfs(self, stream: BinaryIO, *, oid: str, size: int, chunk: int = 1 << 20) -> int:
        """Stream an upload to a temp file, verify size and sha256, then publish it atomically.

        `stream.read(n)` returns b"" at the end of the body. Raises StorageError on mismatch; nothing is left behind
        on any failure (including the client disconnecting mid-body).
        """
        if not SHA256_RE.match(oid):
            raise StorageError(f"Invalid LFS oid {oid!r}")
        tmp = self._tmp_path("lfs")
        h = hashlib.sha256()
        n = 0
        try:
            with open(tmp, "wb") as f:
                while True:
                    data = stream.read(chunk)
                    if not data:
                        break
                    n += len(data)
                    if n > size:
                        raise StorageError(f"Upload is larger than the declared size ({size} bytes)")
                    h.update(data)
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if n != size:
                raise StorageError(f"Size mismatch: declared {size} bytes, received {n}")
            if h.hexdigest() != oid:
                raise StorageError(f"sha256 mismatch: declared {oid}, received {h.hexdigest()}")
            dest = self.lfs_path(oid)
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
            return n
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # ------------------------------------------------------------------ file content
    def open_entry(self, entry: dict[str, Any]) -> tuple[Path, int]:
        """Path and size of the content of a tree entry."""
        if entry.get("lfs"):
            return self.lfs_path(entry["lfs"]["oid"]), int(entry["lfs"]["size"])
        return self.blob_path(entry["oid"]), int(entry["size"])

    def read_entry(self, entry: dict[str, Any]) -> bytes:
        path, _ = self.open_entry(entry)
        return path.read_bytes()

    # ------------------------------------------------------------------ discussions
    def discussions_dir(self, repo: RepoRef) -> Path:
        return self.repo_dir(repo) / "discussions"

    def list_discussions(self, repo: RepoRef) -> list[dict[str, Any]]:
        ddir = self.discussions_dir(repo)
        items = [self.read_json(p) for p in ddir.glob("*.json")]
        return sorted(items, key=lambda d: d["num"], reverse=True)

    def get_discussion(self, repo: RepoRef, num: int) -> dict[str, Any] | None:
        try:
            return self.read_json(self.discussions_dir(repo) / f"{int(num)}.json")
        except (FileNotFoundError, ValueError):
            return None

    def save_discussion(self, repo: RepoRef, disc: dict[str, Any]) -> None:
        self.atomic_write_json(self.discussions_dir(repo) / f"{int(disc['num'])}.json", disc)

    def next_discussion_num(self, repo: RepoRef) -> int:
        nums = [int(p.stem) for p in self.discussions_dir(repo).glob("*.json") if p.stem.isdigit()]
        return max(nums, default=0) + 1

    def cleanup_tmp(self, older_than: float = 0.0) -> None:
        now = time.time()
        for p in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime >= older_than:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
