"""Hub-side content rules: LFS vs regular upload mode, `.gitignore` matching, README YAML validation."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

# Files at or above this size must go through LFS (the Hub's limit for regular git files is 10 MB).
LFS_SIZE_THRESHOLD = 10 * 1000 * 1000

# Same regex as huggingface_hub.repocard.REGEX_YAML_BLOCK.
REGEX_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


def is_binary(sample: bytes) -> bool:
    """Git's heuristic: a NUL byte in the first 8000 bytes means binary. The client sends 512 bytes."""
    return b"\0" in sample[:8000]


@lru_cache(maxsize=512)
def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a gitattributes/gitignore glob (already stripped of anchors) to a regex on a full path."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _match(pattern: str, path: str) -> bool:
    """gitattributes semantics: a pattern without '/' matches the basename at any depth."""
    anchored = pattern.startswith("/")
    pattern = pattern.lstrip("/")
    if "/" not in pattern and not anchored:
        return _glob_to_regex(pattern).match(path.rsplit("/", 1)[-1]) is not None
    return _glob_to_regex(pattern).match(path) is not None


def lfs_patterns(gitattributes: str | None) -> list[tuple[str, bool]]:
    """(pattern, is_lfs) pairs in file order; later lines override earlier ones like in git."""
    out = []
    for line in (gitattributes or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        attrs = parts[1:]
        if "filter=lfs" in attrs:
            out.append((parts[0], True))
        elif "-filter" in attrs or "!filter" in attrs or any(a.startswith("filter=") for a in attrs):
            out.append((parts[0], False))
    return out


def matches_lfs_attributes(path: str, patterns: list[tuple[str, bool]]) -> bool:
    result = False
    for pattern, is_lfs in patterns:
        if _match(pattern, path):
            result = is_lfs
    return result


def upload_mode(path: str, size: int, sample: bytes, patterns: list[tuple[str, bool]]) -> str:
    if size == 0:
        return "regular"
    if size >= LFS_SIZE_THRESHOLD or is_binary(sample) or matches_lfs_attributes(path, patterns):
        return "lfs"
    return "regular"


def is_ignored(path: str, gitignore: str | None) -> bool:
    """Subset of gitignore: globs, leading '/' anchors, trailing '/' for directories, '!' negation."""
    ignored = False
    parts = path.split("/")
    for raw in (gitignore or "").splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        anchored = line.startswith("/") or "/" in line
        pat = line.lstrip("/")
        # candidates: the file itself (unless dir-only) and each parent directory
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
        if not dir_only:
            candidates.append(path)
        hit = False
        for cand in candidates:
            if anchored:
                hit = _glob_to_regex(pat).match(cand) is not None
            else:
                hit = _glob_to_regex(pat).match(cand.rsplit("/", 1)[-1]) is not None
            if hit:
                break
        if hit:
            ignored = not negate
    return ignored


def validate_readme(content: str) -> tuple[list[str], list[str], dict[str, Any] | None]:
    """Validate the YAML front matter of a model card. Returns (errors, warnings, metadata)."""
    match = REGEX_YAML_BLOCK.search(content)
    if match is None:
        return [], ["empty or missing yaml metadata in repo card"], None
    from hubconv.safe_yaml import YamlFileError, load_text  # bounded: an uploaded alias bomb is refused

    try:
        data = load_text(match.group(2))
    except YamlFileError as e:
        return [f"Invalid YAML in the metadata block: {e}"], [], None
    if data is None:
        return [], ["empty or missing yaml metadata in repo card"], None
    if not isinstance(data, dict):
        return [f"The metadata block must be a YAML mapping, got {type(data).__name__}"], [], None
    errors = []
    for key in ("tags", "datasets", "language", "base_model"):
        value = data.get(key)
        if value is not None and not isinstance(value, (str, list)):
            errors.append(f'"{key}" must be a string or a list of strings')
        elif isinstance(value, list) and not all(isinstance(v, str) for v in value):
            errors.append(f'"{key}" must be a string or a list of strings')
    license_ = data.get("license")
    if license_ is not None and not isinstance(license_, str):
        errors.append('"license" must be a string')
    return errors, [], data if not errors else None
