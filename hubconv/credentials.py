"""Secrets and Hub inputs: tokens, endpoint URLs and repo ids are checked before any request, and nothing that
could carry a credential (a token, URL userinfo, a query string) ever reaches a message.

- :func:`clean_token` strips surrounding whitespace (as huggingface_hub does with ``HF_TOKEN``) and refuses any
  other character that cannot be in an HTTP header token, with an error that does not contain the token.
- :func:`check_endpoint` accepts only ``http``/``https`` URLs with a host and without userinfo, query or fragment.
- :func:`check_repo_id` applies huggingface_hub's ``validate_repo_id`` plus our rule that publishing needs
  ``namespace/name``.
- :func:`redact` is for every exception text or URL that goes into a message: it drops userinfo and query strings
  from URLs, hides bearer credentials and token-shaped strings, and replaces every registered secret with ``***``.
"""

from __future__ import annotations

import os
import re
import threading
import urllib.parse

from hubconv.errors import HubconvError

MASK = "***"
_SECRETS: set[str] = set()
_LOCK = threading.Lock()
_URL_RE = re.compile(r"""[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'"<>`]+""")
_PATH_QUERY_RE = re.compile(r"""(/[^\s'"?#<>]*)\?[^\s'"<>]*""")
_AUTH_RE = re.compile(r"""(?i)\b(bearer|basic)(\s+|%20)[^\s'",)\]}]+""")
# Token shapes of the Hugging Face Hub and GitHub (classic and fine-grained), wherever they appear.
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{16,}|api_org_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{16,}|github_pat_\w{20,})"
)


class InputError(HubconvError):
    """A token, endpoint URL or repo id that cannot be used (named by its field, never echoing a secret)."""


def register_secret(value: str | None) -> None:
    """Remember ``value`` so that :func:`redact` replaces it in any later message."""
    if value and len(value.strip()) >= 8:
        with _LOCK:
            _SECRETS.add(value)


def clean_token(value: str | None, field: str) -> str | None:
    """``value`` without surrounding whitespace (None when empty); an error naming ``field`` when a character inside
    it is whitespace, a control character or non-ASCII. The token is registered for :func:`redact`."""
    if value is None:
        return None
    register_secret(value)
    token = value.strip()
    if not token:
        return None
    register_secret(token)
    for i, ch in enumerate(token):
        if not "!" <= ch <= "~":
            kind = (
                "a control character"
                if ch.isascii() and not ch.isprintable()
                else "whitespace"
                if ch.isspace()
                else "a non-ASCII character"
            )
            raise InputError(
                f"{field}: the token contains {kind} (U+{ord(ch):04X}) at position {i + 1} of {len(token)}; "
                "copy the token again (the value is not shown)"
            )
    return token


def add_mask(value: str | None, *, always: bool = False) -> None:
    """In GitHub Actions (or ``always``: the action entry point), ask the runner to mask ``value`` in the log, each
    line of it, so that a multi-line value never prints its second line unmasked."""
    if not value or not (always or os.environ.get("GITHUB_ACTIONS") == "true"):
        return
    for line in re.split(r"[\r\n]+", value):
        if line.strip():
            print(f"::add-mask::{line}", flush=True)


def redact_url(url: str) -> str:
    """``url`` without userinfo, query string and fragment (presigned URLs and tokens live there)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with URLs redacted (:func:`redact_url`), query strings of bare paths dropped, ``Bearer``/``Basic``
    credentials and token-shaped strings hidden, and ``secrets`` plus every registered secret replaced."""
    with _LOCK:
        known = set(_SECRETS)
    for secret in sorted(known | {s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
        text = text.replace(repr(secret)[1:-1], MASK)  # as it appears inside a repr()'d str or bytes
    text = _URL_RE.sub(lambda m: redact_url(m.group(0)), text)
    text = _PATH_QUERY_RE.sub(r"\1", text)
    text = _AUTH_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    return _TOKEN_SHAPES.sub(MASK, text)


def check_endpoint(url: str, field: str) -> str:
    """``url`` (without a trailing ``/``) if it is an http(s) URL with a host and nothing secret in it, else an
    :class:`InputError` naming ``field`` (and the URL without userinfo or query)."""
    shown = redact_url(url)
    if any(not ch.isprintable() or ch.isspace() for ch in url):
        raise InputError(f"{field}: the URL {shown!r} contains whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError:
        raise InputError(f"{field}: {shown!r} is not a valid URL (check the host and port)") from None
    if parts.scheme.lower() not in ("http", "https"):
        scheme = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise InputError(f"{field}: {shown!r} has {scheme}; the Hub endpoint must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise InputError(
            f"{field}: the URL {shown!r} carries credentials (user:password@); pass the token in HF_TOKEN instead"
        )
    if not parts.hostname:
        raise InputError(f"{field}: {shown!r} has no host")
    if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        raise InputError(f"{field}: the URL {shown!r} must not have a query string or fragment")
    return url.rstrip("/")


def check_repo_id(repo_id: str | None, field: str) -> str:
    """``repo_id`` if huggingface_hub's ``validate_repo_id`` accepts it and it is ``namespace/name``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise InputError(f"{field}: a Hub repo id 'namespace/name' is required")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = " ".join(str(e).replace(f": '{repo_id}'", "").split()).split(". Use `repo_type`")[0].rstrip(".")
        raise InputError(f"{field}: {repo_id!r} is not a valid Hub repo id ({reason})") from None
    if "/" not in repo_id:
        raise InputError(
            f"{field}: {repo_id!r} has no namespace; publishing needs 'namespace/name' (your user or organization)"
        )
    return repo_id


__all__ = [
    "InputError",
    "add_mask",
    "check_endpoint",
    "check_repo_id",
    "clean_token",
    "redact",
    "redact_url",
    "register_secret",
]
