"""Fault injection and the in-memory request log of the dev Hub."""

from __future__ import annotations

import itertools
import re
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

FAULT_ACTIONS = ("status", "drop", "latency")


@dataclass
class FaultRule:
    """Fail (or slow down) requests whose method and path match.

    action:
      - "status": answer with `status` (e.g. 500, 429, 503) instead of handling the request;
      - "drop": close the connection without answering; with `after_bytes` > 0 the request is handled until that
        many body bytes were read (an upload has started being stored), then the connection is cut;
      - "latency": sleep `delay` seconds, then handle the request normally.
    `count` is how many matching requests the rule applies to (None: until removed). `delay` also applies before a
    "status"/"drop" fault. `path` is a regex searched in the decoded request path (no query string).
    """

    method: str = ".*"
    path: str = ".*"
    action: str = "status"
    status: int = 500
    count: int | None = 1
    delay: float = 0.0
    after_bytes: int = 0
    retry_after: int | None = None
    message: str = "Injected fault"
    id: int = 0
    hits: int = 0
    _method_re: re.Pattern[str] = field(default=re.compile(".*"), repr=False)
    _path_re: re.Pattern[str] = field(default=re.compile(".*"), repr=False)

    def __post_init__(self) -> None:
        if self.action not in FAULT_ACTIONS:
            raise ValueError(f"action must be one of {FAULT_ACTIONS}, got {self.action!r}")
        if self.action == "status" and not 400 <= int(self.status) <= 599:
            raise ValueError(f"status must be a 4xx/5xx code, got {self.status!r}")
        if self.count is not None and int(self.count) < 1:
            raise ValueError("count must be >= 1 (or null for 'until cleared')")
        if float(self.delay) < 0 or int(self.after_bytes) < 0:
            raise ValueError("delay and after_bytes must be >= 0")
        self._method_re = re.compile(self.method, re.IGNORECASE)
        self._path_re = re.compile(self.path)

    def matches(self, method: str, path: str) -> bool:
        return self._method_re.fullmatch(method) is not None and self._path_re.search(path) is not None

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


class FaultInjector:
    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def add(self, **kwargs: Any) -> FaultRule:
        rule = FaultRule(**{k: v for k, v in kwargs.items() if not k.startswith("_") and k not in ("id", "hits")})
        with self._lock:
            rule.id = next(self._ids)
            self._rules.append(rule)
        return rule

    def remove(self, rule_id: int) -> bool:
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) != before

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.public() for r in self._rules]

    def take(self, method: str, path: str) -> list[FaultRule]:
        """Consume the rules that apply to this request: all matching latency rules + the first failing rule."""
        out: list[FaultRule] = []
        with self._lock:
            failing_taken = False
            for rule in list(self._rules):
                if not rule.matches(method, path):
                    continue
                if rule.action != "latency":
                    if failing_taken:
                        continue
                    failing_taken = True
                rule.hits += 1
                out.append(rule)
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        self._rules.remove(rule)
        return out


class RequestLog:
    """Bounded log of recent requests. Entries never contain tokens or signed-URL signatures."""

    def __init__(self, maxlen: int = 5000) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def add(self, entry: dict[str, Any]) -> None:
        with self._lock:
            entry["id"] = next(self._ids)
            self._entries.append(entry)

    def entries(self, *, method: str | None = None, path: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        method_re = re.compile(method, re.IGNORECASE) if method else None
        path_re = re.compile(path) if path else None
        with self._lock:
            items = list(self._entries)
        return [
            dict(e)
            for e in items
            if e["id"] > since
            and (method_re is None or method_re.fullmatch(e["method"]))
            and (path_re is None or path_re.search(e["path"]))
        ]

    def last_id(self) -> int:
        with self._lock:
            return self._entries[-1]["id"] if self._entries else 0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
