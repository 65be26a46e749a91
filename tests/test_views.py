"""hubconv.views: every view bit-exact against numpy, file segments kept by row views, views composed,
and transposes that read column boxes instead of whole rows."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from hubconv import views as V
from hubconv.dtypes import BF16, BY_NAME, F32
from hubconv.errors import MappingError
from hubconv.io.safetensors_reader import open_safetensors
from hubconv.io.tensor import ArrayTensor
from tests.helpers import segment_bytes

RNG = np.random.default_rng(7)


def arr(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def mem(name: str, a: np.ndarray) -> ArrayTensor:
    return ArrayTensor(name, BY_NAME["F32"], a)


@pytest.fixture
def ckpt(tmp_path):
    data = {"a": arr(12, 5), "b": arr(8, 5), "w": arr(64, 300), "big": arr(300, 2048)}
    path = str(tmp_path / "t.safetensors")
    save_file(data, path)
    with open_safetensors(path) as c:
        yield c, data


def test_row_views_are_exact_and_keep_segments(ckpt) -> None:
    c, data = ckpt
    a, b = c.tensors["a"], c.tensors["b"]
    cases = {
        "slice": (V.slice_rows(a, 3, 10), data["a"][3:10]),
        "concat": (V.concat_rows([a, b], "ab"), np.concatenate([data["a"], data["b"]])),
        "trim of concat": (
            V.slice_rows(V.concat_rows([a, b], "ab"), 10, 15),
            np.concatenate([data["a"], data["b"]])[10:15],
        ),
    }
    for what, (view, expect) in cases.items():
        got = V.materialize(view)
        assert got.shape == expect.shape and np.array_equal(got, expect), what
        segs = view.segments()
        assert segs is not None, f"{what}: a row view of file-backed tensors must keep its segments"
        assert segment_bytes(segs) == expect.tobytes(), what
        for lo, hi in [(0, 1), (1, view.shape[0] - 1), (2, 2)]:
            assert np.array_equal(view.read_rows(lo, hi), expect[lo:hi]), (what, lo, hi)
    # Adjacent pieces of one file collapse into one segment: the writer makes one kernel copy.
    assert len(V.concat_rows([V.slice_rows(a, 0, 4), V.slice_rows(a, 4, 12)], "x").segments()) == 1


def test_split_rows_and_groups_invert_their_joins() -> None:
    q, k, v = mem("q", arr(4 * 6, 3)), mem("k", arr(2 * 6 // 2, 3)), mem("v", arr(2 * 6 // 2, 3))
    # 2 KV groups: each holds 2 query heads of 6 rows (12 rows) and one k and one v head of 3 rows.
    fused = V.interleave_groups([q, k, v], [12, 3, 3], 2, "qkv")
    expect = np.concatenate([q.array[:12], k.array[:3], v.array[:3], q.array[12:], k.array[3:], v.array[3:]])
    assert np.array_equal(V.materialize(fused), expect)
    back = V.split_groups(fused, [12, 3, 3], 2, ["q", "k", "v"])
    for got, src in zip(back, (q, k, v), strict=True):
        assert np.array_equal(V.materialize(got), src.array)
    gate, up = mem("gate", arr(5, 4)), mem("up", arr(5, 4))
    inter = V.interleave_rows([gate, up], "w_gate_hidden")
    assert np.array_equal(V.materialize(inter)[0::2], gate.array) and np.array_equal(
        V.materialize(inter)[1::2], up.array
    )
    g2, u2 = V.split_groups(inter, [1, 1], 5, ["gate", "up"])
    assert np.array_equal(V.materialize(g2), gate.array) and np.array_equal(V.materialize(u2), up.array)
    parts = V.split_rows(mem("fc1", arr(10, 2)), [4, 6], ["gate", "up"])
    assert [p.shape for p in parts] == [(4, 2), (6, 2)]
    with pytest.raises(MappingError, match="cannot be split"):
        V.split_rows(mem("fc1", arr(10, 2)), [4, 5], ["gate", "up"])
    with pytest.raises(MappingError, match="groups"):
        V.interleave_groups([q, k, v], [12, 3, 4], 2, "qkv")


def test_composed_tp_merge_group_split_and_vocab_trim() -> None:
    """Two tensor-parallel ranks of a fused per-group QKV (each rank holds whole groups), merged on
    dim 0, split into q/k/v; and a padded vocabulary merged then trimmed."""
    hd, groups, heads_per_group, hidden = 4, 4, 2, 6
    per_group = [heads_per_group * hd, hd, hd]
    full = arr(groups * sum(per_group), hidden)
    ranks = [mem(f"rank{r}", full[r * len(full) // 2 : (r + 1) * len(full) // 2]) for r in range(2)]
    merged = V.concat_rows(ranks, "linear_qkv")
    q, k, v = V.split_groups(merged, per_group, groups, ["q", "k", "v"])
    g = full.reshape(groups, sum(per_group), hidden)
    assert np.array_equal(V.materialize(q), g[:, :8].reshape(-1, hidden))
    assert np.array_equal(V.materialize(k), g[:, 8:12].reshape(-1, hidden))
    assert np.array_equal(V.materialize(v), g[:, 12:].reshape(-1, hidden))
    emb = arr(128, 6)
    shards = [mem("e0", emb[:64]), mem("e1", emb[64:])]
    trimmed = V.slice_rows(V.concat_rows(shards, "emb"), 0, 100)
    assert np.array_equal(V.materialize(trimmed), emb[:100])


def test_columns_concat_split_and_boxes(ckpt) -> None:
    c, data = ckpt
    w = c.tensors["w"]
    left, right = V.split_columns(w, [100, 200], ["l", "r"])
    assert np.array_equal(V.materialize(left), data["w"][:, :100])
    joined = V.concat_columns([left, right], "w")
    assert np.array_equal(V.materialize(joined), data["w"])
    assert joined.segments() is None  # a column join produces bytes; it cannot be a kernel copy
    assert np.array_equal(V.read_box(joined, 5, 9, 90, 130), data["w"][5:9, 90:130])


class _RowsForbidden:
    """A file-backed tensor that fails if anything reads whole rows from it."""

    def __init__(self, t):
        self.name, self.dtype, self.shape, self._t = t.name, t.dtype, t.shape, t
        self.row_reads = 0

    def segments(self):
        return self._t.segments()

    def read_rows(self, start, stop):
        self.row_reads += 1
        return self._t.read_rows(start, stop)


def test_transpose_reads_column_boxes_of_files(ckpt) -> None:
    c, data = ckpt
    src = _RowsForbidden(c.tensors["big"])  # [300, 2048] float32
    t = V.transpose(src, "h.0.mlp.c_fc.weight")
    assert t.shape == (2048, 300)
    blocks = list(V.blocks(t))
    assert np.array_equal(np.concatenate(blocks), data["big"].T)
    assert src.row_reads == 0, "a transpose of a file-backed tensor must read boxes, not whole rows"
    # Each block covers at least a page of every source row: the source is read about once in all.
    assert len(blocks) <= -(-2048 * 4 // 4096)
    assert max(b.nbytes for b in blocks) <= max(1 << 20, 4096 * 300)
    assert np.array_equal(t.read_rows(7, 19), data["big"].T[7:19])
    assert np.array_equal(V.materialize(V.transpose(t)), data["big"])  # its own inverse


def test_transpose_of_views_and_memory_sources() -> None:
    a, b = arr(6, 10), arr(6, 4)
    joined = V.concat_columns([mem("a", a), mem("b", b)], "ab")
    assert np.array_equal(V.materialize(V.transpose(joined)), np.concatenate([a, b], 1).T)
    assert np.array_equal(V.materialize(V.transpose(V.slice_rows(mem("a", a), 1, 5))), a[1:5].T)
    with pytest.raises(MappingError, match="2-D"):
        V.transpose(mem("v", arr(3)))


def test_rope_permute_matches_numpy_and_inverts() -> None:
    w = mem("wk", arr(2 * 8, 5))
    view = V.rope_permute(w, 2)
    # per head: interleaved rows (x0, y0, x1, y1, ...) -> (x0, x1, ..., y0, y1, ...)
    expect = np.concatenate([np.concatenate([h[0::2], h[1::2]]) for h in np.split(w.array, 2)])
    assert np.array_equal(V.materialize(view), expect) and not np.array_equal(expect, w.array)
    assert np.array_equal(V.materialize(V.rope_permute(view, 2, to_half=False)), w.array)
    for lo, hi in [(0, 3), (3, 13), (15, 16)]:  # reads that start and stop inside a head
        assert np.array_equal(view.read_rows(lo, hi), V.materialize(view)[lo:hi])
    bias = mem("bk", arr(16))
    assert np.array_equal(V.materialize(V.rope_permute(V.rope_permute(bias, 4), 4, to_half=False)), bias.array)
    with pytest.raises(MappingError, match="heads of even size"):
        V.rope_permute(w, 3)


def test_zeros_and_casts() -> None:
    z = V.Zeros("h.0.attn.c_attn.bias", F32, (12,))
    assert np.array_equal(V.materialize(z), np.zeros(12, np.float32)) and z.segments() is None
    x = mem("x", arr(4, 3))
    down = V.cast(x, BF16)
    up = V.cast(down, F32)
    np.testing.assert_allclose(V.materialize(up), x.array, rtol=2**-8)
    assert np.array_equal(V.materialize(V.cast(down, F32)), V.materialize(up))
    assert np.array_equal(V.materialize(V.cast(up, BF16)), V.materialize(down))  # bf16 -> f32 -> bf16 is exact
    same = V.cast(x, F32)
    assert np.array_equal(V.materialize(same), x.array)


def test_bad_pieces_and_mixed_sources_are_errors() -> None:
    with pytest.raises(MappingError, match="outside its source"):
        V.Rows("x", [mem("a", arr(3, 2))], [V.Piece(0, 2, 5)])
    with pytest.raises(MappingError, match="cannot join rows"):
        V.concat_rows([mem("a", arr(3, 2)), mem("b", arr(3, 4))], "ab")
    with pytest.raises(MappingError, match="cannot join columns"):
        V.concat_columns([mem("a", arr(3, 2)), mem("b", arr(4, 2))], "ab")


def test_file_box_reader_unmaps_after_each_read(ckpt, tmp_path) -> None:
    """Boxes come from short-lived maps: no mapping of the checkpoint survives a read."""
    c, _data = ckpt
    path = c.tensors["big"].segments()[0].path
    V.read_box(c.tensors["big"], 10, 200, 100, 900)
    with open(f"/proc/{os.getpid()}/maps") as f:
        assert path not in f.read()
