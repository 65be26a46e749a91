"""Confinement of checkpoint reads: every file a reader opens because metadata names it stays in the folder.

A checkpoint is downloaded data, and hubconv publishes what its readers return: a reader that follows
a path out of the checkpoint folder would publish that file. So every reader resolves each path that
comes from the checkpoint itself (DCP `.metadata` storage paths, a safetensors index `weight_map`,
the `*.safetensors` files of a folder listing; Megatron rank folders and tar members in future
readers) through `confined`, and opens only the path it returns. The folder the user names is the
root and may itself be a symlink; anything inside it is resolved with `os.path.realpath` (symlinks
included) and must stay under the root's real path.
"""

from __future__ import annotations

import os

from hubconv.errors import CheckpointError


def confined(root: str, relative: object, what: str) -> str:
    """The real path of `relative` under `root`, or a CheckpointError `{what} ...` saying why not.

    `what` names the entry for the message, e.g. `ckpt/.metadata: tensor 'norm.weight': storage path '..'`.
    Refused: non-strings, empty names, NUL bytes, absolute paths, and anything that resolves (after
    `..` and symlinks) outside `root` or to `root` itself.
    """
    if isinstance(relative, os.PathLike):
        relative = os.fspath(relative)
    if not isinstance(relative, str):
        raise CheckpointError(f"{what}: a file name must be a string, not {type(relative).__name__}")
    if not relative or "\x00" in relative:
        raise CheckpointError(f"{what} is not a valid file name")
    if os.path.isabs(relative):
        raise CheckpointError(f"{what} is an absolute path; files must lie inside the checkpoint folder")
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, relative))
    if target == real_root or os.path.commonpath([real_root, target]) != real_root:
        raise CheckpointError(f"{what} leaves the checkpoint folder")
    return target
