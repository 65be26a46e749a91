"""Resolve the action's ``checkpoint`` input to a local path.

- a plain path (relative to the workspace);
- ``release-assets:`` / ``release-assets:PATTERN``: the assets of the triggering GitHub release (fnmatch filter),
  downloaded through the asset API with resume (HTTP ``Range``), size and sha256 verification;
- a URL (``s3://``, ``gs://``, ``hf://``, ``https://``, ``file://``...): copied with fsspec when it is installed.

The GitHub token is only sent in an ``Authorization`` header, to the API host; it never appears in URLs, log records
or messages, and it is dropped when a download is redirected to another origin (GitHub's storage host). Every URL
or exception text in a message goes through ``hubconv.credentials.redact`` (no userinfo, query string or token).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import time
import urllib.parse
from typing import Literal

import requests
from github import GithubException
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from hubconv.credentials import clean_token, redact, redact_url
from hubconv.errors import CheckpointError, HubconvError
from hubconv.github import Bot, GitHubContext, GitHubError
from hubconv.hashing import git_blob_id, sha256_file

log = logging.getLogger(__name__)

RELEASE_ASSETS = "release-assets:"
CHUNK = 1 << 20
MAX_REDIRECTS = 5
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_SHA_LINE = re.compile(r"^\s*([0-9a-fA-F]{64})\s[ *]?(\S.*?)\s*$")
_FSSPEC_EXTRAS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub"}


def resolve_checkpoint(
    spec: str,
    workspace: str,
    *,
    github: GitHubContext | None = None,
    tag: str | None = None,
    dest: str | None = None,
    progress: Progress = True,
    hf_endpoint: str | None = None,
    hf_token: str | None = None,
) -> str:
    """Return a local path for ``spec`` (see the module docstring). ``dest`` is the download folder (default
    ``<workspace>/.hubconv/checkpoint``); ``hf_endpoint``/``hf_token`` are used for ``hf://`` URLs (default: the
    ``HF_ENDPOINT``/``HF_TOKEN`` environment). Raises :class:`CheckpointError` or :class:`GitHubError`."""
    spec = spec.strip()
    if spec.startswith(RELEASE_ASSETS):
        pattern = spec[len(RELEASE_ASSETS) :].strip() or "*"
        if github is None:
            github = GitHubContext.from_env()
        tag = tag or _tag_from_env()
        if not tag:
            raise CheckpointError(
                "checkpoint 'release-assets:' needs a release tag: run on a 'release' event or pass the tag"
            )
        folder = dest or os.path.join(workspace, ".hubconv", "checkpoint")
        return download_release_assets(github, tag, folder, pattern=pattern, progress=progress)
    if _URL_RE.match(spec):
        options = {}
        if spec.lower().startswith("hf://"):
            from hubconv.hub import hub_endpoint

            endpoint = hub_endpoint(hf_endpoint, "hub.endpoint")
            field = "the Hub token" if hf_token else "HF_TOKEN"
            token = clean_token(hf_token or os.environ.get("HF_TOKEN"), field)
            options = {k: v for k, v in (("endpoint", endpoint), ("token", token)) if v}
        folder = dest or os.path.join(workspace, ".hubconv", "checkpoint")
        return _fetch_url(spec, folder, progress=progress, storage_options=options)
    path = spec if os.path.isabs(spec) else os.path.join(workspace, spec)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {spec!r} not found (looked for {path})")
    return path


def _tag_from_env() -> str | None:
    ref = os.environ.get("GITHUB_REF", "")
    return ref[len("refs/tags/") :] if ref.startswith("refs/tags/") else None


def _folder_result(folder: str) -> str:
    files = [f for f in os.listdir(folder) if not f.endswith(".part")]
    if len(files) == 1 and os.path.isfile(os.path.join(folder, files[0])):
        return os.path.join(folder, files[0])
    return folder


# ---------------------------------------------------------------------------------------------- release assets
def parse_sha256sums(text: str | None) -> dict[str, str]:
    """``{file name: sha256}`` from ``sha256sum``-format lines (``<hex>  name`` or ``<hex> *name``) in ``text``.
    A line naming a path (``step-7/x.bin``) gives that path and, unless another line names it, its base name."""
    sums: dict[str, str] = {}
    bare: dict[str, str] = {}
    for line in (text or "").splitlines():
        line = line.strip().strip("`")
        if m := _SHA_LINE.match(line):
            path = m.group(2).strip("`").removeprefix("./")
            sums[path] = m.group(1).lower()
            bare.setdefault(os.path.basename(path), m.group(1).lower())
    return bare | sums


def download_release_assets(
    ctx: GitHubContext, tag: str, dest: str, *, pattern: str = "*", progress: Progress = True, timeout: float = 60.0
) -> str:
    """Download the assets of release ``tag`` matching ``pattern`` into ``dest``; return ``dest``, or the one file."""
    bot = Bot(ctx, max_retries=3, backoff_factor=0.5, seconds_between_requests=None, seconds_between_writes=None)
    try:
        try:
            release = bot._find_release(tag)
            body = release.body or ""
            assets = [a for a in release.get_assets() if fnmatch.fnmatchcase(a.name, pattern)]
            # digest: "sha256:<hex>", null for assets uploaded before GitHub computed it
            plan = [(a.name, a.url, int(a.size), (a.digest or "")) for a in assets]
        except (GithubException, requests.RequestException) as exc:
            raise bot._fail(f"list the assets of release {tag!r} of {ctx.repository}", exc) from None
    finally:
        bot.close()
    if not plan:
        raise CheckpointError(f"release {tag!r} of {ctx.repository} has no asset matching {pattern!r}")
    sums = parse_sha256sums(body)
    os.makedirs(dest, exist_ok=True)
    with _Downloader(ctx, timeout=timeout) as dl, _progress(sum(p[2] for p in plan), progress) as bar:
        for name, url, size, digest in plan:
            expected = sums.get(name)
            if digest.lower().startswith("sha256:"):
                expected = expected or digest.split(":", 1)[1].lower()
            dl.fetch(name, url, size, expected, dest, bar)
    return _folder_result(dest)


Progress = Literal["bar", "log", "none"] | bool  # True = "bar", False = "none"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _LogProgress(_NoBar):
    """Progress as plain lines for CI logs (a redrawn bar is unreadable there): every 10 % or 30 s, and at the end."""

    def __init__(self, total: int, label: str = "checkpoint", clock=time.monotonic) -> None:
        self.total, self.label, self.clock = total, label, clock
        self.done = 0
        self.t0 = self.last_t = clock()
        self.last_pct = 0

    def update(self, n: int) -> None:
        self.done += n
        pct = 100 * self.done // self.total if self.total else 100
        now = self.clock()
        if pct >= self.last_pct + 10 or now - self.last_t >= 30:
            self._line(pct, now)

    def _line(self, pct: int, now: float) -> None:
        self.last_pct, self.last_t = pct - pct % 10, now
        rate = self.done / max(now - self.t0, 1e-9) / 2**20
        print(f"{self.label}: {self.done:,} / {self.total:,} bytes ({pct}%, {rate:.1f} MiB/s)", flush=True)

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None and self.last_pct < 100:
            self._line(100 * self.done // self.total if self.total else 100, self.clock())


def _progress(total: int, mode: Progress):
    mode = {True: "bar", False: "none"}.get(mode, mode)  # type: ignore[arg-type]
    if mode == "log":
        return _LogProgress(total)
    if mode != "bar":
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="checkpoint")


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class _Downloader:
    def __init__(self, ctx: GitHubContext, timeout: float) -> None:
        self.ctx = ctx
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # no .netrc credentials; we handle auth ourselves
        retry = Retry(total=3, backoff_factor=0.5, status_forcelist=(500, 502, 503, 504), allowed_methods={"GET"})
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def __enter__(self) -> _Downloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.close()

    def _scrub(self, text: str) -> str:
        return redact(text, self.ctx.token)

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        """GET with redirects followed by hand: the token goes only to the API's origin."""
        api_origin = _origin(self.ctx.api_url)
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = dict(headers)
            if _origin(url) == api_origin:
                hdrs["Authorization"] = f"Bearer {self.ctx.token}"
            resp = self.session.get(url, headers=hdrs, stream=True, allow_redirects=False, timeout=self.timeout)
            if resp.status_code in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                url = urllib.parse.urljoin(url, resp.headers["Location"])
                resp.close()
                continue
            return resp
        raise GitHubError("asset download: too many redirects")

    def fetch(self, name: str, url: str, size: int, sha256: str | None, dest: str, bar) -> None:
        if name != os.path.basename(name) or name in ("", ".", ".."):
            raise CheckpointError(f"release asset has an unsafe name: {name!r}")
        final = os.path.join(dest, name)
        part = final + ".part"
        expected = ("sha256", sha256) if sha256 else None
        if _already_complete(final, size, expected, bar, label=f"release asset {name}"):
            return
        have = os.path.getsize(part) if os.path.isfile(part) else 0
        if have > size:
            os.remove(part)
            have = 0
        if have < size or size == 0:
            have = self._stream(name, url, size, part, have, bar)
        else:
            bar.update(have)
        got = os.path.getsize(part)
        if got != size:
            os.remove(part)
            raise CheckpointError(f"release asset {name}: downloaded {got} bytes, expected {size}; removed it")
        if sha256 is not None:
            actual = sha256_file(part)
            if actual != sha256:
                os.remove(part)
                raise CheckpointError(
                    f"release asset {name}: sha256 mismatch (expected {sha256}, got {actual}); removed the file"
                )
        os.replace(part, final)
        log.info("downloaded release asset %s (%d bytes)", name, size)

    def _stream(self, name: str, url: str, size: int, part: str, have: int, bar) -> int:
        headers = {"Accept": "application/octet-stream"}
        if have:
            headers["Range"] = f"bytes={have}-"
            log.info("resuming release asset %s at byte %d of %d", name, have, size)
        try:
            resp = self._get(url, headers)
            with resp:
                if resp.status_code == 416 and have:  # stale/odd partial file: start over
                    os.remove(part)
                    return self._stream(name, url, size, part, 0, bar)
                if resp.status_code == 206:
                    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != have:
                        raise CheckpointError(f"release asset {name}: server answered an unexpected byte range")
                    mode = "ab"
                elif resp.status_code == 200:
                    have, mode = 0, "wb"  # range ignored: whole file again
                else:
                    raise GitHubError(f"release asset {name}: download failed: HTTP {resp.status_code}")
                bar.update(have)
                with open(part, mode) as f:
                    for chunk in resp.iter_content(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
        except requests.RequestException as exc:
            # keep the .part for a later resume; scrub in case a library put a header in the text
            raise GitHubError(
                self._scrub(f"release asset {name}: download failed: {type(exc).__name__}: {exc}")
            ) from None
        return have


# ---------------------------------------------------------------------------------------------- URLs (fsspec)
# Checksum lists published beside a checkpoint (sha256sum format); they are read, not downloaded.
SUMS_FILES = ("SHA256SUMS", "SHA256SUMS.txt", "sha256sums.txt", "checksums.sha256")


def _fetch_url(url: str, dest: str, *, progress: Progress = True, storage_options: dict | None = None) -> str:
    """Copy the file or folder at ``url`` into ``dest`` with fsspec: resumable, size- and checksum-verified."""
    scheme = url.split("://", 1)[0].lower()
    try:
        import fsspec
    except ImportError:
        extra = _FSSPEC_EXTRAS.get(scheme)
        pkgs = "fsspec" + (f" {extra}" if extra else "") + (" aiohttp" if scheme in ("http", "https") else "")
        raise CheckpointError(f"checkpoint URL {_redact(url)} needs the 'fsspec' package: pip install {pkgs}") from None
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        # HTTP has no folders: fsspec answers isdir() by fetching the URL and parsing links out of the body, which
        # for a server that sends no Content-Type means reading a whole checkpoint into memory. A URL is a file unless
        # it ends with "/" (then an HTML index is listed).
        is_folder = url.endswith("/") if scheme in ("http", "https") else fs.isdir(root.rstrip("/") or root)
        root = root.rstrip("/") or root
        if is_folder:
            infos = {p: i for p, i in fs.find(root, detail=True).items() if i.get("type") != "directory"}
            base = root
        else:
            infos = {root: fs.info(root)}
            base = _parent(root)
        sums = _remote_sums(fs, base, infos)
        rels = {src: _relpath(src, base) for src in infos}
        names = set(rels.values())
        plan = []
        for src, info in sorted(infos.items()):
            rel = rels[src]
            if os.path.basename(rel) in SUMS_FILES or (rel.endswith(".sha256") and rel[: -len(".sha256")] in names):
                continue  # checksum lists are read, not downloaded
            plan.append((src, rel, info, _expected_checksum(info, rel, sums)))
        if not plan:
            raise CheckpointError(f"checkpoint URL {_redact(url)} is an empty folder")
        with _progress(sum(int(i.get("size") or 0) for _, _, i, _ in plan), progress) as bar:
            for src, rel, info, expected in plan:
                target = os.path.join(dest, *rel.split("/"))
                _copy_resumable(fs, src, target, info.get("size"), expected, bar, label=f"{_redact(url)}: {rel}")
    except ImportError as exc:  # fsspec knows the scheme but its backend is missing
        extra = _FSSPEC_EXTRAS.get(scheme, str(exc))
        raise CheckpointError(f"checkpoint URL {_redact(url)}: pip install {extra} ({redact(str(exc))})") from None
    except HubconvError:
        raise
    except Exception as exc:  # fsspec backends raise their own types (aiohttp, botocore, gcsfs...)
        text = redact(" ".join(f"{type(exc).__name__}: {exc}".split()), (storage_options or {}).get("token"))
        raise CheckpointError(f"checkpoint URL {_redact(url)}: copy failed: {text}") from None
    return _folder_result(dest)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _relpath(path: str, base: str) -> str:
    if base and path.startswith(base.rstrip("/") + "/"):
        path = path[len(base.rstrip("/")) + 1 :]
    else:
        path = path.rsplit("/", 1)[-1]
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CheckpointError(f"checkpoint URL lists an unsafe file name: {path!r}")
    return path


def _remote_sums(fs, base: str, infos: dict[str, dict]) -> dict[str, dict[str, str]]:
    """Checksums published beside the files: ``SHA256SUMS``-style lists in ``base`` and ``<file>.sha256``."""
    listed: dict[str, str] = {}  # relative path and bare name -> sha256
    sidecars: dict[str, str] = {}  # "<relative path>.sha256" -> sha256
    for name in SUMS_FILES:
        path = f"{base}/{name}" if base else name
        if path in infos or (len(infos) == 1 and fs.exists(path)):
            listed |= parse_sha256sums(fs.cat_file(path).decode("utf-8", "replace"))
    for src in list(infos):
        side = src + ".sha256"
        if side in infos or (len(infos) == 1 and fs.exists(side)):
            text = fs.cat_file(side).decode("utf-8", "replace").split()
            if text and re.fullmatch(r"[0-9a-fA-F]{64}", text[0]):
                sidecars[_relpath(side, base)] = text[0].lower()
    return {"listed": listed, "sidecars": sidecars}


def _expected_checksum(info: dict, rel: str, sums: dict[str, dict[str, str]]) -> tuple[str, str] | None:
    """(kind, hex) to verify ``rel`` against: the Hub's LFS sha256 or git blob id, else a published sha256."""
    lfs = info.get("lfs")
    if isinstance(lfs, dict) and lfs.get("sha256"):
        return "sha256", str(lfs["sha256"]).lower()
    if sha := sums["sidecars"].get(rel + ".sha256"):
        return "sha256", sha
    listed = sums["listed"]
    if sha := listed.get(rel) or listed.get(os.path.basename(rel)):  # as listed, or by base name
        return "sha256", sha
    if isinstance(info.get("blob_id"), str) and re.fullmatch(r"[0-9a-f]{40}", info["blob_id"]):
        return "git-blob", info["blob_id"]  # hf:// regular (non-LFS) file
    return None


def _already_complete(path: str, size: int | None, expected: tuple[str, str] | None, bar, *, label: str) -> bool:
    """True when an earlier run left ``path`` complete (right size, and checksum when one is known); a file of the
    right size whose checksum differs is removed so that it is fetched again."""
    if size is None or not os.path.isfile(path) or os.path.getsize(path) != size:
        return False
    if expected is None or _digest(path, expected[0]) == expected[1]:
        log.info("%s already downloaded (%d bytes), skipping", label, size)
        bar.update(size)
        return True
    log.warning("%s exists but its %s differs; downloading again", label, expected[0])
    os.remove(path)
    return False


def _digest(path: str, kind: str) -> str:
    return sha256_file(path) if kind == "sha256" else git_blob_id(path)


def _copy_resumable(fs, src: str, target: str, size: int | None, expected, bar, *, label: str) -> None:
    """Stream ``src`` to ``target.part`` (appending to what an interrupted run left), check it, then rename.
    A complete ``target`` that still verifies is kept as it is."""
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    part = target + ".part"
    if _already_complete(target, size, expected, bar, label=label):
        return
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if size is None or have > size:
        have = 0
    if have:
        log.info("resuming %s at byte %d of %d", label, have, size)
    bar.update(have)
    with fs.open(src, "rb", block_size=CHUNK) as fin, open(part, "ab" if have else "wb") as fout:
        if have:
            fin.seek(have)
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            bar.update(len(chunk))
    got = os.path.getsize(part)
    if size is not None and got != size:
        raise CheckpointError(f"{label}: copied {got} bytes, the source has {size}; run again to resume")
    if expected is not None:
        actual = _digest(part, expected[0])
        if actual != expected[1]:
            os.remove(part)
            raise CheckpointError(f"{label}: {expected[0]} mismatch (expected {expected[1]}, got {actual}); removed it")
    os.replace(part, target)


def _redact(url: str) -> str:
    """Drop user:password@ and the query string (presigned URLs carry credentials there)."""
    return redact_url(url)


__all__ = ["download_release_assets", "parse_sha256sums", "resolve_checkpoint"]
