"""A small, strict Hugging Face Hub server for tests and dry runs (loopback, on-disk, standard library only).

It speaks the part of the Hub HTTP API used by `huggingface_hub` 2.x: repos, preupload, LFS basic transfer,
ndjson commits (with PRs and optimistic concurrency), refs/tags/branches, discussions, tree/paths-info/commits
listings and `resolve` downloads. Clients must set `HF_HUB_DISABLE_XET=1` (no Xet storage here).

    from hubconv.devhub import DevHub
    with DevHub(tmp_dir) as hub:
        api = HfApi(endpoint=hub.url, token=hub.token)
"""

from .cli import main, serve
from .faults import FaultRule
from .server import DevHub

__all__ = ["DevHub", "FaultRule", "main", "serve"]
