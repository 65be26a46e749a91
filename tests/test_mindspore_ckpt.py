"""MindSpore .ckpt reader and the shared protobuf walker: layouts MindSpore writes, split tensors, crc trailer,
dtypes, rank folders, and hostile or damaged files (one-line errors)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hubconv.errors import CheckpointError
from hubconv.io import protobuf as pb
from hubconv.io.checkpoint import open_checkpoint
from hubconv.io.mindspore_ckpt import open_mindspore_ckpt
from hubconv.io.tensor import read_all
from tests.helpers import segment_bytes
from tests.native import mindformers_ckpt as W

# ------------------------------------------------------------------------------------------------ protobuf walker


def test_varints_round_trip_and_are_bounded() -> None:
    for v in (0, 1, 127, 128, 300, 2**32, 2**63 - 1, 2**64 - 1):
        assert pb.decode_varint(W.varint(v), 0, 10, "x") == (v, len(W.varint(v)))
    assert pb.to_int64(pb.decode_varint(W.varint(-5), 0, 10, "x")[0]) == -5
    with pytest.raises(pb.ProtobufError, match="longer than 10 bytes"):
        pb.decode_varint(b"\xff" * 11, 0, 11, "x")
    with pytest.raises(pb.ProtobufError, match="does not fit in 64 bits"):
        pb.decode_varint(b"\xff" * 9 + b"\x02", 0, 10, "x")
    with pytest.raises(pb.ProtobufError, match="truncated varint at byte 3"):
        pb.decode_varint(b"\x80\x80", 0, 2, "x", origin=3)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x0a\x05ab", r"field 1 at byte 0 needs 5 bytes but only 2 are left"),
        (b"\x0b", r"deprecated group wire type 3"),
        (b"\x0e", r"invalid wire type 6"),
        (b"\x02\x00", r"invalid field number 0"),
        (b"\x08", r"truncated varint at byte 1"),
        (b"\x0d\x01\x02", r"needs 4 bytes but only 2"),
    ],
)
def test_malformed_messages_are_one_line_errors(data: bytes, match: str) -> None:
    for walk in (lambda: list(pb.fields(data, "m")), lambda: list(pb.stream_fields(_reader(data), 0, len(data), "m"))):
        with pytest.raises(pb.ProtobufError, match=match) as e:
            walk()
        assert "\n" not in str(e.value) and str(e.value).startswith("m")


def _reader(data: bytes):
    return lambda off, n: data[off : off + n]


def test_streaming_walk_agrees_with_the_in_memory_walk() -> None:
    msg = W.value_message("a.weight", [3, 4], "Float32", bytes(range(48))) * 3 + W.varint(2 << 3) + W.varint(7)
    mem = list(pb.fields(msg))
    streamed = list(pb.stream_fields(_reader(msg), 0, len(msg)))
    assert len(mem) == len(streamed) == 4
    for (n1, w1, v1), (n2, w2, v2) in zip(mem, streamed, strict=True):
        assert (n1, w1) == (n2, w2)
        assert v1 == (msg[v2[0] : v2[0] + v2[1]] if w2 == pb.LEN else v2)


def test_stream_fields_reads_windows_not_the_payloads() -> None:
    big = W.value_message("t", [1 << 20], "UInt8", bytes(1 << 20))
    reads: list[int] = []

    def read(off: int, n: int) -> bytes:
        reads.append(n)
        return big[off : off + n]

    ((number, wire, (off, n)),) = list(pb.stream_fields(read, 0, len(big)))
    assert (number, wire, n) == (1, pb.LEN, len(big) - off) and sum(reads) <= pb.WINDOW


# ------------------------------------------------------------------------------------------------ reading


def _all_dtypes() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, 2, generator=g).half(),
        "bf16": torch.randn(6, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "i16": torch.arange(6, dtype=torch.int16).reshape(2, 3),
        "i32": torch.tensor([[1, -2]], dtype=torch.int32),
        "i64": torch.tensor([2**40], dtype=torch.int64),
        "u8": torch.arange(5, dtype=torch.uint8),
        "flags": torch.tensor([True, False, True]),
        "scalar_int": 7,
        "scalar_float": 0.5,
        "note": "trained on Ascend",
    }


def test_every_dtype_reads_back_bit_exact(tmp_path: Path) -> None:
    items = _all_dtypes()
    ckpt = open_checkpoint(W.save_checkpoint(items, str(tmp_path / "net.ckpt")))
    assert ckpt.format == "mindspore-ckpt"
    names = {"f32": "F32", "f16": "F16", "bf16": "BF16", "f64": "F64", "i8": "I8", "i16": "I16", "i32": "I32",
             "i64": "I64", "u8": "U8", "flags": "BOOL", "scalar_int": "I64", "scalar_float": "F32"}  # fmt: skip
    for key, dtype in names.items():
        t = ckpt.tensors[key]
        assert t.dtype.name == dtype
        want = items[key] if isinstance(items[key], torch.Tensor) else torch.tensor(items[key])
        if want.dtype == torch.float64 and key == "scalar_float":
            want = want.float()
        assert t.shape == tuple(want.shape)
        assert read_all(t).tobytes() == W.raw_bytes(want.to(torch.float32) if key == "scalar_float" else want)
    assert ckpt.entries == ["note"] and ckpt.values["note"] == "trained on Ascend"
    assert ckpt.values["crc_num"] is None


def test_old_uint8_spelling_and_dims_zero_scalar(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    path.write_bytes(
        W.value_message("u", [4], "Uint8", bytes([1, 2, 3, 4])) + W.value_message("s", [0], "Float32", b"\0\0\x80?")
    )
    ckpt = open_checkpoint(str(path))
    assert read_all(ckpt.tensors["u"]).tolist() == [1, 2, 3, 4]
    assert ckpt.tensors["s"].shape == () and read_all(ckpt.tensors["s"]).item() == 1.0


def test_split_tensor_is_several_segments_and_reads_across_chunks(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    big = torch.randn(37, 11, generator=g).bfloat16()
    path = W.save_checkpoint(
        {"a": torch.ones(2), "big": big, "z": torch.zeros(3)}, str(tmp_path / "s.ckpt"), slice_bytes=100
    )
    t = open_checkpoint(path).tensors["big"]
    segs = t.segments()
    assert len(segs) == -(-big.numel() * 2 // 100) and all(s.nbytes == 100 for s in segs[:-1])
    assert segment_bytes(segs) == W.raw_bytes(big)
    full = W.raw_bytes(big)
    for lo, hi in ((0, 37), (3, 4), (4, 19), (36, 37)):  # rows of 22 bytes straddle the 100-byte chunks
        assert t.read_rows(lo, hi).tobytes() == full[lo * 22 : hi * 22]


def test_a_tensor_over_512_mib_is_split_in_two_like_mindspore(tmp_path: Path) -> None:
    """A real 600 MiB BFloat16 tensor in MindSpore's 512 MiB chunks, written sparsely (holes read as zeros)."""
    rows, cols = 600 * 1024, 512  # 600 MiB of bf16
    boundary = W.SLICE_BYTES
    marks = {0: b"\x01\x02", boundary - 2: b"\x03\x04\x05\x06", rows * cols * 2 - 2: b"\x07\x08"}
    path = str(tmp_path / "huge.ckpt")
    size = W.write_sparse_split(path, "model.tok_embeddings.embedding_weight", [rows, cols], "BFloat16", 2, marks=marks)
    assert size > rows * cols * 2
    t = open_checkpoint(path).tensors["model.tok_embeddings.embedding_weight"]
    assert t.shape == (rows, cols) and t.dtype.name == "BF16"
    segs = t.segments()
    assert [s.nbytes for s in segs] == [boundary, rows * cols * 2 - boundary]
    row_bytes = cols * 2
    r = boundary // row_bytes  # the chunk boundary falls between rows r-1 and r
    data = t.read_rows(r - 1, r + 1).view(np.uint8).reshape(-1)
    assert bytes(data[row_bytes - 2 : row_bytes + 2]) == b"\x03\x04\x05\x06"
    assert bytes(t.read_rows(0, 1).view(np.uint8).reshape(-1)[:2]) == b"\x01\x02"
    assert bytes(t.read_rows(rows - 1, rows).view(np.uint8).reshape(-1)[-2:]) == b"\x07\x08"


def test_crc_trailer_is_verified(tmp_path: Path) -> None:
    items = {"w": torch.arange(64, dtype=torch.float32), "step": 3}
    path = W.save_checkpoint(items, str(tmp_path / "c.ckpt"), crc=True)
    ckpt = open_checkpoint(path)
    assert read_all(ckpt.tensors["w"]).tolist() == list(range(64)) and ckpt.values["crc_num"] > 0
    data = bytearray(Path(path).read_bytes())
    assert data[-17:-10] == b"crc_num"
    data[40] ^= 0x01  # one bit inside w's content
    Path(path).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"CRC check failed .* the file is damaged") as e:
        open_checkpoint(path)
    assert "\n" not in str(e.value)
    assert open_mindspore_ckpt(path, verify_crc=False).tensors["w"].shape == (64,)


def test_sniffed_by_content_whatever_the_name(tmp_path: Path) -> None:
    path = W.save_checkpoint({"model.norm_out.weight": torch.ones(4)}, str(tmp_path / "weights.bin"))
    assert open_checkpoint(path).format == "mindspore-ckpt"
    folder = tmp_path / "run"
    folder.mkdir()
    W.save_checkpoint({"w": torch.ones(4)}, str(folder / "llama-10_2.ckpt"))
    assert open_checkpoint(str(folder)).format == "mindspore-ckpt"


# ------------------------------------------------------------------------------------------------ damaged files


def _good(tmp_path: Path) -> bytes:
    return Path(
        W.save_checkpoint({"a.weight": torch.ones(4, 4), "b.weight": torch.ones(8)}, str(tmp_path / "g.ckpt"))
    ).read_bytes()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncated", r"needs \d+ bytes but only \d+ are left"),
        ("content", r"'a.weight': tensor_content holds 60 bytes, but Float32 dims \[4, 4\] need 64"),
        ("varint", r"varint at byte 1 is longer than 10 bytes"),
        ("path_tag", r"tag '\.\./\.\./etc/passwd' is not a parameter name"),
        ("dtype", r"'a.weight': unknown tensor_type 'Float8'"),
        ("repeat", r"'a.weight' appears again at Checkpoint.value\[2\]"),
        ("chunks", r"'a.weight': its 2 chunks disagree on dims or tensor_type"),
        ("negative", r"negative dims"),
        ("field", r"unexpected field 2 \(wire type 0\)"),
    ],
)
def test_damaged_files_are_one_line_errors(tmp_path: Path, damage: str, match: str) -> None:
    good = _good(tmp_path)
    b = W.value_message("b.weight", [8], "Float32", bytes(32))
    bad = {
        "truncated": good[: len(good) - 20],
        "content": W.value_message("a.weight", [4, 4], "Float32", bytes(60)) + b,
        "varint": b"\x0a" + b"\xff" * 11 + good,
        "path_tag": W.value_message("../../etc/passwd", [4], "Float32", bytes(16)),
        "dtype": W.value_message("a.weight", [4], "Float8", bytes(4)),
        "repeat": W.value_message("a.weight", [4], "Float32", bytes(16))
        + b
        + W.value_message("a.weight", [4], "Float32", bytes(16)),
        "chunks": W.value_message("a.weight", [4], "Float32", bytes(8))
        + W.value_message("a.weight", [2], "Float32", bytes(8)),
        "negative": W.value_message("a.weight", [-4], "Float32", b""),
        "field": good + W.varint(2 << 3) + W.varint(1),
    }[damage]
    path = tmp_path / "bad.ckpt"
    path.write_bytes(bad)
    with pytest.raises(CheckpointError, match=match) as e:
        open_checkpoint(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


# ------------------------------------------------------------------------------------------------ rank folders


def test_one_rank_and_identical_replicas_open_as_one_checkpoint(tmp_path: Path) -> None:
    items = {"model.norm_out.weight": torch.arange(4.0), "global_step": torch.tensor([5], dtype=torch.int32)}
    for ranks in (1, 3):
        folder = tmp_path / f"r{ranks}"
        W.save_rank_folder(str(folder), items, ranks=ranks)
        (folder / "strategy").mkdir()  # other files beside the rank folders are ignored
        ckpt = open_checkpoint(str(folder))
        assert ckpt.format == "mindspore-ckpt" and ckpt.values["ranks"] == ranks
        assert read_all(ckpt.tensors["model.norm_out.weight"]).tolist() == [0, 1, 2, 3]
        ckpt.close()


def test_sharded_ranks_are_refused_naming_the_strategy_file(tmp_path: Path) -> None:
    W.save_checkpoint({"w": torch.ones(4, 2)}, str(tmp_path / "x.ckpt"))
    for r, rows in enumerate((4, 4)):
        os.makedirs(tmp_path / f"rank_{r}")
        W.save_checkpoint({"w": torch.full((rows, 2), float(r))}, str(tmp_path / f"rank_{r}" / f"ck_{r}.ckpt"))
    os.remove(tmp_path / "x.ckpt")
    with pytest.raises(
        CheckpointError, match=r"rank_1 holds different tensors than rank_0: a distributed .*strategy file"
    ):
        open_checkpoint(str(tmp_path))


@pytest.mark.parametrize("problem", ["gap", "two_files"])
def test_rank_folder_problems(tmp_path: Path, problem: str) -> None:
    items = {"w": torch.ones(2)}
    W.save_rank_folder(str(tmp_path), items, ranks=3 if problem == "gap" else 1)
    if problem == "gap":
        import shutil

        shutil.rmtree(tmp_path / "rank_1")
        match = r"missing rank_1"
    else:
        W.save_checkpoint(items, str(tmp_path / "rank_0" / "llama_rank_0-20_2.ckpt"))
        match = (
            r"rank_0: expected one \.ckpt or \.safetensors file, found llama_rank_0-10_2.ckpt, llama_rank_0-20_2.ckpt"
        )
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(str(tmp_path))
