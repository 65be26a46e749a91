"""hubconv.adapters.megatron_layouts: Megatron tensor/pipeline-parallel shards merged back bit-exact.

A random global model is sharded here the way Megatron-LM lays it out (written from Megatron's
code with numpy, independently of the module's own inverses): fused QKV per rank in each
`checkpoint_version` ordering (checked against a numpy port of `_transpose_first_dim`), SwiGLU
fc1 `[gate_r; up_r]` per rank, column/row/vocab splits, stage-local layer numbers. Rank tensors
are safetensors files, so row views must keep their file segments.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from hubconv import views as V
from hubconv.adapters import megatron_layouts as M
from hubconv.dtypes import F32
from hubconv.errors import CheckpointError, MappingError, ModelArgsError
from hubconv.io.safetensors_reader import open_safetensors
from hubconv.io.tensor import ArrayTensor
from tests.helpers import segment_bytes

H, HN, FFN, VOCAB, LAYERS = 16, 4, 24, 40, 4


# ------------------------------------------------------------------ Megatron's sharding, in numpy


def transpose_first_dim(t: np.ndarray, num_splits: int, num_splits_first: bool, heads: int, hn: int) -> np.ndarray:
    """numpy port of Megatron's checkpointing._transpose_first_dim (what fix_query_key_value_ordering runs)."""
    if num_splits_first:
        t = t.reshape(num_splits, heads, hn, *t.shape[1:]).swapaxes(0, 1)
    else:
        t = t.reshape(heads, hn, num_splits, *t.shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(t).reshape(-1, *t.shape[3:])


def fused_in_memory(q: np.ndarray, k: np.ndarray, v: np.ndarray, groups: int) -> np.ndarray:
    """megatron-core's linear_qkv layout: [ng, (np/ng + 2), hn] (attention.get_query_key_value_tensors)."""
    rest = q.shape[1:]
    qg = q.reshape(groups, -1, *rest)
    kg, vg = k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)
    return np.concatenate([qg, kg, vg], axis=1).reshape(-1, *rest)


def shard_qkv_megatron(q, k, v, heads: int, groups: int, tp: int, version: float) -> list[np.ndarray]:
    """Per-rank fused QKV as a Megatron checkpoint of `version` stores it."""
    if groups < tp:  # ranks hold plain 1/TP slices of the global fused tensor
        return np.split(fused_in_memory(q, k, v, groups), tp)
    out = []
    for qr, kr, vr in zip(np.split(q, tp), np.split(k, tp), np.split(v, tp), strict=True):
        mem = fused_in_memory(qr, kr, vr, groups // tp)
        if version == 0:
            saved = np.concatenate([qr, kr, vr])  # [3, np, hn]
        elif version == 1.0:
            np_r, rest = heads // tp, qr.shape[1:]
            parts = [x.reshape(np_r, HN, *rest) for x in (qr, kr, vr)]
            saved = np.stack(parts, axis=2).reshape(-1, *rest)  # [np, hn, 3]
        else:
            saved = mem
        if version < 2.0:  # what Megatron does on load must give the in-memory layout back
            fixed = transpose_first_dim(saved, 3, version == 0, heads // tp, HN)
            assert np.array_equal(fixed, mem)
        out.append(saved)
    return out


def make_global(heads: int, groups: int, gated: bool, rng) -> dict[str, np.ndarray]:
    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    g = {"emb": r(VOCAB, H), "pos": r(12, H), "out": r(VOCAB, H), "final": r(H), "final_b": r(H)}
    for i in range(LAYERS):
        g |= {
            f"{i}.q": r(heads * HN, H),
            f"{i}.k": r(groups * HN, H),
            f"{i}.v": r(groups * HN, H),
            f"{i}.qb": r(heads * HN),
            f"{i}.kb": r(groups * HN),
            f"{i}.vb": r(groups * HN),
            f"{i}.proj": r(H, heads * HN),
            f"{i}.proj_b": r(H),
            f"{i}.ln1": r(H),
            f"{i}.ln2": r(H),
            f"{i}.fc2": r(H, FFN),
            f"{i}.fc2_b": r(H),
        }
        if gated:
            g |= {f"{i}.gate": r(FFN, H), f"{i}.up": r(FFN, H), f"{i}.gate_b": r(FFN), f"{i}.up_b": r(FFN)}
        else:
            g |= {f"{i}.fc1": r(FFN, H), f"{i}.fc1_b": r(FFN)}
    return g


NAMES = {
    "core": {
        "emb": "embedding.word_embeddings.weight",
        "pos": "embedding.position_embeddings.weight",
        "out": "output_layer.weight",
        "final": "decoder.final_layernorm.weight",
        "final_b": "decoder.final_layernorm.bias",
        "layer": "decoder.layers.{i}.",
        "qkv": "self_attention.linear_qkv",
        "q": "self_attention.linear_q",
        "k": "self_attention.linear_k",
        "v": "self_attention.linear_v",
        "proj": "self_attention.linear_proj",
        "ln1": "self_attention.linear_qkv.layer_norm_weight",
        "ln2": "mlp.linear_fc1.layer_norm_weight",
        "fc1": "mlp.linear_fc1",
        "gate": "mlp.linear_fc1_gate",
        "up": "mlp.linear_fc1_up",
        "fc2": "mlp.linear_fc2",
    },
    "legacy": {
        "emb": "language_model.embedding.word_embeddings.weight",
        "pos": "language_model.embedding.position_embeddings.weight",
        "out": "word_embeddings_for_head.weight",
        "final": "language_model.encoder.final_layernorm.weight",
        "final_b": "language_model.encoder.final_layernorm.bias",
        "layer": "language_model.encoder.layers.{i}.",
        "qkv": "self_attention.query_key_value",
        "q": "self_attention.query",
        "k": "self_attention.key",
        "v": "self_attention.value",
        "proj": "self_attention.dense",
        "ln1": "input_layernorm.weight",
        "ln2": "post_attention_layernorm.weight",
        "fc1": "mlp.dense_h_to_4h",
        "gate": "mlp.dense_h_to_4h_gate",
        "up": "mlp.dense_h_to_4h_up",
        "fc2": "mlp.dense_4h_to_h",
    },
}


def shard_model(g, naming: str, heads: int, groups: int, tp: int, pp: int, version: float, gated: bool):
    """{(tp, pp): {key: array}} as Megatron saves it (stage-local layer numbers)."""
    n = NAMES[naming]
    out: dict[tuple[int, int], dict[str, np.ndarray]] = {(t, p): {} for t in range(tp) for p in range(pp)}
    per_stage = LAYERS // pp

    def put(p: int, key: str, parts: list[np.ndarray]) -> None:
        for t in range(tp):
            out[(t, p)][key] = parts[t]

    put(0, n["emb"], np.split(g["emb"], tp))
    put(0, n["pos"], [g["pos"]] * tp)
    put(pp - 1, n["out"], np.split(g["out"], tp))
    put(pp - 1, n["final"], [g["final"]] * tp)
    put(pp - 1, n["final_b"], [g["final_b"]] * tp)
    for i in range(LAYERS):
        p, local = divmod(i, per_stage)
        pre = n["layer"].format(i=local)
        put(
            p,
            pre + n["qkv"] + ".weight",
            shard_qkv_megatron(g[f"{i}.q"], g[f"{i}.k"], g[f"{i}.v"], heads, groups, tp, version),
        )
        put(
            p,
            pre + n["qkv"] + ".bias",
            shard_qkv_megatron(g[f"{i}.qb"], g[f"{i}.kb"], g[f"{i}.vb"], heads, groups, tp, version),
        )
        put(p, pre + n["proj"] + ".weight", np.split(g[f"{i}.proj"], tp, axis=1))
        put(p, pre + n["proj"] + ".bias", [g[f"{i}.proj_b"]] * tp)
        put(p, pre + n["ln1"], [g[f"{i}.ln1"]] * tp)
        put(p, pre + n["ln2"], [g[f"{i}.ln2"]] * tp)
        if gated:  # mlp.py: torch.chunk(x, 2, dim=-1) -> gate, up of this rank
            for suffix, a, b in ((".weight", "gate", "up"), (".bias", "gate_b", "up_b")):
                parts = [
                    np.concatenate([x, y])
                    for x, y in zip(np.split(g[f"{i}.{a}"], tp), np.split(g[f"{i}.{b}"], tp), strict=True)
                ]
                put(p, pre + n["fc1"] + suffix, parts)
        else:
            put(p, pre + n["fc1"] + ".weight", np.split(g[f"{i}.fc1"], tp))
            put(p, pre + n["fc1"] + ".bias", np.split(g[f"{i}.fc1_b"], tp))
        put(p, pre + n["fc2"] + ".weight", np.split(g[f"{i}.fc2"], tp, axis=1))
        put(p, pre + n["fc2"] + ".bias", [g[f"{i}.fc2_b"]] * tp)
    return out


def expected_globals(g, naming: str, gated: bool) -> dict[str, np.ndarray]:
    n = NAMES[naming]
    e = {n[k]: g[k] for k in ("emb", "pos", "out", "final", "final_b")}
    for i in range(LAYERS):
        pre = n["layer"].format(i=i)
        for part in ("q", "k", "v"):
            e[pre + n[part] + ".weight"] = g[f"{i}.{part}"]
            e[pre + n[part] + ".bias"] = g[f"{i}.{part}b"]
        e |= {
            pre + n["proj"] + ".weight": g[f"{i}.proj"],
            pre + n["proj"] + ".bias": g[f"{i}.proj_b"],
            pre + n["ln1"]: g[f"{i}.ln1"],
            pre + n["ln2"]: g[f"{i}.ln2"],
            pre + n["fc2"] + ".weight": g[f"{i}.fc2"],
            pre + n["fc2"] + ".bias": g[f"{i}.fc2_b"],
        }
        if gated:
            e |= {
                pre + n["gate"] + ".weight": g[f"{i}.gate"],
                pre + n["up"] + ".weight": g[f"{i}.up"],
                pre + n["gate"] + ".bias": g[f"{i}.gate_b"],
                pre + n["up"] + ".bias": g[f"{i}.up_b"],
            }
        else:
            e |= {pre + n["fc1"] + ".weight": g[f"{i}.fc1"], pre + n["fc1"] + ".bias": g[f"{i}.fc1_b"]}
    return e


def on_disk(tmp_path, arrays: dict[tuple[int, int], dict[str, np.ndarray]]):
    """Each rank's tensors as a safetensors file, opened lazily."""
    out, handles = {}, []
    for (t, p), d in arrays.items():
        path = str(tmp_path / f"rank_{t}_{p}.safetensors")
        save_file({k: np.ascontiguousarray(v) for k, v in d.items()}, path)
        c = open_safetensors(path)
        handles.append(c)
        out[(t, p)] = dict(c.tensors)
    return out, handles


def layout(naming: str, heads: int, groups: int, version: float, gated: bool) -> M.Layout:
    table = M.CORE_TABLE if naming == "core" else M.LEGACY_TABLE
    return M.Layout(table, M.Attention(heads, groups, HN, version), gated=gated)


CASES = [
    # naming, tp, pp, heads, groups, version, gated
    ("core", 1, 1, 8, 2, 3.0, True),
    ("core", 2, 1, 8, 2, 3.0, True),
    ("core", 4, 1, 8, 4, 3.0, True),
    ("core", 1, 2, 8, 8, 3.0, True),
    ("core", 2, 2, 8, 2, 3.0, True),
    ("core", 4, 2, 8, 8, 3.0, False),
    ("core", 4, 1, 8, 2, 3.0, True),  # fewer query groups than ranks
    ("legacy", 1, 1, 4, 4, 0, False),
    ("legacy", 2, 1, 4, 4, 0, False),
    ("legacy", 4, 2, 4, 4, 0, False),
    ("legacy", 2, 2, 4, 4, 1.0, False),
    ("legacy", 4, 1, 4, 4, 1.0, False),
    ("legacy", 2, 2, 4, 4, 2.0, False),
    ("legacy", 2, 1, 4, 4, 3.0, False),
    ("legacy", 2, 2, 4, 4, 3.0, True),
]


@pytest.mark.parametrize("naming,tp,pp,heads,groups,version,gated", CASES)
def test_merge_model_is_bit_exact(tmp_path, naming, tp, pp, heads, groups, version, gated) -> None:
    g = make_global(heads, groups, gated, np.random.default_rng(tp * 10 + pp))
    shards, handles = on_disk(tmp_path, shard_model(g, naming, heads, groups, tp, pp, version, gated))
    merged = M.merge_model(shards, layout(naming, heads, groups, version, gated), tp, pp, num_layers=LAYERS)
    expect = expected_globals(g, naming, gated)
    assert sorted(merged.tensors) == sorted(expect)
    for key, want in expect.items():
        got = merged.tensors[key]
        assert got.name == key and np.array_equal(V.materialize(got), want), key
    # Row views keep the rank files' byte ranges: the writer copies them without decoding.
    n = NAMES[naming]
    for key in (n["emb"], n["layer"].format(i=LAYERS - 1) + n["q"] + ".weight"):
        segs = merged.tensors[key].segments()
        assert segs is not None and segment_bytes(segs) == expect[key].tobytes(), key
    for c in handles:
        c.close()


def test_split_as_q_k_v_blocks_or_wrong_version_gives_other_q() -> None:
    rng = np.random.default_rng(1)
    heads, groups, tp = 8, 2, 2
    q, k, v = (rng.standard_normal((n * HN, H)).astype(np.float32) for n in (heads, groups, groups))
    ranks = [ArrayTensor(f"qkv{r}", F32, a) for r, a in enumerate(shard_qkv_megatron(q, k, v, heads, groups, tp, 3.0))]
    att = M.Attention(heads, groups, HN, 3.0)
    good = V.materialize(M.merge_qkv(ranks, att, ["q", "k", "v"])[0])
    assert np.array_equal(good, q)
    # Negative control: [Q | K | V] blocks of the merged tensor instead of per-group pieces.
    whole = V.concat_rows(ranks, "qkv")
    naive_q = V.split_rows(whole, [heads * HN, groups * HN, groups * HN], ["q", "k", "v"])[0]
    assert not np.array_equal(V.materialize(naive_q), q)
    # Negative control: a version-0 checkpoint ([3, np, hn]) read as 3.0 ([np, 3, hn]).
    mha = [ArrayTensor(f"qkv{r}", F32, a) for r, a in enumerate(shard_qkv_megatron(q, q, q, heads, heads, tp, 0))]
    as_v3 = V.materialize(M.merge_qkv(mha, M.Attention(heads, heads, HN, 3.0), ["q", "k", "v"])[0])
    as_v0 = V.materialize(M.merge_qkv(mha, M.Attention(heads, heads, HN, 0), ["q", "k", "v"])[0])
    assert np.array_equal(as_v0, q) and not np.array_equal(as_v3, q)


def test_ranks_in_the_wrong_order_give_other_tensors(tmp_path) -> None:
    g = make_global(8, 2, True, np.random.default_rng(3))
    arrays = shard_model(g, "core", 8, 2, 2, 1, 3.0, True)
    swapped = {(1 - t, p): d for (t, p), d in arrays.items()}
    lay = layout("core", 8, 2, 3.0, True)
    merged = M.merge_model(
        {k: {n: ArrayTensor(n, F32, a) for n, a in d.items()} for k, d in swapped.items()}, lay, 2, 1
    )
    expect = expected_globals(g, "core", True)
    for key in (
        "embedding.word_embeddings.weight",
        "decoder.layers.0.self_attention.linear_q.weight",
        "decoder.layers.0.mlp.linear_fc1_gate.weight",
        "decoder.layers.0.self_attention.linear_proj.weight",
    ):
        assert not np.array_equal(V.materialize(merged.tensors[key]), expect[key]), key


def _mem(arrays):
    return {k: {n: ArrayTensor(n, F32, a) for n, a in d.items()} for k, d in arrays.items()}


def test_replicated_mismatch_and_missing_or_extra_ranks_are_named() -> None:
    g = make_global(4, 4, False, np.random.default_rng(5))
    lay = layout("legacy", 4, 4, 3.0, False)
    arrays = shard_model(g, "legacy", 4, 4, 2, 2, 3.0, False)
    key = "language_model.encoder.layers.1.post_attention_layernorm.weight"
    arrays[(1, 1)][key] = arrays[(1, 1)][key] + np.float32(1e-3)
    with pytest.raises(MappingError, match=r"layers\.3\.post_attention_layernorm.*rank 0.*rank 1"):
        M.merge_model(_mem(arrays), lay, 2, 2)
    arrays = shard_model(g, "legacy", 4, 4, 2, 2, 3.0, False)
    del arrays[(1, 1)]
    with pytest.raises(CheckpointError, match="mp_rank_01_001: missing"):
        M.merge_model(_mem(arrays), lay, 2, 2)
    arrays = shard_model(g, "legacy", 4, 4, 2, 1, 3.0, False)
    arrays[(2, 0)] = arrays[(1, 0)]
    with pytest.raises(CheckpointError, match="mp_rank_02: extra"):
        M.merge_model(_mem(arrays), lay, 2, 1)
    arrays = shard_model(g, "legacy", 4, 4, 2, 1, 3.0, False)
    del arrays[(1, 0)]["language_model.encoder.layers.2.mlp.dense_4h_to_h.bias"]
    with pytest.raises(CheckpointError, match=r"mp_rank_01.*dense_4h_to_h"):
        M.merge_model(_mem(arrays), lay, 2, 1)
    arrays = shard_model(g, "legacy", 4, 4, 1, 1, 3.0, False)
    arrays[(0, 0)]["language_model.encoder.layers.0.mystery.weight"] = g["final"]
    with pytest.raises(MappingError, match=r"mystery\.weight: not a known"):
        M.merge_model(_mem(arrays), lay, 1, 1)


@pytest.mark.parametrize("version", [0, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("heads,groups,tp", [(8, 8, 1), (8, 8, 2), (8, 8, 4), (8, 2, 2), (8, 2, 4), (8, 1, 2)])
def test_qkv_and_fc1_round_trips(version, heads, groups, tp) -> None:
    if version < 2.0 and groups != heads:
        with pytest.raises(ModelArgsError, match="predates grouped-query"):
            M.Attention(heads, groups, HN, version).per_rank(tp, "qkv")
        return
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((n * HN, H)).astype(np.float32) for n in (heads, groups, groups))
    att = M.Attention(heads, groups, HN, version)
    ranks = [
        ArrayTensor(f"qkv{r}", F32, a) for r, a in enumerate(shard_qkv_megatron(q, k, v, heads, groups, tp, version))
    ]
    merged = M.merge_qkv(ranks, att, ["q", "k", "v"])
    for got, want in zip(merged, (q, k, v), strict=True):
        assert np.array_equal(V.materialize(got), want)
    back = M.shard_qkv(*merged, att, tp, "qkv")
    for got, want in zip(back, ranks, strict=True):
        assert np.array_equal(V.materialize(got), want.array)
    gate, up = rng.standard_normal((2, FFN, H)).astype(np.float32)
    fc1 = M.shard_fc1(ArrayTensor("gate", F32, gate), ArrayTensor("up", F32, up), tp, "fc1")
    for r, part in enumerate(fc1):  # Megatron's per-rank layout, written independently
        want = np.concatenate([np.split(gate, tp)[r], np.split(up, tp)[r]])
        assert np.array_equal(V.materialize(part), want)
    g2, u2 = M.merge_fc1(fc1, ["gate", "up"])
    assert np.array_equal(V.materialize(g2), gate) and np.array_equal(V.materialize(u2), up)


def test_vocab_padding_matches_megatron_and_trims() -> None:
    def old_round(after: int, multiple: int) -> int:  # Megatron's former loop (tests/unit_tests/test_training.py)
        while after % multiple:
            after += 1
        return after

    for vocab in (1, 50257, 64000, 64001):
        for div, tp in ((1, 1), (128, 1), (128, 2), (64, 8)):
            assert M.padded_vocab_size(vocab, div, tp) == old_round(vocab, div * tp)
    emb = np.random.default_rng(2).standard_normal((M.padded_vocab_size(37, 8, 2), 4)).astype(np.float32)
    t = ArrayTensor("emb", F32, emb)
    assert t.shape[0] == 48
    assert np.array_equal(V.materialize(M.trim_vocab(t, 37, make_vocab_size_divisible_by=8, tp=2)), emb[:37])
    with pytest.raises(ModelArgsError, match=r"emb: 48 rows.*has 64"):
        M.trim_vocab(t, 37, make_vocab_size_divisible_by=8, tp=4)
    with pytest.raises(ModelArgsError, match="does not fit"):
        M.trim_vocab(t, 49)


def test_pipeline_renumbering_even_and_uneven() -> None:
    assert M.renumber_layer("decoder.layers.1.mlp.linear_fc1.weight", 6) == "decoder.layers.7.mlp.linear_fc1.weight"
    assert M.renumber_layer("model.language_model.encoder.layers.0.dense.weight", 3).endswith(
        "encoder.layers.3.dense.weight"
    )
    assert M.renumber_layer("layers.2.attention.wq.weight", 2) == "layers.4.attention.wq.weight"
    assert M.layer_index("decoder.final_layernorm.weight") is None
    assert M.megatron_stage_layer_counts(8, 2) == [4, 4]
    assert M.megatron_stage_layer_counts(7, 3, first=1) == [1, 3, 3]
    assert M.megatron_stage_layer_counts(7, 3, first=3, last=2) == [3, 2, 2]
    with pytest.raises(ModelArgsError):
        M.megatron_stage_layer_counts(7, 2)
    # Uneven stages (num_layers_in_first_pipeline_stage=1): counts come from each stage's keys.
    g = make_global(4, 4, False, np.random.default_rng(9))
    even = shard_model(g, "legacy", 4, 4, 1, 1, 3.0, False)[(0, 0)]
    pre = "language_model.encoder.layers."
    stage0 = {k: a for k, a in even.items() if not k.startswith(pre) or k.startswith(pre + "0.")}
    stage0 = {k: a for k, a in stage0.items() if "final_layernorm" not in k and "for_head" not in k}
    stage1 = {}
    for k, a in even.items():
        i = M.layer_index(k)
        if i is None and ("final_layernorm" in k or "for_head" in k):
            stage1[k] = a
        elif i is not None and i >= 1:
            stage1[M.renumber_layer(k, -1)] = a
    lay = layout("legacy", 4, 4, 3.0, False)
    merged = M.merge_model(_mem({(0, 0): stage0, (0, 1): stage1}), lay, 1, 2, num_layers=LAYERS)
    for key, want in expected_globals(g, "legacy", False).items():
        assert np.array_equal(V.materialize(merged.tensors[key]), want), key
    with pytest.raises(CheckpointError, match="expected 5"):
        M.merge_model(_mem({(0, 0): stage0, (0, 1): stage1}), lay, 1, 2, num_layers=5)
    gap = {M.renumber_layer(k, 1) if M.layer_index(k) == 2 else k: a for k, a in stage1.items()}
    with pytest.raises(CheckpointError, match=r"mp_rank_00_001: layer indices skip \[2\]"):
        M.merge_model(_mem({(0, 0): stage0, (0, 1): gap}), lay, 1, 2)


def test_extra_state_is_dropped_and_stage_duplicates_are_checked() -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    lay = layout("core", 4, 4, 3.0, False)
    stage = {"decoder.layers.0.self_attention.linear_proj._extra_state": a, "decoder.final_layernorm.weight": a[0]}
    merged = M.merge_model(_mem({(0, 0): dict(stage), (0, 1): dict(stage)}), lay, 1, 2)
    assert merged.dropped == [
        "decoder.layers.0.self_attention.linear_proj._extra_state",
        "decoder.layers.1.self_attention.linear_proj._extra_state",
    ]
    other = dict(stage) | {"decoder.final_layernorm.weight": a[1]}
    with pytest.raises(MappingError, match=r"final_layernorm\.weight.*pipeline stage 0 and pipeline stage 1"):
        M.merge_model(_mem({(0, 0): dict(stage), (0, 1): other}), lay, 1, 2)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_plain_tensor_parallel_round_trips(tp) -> None:
    rng = np.random.default_rng(13)
    w, b = rng.standard_normal((8, 12)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    cases = [
        (M.Kind.COLUMN, w, np.split(w, tp)),
        (M.Kind.VOCAB, w, np.split(w, tp)),
        (M.Kind.COLUMN, b, np.split(b, tp)),
        (M.Kind.ROW, w, np.split(w, tp, axis=1)),
        (M.Kind.ROW, b, [b] * tp),  # row-parallel biases are whole on every rank
        (M.Kind.REPLICATED, b, [b] * tp),
    ]
    for kind, whole, parts in cases:
        ranks = [ArrayTensor(f"t{r}", F32, a) for r, a in enumerate(parts)]
        merged = M.merge_tp(ranks, kind, "t")
        assert np.array_equal(V.materialize(merged), whole), kind
        back = M.shard_tp(ArrayTensor("t", F32, whole), kind, tp)
        assert all(np.array_equal(V.materialize(x), a) for x, a in zip(back, parts, strict=True)), kind
        if tp > 1 and kind is not M.Kind.REPLICATED and not (kind is M.Kind.ROW and whole.ndim == 1):
            wrong = M.merge_tp(ranks[::-1], kind, "t")  # negative control: ranks in the wrong order
            assert not np.array_equal(V.materialize(wrong), whole), kind
    with pytest.raises(MappingError, match="cannot be split over 5 ranks"):
        M.shard_tp(ArrayTensor("t", F32, w), M.Kind.ROW, 5)


def test_virtual_pipeline_chunks_follow_megatron_offsets() -> None:
    tp, pp, vp = 2, 2, 2
    g = make_global(8, 2, True, np.random.default_rng(17))
    flat = shard_model(g, "core", 8, 2, tp, 1, 3.0, True)
    per_chunk = LAYERS // pp // vp
    chunks: dict[tuple[int, int, int], dict[str, np.ndarray]] = {}
    for t in range(tp):
        for p in range(pp):
            for v in range(vp):
                # get_transformer_layer_offset with virtual stages: vp_stage * (L / vp) + pp_rank * (L / pp / vp)
                offset = v * (LAYERS // vp) + p * per_chunk
                d = {}
                for k, a in flat[(t, 0)].items():
                    i = M.layer_index(k)
                    if i is not None and offset <= i < offset + per_chunk:
                        d[M.renumber_layer(k, -offset)] = a
                    elif i is None and (p, v) == (0, 0) and k.startswith("embedding."):
                        d[k] = a
                    elif i is None and (p, v) == (pp - 1, vp - 1) and not k.startswith("embedding."):
                        d[k] = a
                chunks[(t, p, v)] = d
    lay = layout("core", 8, 2, 3.0, True)
    merged = M.merge_model(_mem(chunks), lay, tp, pp, vp_size=vp, num_layers=LAYERS)
    for key, want in expected_globals(g, "core", True).items():
        assert np.array_equal(V.materialize(merged.tensors[key]), want), key
    # Negative control: chunks taken in (pp, vp) order instead of (vp, pp) misplace the layers.
    swapped = {(t, p, v): chunks[(t, v, p)] for t, p, v in chunks}
    wrong = M.merge_model(_mem(swapped), lay, tp, pp, vp_size=vp)
    key = "decoder.layers.1.self_attention.linear_q.weight"
    assert not np.array_equal(V.materialize(wrong.tensors[key]), g["1.q"])
    del chunks[(1, 1, 0)]
    with pytest.raises(CheckpointError, match="mp_rank_01_001 model0: missing"):
        M.merge_model(_mem(chunks), lay, tp, pp, vp_size=vp)


# ------------------------------------------- against the Megatron checkpoint fixtures (torch zip)

FIXTURE_CASES = [
    # naming, spec, tp, pp, checkpoint_version, config overrides
    ("core", "te", 2, 2, 3.0, {"num_query_groups": 2, "activation": "swiglu", "normalization": "RMSNorm"}),
    ("core", "local", 2, 1, 3.0, {"untie_embeddings_and_output_weights": True}),
    ("legacy", "local", 2, 2, 0, {}),
    ("legacy", "local", 2, 1, 1.0, {}),
    ("legacy", "local", 1, 2, 3.0, {"activation": "swiglu"}),
]


def _fixture_expectation(model, cfg, naming: str, spec: str) -> dict[str, np.ndarray]:
    """Global tensors of the reference model under the names merge_model gives them."""
    from tests.native.megatron_save import LEGACY_LAYER_NAMES, LOCAL_LAYER_NAMES

    hn, groups = cfg.head_dim, cfg.groups
    hpg = cfg.num_attention_heads // groups
    out: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        a = t.numpy()
        m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
        sub = m.group(2) if m else None
        if naming == "legacy":
            sub = LEGACY_LAYER_NAMES.get(sub, sub)
            pre = f"language_model.encoder.layers.{m.group(1)}." if m else ""
            qkv, fc1 = "self_attention.query_key_value", "mlp.dense_h_to_4h"
            q, k, v, gate, up = "query", "key", "value", "dense_h_to_4h_gate", "dense_h_to_4h_up"
        else:
            sub = LOCAL_LAYER_NAMES.get(sub, sub) if spec == "local" else sub
            pre = f"decoder.layers.{m.group(1)}." if m else ""
            qkv, fc1 = "self_attention.linear_qkv", "mlp.linear_fc1"
            q, k, v, gate, up = "linear_q", "linear_k", "linear_v", "linear_fc1_gate", "linear_fc1_up"
        if not m:
            key = {
                "embedding.word_embeddings.weight": "language_model.embedding.word_embeddings.weight",
                "embedding.position_embeddings.weight": "language_model.embedding.position_embeddings.weight",
                "decoder.final_layernorm.weight": "language_model.encoder.final_layernorm.weight",
                "decoder.final_layernorm.bias": "language_model.encoder.final_layernorm.bias",
                "output_layer.weight": "language_model.output_layer.weight",
            }[name]
            out["model." + (key if naming == "legacy" else name)] = a
            continue
        leaf = sub.rsplit(".", 1)[-1]
        if sub.startswith(qkv + ".") and leaf in ("weight", "bias"):
            per_group = a.reshape(groups, hpg + 2, hn, *a.shape[1:])
            parts = (per_group[:, :hpg], per_group[:, hpg : hpg + 1], per_group[:, hpg + 1 :])
            for part, arr in zip((q, k, v), parts, strict=True):
                out[f"model.{pre}self_attention.{part}.{leaf}"] = arr.reshape(-1, *a.shape[1:])
        elif sub.startswith(fc1 + ".") and leaf in ("weight", "bias") and cfg.activation == "swiglu":
            g_, u_ = np.split(a, 2)
            out[f"model.{pre}mlp.{gate}.{leaf}"], out[f"model.{pre}mlp.{up}.{leaf}"] = g_, u_
        else:
            out[f"model.{pre}{sub}"] = a
    return out


@pytest.mark.parametrize("naming,spec,tp,pp,version,overrides", FIXTURE_CASES)
def test_merge_of_saved_megatron_checkpoints(tmp_path, naming, spec, tp, pp, version, overrides) -> None:
    pytest.importorskip("torch")
    from hubconv.io.torch_file import open_torch_zip
    from tests.native.megatron_gpt import MegatronGPT, MegatronGPTConfig
    from tests.native.megatron_save import save_legacy

    cfg = MegatronGPTConfig(num_layers=4, **overrides)
    model = MegatronGPT(cfg, tp=tp).init_random(7)
    files = save_legacy(model, cfg, tmp_path, tp=tp, pp=pp, checkpoint_version=version, naming=naming, spec=spec)
    opened = {rank: open_torch_zip(str(path)) for rank, path in files.items()}
    shards = {rank: {k: t for k, t in c.tensors.items() if k.startswith("model.")} for rank, c in opened.items()}
    att = M.Attention(cfg.num_attention_heads, cfg.groups, cfg.head_dim, version)
    table = M.CORE_TABLE if naming == "core" else M.LEGACY_TABLE
    lay = M.Layout(table, att, gated=cfg.activation == "swiglu")
    merged = M.merge_model(shards, lay, tp, pp, num_layers=cfg.num_layers)
    expect = _fixture_expectation(model, cfg, naming, spec)
    tied_head = "model.word_embeddings_for_head.weight" if naming == "legacy" else "model.output_layer.weight"
    if pp > 1 and not cfg.untie_embeddings_and_output_weights:  # the last stage's copy of the tied embedding
        expect[tied_head] = expect[
            f"model.{'language_model.' if naming == 'legacy' else ''}embedding.word_embeddings.weight"
        ]
    assert sorted(merged.tensors) == sorted(expect)
    for key, want in expect.items():
        assert np.array_equal(V.materialize(merged.tensors[key]), want), key
    assert all(k.endswith("_extra_state") for k in merged.dropped) and (spec == "te") == bool(merged.dropped)
    for c in opened.values():
        c.close()


class CountingTensor(ArrayTensor):
    """An in-memory tensor that records the largest read (rows) it served."""

    largest = 0

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        CountingTensor.largest = max(CountingTensor.largest, stop - start)
        return super().read_rows(start, stop)


def test_merges_read_bounded_blocks() -> None:
    rows, cols, tp = 4096, 256, 2  # 4 MiB per rank, four 1 MiB blocks (1024 rows)
    rng = np.random.default_rng(19)
    same = rng.standard_normal((rows, cols)).astype(np.float32)
    CountingTensor.largest = 0
    M.merge_tp([CountingTensor(f"n{r}", F32, same) for r in range(tp)], M.Kind.REPLICATED, "norm")
    assert CountingTensor.largest == 1024  # the equality check streams block by block
    heads = 64  # 16 groups, head_dim 64: q has 4096 rows (4 MiB), 32 heads per rank
    fused = [rng.standard_normal(((heads + 2 * 16) // tp * 64, cols)).astype(np.float32) for _ in range(tp)]
    q, _, _ = M.merge_qkv(
        [CountingTensor(f"qkv{r}", F32, a) for r, a in enumerate(fused)], M.Attention(heads, 16, 64), "qkv"
    )
    CountingTensor.largest = 0
    blocks = list(V.blocks(q))
    assert len(blocks) == 4 and CountingTensor.largest <= 1024


@pytest.mark.parametrize("naming,tp,pp,heads,groups,version,gated", CASES)
def test_shard_model_inverts_merge_model(naming, tp, pp, heads, groups, version, gated) -> None:
    g = make_global(heads, groups, gated, np.random.default_rng(23))
    arrays = shard_model(g, naming, heads, groups, tp, pp, version, gated)
    lay = layout(naming, heads, groups, version, gated)
    merged = M.merge_model(_mem(arrays), lay, tp, pp)
    back = M.shard_model(merged.tensors, lay, tp, pp)
    assert sorted(back) == sorted(arrays)
    for rank, d in arrays.items():  # Megatron's own per-rank layout, written independently above
        assert sorted(back[rank]) == sorted(d), rank
        for key, want in d.items():
            assert np.array_equal(V.materialize(back[rank][key]), want), (rank, key)


def test_impossible_attention_shapes_are_one_line_errors() -> None:
    for att, tp in ((M.Attention(8, 0, 4), 1), (M.Attention(8, 3, 4), 1), (M.Attention(6, 6, 4), 4)):
        with pytest.raises(ModelArgsError, match=r"^qkv: "):
            att.per_rank(tp, "qkv")
    with pytest.raises(ModelArgsError, match="not a known Megatron QKV ordering"):
        M.merge_qkv(
            [ArrayTensor("qkv", F32, np.zeros((12, 2), np.float32))], M.Attention(1, 1, 4, 1.5), ["q", "k", "v"]
        )
    with pytest.raises(MappingError, match="qkv0: tensor-parallel rank 0 has shape \\[10, 2\\], expected 12 rows"):
        M.merge_qkv([ArrayTensor("qkv0", F32, np.zeros((10, 2), np.float32))], M.Attention(1, 1, 4), ["q", "k", "v"])
