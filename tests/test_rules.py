"""Role rules, gathers and the op registry: exact fusions, every tensor accounted for, errors that name the
rule and the key, and round trips through the recorded inverses."""

from __future__ import annotations

import re

import numpy as np
import pytest

from hubconv import ops
from hubconv import views as V
from hubconv.adapters.rules import Drop, Rule, RuleTable, evaluate
from hubconv.dtypes import BY_NAME
from hubconv.errors import MappingError
from hubconv.io.tensor import ArrayTensor

F32 = BY_NAME["F32"]
RNG = np.random.default_rng(3)
N_EMBD, N_HEAD, N_LAYER = 8, 2, 2
HS = N_EMBD // N_HEAD
ARGS = {"n_embd": N_EMBD, "n_head": N_HEAD, "n_layer": N_LAYER}


def tutorial_gpt() -> dict[str, ArrayTensor]:
    """State dict of the classic tutorial GPT: one Linear per head, no biases on q/k/v."""
    sd = {}
    for i in range(N_LAYER):
        for h in range(N_HEAD):
            for w in ("query", "key", "value"):
                sd[f"blocks.{i}.sa.heads.{h}.{w}.weight"] = RNG.standard_normal((HS, N_EMBD)).astype(np.float32)
        sd[f"blocks.{i}.sa.proj.weight"] = RNG.standard_normal((N_EMBD, N_EMBD)).astype(np.float32)
    sd["step"] = np.zeros((), np.float32)
    return {k: ArrayTensor(k, F32, v) for k, v in sd.items()}


QKV = Rule(
    src={
        "q": "blocks.{i}.sa.heads.{h*}.query.weight",
        "k": "blocks.{i}.sa.heads.{h*}.key.weight",
        "v": "blocks.{i}.sa.heads.{h*}.value.weight",
    },
    dst="transformer.h.{i}.attn.c_attn.weight",
    ops=[("concat_rows", {}), ("transpose", {})],
    counts={"h": "n_head"},
)
PROJ = Rule("blocks.{i}.sa.proj.weight", "transformer.h.{i}.attn.c_proj.weight", ops=[("transpose", {})])
BIAS = Rule(
    {}, "transformer.h.{i}.attn.c_attn.bias", ops=[("zeros", {"shape": ["3 * n_embd"]})], counts={"i": "n_layer"}
)
TABLE = RuleTable([QKV, PROJ, BIAS], [Drop(r"^step$", "training step counter")])


def test_per_head_qkv_fused_in_role_order_then_transposed() -> None:
    sd = tutorial_gpt()
    targets, dropped, records = TABLE.apply(sd, ARGS)
    got = {t.name: V.materialize(t) for t in targets}
    for i in range(N_LAYER):
        heads = [
            sd[f"blocks.{i}.sa.heads.{h}.{w}.weight"].array for w in ("query", "key", "value") for h in range(N_HEAD)
        ]
        assert np.array_equal(got[f"transformer.h.{i}.attn.c_attn.weight"], np.concatenate(heads).T)
        assert np.array_equal(got[f"transformer.h.{i}.attn.c_proj.weight"], sd[f"blocks.{i}.sa.proj.weight"].array.T)
        assert np.array_equal(got[f"transformer.h.{i}.attn.c_attn.bias"], np.zeros(3 * N_EMBD, np.float32))
    assert dropped == {"step": "training step counter"}
    lossy = {t for r in records if r.lossy for t in r.targets}
    assert lossy == {f"transformer.h.{i}.attn.c_attn.bias" for i in range(N_LAYER)}


def test_round_trip_of_exact_rules_is_bit_exact() -> None:
    sd = tutorial_gpt()
    targets, _, records = TABLE.apply(sd, ARGS)
    hf = {t.name: t for t in targets}
    exact = [r for r in records if r.inverse is not None]
    back = {t.name: V.materialize(t) for t in TABLE.invert(hf, exact)}
    assert set(back) == {k for k in sd if k != "step"}
    for k, v in back.items():
        assert v.tobytes() == sd[k].array.tobytes(), k
    with pytest.raises(MappingError, match="lossy"):
        TABLE.invert(hf, records)


def test_rename_only_mapping_of_per_head_weights_is_an_error_not_a_silent_success() -> None:
    """The classic strict=False bug: renaming per-head keys cannot produce a fused c_attn."""
    rename_only = RuleTable([Rule("blocks.{i}.sa.heads.{h}.query.weight", "transformer.h.{i}.attn.c_attn.weight")])
    with pytest.raises(MappingError, match=r"both produce 'transformer\.h\.0\.attn\.c_attn\.weight'"):
        rename_only.apply({k: v for k, v in tutorial_gpt().items() if ".query." in k}, ARGS)
    partial = RuleTable([QKV])
    with pytest.raises(MappingError, match=r"match no mapping rule: blocks\.0\.sa\.proj\.weight"):
        partial.apply(tutorial_gpt(), ARGS)


def test_gathers_must_be_complete_and_match_the_count() -> None:
    sd = tutorial_gpt()
    del sd["blocks.1.sa.heads.1.key.weight"]
    with pytest.raises(MappingError, match=r"role 'k' gathers h=\[0\], missing \[1\]"):
        TABLE.apply(sd, ARGS)
    sd = tutorial_gpt()
    with pytest.raises(MappingError, match=r"role 'q' gathers h=\[0, 1\], missing \[2\]"):
        TABLE.apply(sd, {**ARGS, "n_head": 3})
    sd = {k: v for k, v in tutorial_gpt().items() if ".value." not in k}
    with pytest.raises(
        MappingError,
        match=re.escape(
            "'blocks.0.sa.heads.0.query.weight' is present but 'blocks.0.sa.heads.{h}.value.weight' is missing"
        ),
    ):
        TABLE.apply(sd, ARGS)


def test_group_split_and_its_inverse_through_the_registry() -> None:
    """Megatron-style fused QKV per KV group -> q, k, v, and back, bit-exact."""
    groups, hd, q_per = 2, 4, 2
    fused = RNG.standard_normal((groups * (q_per + 2) * hd, 6)).astype(np.float32)
    table = RuleTable(
        [
            Rule(
                "layers.{i}.linear_qkv.weight",
                ["model.layers.{i}.q", "model.layers.{i}.k", "model.layers.{i}.v"],
                ops=[("split_groups", {"groups": "n_groups", "rows": ["q_per * hd", "hd", "hd"]})],
            )
        ]
    )
    sd = {"layers.0.linear_qkv.weight": ArrayTensor("layers.0.linear_qkv.weight", F32, fused)}
    targets, _, records = table.apply(sd, {"n_groups": groups, "q_per": q_per, "hd": hd})
    q, k, v = (V.materialize(t) for t in targets)
    g = fused.reshape(groups, (q_per + 2) * hd, 6)
    assert np.array_equal(q, g[:, : q_per * hd].reshape(-1, 6)) and np.array_equal(v, g[:, -hd:].reshape(-1, 6))
    (back,) = table.invert({t.name: t for t in targets}, records)
    assert back.name == "layers.0.linear_qkv.weight" and np.array_equal(V.materialize(back), fused)
    assert np.array_equal(k, g[:, q_per * hd : (q_per + 1) * hd].reshape(-1, 6))


def test_table_errors_name_the_rule() -> None:
    with pytest.raises(MappingError, match="unknown op 'fuse_magic'"):
        RuleTable([Rule("a", "b", ops=[("fuse_magic", {})])])
    with pytest.raises(MappingError, match="cannot gather"):
        RuleTable([Rule("a.{h*}", "b.{h*}")])
    with pytest.raises(MappingError, match=r"placeholder.* i are not given a range in counts"):
        RuleTable([Rule({}, "h.{i}.bias", ops=[("zeros", {"shape": [2]})])])
    with pytest.raises(MappingError, match=r"placeholder.* j are not captured by the source patterns"):
        RuleTable([Rule("a.{i}", "b.{j}")])
    bad = RuleTable([Rule("w", "x", ops=[("rope_permute", {"heads": "n_kv_head"})], label="rules[0]")])
    sd = {"w": ArrayTensor("w", F32, np.zeros((8, 2), np.float32))}
    with pytest.raises(MappingError, match=r"rules\[0\]: op rope_permute: parameter heads must be a positive integer"):
        bad.apply(sd, {"n_kv_heads": 2})
    with pytest.raises(MappingError, match="rules\\[0\\]: op rope_permute: unknown parameter"):
        RuleTable([Rule("w", "x", ops=[("rope_permute", {"heads": 2, "head": 2})], label="rules[0]")]).apply(sd, {})


def test_evaluate_is_arithmetic_only() -> None:
    assert evaluate("3 * n_embd + 1", ARGS, "t") == 25 and evaluate(["n_head", 4], ARGS, "t") == [2, 4]
    assert evaluate("BF16", ARGS, "t") == "BF16"
    for hostile in ("__import__('os').system('true')", "n_embd ** 99", "[].__class__"):
        with pytest.raises(MappingError, match="not integer arithmetic"):
            evaluate(hostile, ARGS, "t")
    with pytest.raises(MappingError, match="divides by zero"):
        evaluate("n_embd // 0", ARGS, "t")


def test_every_op_declares_an_inverse_or_a_lossy_reason() -> None:
    shapes = {"concat_rows": [(2, 3), (4, 3)], "concat_columns": [(2, 3), (2, 5)], "interleave_rows": [(2, 3)] * 2}
    params = {
        "rope_permute": {"heads": 2},
        "split_rows": {"sizes": [1, 1]},
        "split_groups": {"groups": 1, "rows": [1, 1]},
        "interleave_groups": {"groups": 1},
        "split_columns": {"sizes": [1, 2]},
        "slice_rows": {"stop": 1},
        "zeros": {"shape": [2]},
        "cast": {"dtype": "BF16"},
    }
    for name, _doc in ops.describe():
        op = ops.get(name)
        back = op.invert(params.get(name, {}), shapes.get(name, [(2, 3)]), [F32] * 2)
        assert isinstance(back, str) or back[0] in ops.REGISTRY, name
    assert isinstance(ops.get("slice_rows").invert({"stop": 1}, [(2, 3)], [F32]), str)
    assert ops.get("cast").invert({"dtype": "F32"}, [(2, 3)], [BY_NAME["BF16"]]) == ("cast", {"dtype": "BF16"})
    assert isinstance(ops.get("cast").invert({"dtype": "BF16"}, [(2, 3)], [F32]), str)
