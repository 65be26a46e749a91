"""Hostile and malformed checkpoints: every reader stays inside the checkpoint folder, and every bad header,
offset, size or archive is a one-line CheckpointError naming the file and tensor (issue 9)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open

from hubconv.cli import main
from hubconv.errors import CheckpointError
from hubconv.io.checkpoint import open_checkpoint
from hubconv.io.dcp import _check_tiling
from hubconv.io.paths import confined
from hubconv.io.tensor import read_all
from tests.native import torchtitan_llama3 as tt
from tests.test_io import raw
from tests.test_torchtitan import tiny, user_args

# ---------------------------------------------------------------------------------------------- helpers


def save_dcp(sd: dict, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(path))
    return path


def edit_metadata(ck: Path, edit: Callable) -> None:
    """Rewrite `.metadata` with torch's own classes (the file is ours, so plain pickle is fine here)."""
    with open(ck / ".metadata", "rb") as f:
        md = pickle.load(f)
    edit(md)
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(md, f)


def redirect(fqn: str, **changes) -> Callable:
    """An edit that changes the storage info (relative_path, offset, length) of every chunk of `fqn`."""

    def edit(md) -> None:
        for index, info in list(md.storage_data.items()):
            if index.fqn == fqn:
                md.storage_data[index] = dataclasses.replace(info, **changes)

    return edit


def storage_info(ck: Path, fqn: str):
    with open(ck / ".metadata", "rb") as f:
        md = pickle.load(f)
    return next(info for index, info in md.storage_data.items() if index.fqn == fqn)


@pytest.fixture
def dcp_ckpt(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    return save_dcp(
        {"norm.weight": torch.randn(64, generator=g), "emb.weight": torch.randn(33, 7, generator=g)},
        tmp_path / "ck",
    )


# ------------------------------------------------------------------------------ 1. reads confined to the folder


def test_confined_helper(tmp_path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_bytes(b"x")
    (tmp_path / "outside").write_bytes(b"secret")
    (root / "in_link").symlink_to(root / "sub" / "f")
    (root / "out_link").symlink_to(tmp_path / "outside")
    (root / "dir_link").symlink_to(tmp_path)
    assert confined(str(root), "sub/f", "x") == str((root / "sub" / "f").resolve())
    assert confined(str(root), "in_link", "x") == str((root / "sub" / "f").resolve())
    assert confined(str(root), "sub/../sub/f", "x") == str((root / "sub" / "f").resolve())
    for bad, why in [
        ("../outside", "leaves the checkpoint folder"),
        ("sub/../../outside", "leaves the checkpoint folder"),
        ("out_link", "leaves the checkpoint folder"),
        ("dir_link/outside", "leaves the checkpoint folder"),
        (".", "leaves the checkpoint folder"),
        (str(tmp_path / "outside"), "absolute path"),
        ("sub/f\x00", "not a valid file name"),
        ("", "not a valid file name"),
        (7, "must be a string"),
    ]:
        with pytest.raises(CheckpointError, match=rf"^entry\b.*{why}") as e:
            confined(str(root), bad, "entry")
        assert "\n" not in str(e.value)
    # The root the user names may itself be a symlink.
    (tmp_path / "root_link").symlink_to(root)
    assert confined(str(tmp_path / "root_link"), "sub/f", "x") == str((root / "sub" / "f").resolve())


@pytest.mark.parametrize("target", ["copy_outside", "etc_passwd", "absolute", "nul"])
def test_dcp_storage_path_outside_the_folder_is_refused(tmp_path, dcp_ckpt, target) -> None:
    # A byte-identical copy of the .distcp outside the folder: offsets and lengths are all plausible,
    # so only confinement stops the read (the reader used to convert this happily).
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(dcp_ckpt / "__0_0.distcp", outside / "__0_0.distcp")
    info = storage_info(dcp_ckpt, "norm.weight")
    rel = {
        "copy_outside": "../elsewhere/__0_0.distcp",
        "etc_passwd": "../../../../../../../../etc/passwd",
        "absolute": str(outside / "__0_0.distcp"),
        "nul": "__0_0.distcp\x00",
    }[target]
    length = min(info.length, 64) if target == "etc_passwd" else info.length
    edit_metadata(dcp_ckpt, redirect("norm.weight", relative_path=rel, offset=0, length=length))
    why = {"absolute": "is an absolute path", "nul": "is not a valid file name"}.get(target, "leaves the checkpoint")
    with pytest.raises(CheckpointError, match=rf"\.metadata: tensor 'norm\.weight': storage path .* {why}") as e:
        open_checkpoint(str(dcp_ckpt))
    assert "\n" not in str(e.value)


def test_dcp_symlinked_distcp_pointing_outside_is_refused(tmp_path, dcp_ckpt) -> None:
    outside = tmp_path / "elsewhere.distcp"
    shutil.move(dcp_ckpt / "__0_0.distcp", outside)
    (dcp_ckpt / "__0_0.distcp").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"storage path '__0_0\.distcp' leaves the checkpoint folder"):
        open_checkpoint(str(dcp_ckpt))


def test_dcp_symlinks_inside_the_folder_are_accepted(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    sd = {"w": torch.randn(5, 3, generator=g)}
    real = save_dcp(sd, tmp_path / "real")
    # A .distcp kept in a subfolder and linked, and the checkpoint root itself reached through a link.
    (real / "blobs").mkdir()
    shutil.move(real / "__0_0.distcp", real / "blobs" / "data.bin")
    (real / "__0_0.distcp").symlink_to(Path("blobs") / "data.bin")
    (tmp_path / "link").symlink_to(real)
    with open_checkpoint(str(tmp_path / "link")) as ck:
        assert np.array_equal(read_all(ck.tensors["w"]), raw(sd["w"]))


def test_cli_convert_of_a_checkpoint_reading_outside_exits_1_and_writes_nothing(tmp_path, capsys) -> None:
    a = tiny()
    ckpt = tmp_path / "ckpt"
    tt.save_dcp(ckpt, tt.random_state_dict(a, seed=0))
    outside = tmp_path / "foreign"
    outside.mkdir()
    shutil.copy(ckpt / "__0_0.distcp", outside / "__0_0.distcp")
    edit_metadata(ckpt, redirect("norm.weight", relative_path="../foreign/__0_0.distcp"))
    args = tmp_path / "args.json"
    args.write_text(json.dumps(user_args(a)))
    out = tmp_path / "out"
    argv = ["convert", "--adapter", "torchtitan", "--checkpoint", str(ckpt), "--output", str(out)]
    rc = main([*argv, "--model-args", str(args), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("hubconv: error: ") and err.count("\n") == 1, err
    assert "norm.weight" in err and "leaves the checkpoint folder" in err
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if "hubconv-tmp" in n]
    # Control: the same checkpoint with the storage path put back converts.
    edit_metadata(ckpt, redirect("norm.weight", relative_path="__0_0.distcp"))
    assert main([*argv, "--model-args", str(args), "--quiet"]) == 0
    assert (out / "config.json").exists()


# ------------------------------------------------------------------------------ 2. safetensors headers

BASE = {
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    "c": {"dtype": "I64", "shape": [], "data_offsets": [32, 40]},
}
DATA = bytes(range(40))


def write_st(path: Path, header: dict | bytes, data: bytes, declared: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if declared is None else declared) + text + data)
    return path


def with_entry(name: str, **fields) -> dict:
    return {**BASE, name: {**BASE[name], **fields}}


def dup_key(entry: str) -> bytes:
    return json.dumps(BASE).replace('"a": {', entry, 1).encode()


# (id, header, data, declared length, message, does the safetensors library itself refuse it?)
SAFETENSORS_DEFECTS = [
    ("negative_offset", with_entry("a", data_offsets=[-8, 16]), DATA, None, r"'a': data_offsets .*non-negative", True),
    ("overlap", with_entry("b", data_offsets=[16, 24]), DATA, None, r"'b': .*overlap tensor 'a'", True),
    ("duplicate_offsets", with_entry("c", dtype="BF16", shape=[4], data_offsets=[24, 32]), DATA[:32], None,
     r"'[bc]': .*overlap tensor '[bc]'", True),
    ("gap", with_entry("c", data_offsets=[33, 41]), DATA + b"\0", None, r"'c': .*leave a gap after 32", True),
    ("trailing_bytes", BASE, DATA + b"\0" * 8, None, r"'c': data ends at 40, .*48 bytes \(trailing bytes\)", True),
    ("truncated", BASE, DATA[:36], None, r"'c': data ends at 40, .*36 bytes \(truncated\)", True),
    ("end_before_begin", with_entry("a", data_offsets=[24, 0]), DATA, None, r"'a': .*end before they begin", True),
    ("size_mismatch", with_entry("a", shape=[2, 2]), DATA, None, r"'a': .*hold 24 bytes, .*needs 16", True),
    ("unknown_dtype", with_entry("a", dtype="F33"), DATA, None, r"'a': unsupported dtype 'F33'", True),
    ("negative_dim", with_entry("a", shape=[-2, -3]), DATA, None, r"'a': shape must be .*non-negative", True),
    ("float_dim", with_entry("a", shape=[2.0, 3]), DATA, None, r"'a': shape must be", True),
    ("bool_dim", with_entry("a", shape=[True, 3]), DATA, None, r"'a': shape must be", True),
    ("shape_not_list", with_entry("a", shape="2x3"), DATA, None, r"'a': shape must be", True),
    ("float_offsets", with_entry("a", data_offsets=[0.0, 24]), DATA, None, r"'a': data_offsets must be", True),
    ("three_offsets", with_entry("a", data_offsets=[0, 24, 24]), DATA, None, r"'a': data_offsets must be", True),
    ("missing_offsets", {**BASE, "a": {"dtype": "F32", "shape": [2, 3]}}, DATA, None, r"'a': data_offsets", True),
    ("entry_not_object", {**BASE, "a": 5}, DATA, None, r"'a': header entry must be an object", True),
    ("header_is_list", b"[1, 2]  ", DATA, None, r"must start with '\{'", True),
    ("header_is_string", b'"{}"', DATA, None, r"must start with '\{'", True),
    ("metadata_not_str", {"__metadata__": {"k": 1}, **BASE}, DATA, None, r"__metadata__ must map strings", True),
    ("metadata_not_map", {"__metadata__": ["k"], **BASE}, DATA, None, r"__metadata__ must map strings", True),
    ("duplicate_tensor", dup_key('"c": {"dtype": "I64", "shape": [], "data_offsets": [32, 40]}, "a": {'), DATA,
     None, r"duplicate key 'c'", None),
    ("duplicate_field", dup_key('"a": {"dtype": "F16", '), DATA, None, r"duplicate key 'dtype'", True),
    ("invalid_json", b'{"a": ', DATA, None, r"invalid JSON", True),
    ("invalid_utf8", json.dumps(BASE).replace('"a"', '"\udcff"').encode("utf-8", "surrogateescape"), DATA, None,
     r"not valid UTF-8", True),
    ("deep_nesting", b"{" + b'"x":[' * 100_000 + b"]" * 100_000 + b"}", b"", None, r"invalid JSON", True),
    ("header_too_large", BASE, DATA, 100_000_001, r"header of 100000001 bytes exceeds", True),
    ("header_past_eof", BASE, DATA, 10_000, r"corrupt safetensors header length 10000", True),
    ("too_short", b"", b"", 0, r"", True),
]  # fmt: skip


@pytest.mark.parametrize(
    "header, data, declared, message, library_refuses",
    [row[1:] for row in SAFETENSORS_DEFECTS],
    ids=[row[0] for row in SAFETENSORS_DEFECTS],
)
def test_safetensors_header_defects(tmp_path, header, data, declared, message, library_refuses) -> None:
    path = write_st(tmp_path / "bad.safetensors", header, data, declared)
    if declared == 0:  # a file shorter than the 8-byte length prefix
        path.write_bytes(b"\x01\x00")
        message = "too short"
    with pytest.raises(CheckpointError, match=message) as e:
        open_checkpoint(str(path))
    text = str(e.value)
    assert text.startswith(str(path)) and "\n" not in text and len(text) < 400, text
    if library_refuses:  # the rule is the safetensors library's own, not one of ours
        with pytest.raises(SafetensorError), safe_open(str(path), framework="numpy") as f:
            for k in f.keys():
                f.get_tensor(k)


def test_safetensors_base_file_of_the_defect_table_is_valid(tmp_path) -> None:
    """Negative control for the table: the unmutated header and data are accepted by both readers."""
    path = write_st(tmp_path / "ok.safetensors", BASE, DATA)
    with open_checkpoint(str(path)) as ck:
        assert read_all(ck.tensors["a"]).tobytes() == DATA[:24]
        assert read_all(ck.tensors["c"]).tobytes() == DATA[32:]
    with safe_open(str(path), framework="numpy") as f:
        assert f.get_tensor("a").tobytes() == DATA[:24]


def test_safetensors_written_by_the_library_are_accepted_bit_exact(tmp_path) -> None:
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file as save_pt

    g = torch.Generator().manual_seed(3)
    pt = {
        "bf16": torch.randn(9, 5, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }
    save_pt(pt, str(tmp_path / "pt.safetensors"), metadata={"format": "pt"})
    rng = np.random.default_rng(0)
    arrays = {"h": rng.standard_normal((3, 3)).astype(np.float16), "z": np.zeros((), np.int8), "e": np.zeros((0,))}
    save_np(arrays, str(tmp_path / "np.safetensors"))
    with open_checkpoint(str(tmp_path / "pt.safetensors")) as ck:
        assert set(ck.tensors) == set(pt)
        for name, t in pt.items():
            got = read_all(ck.tensors[name])
            want = t.view(torch.uint8).numpy() if t.dtype == torch.float8_e4m3fn else raw(t)
            assert got.shape == tuple(t.shape) and got.tobytes() == want.tobytes(), name
    with open_checkpoint(str(tmp_path / "np.safetensors")) as ck:
        for name, a in arrays.items():
            assert read_all(ck.tensors[name]).tobytes() == a.tobytes() and ck.tensors[name].shape == a.shape


def sharded_folder(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"x": torch.arange(6.0)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"y": torch.ones(2, 2), "z": torch.zeros(3)}, str(folder / "model-00002-of-00002.safetensors"))
    write_index(folder, {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors",
                         "z": "model-00002-of-00002.safetensors"})  # fmt: skip
    return folder


def write_index(folder: Path, weight_map: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )


def test_safetensors_index_is_followed(tmp_path) -> None:
    folder = sharded_folder(tmp_path)
    # A stray file the index does not name is not read (as transformers does).
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(folder / "consolidated.safetensors"))
    with open_checkpoint(str(folder)) as ck:
        assert sorted(ck.tensors) == ["x", "y", "z"]
        assert read_all(ck.tensors["x"]).tolist() == list(range(6))


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ({"x": "../outside.safetensors"}, r"tensor 'x': file '\.\./outside\.safetensors' leaves the checkpoint"),
        ({"x": "/etc/passwd.safetensors"}, r"tensor 'x': file '/etc/passwd\.safetensors' is an absolute path"),
        ({"x": "model-00001-of-00002.json"}, r"tensor 'x': 'model-00001-of-00002\.json' is not a \.safetensors"),
        (
            {"x": "model-00002-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"},
            r"model-00002-of-00002\.safetensors: tensor '[xz]' is",
        ),
        (
            {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"},
            r"00002\.safetensors: tensor 'z' is in the file but model\.safetensors\.index\.json does not map it",
        ),
        ({"x": "model-00003-of-00002.safetensors"}, r"00003-of-00002\.safetensors: missing or not a file \(named in"),
        ({}, r"weight_map must be a non-empty object"),
    ],
)
def test_safetensors_index_defects(tmp_path, weight_map, message) -> None:
    folder = sharded_folder(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.arange(6.0)}, str(tmp_path / "outside.safetensors"))
    write_index(folder, weight_map)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(str(folder))


def test_safetensors_folder_symlinks(tmp_path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "st"
    (folder / "blobs").mkdir(parents=True)
    save_file({"w": torch.arange(4.0)}, str(folder / "blobs" / "w.bin"))
    (folder / "model.safetensors").symlink_to(folder / "blobs" / "w.bin")
    with open_checkpoint(str(folder)) as ck:  # a link inside the folder is fine
        assert read_all(ck.tensors["w"]).tolist() == [0, 1, 2, 3]
    save_file({"secret": torch.arange(3.0)}, str(tmp_path / "secret.safetensors"))
    (folder / "z.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(CheckpointError, match=r"z\.safetensors: file leaves the checkpoint folder"):
        open_checkpoint(str(folder))


# ------------------------------------------------------------------------------ 3. torch-zip records and files


def record_zip(members: dict[str, tuple[bytes | int, int]]) -> bytes:
    """A zip of `name: (data, compress_type)`; an int data is that many zero bytes, written streamed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, (data, ctype) in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = ctype
            with zf.open(info, "w", force_zip64=True) as f:
                if isinstance(data, int):
                    block = b"\0" * (1 << 20)
                    for _ in range(data // len(block)):
                        f.write(block)
                else:
                    f.write(data)
    return buf.getvalue()


def torch_record(t: torch.Tensor) -> dict[str, tuple[bytes, int]]:
    """The members of torch.save(t) (what a .distcp record holds), all stored."""
    buf = io.BytesIO()
    torch.save(t, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return {n: (zf.read(n), zipfile.ZIP_STORED) for n in zf.namelist()}


def splice_record(ck: Path, fqn: str, record: bytes) -> None:
    """Append `record` to the .distcp and point `fqn`'s storage at it."""
    distcp = ck / "__0_0.distcp"
    offset = distcp.stat().st_size
    with open(distcp, "ab") as f:
        f.write(record)
    edit_metadata(ck, redirect(fqn, offset=offset, length=len(record)))


def test_dcp_record_splice_control(dcp_ckpt) -> None:
    """Control for the record tests below: a re-zipped, spliced record of other values is read."""
    new = torch.arange(64, dtype=torch.float32)
    splice_record(dcp_ckpt, "norm.weight", record_zip(torch_record(new)))
    with open_checkpoint(str(dcp_ckpt)) as ck:
        assert np.array_equal(read_all(ck.tensors["norm.weight"]), new.numpy())


def bomb_record(t: torch.Tensor, inflated: int) -> bytes:
    members = torch_record(t)
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = (inflated, zipfile.ZIP_DEFLATED)
    return record_zip(members)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_storage", r"lacks its storage member '.*data/0'"),
        ("compressed_pickle", r"member '.*data\.pkl' is compressed and declares"),
        ("big_pickle", r"member '.*data\.pkl' declares 70000 bytes \(at most 65536\)"),
        ("garbage_zip", r"corrupt tensor record"),
        ("many_members", r"zip archive has 100 members"),
        ("compressed_storage", r"compressed tensor data is not supported"),
    ],
)
def test_dcp_record_defects(dcp_ckpt, damage, message) -> None:
    members = torch_record(torch.zeros(64))
    pkl = next(n for n in members if n.endswith("data.pkl"))
    data0 = next(n for n in members if n.endswith("data/0"))
    if damage == "missing_storage":
        members[data0.replace("data/0", "data/9")] = members.pop(data0)
    elif damage == "compressed_pickle":
        members[pkl] = (1 << 20, zipfile.ZIP_DEFLATED)
    elif damage == "big_pickle":
        members[pkl] = (members[pkl][0] + b"\0" * (70000 - len(members[pkl][0])), zipfile.ZIP_STORED)
    elif damage == "many_members":
        members.update({f"archive/pad{i}": (b"", zipfile.ZIP_STORED) for i in range(100 - len(members))})
    elif damage == "compressed_storage":
        members[data0] = (members[data0][0], zipfile.ZIP_DEFLATED)
    record = record_zip(members)
    if damage == "garbage_zip":
        record = record[:4] + b"\xff" * (len(record) - 4)
    splice_record(dcp_ckpt, "norm.weight", record)
    with open_checkpoint(str(dcp_ckpt)) as ck, pytest.raises(CheckpointError, match=message) as e:
        ck.tensors["norm.weight"].segments()
    assert "__0_0.distcp (tensor 'norm.weight'" in str(e.value) and "\n" not in str(e.value)


RSS_PROBE = textwrap.dedent(
    """
    import resource, sys, zipfile
    from hubconv.errors import CheckpointError
    from hubconv.io.checkpoint import open_checkpoint

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    before = peak()
    with open_checkpoint(sys.argv[1]) as ck:
        try:
            ck.tensors["norm.weight"].segments()
            print("accepted")
        except CheckpointError as e:
            print("refused", e)
    print(peak() - before)
    if sys.argv[2] == "inflate":  # the control: what plain zipfile makes of the same record
        ck = open_checkpoint(sys.argv[1])
        c = ck.tensors["norm.weight"]._chunks[0]
        with open(c.path, "rb") as f:
            f.seek(c.item_offset)
            data = f.read(c.item_length)
        import io
        zf = zipfile.ZipFile(io.BytesIO(data))
        print(len(zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))))
    """
)


def test_dcp_record_deflate_bomb_does_not_grow_memory(dcp_ckpt) -> None:
    inflated = 256 << 20
    splice_record(dcp_ckpt, "norm.weight", bomb_record(torch.zeros(64), inflated))
    assert (dcp_ckpt / "__0_0.distcp").stat().st_size < 2 << 20  # a small file that inflates to 256 MiB
    r = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(dcp_ckpt), "inflate"], capture_output=True, text=True, check=True
    )
    verdict, guarded, inflates_to = r.stdout.strip().splitlines()
    assert verdict.startswith("refused") and "is compressed and declares 268435456 bytes" in verdict
    assert int(guarded) < 16 << 20, guarded  # peak RSS growth while refusing it
    assert int(inflates_to) == inflated  # control: plain zipfile really inflates the record to 256 MiB


def test_dcp_record_bomb_with_a_lying_size_is_bounded(dcp_ckpt) -> None:
    """A deflated data.pkl that declares 1 KiB but inflates to 64 MiB: read through a bounded reader."""
    record = bytearray(bomb_record(torch.zeros(64), 64 << 20))
    cd = record.find(b"PK\x01\x02")  # the first central directory entry: data.pkl's
    assert record[cd + 46 : cd + 46 + 16] == b"archive/data.pkl"
    record[cd + 24 : cd + 28] = struct.pack("<I", 1024)  # its declared uncompressed size
    with zipfile.ZipFile(io.BytesIO(bytes(record))) as zf:
        assert zf.getinfo("archive/data.pkl").file_size == 1024
    splice_record(dcp_ckpt, "norm.weight", bytes(record))
    with open_checkpoint(str(dcp_ckpt)) as ck, pytest.raises(CheckpointError, match=r"norm\.weight"):
        ck.tensors["norm.weight"].segments()


def torch_file(path: Path, members: dict[str, tuple[bytes | int, int]]) -> Path:
    path.write_bytes(record_zip(members))
    return path


def torch_members(obj) -> dict[str, tuple[bytes, int]]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return {n: (zf.read(n), zipfile.ZIP_STORED) for n in zf.namelist()}


def test_torch_file_control_rezipped_is_read(tmp_path) -> None:
    sd = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    path = torch_file(tmp_path / "ok.pt", torch_members(sd))
    with open_checkpoint(str(path)) as ck:
        assert np.array_equal(read_all(ck.tensors["w"]), sd["w"].numpy()) and ck.values == {"step": 3}


@pytest.mark.parametrize(
    "damage, message",
    [
        ("pickle_bomb", r"member '.*data\.pkl' is compressed and declares 67108864 bytes"),
        ("many_members", r"zip archive has \d+ members \(at most 8 expected\)"),
        ("missing_storage", r"storage '0' is missing from the archive"),
        ("garbage_pickle", r"cannot read data\.pkl"),
        ("truncated", r"(corrupt|cannot read) torch file"),
        ("not_a_zip", r"cannot read torch file"),
        ("pickled_code", r"data\.pkl: refusing to load posix\.system"),
    ],
)
def test_torch_file_defects(tmp_path, monkeypatch, damage, message) -> None:
    members = torch_members({"w": torch.arange(6.0), "v": torch.ones(2)})
    pkl = next(n for n in members if n.endswith("data.pkl"))
    if damage == "pickle_bomb":
        members[pkl] = (64 << 20, zipfile.ZIP_DEFLATED)
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load saw the bomb"))
    elif damage == "many_members":
        monkeypatch.setattr("hubconv.io.torch_zip.MAX_FILE_MEMBERS", 8)
        members.update({f"archive/pad{i}": (b"", zipfile.ZIP_STORED) for i in range(8)})
    elif damage == "missing_storage":
        del members[next(n for n in members if n.endswith("data/0"))]
    elif damage == "garbage_pickle":
        members[pkl] = (b"\x80\x02garbage" * 5, zipfile.ZIP_STORED)
    path = torch_file(tmp_path / "bad.pt", members)
    if damage == "truncated":
        os.truncate(path, path.stat().st_size - 40)
    elif damage == "not_a_zip":
        path.write_bytes(b"\x00" * 100)
    elif damage == "pickled_code":

        class Evil:
            def __reduce__(self):
                return (os.system, ("true",))

        torch.save({"w": torch.zeros(2), "x": Evil()}, str(path))
    with pytest.raises(CheckpointError, match=message) as e:
        open_checkpoint(str(path))
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value) and len(str(e.value)) < 500


# ------------------------------------------------------------------------------ 4. DCP sizes, offsets, chunks


def chunks_of(fqn: str, boxes: list[tuple[tuple, tuple]]) -> Callable:
    """An edit giving `fqn` the chunk boxes `boxes`, each stored at the tensor's original record."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    def edit(md) -> None:
        info = next(i for k, i in md.storage_data.items() if k.fqn == fqn)
        for k in [k for k in md.storage_data if k.fqn == fqn]:
            del md.storage_data[k]
        md.state_dict_metadata[fqn].chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]
        for o, _ in boxes:
            md.storage_data[MetadataIndex(fqn, torch.Size(o))] = info

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (redirect("emb.weight", offset=-1), r"'emb\.weight': storage offset -1 / length \d+ are not byte counts"),
        (redirect("emb.weight", length=1.5), r"'emb\.weight': storage offset \d+ / length 1\.5 are not"),
        (redirect("emb.weight", offset=True), r"storage offset True"),
        (redirect("emb.weight", offset=10**12), r"truncated: tensor 'emb\.weight' needs bytes up to"),
        (redirect("emb.weight", relative_path=None), r"'emb\.weight': storage path None: a file name must be a str"),
        (chunks_of("emb.weight", [((0, 0), (20, 7)), ((10, 0), (13, 7))]), r"'emb\.weight': chunks overlap"),
        (chunks_of("emb.weight", [((0, 0), (33, 7)), ((0, 0), (0, 7))]), None),  # an empty extra chunk is fine
        (chunks_of("emb.weight", [((1, 0), (33, 7))]), r"chunk at \(1, 0\) of size \(33, 7\) lies outside"),
        (chunks_of("emb.weight", [((0, 0), (33, 7)), ((0, 0), (1, 7))]), r"do not cover the shape \(33, 7\) exact"),
        (
            chunks_of("emb.weight", [((0,), (231,))]),
            r"chunk at \(0,\) of size \(231,\) does not have the tensor's rank",
        ),
        (chunks_of("emb.weight", [((0, 0), (-33, -7))]), r"'emb\.weight': chunk sizes must be .*non-negative"),
    ],
)
def test_dcp_offsets_and_chunks_are_validated(dcp_ckpt, edit, message) -> None:
    edit_metadata(dcp_ckpt, edit)
    if message is None:
        with open_checkpoint(str(dcp_ckpt)) as ck:
            assert ck.tensors["emb.weight"].shape == (33, 7)
        return
    with pytest.raises(CheckpointError, match=message) as e:
        open_checkpoint(str(dcp_ckpt))
    assert "\n" not in str(e.value)


def test_dcp_negative_shape_is_refused(dcp_ckpt) -> None:
    def edit(md) -> None:
        md.state_dict_metadata["norm.weight"].size = [-64]

    edit_metadata(dcp_ckpt, edit)
    with pytest.raises(CheckpointError, match=r"tensor 'norm\.weight': size must be a list of non-negative"):
        open_checkpoint(str(dcp_ckpt))


def test_chunk_tiling_check() -> None:
    shape = (8, 6)
    grid = [((r, c), (4, 3)) for r in (0, 4) for c in (0, 3)]  # TP x FSDP
    _check_tiling(shape, grid, "t")
    uneven = [((0, 0), (5, 6)), ((5, 0), (3, 2)), ((5, 2), (3, 4))]
    _check_tiling(shape, uneven, "t")
    _check_tiling((), [((), ())], "t")
    _check_tiling((0, 4), [((0, 0), (0, 4))], "t")
    # Same element count as the shape, but two chunks overlap and leave a hole: only the tiling sees it.
    shifted = [((0, 0), (4, 3)), ((0, 3), (4, 3)), ((4, 0), (4, 3)), ((3, 3), (4, 3))]
    with pytest.raises(CheckpointError, match="t: chunks overlap"):
        _check_tiling(shape, shifted, "t")
    with pytest.raises(CheckpointError, match="lies outside"):
        _check_tiling(shape, [((0, 0), (4, 6)), ((5, 0), (4, 6))], "t")


def test_hubconv_writer_output_reads_back_through_its_index(tmp_path) -> None:
    """Control for the index checks: a sharded folder written by hubconv's own writer is accepted as is."""
    from hubconv.dtypes import F32
    from hubconv.io.tensor import ArrayTensor
    from hubconv.io.writer import plan_shards, write_model

    g = np.random.default_rng(0)
    arrays = {f"layer.{i}.w": g.standard_normal((17, 5 + i)).astype(np.float32) for i in range(6)}
    targets = {n: ArrayTensor(n, F32, a) for n, a in arrays.items()}
    plan = plan_shards([(n, t.dtype, t.shape) for n, t in targets.items()], 1000)
    write_model(plan, targets, str(tmp_path), show_progress=False)
    assert len(plan.shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    with open_checkpoint(str(tmp_path)) as ck:
        assert sorted(ck.tensors) == sorted(arrays)
        for name, a in arrays.items():
            assert np.array_equal(read_all(ck.tensors[name]), a)


def test_metadata_and_index_symlinked_outside_are_refused(tmp_path, dcp_ckpt) -> None:
    shutil.move(dcp_ckpt / ".metadata", tmp_path / "foreign.metadata")
    (dcp_ckpt / ".metadata").symlink_to(tmp_path / "foreign.metadata")
    with pytest.raises(CheckpointError, match=r"ck/\.metadata: file leaves the checkpoint folder"):
        open_checkpoint(str(dcp_ckpt))
    folder = sharded_folder(tmp_path)
    shutil.move(folder / "model.safetensors.index.json", tmp_path / "index.json")
    (folder / "model.safetensors.index.json").symlink_to(tmp_path / "index.json")
    with pytest.raises(CheckpointError, match=r"index\.json: file leaves the checkpoint folder"):
        open_checkpoint(str(folder))
