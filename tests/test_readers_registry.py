"""Checkpoint readers chosen by content (magic bytes), from a registry plugins extend."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from hubconv.dtypes import F32
from hubconv.errors import CheckpointError
from hubconv.io import checkpoint as registry
from hubconv.io.checkpoint import Checkpoint, open_checkpoint, readers, register_reader
from hubconv.io.tensor import ArrayTensor, read_all
from tests.native import torchtitan_llama3 as tt

W = np.arange(12, dtype=np.float32).reshape(3, 4)


@pytest.fixture(autouse=True)
def restore_readers():
    saved = readers()
    yield
    registry._READERS[:] = saved


def opened(path) -> tuple[str, dict[str, np.ndarray]]:
    with open_checkpoint(str(path)) as ck:
        return ck.format, {k: read_all(t) for k, t in ck.tensors.items()}


@pytest.mark.parametrize("name", ["weights.bin", "model.pt", "no_suffix"])
def test_safetensors_content_is_recognised_whatever_the_name(tmp_path, name) -> None:
    save_file({"w": W}, str(tmp_path / name))
    fmt, tensors = opened(tmp_path / name)
    assert fmt == "safetensors" and np.array_equal(tensors["w"], W)


@pytest.mark.parametrize("zipped", [True, False])
def test_torch_files_by_content_even_named_safetensors(tmp_path, zipped) -> None:
    path = tmp_path / "misnamed.safetensors"
    torch.save({"w": torch.from_numpy(W)}, str(path), _use_new_zipfile_serialization=zipped)
    assert path.read_bytes()[:4] == (b"PK\x03\x04" if zipped else b"\x80\x02\x8a\x0a")
    fmt, tensors = opened(path)
    assert fmt == "torch" and np.array_equal(tensors["w"], W)


def test_folders_dispatch_to_what_they_contain(tmp_path) -> None:
    a = tt.TitanArgs(dim=16, n_layers=1, n_heads=2, vocab_size=8, multiple_of=16)
    tt.save_dcp(str(tmp_path / "dcp"), tt.random_state_dict(a, seed=0))
    assert opened(tmp_path / "dcp")[0] == "dcp"
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "notes.txt").write_text("not a checkpoint")
    torch.save({"w": torch.from_numpy(W)}, str(tmp_path / "one" / "ckpt.pt"))
    fmt, tensors = opened(tmp_path / "one")  # the one checkpoint file inside it
    assert fmt == "torch" and np.array_equal(tensors["w"], W)
    save_file({"w": W}, str(tmp_path / "one" / "other.data"))
    with pytest.raises(
        CheckpointError, match=r"one: the folder holds several checkpoint files \(ckpt\.pt, other\.data\)"
    ):
        open_checkpoint(str(tmp_path / "one"))


def test_unknown_content_is_one_line_listing_what_was_tried(tmp_path) -> None:
    path = tmp_path / "weights.dat"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(path))
    text = str(e.value)
    assert text.startswith(f"{path}: unrecognised checkpoint content (starts with 4747554603000000); tried: ")
    for what in ("safetensors (8-byte header length", "torch.save zip (PK\\x03\\x04", "torch pickle (\\x80"):
        assert what in text, text
    assert "\n" not in text
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("hi")
    with pytest.raises(
        CheckpointError, match=r"empty: not a recognised checkpoint folder \(tried: .*DCP folder.*holds README"
    ):
        open_checkpoint(str(tmp_path / "empty"))


def test_sniffers_look_at_content_not_at_names(tmp_path) -> None:
    """Negative controls: near-misses of each magic are not claimed."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    fake = tmp_path / "fake.dat"
    fake.write_bytes(len(header).to_bytes(8, "little") + b"[" + header[1:] + b"\0" * 4)  # '[' instead of '{'
    too_long = tmp_path / "too_long.dat"
    too_long.write_bytes((10_000).to_bytes(8, "little") + header + b"\0" * 4)  # header length past the end
    plain_zip = tmp_path / "plain.dat"
    import zipfile

    with zipfile.ZipFile(plain_zip, "w") as zf:
        zf.writestr("archive/notes.txt", "a zip, but not torch.save's")
    for path in (fake, too_long, plain_zip):
        with pytest.raises(CheckpointError, match="unrecognised checkpoint content"):
            open_checkpoint(str(path))
    # The same damaged bytes named .safetensors reach the safetensors reader, which says precisely what is wrong.
    os.rename(too_long, tmp_path / "too_long.safetensors")
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header length 10000"):
        open_checkpoint(str(tmp_path / "too_long.safetensors"))


MAGIC = b"TOYCKPT1"


def _toy_sniff(path: str, head: bytes) -> bool:
    return head.startswith(MAGIC)


def _toy_open(path: str) -> Checkpoint:
    with open(path, "rb") as f:
        f.read(len(MAGIC))
        meta = json.loads(f.readline())
        data = np.frombuffer(f.read(), np.float32).reshape(meta["shape"])
    return Checkpoint(path=path, format="toy", tensors={meta["name"]: ArrayTensor(meta["name"], F32, data)})


def write_toy(path) -> None:
    path.write_bytes(MAGIC + json.dumps({"name": "w", "shape": list(W.shape)}).encode() + b"\n" + W.tobytes())


def test_plugin_reader_extends_the_registry(tmp_path) -> None:
    write_toy(tmp_path / "model.toy")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint content"):
        open_checkpoint(str(tmp_path / "model.toy"))
    register_reader("toy", _toy_sniff, _toy_open, description="toy format (TOYCKPT1 magic)")
    fmt, tensors = opened(tmp_path / "model.toy")
    assert fmt == "toy" and np.array_equal(tensors["w"], W)
    assert [r.name for r in readers()][-1] == "toy"
    fmt, _ = opened(tmp_path)  # a folder holding one such file dispatches to it too
    assert fmt == "toy"
    (tmp_path / "x.dat").write_bytes(b"nothing")
    with pytest.raises(CheckpointError, match=r"tried: .*toy format \(TOYCKPT1 magic\)"):
        open_checkpoint(str(tmp_path / "x.dat"))


def test_plugin_reader_first_takes_precedence(tmp_path) -> None:
    save_file({"w": W}, str(tmp_path / "a.safetensors"))
    seen: list[str] = []

    def sniff(path: str, head: bytes) -> bool:
        seen.append(path)
        return path.endswith(".safetensors")

    def open_(path: str) -> Checkpoint:
        return Checkpoint(path=path, format="mine", tensors={})

    register_reader("mine", sniff, open_, first=True)
    assert readers()[0].name == "mine" and opened(tmp_path / "a.safetensors")[0] == "mine"
    register_reader("mine", sniff, open_)  # registering a name again replaces it (now last)
    assert [r.name for r in readers()].count("mine") == 1
    assert opened(tmp_path / "a.safetensors")[0] == "safetensors"
    with pytest.raises(ValueError, match="kind must be"):
        register_reader("bad", sniff, open_, kind="tarball")  # type: ignore[arg-type]
