"""A small, strict Hugging Face Hub server for tests and dry runs (loopback, on-disk, standard library only).

It speaks the part of the Hub HTTP API used by `huggingface_hub` 2.x: repos, preupload, LFS basic transfer,
ndjson commits (with PRs and optimistic concurrency), refs/tags/branches, discussions, tree/paths-info/commits
listings and `resolve` downloads. Clients must set `HF_HUB_DISABLE_XET=1` (no Xet storage here).

    from hubconv.devhub import DevHub
    with DevHub(tmp_dir) as hub:
        api = HfApi(endpoint=hub.url, token=hub.token)
"""

from importlib import import_module
from typing import Any

__all__ = ["DevHub", "FaultRule", "main", "serve"]
_WHERE = {"DevHub": ".server", "FaultRule": ".faults", "main": ".cli", "serve": ".cli"}


def __getattr__(name: str) -> Any:
    """Import lazily: `hubconv`'s command line registers `devhub` without loading the server."""
    if name in _WHERE:
        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(name)
