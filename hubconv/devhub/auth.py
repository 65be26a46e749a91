"""Tokens, identities and permissions of the dev Hub."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import threading
from dataclasses import dataclass, field
from typing import Any

_TOKEN_ALPHABET = string.ascii_letters + string.digits
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-.~+/=]{8,512}$")
_SECRET_QUERY_RE = re.compile(r"((?:^|[?&])(?:sig|token|access_token)=)[^&]*", re.IGNORECASE)


def generate_token(prefix: str = "hf_") -> str:
    return prefix + "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(34))


def redact_query(target: str) -> str:
    """Hide signatures/tokens that could appear in a request target's query string."""
    return _SECRET_QUERY_RE.sub(r"\1***", target)


@dataclass(frozen=True)
class Identity:
    user: str
    role: str  # "read" or "write"
    orgs: tuple[str, ...] = ()
    display_name: str = "devhub"
    created_at: str = "2024-01-01T00:00:00.000Z"
    fullname: str = field(default="", compare=False)
    admin: bool = False  # the dev Hub's own write token: may use the /_devhub admin API

    @property
    def can_write(self) -> bool:
        return self.role == "write"

    def member_of(self, namespace: str) -> bool:
        return namespace == self.user or namespace in self.orgs

    def whoami(self) -> dict[str, Any]:
        uid = hashlib.sha1(self.user.encode(), usedforsecurity=False).hexdigest()[:24]
        return {
            "type": "user",
            "id": uid,
            "name": self.user,
            "fullname": self.fullname or self.user,
            "email": f"{self.user}@devhub.invalid",
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": "",
            "orgs": [
                {
                    "type": "org",
                    "id": hashlib.sha1(o.encode(), usedforsecurity=False).hexdigest()[:24],
                    "name": o,
                    "fullname": o,
                    "email": None,
                    "canPay": False,
                    "periodEnd": None,
                    "avatarUrl": "",
                    "roleInOrg": "admin" if self.can_write else "read",
                    "isEnterprise": False,
                }
                for o in self.orgs
            ],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": self.display_name, "role": self.role, "createdAt": self.created_at},
            },
        }


class TokenRegistry:
    """Maps bearer tokens to identities. Comparison is constant-time; tokens are never logged."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, Identity] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def add(self, token: str, identity: Identity) -> None:
        if not _TOKEN_RE.match(token):
            raise ValueError("tokens must be 8-512 characters of [A-Za-z0-9_-.~+/=]")
        with self._lock:
            self._by_digest[self._digest(token)] = identity

    def lookup(self, token: str) -> Identity | None:
        digest = self._digest(token)
        with self._lock:
            items = list(self._by_digest.items())
        found = None
        for known, ident in items:  # constant-time compare against every known token digest
            if hmac.compare_digest(known, digest):
                found = ident
        return found

    def users(self) -> set[str]:
        with self._lock:
            return {i.user for i in self._by_digest.values()}


def parse_authorization(value: str | None) -> str | None:
    """Token from an `Authorization: Bearer <token>` header (None if absent/malformed)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
