"""RuleAdapter: the planning every rule-based adapter shares (ties, entries, completeness, lossy steps)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from hubconv.adapters.generic import RuleAdapter, same_data
from hubconv.adapters.rules import Drop, Rule, RuleTable
from hubconv.dtypes import BY_NAME
from hubconv.errors import MappingError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import ArrayTensor

F32 = BY_NAME["F32"]


class Toy(RuleAdapter):
    name, description, families, model_types, model_type = "toy", "toy", ("toy",), ("gpt2",), "gpt2"
    layer_count_arg = "n_layer"
    tied_pair = ("wte", "head")

    def detect_family(self, ckpt: Checkpoint) -> str:
        return "toy"

    def resolve_args(self, ckpt, tensors, user: Mapping[str, Any]) -> dict[str, Any]:
        return {"n_layer": 2, "width": 4, "tie_word_embeddings": user.get("tie", True)}

    def table(self, args):
        return RuleTable(
            [
                Rule("wte", "transformer.wte.weight", ops=[("slice_rows", {"stop": 3})]),
                Rule("h.{i}.w", "transformer.h.{i}.mlp.c_fc.weight", ops=[("transpose", {})]),
                Rule(
                    {},
                    "transformer.h.{i}.mlp.c_fc.bias",
                    ops=[("zeros", {"shape": ["width"]})],
                    counts={"i": "n_layer"},
                ),
                Rule("head", "lm_head.weight"),
            ],
            [Drop(r"^opt\.", "optimizer state")],
        )

    def hf_config(self, args):
        return {"n_layer": args["n_layer"]}

    def entry_reason(self, entry: str) -> str | None:
        return "training counter" if entry == "iter_num" else None


def ckpt(**over: np.ndarray) -> Checkpoint:
    rng = np.random.default_rng(0)
    wte = rng.standard_normal((5, 4)).astype(np.float32)
    arrays = {"wte": wte, "head": wte.copy(), "h.0.w": rng.standard_normal((4, 4)).astype(np.float32)}
    arrays["h.1.w"] = arrays["h.0.w"] + 1
    arrays["opt.m"] = np.zeros(2, np.float32)
    arrays.update(over)
    tensors = {k: ArrayTensor(k, F32, v) for k, v in arrays.items() if v is not None}
    return Checkpoint(path="toy.pt", format="torch", tensors=tensors, entries=["iter_num"], values={"iter_num": 3})


def test_plan_accounts_for_everything() -> None:
    plan = Toy().plan(ckpt(), "toy", {})
    names = [t.name for t in plan.targets]
    assert names == [
        "transformer.wte.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_fc.bias",
        "transformer.h.1.mlp.c_fc.bias",
    ]
    assert plan.dropped == {
        "head": "tied to wte (identical data)",
        "opt.m": "optimizer state",
        "iter_num": "training counter",
    }
    assert set(plan.lossy) == {
        "transformer.wte.weight",
        "transformer.h.0.mlp.c_fc.bias",
        "transformer.h.1.mlp.c_fc.bias",
    }
    assert "vocabulary padding" in plan.lossy["transformer.wte.weight"]


def test_tied_head_that_differs_is_an_error() -> None:
    with pytest.raises(MappingError, match="tied, but head differs from wte"):
        Toy().plan(ckpt(head=np.ones((5, 4), np.float32)), "toy", {})
    plan = Toy().plan(ckpt(head=np.ones((5, 4), np.float32)), "toy", {"tie": False})
    assert "lm_head.weight" in {t.name for t in plan.targets}


def test_missing_layer_and_unknown_entries_are_errors() -> None:
    with pytest.raises(MappingError, match=r"lacks tensors needed by the model: h\.1\.w$"):
        Toy().plan(ckpt(**{"h.1.w": None}), "toy", {})
    c = ckpt()
    c.entries.append("mystery")
    with pytest.raises(MappingError, match="non-tensor entry 'mystery'"):
        Toy().plan(c, "toy", {})
    with pytest.raises(MappingError, match=r"match no mapping rule: h\.0\.extra"):
        Toy().plan(ckpt(**{"h.0.extra": np.zeros(1, np.float32)}), "toy", {})


def test_same_data_compares_bytes() -> None:
    a = ArrayTensor("a", F32, np.array([0.0, 1.0], np.float32))
    assert same_data(a, ArrayTensor("b", F32, np.array([0.0, 1.0], np.float32)))
    assert not same_data(a, ArrayTensor("b", F32, np.array([-0.0, 1.0], np.float32)))  # -0.0 == 0.0 but differs
