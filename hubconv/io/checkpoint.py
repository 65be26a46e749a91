"""The reader interface every checkpoint format implements, and the registry that picks a reader by content.

Readers treat the checkpoint as hostile input: every file a reader opens because the checkpoint's
own metadata or listing names it goes through `hubconv.io.paths.confined` (it must resolve inside
the folder the user named), and every size, offset and shape is validated before bytes are read,
with a one-line CheckpointError naming the file and tensor otherwise. New readers (Megatron rank
folders, tar members) follow the same rules.

`open_checkpoint` chooses the reader from what the path *contains*, never from its name alone:

- a folder: a DCP checkpoint (`.metadata`, `*.distcp`), a Megatron-LM save or iteration folder (per-rank
  `mp_rank_TT[_PPP]/model_optim_rng.pt`, see `megatron_folder`), safetensors files (or their index), else the one
  checkpoint file inside it that a file reader recognises (several are an error naming them);
- a file: its first bytes (`HEAD_BYTES`) go to each file reader's sniffer — safetensors (8-byte little-endian
  header length, then `{`), torch.save zip (`PK\x03\x04` whose archive holds `<name>/data.pkl`), legacy
  torch pickle (protocol byte `\x80` then 2..5), uncompressed tar (`ustar` at 257: a NeMo `.nemo` archive);
- content no sniffer claims goes to the reader whose `suffixes` match the file name, so a damaged
  `.safetensors` or `.pt` gets that reader's precise message; otherwise a one-line error lists what was tried.

Extension points: `register_reader(name, sniff, open, ...)` adds a format (MindSpore protobuf `.ckpt` and tar
archives are the next ones; a plugin module may register its own at import time). Readers are tried in
registration order; `first=True` puts a reader ahead of the built-in ones.
"""

from __future__ import annotations

import importlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hubconv.errors import CheckpointError
from hubconv.io.tensor import LazyTensor

HEAD_BYTES = 64  # what a file sniffer sees of the file's beginning


@dataclass
class Checkpoint:
    """An opened checkpoint: lazy tensors plus the non-tensor entries beside them.

    `tensors` is in the source's own order. `entries` names non-tensor records (DCP byte items,
    Python values in a torch file) so adapters can account for them; `values` holds small
    non-tensor values a reader could decode safely (for example nanoGPT's `model_args`).
    """

    path: str
    format: str
    tensors: dict[str, LazyTensor]
    entries: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    closers: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for c in self.closers:
            c()
        self.closers.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# (path, first HEAD_BYTES bytes of a file, or b"" for a folder) -> whether the reader claims it.
Sniff = Callable[[str, bytes], bool]
Opener = Callable[[str], Checkpoint]


@dataclass(frozen=True)
class Reader:
    """A checkpoint format: `sniff` recognises it by content, `open` reads it lazily.

    `kind` says whether it reads a file or a folder; `suffixes` are file-name endings it handles when
    no sniffer recognises the content (so a damaged file still gets this reader's precise error);
    `description` says what the sniffer looks for (it appears in the error listing what was tried)."""

    name: str
    sniff: Sniff
    open: Opener
    kind: Literal["file", "folder"] = "file"
    suffixes: tuple[str, ...] = ()
    description: str = ""


_READERS: list[Reader] = []


def register_reader(
    name: str,
    sniff: Sniff,
    open: Opener,
    *,
    kind: Literal["file", "folder"] = "file",
    suffixes: tuple[str, ...] = (),
    description: str = "",
    first: bool = False,
) -> Reader:
    """Add a reader (a plugin may call this at import time); `first` tries it before the built-in ones.
    Registering a name again replaces that reader."""
    if kind not in ("file", "folder"):
        raise ValueError(f"reader {name!r}: kind must be 'file' or 'folder', not {kind!r}")
    reader = Reader(name, sniff, open, kind, tuple(suffixes), description or name)
    _READERS[:] = [r for r in _READERS if r.name != name]
    if first:
        _READERS.insert(0, reader)
    else:
        _READERS.append(reader)
    return reader


def readers() -> list[Reader]:
    """The registered readers, in the order they are tried."""
    return list(_READERS)


def _lazy(module: str, function: str) -> Opener:
    """An opener that imports its reader module on first use (keeps start-up lean)."""

    def opener(path: str) -> Checkpoint:
        return getattr(importlib.import_module(module), function)(path)

    return opener


def _module(name: str) -> Any:
    return importlib.import_module(name)


def _is_dcp(path: str, head: bytes) -> bool:
    names = os.listdir(path)
    return ".metadata" in names or any(n.endswith(".distcp") for n in names)


def _is_safetensors_folder(path: str, head: bytes) -> bool:
    names = os.listdir(path)
    return "model.safetensors.index.json" in names or any(n.endswith(".safetensors") for n in names)


def _is_safetensors(path: str, head: bytes) -> bool:
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= os.path.getsize(path) - 8


def _is_torch_zip(path: str, head: bytes) -> bool:
    if not head.startswith(b"PK\x03\x04"):
        return False
    name_len = int.from_bytes(head[26:28], "little") if len(head) >= 30 else 0
    if head[30 : 30 + name_len].endswith(b"/data.pkl"):  # torch.save writes data.pkl first
        return True
    from hubconv.io.torch_zip import ZIP_ERRORS

    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/data.pkl") and n.count("/") == 1 for n in zf.namelist())
    except ZIP_ERRORS:
        return False


def _is_tar(path: str, head: bytes) -> bool:
    from hubconv.io.nemo_archive import is_tar

    return is_tar(path, head)


def _is_torch_pickle(path: str, head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


register_reader(
    "megatron",
    lambda path, head: _module("hubconv.io.megatron_folder").is_megatron_folder(path, head),
    _lazy("hubconv.io.megatron_folder", "open_megatron"),
    kind="folder",
    description="Megatron-LM folder (latest_checkpointed_iteration.txt, mp_rank_*/model_optim_rng.pt, torch_dist)",
)
register_reader(
    "dcp",
    _is_dcp,
    _lazy("hubconv.io.dcp", "open_dcp"),
    kind="folder",
    description="DCP folder (.metadata, *.distcp)",
)
register_reader(
    "safetensors-folder",
    _is_safetensors_folder,
    _lazy("hubconv.io.safetensors_reader", "open_safetensors"),
    kind="folder",
    description="safetensors folder (*.safetensors or model.safetensors.index.json)",
)
register_reader(
    "safetensors",
    _is_safetensors,
    _lazy("hubconv.io.safetensors_reader", "open_safetensors"),
    suffixes=(".safetensors",),
    description="safetensors (8-byte header length, then '{')",
)
register_reader(
    "torch-zip",
    _is_torch_zip,
    _lazy("hubconv.io.torch_file", "open_torch_zip"),
    description="torch.save zip (PK\\x03\\x04 with <name>/data.pkl)",
)
register_reader(
    "nemo",
    _is_tar,
    _lazy("hubconv.io.nemo_archive", "open_nemo"),
    suffixes=(".nemo",),
    description="NeMo .nemo archive (uncompressed tar: 'ustar' at offset 257)",
)
register_reader(
    "torch-pickle",
    _is_torch_pickle,
    _lazy("hubconv.io.torch_reader", "open_torch_file"),
    suffixes=(".pt", ".pth", ".bin"),
    description="legacy torch pickle (\\x80 protocol byte)",
)
register_reader(
    "mindspore-ckpt",
    lambda path, head: _module("hubconv.io.mindspore_ckpt").is_mindspore_ckpt(path, head),
    _lazy("hubconv.io.mindspore_ckpt", "open_mindspore_ckpt"),
    suffixes=(".ckpt",),
    description="MindSpore .ckpt (protobuf Checkpoint: 0a <len> 0a <len> <tag>)",
)
register_reader(
    "mindspore-ranks",
    lambda path, head: _module("hubconv.io.mindspore_ckpt").is_rank_folder(path, head),
    _lazy("hubconv.io.mindspore_ckpt", "open_rank_folder"),
    kind="folder",
    description="MindSpore/MindFormers rank folders (rank_N/*.ckpt or *.safetensors)",
)


def _head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def _file_reader(path: str) -> Reader | None:
    """The reader that claims file `path` by content, else by name suffix, else None."""
    files = [r for r in _READERS if r.kind == "file"]
    head = _head(path)
    hit = next((r for r in files if r.sniff(path, head)), None)
    return hit or next((r for r in files if r.suffixes and path.endswith(r.suffixes)), None)


def _tried(kind: str) -> str:
    return "; ".join(r.description for r in _READERS if r.kind == kind)


def open_checkpoint(path: str) -> Checkpoint:
    """Open the checkpoint at `path` (a folder or a file) lazily, with the reader its content calls for."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        for r in _READERS:
            if r.kind == "folder" and r.sniff(path, b""):
                return r.open(path)
        return _open_single_file_in(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file or a folder")
    reader = _file_reader(path)
    if reader is None:
        raise CheckpointError(
            f"{path}: unrecognised checkpoint content (starts with {_head(path)[:8].hex() or 'nothing'}); "
            f"tried: {_tried('file')}"
        )
    return reader.open(path)


def _open_single_file_in(path: str) -> Checkpoint:
    """A folder holding exactly one checkpoint file that a file reader recognises by content (confined to it)."""
    from hubconv.io.paths import confined

    found: list[tuple[str, Reader]] = []
    names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    for name in names:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            confined(path, name, f"{file}: file")
            head = _head(file)
            reader = next((r for r in _READERS if r.kind == "file" and r.sniff(file, head)), None)
            if reader is not None:
                found.append((file, reader))
    if len(found) == 1:
        file, reader = found[0]
        return reader.open(file)
    if found:
        listed = ", ".join(os.path.basename(f) for f, _ in found)
        raise CheckpointError(f"{path}: the folder holds several checkpoint files ({listed}); name one of them")
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "nothing"
    raise CheckpointError(
        f"{path}: not a recognised checkpoint folder (tried: {_tried('folder')}; one checkpoint file inside: "
        f"{_tried('file')}); it holds {shown}"
    )
