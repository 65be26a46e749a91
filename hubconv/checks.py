"""One line of a release report, shared by every stage (tokenizer, smoke test, release)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Check:
    """A named check with its outcome: `pass`, `warn` or `fail`, and a human-readable detail."""

    name: str
    status: str
    detail: str
