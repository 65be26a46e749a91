"""Key and field naming helpers shared by the adapters."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel


def strip_wrappers(key: str) -> str:
    """`module._orig_mod.transformer.wte.weight` -> `transformer.wte.weight` (any order, any count)."""
    while True:
        for p in WRAPPER_PREFIXES:
            if key.startswith(p):
                key = key[len(p) :]
                break
        else:
            return key


def did_you_mean(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    """` (did you mean 'x'?)` for the closest candidate, or "" when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""
