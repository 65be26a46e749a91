"""Declarative YAML mappings (`--adapter mapping --mapping FILE.yml`): the shipped tutorial-GPT -> GPT-2 and
hand-written Llama -> Llama mappings against their own model code, negative controls, round trips, and errors
that name the rule."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from hubconv.adapters.mapping import MappingAdapter, load_spec
from hubconv.convert import convert, load_adapter
from hubconv.errors import HubconvError, MappingError
from hubconv.io.checkpoint import open_checkpoint
from hubconv.smoke import parity_positions, run_smoke
from hubconv.views import materialize
from tests.helpers import ROOT, hubconv

HERE = os.path.join(ROOT, "examples", "tutorial-gpt")
GPT_MAPPING = os.path.join(HERE, "mapping.yml")
LLAMA_MAPPING = os.path.join(HERE, "mapping-llama.yml")
VOCAB = 80
_spec = importlib.util.spec_from_file_location("tutorial_make_checkpoint", os.path.join(HERE, "make_checkpoint.py"))
assert _spec is not None and _spec.loader is not None
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


def tutorial_ckpt(tmp_path: Path, **kw: Any) -> tuple[torch.nn.Module, str]:
    model = make.tutorial_model(VOCAB, **kw)
    path = str(tmp_path / "ckpt.pt")
    torch.save(model.state_dict(), path)
    return model, path


def hf_logits(folder: str, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        kw = {} if positions is None else {"position_ids": positions[None]}
        return model(tokens, **kw).logits


def assert_parity(ref: torch.Tensor, got: torch.Tensor) -> float:
    diff = float((ref - got).abs().max())
    assert diff <= 1e-4, diff
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
    return diff


def tokens(n: int = 96) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(7))


def edited(tmp_path: Path, source: str, edit: Any, name: str = "mapping.yml") -> str:
    """A copy of mapping `source` (beside copies of its model code) with `edit(data)` applied."""
    for f in ("model.py", "llama_model.py"):
        shutil.copy(os.path.join(HERE, f), tmp_path / f)
    with open(source) as f:
        data = yaml.safe_load(f)
    edit(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def rule_index(data: dict, target: str) -> int:
    return next(n for n, r in enumerate(data["rules"]) if r.get("to") == target or r.get("drop") == target)


# ------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("n_head", [4, 2, 8])
def test_tutorial_gpt_parity_through_the_shipped_mapping(tmp_path: Path, n_head: int) -> None:
    """Per-head q/k/v fused into c_attn, the C**-0.5 score scale folded into q (exact for n_head=4, rounded
    otherwise), ReLU, untied lm_head: logits equal to the tutorial's own forward on 96 positions."""
    model, ckpt = tutorial_ckpt(tmp_path, n_head=n_head, n_embd=48 if n_head == 8 else 32)
    out = str(tmp_path / "hf")
    r = convert("mapping", ckpt, out, mapping=GPT_MAPPING, progress=False)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids)[0]
    assert_parity(ref, hf_logits(out, ids))
    record = json.load(open(os.path.join(out, "hubconv.json")))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["activation_function"] == "relu" and config["tie_word_embeddings"] is False
    assert record["mapping"]["path"] == GPT_MAPPING and len(record["mapping"]["sha256"]) == 64
    assert set(r.dropped) == {f"blocks.{i}.sa.heads.{h}.tril" for i in range(2) for h in range(n_head)}
    c_attn_lossy = "transformer.h.0.attn.c_attn.weight" in record["lossy"]
    assert c_attn_lossy == (n_head != 4)  # 4**-0.5 = 0.5 scales bit-exactly; 2**-0.5 and 8**-0.5 round


def test_without_the_scale_fold_parity_fails(tmp_path: Path) -> None:
    """Negative control for the attention scale: GPT-2's head_dim**-0.5 is not the tutorial's C**-0.5."""
    model, ckpt = tutorial_ckpt(tmp_path)

    def no_scale(d: dict) -> None:
        rule = d["rules"][rule_index(d, "transformer.h.{i}.attn.c_attn.weight")]
        rule["ops"] = ["concat_rows", "transpose"]

    out = str(tmp_path / "hf")
    convert("mapping", ckpt, out, mapping=edited(tmp_path, GPT_MAPPING, no_scale), progress=False)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids)[0]
    assert float((ref - hf_logits(out, ids)).abs().max()) > 1e-2


def test_llama_mapping_parity_at_spread_positions(tmp_path: Path) -> None:
    """Interleaved RoPE permuted per head (K per KV head), fused w13 split, value() args from the saved config."""
    model = make.llama_model(VOCAB)
    ckpt = str(tmp_path / "llama.pt")
    make.save_llama(model, ckpt)
    out = str(tmp_path / "hf")
    convert("mapping", ckpt, out, mapping=LLAMA_MAPPING, progress=False)
    ids, pos = tokens(), parity_positions(96, 512)
    assert int(pos[-1]) == 511
    with torch.no_grad():
        ref = model(ids, pos)
    assert_parity(ref, hf_logits(out, ids, pos))
    record = json.load(open(os.path.join(out, "hubconv.json")))
    assert record["native_args"]["n_kv_heads"] == 2 and record["native_args"]["n_heads"] == 4
    assert record["dropped"] == {"config": "non-tensor value read by mapping-llama.yml"}
    # the adapter's own reference forward (imported from llama_model.py) agrees with the model it was saved from
    adapter, _ = load_adapter("mapping", LLAMA_MAPPING)
    with open_checkpoint(ckpt) as c:
        again = adapter.reference_logits(c, record["native_args"], ids, pos)
    assert torch.equal(again, ref)


def test_llama_without_rope_permute_fails_parity(tmp_path: Path) -> None:
    """Negative control: a rename of wq/wk (no rope_permute) loads fine but is wrong at every position > 0."""
    model = make.llama_model(VOCAB)
    ckpt = str(tmp_path / "llama.pt")
    make.save_llama(model, ckpt)

    def rename_only(d: dict) -> None:
        for t in ("q_proj", "k_proj"):
            d["rules"][rule_index(d, f"model.layers.{{i}}.self_attn.{t}.weight")].pop("ops")

    out = str(tmp_path / "hf")
    convert("mapping", ckpt, out, mapping=edited(tmp_path, LLAMA_MAPPING, rename_only), progress=False)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids)
    assert float((ref - hf_logits(out, ids)).abs().max()) > 1e-2


# ------------------------------------------------------------------------------------ negative controls


def rename_only_mapping(d: dict) -> None:
    """What a key-renaming script does: every tensor renamed, nothing fused, nothing transposed."""
    rules = []
    for r in d["rules"]:
        if "from" in r and isinstance(r["from"], dict):
            for role in ("q", "k", "v"):
                rules.append({"from": r["from"][role].replace("{h*}", "{h}"), "to": r["to"]})
        elif "from" in r:
            rules.append({"from": r["from"], "to": r["to"]})
        else:
            rules.append(r)
    d["rules"] = rules


def test_rename_only_mapping_is_an_error(tmp_path: Path) -> None:
    _, ckpt = tutorial_ckpt(tmp_path)
    both = (
        r"mapping\.yml: rules\[4\] and mapping\.yml: rules\[4\] both produce 'transformer\.h\.0\.attn\.c_attn\.weight'"
    )
    with pytest.raises(MappingError, match=both):
        convert("mapping", ckpt, str(tmp_path / "hf"), mapping=edited(tmp_path, GPT_MAPPING, rename_only_mapping))
    assert not os.path.exists(tmp_path / "hf")


def test_missing_transpose_is_an_error_naming_the_rule(tmp_path: Path) -> None:
    _, ckpt = tutorial_ckpt(tmp_path)

    def no_transpose(d: dict) -> None:
        d["rules"][rule_index(d, "transformer.h.{i}.mlp.c_fc.weight")].pop("ops")

    n = rule_index(yaml.safe_load(open(GPT_MAPPING)), "transformer.h.{i}.mlp.c_fc.weight")
    with pytest.raises(
        MappingError,
        match=rf"wrong shape transformer\.h\.0\.mlp\.c_fc\.weight \[128, 32\] \(expected \[32, 128\]\).*"
        rf"comes from mapping\.yml: rules\[{n}\]",
    ):
        convert("mapping", ckpt, str(tmp_path / "hf"), mapping=edited(tmp_path, GPT_MAPPING, no_transpose))


def test_square_transpose_missing_is_caught_by_release_parity(tmp_path: Path) -> None:
    """attn.c_proj is [n_embd, n_embd]: shapes cannot tell a missing transpose; the release's parity does."""
    _, ckpt = tutorial_ckpt(tmp_path)

    def no_transpose(d: dict) -> None:
        d["rules"][rule_index(d, "transformer.h.{i}.attn.c_proj.weight")].pop("ops")

    mapping = edited(tmp_path, GPT_MAPPING, no_transpose)
    out = str(tmp_path / "release")
    r = hubconv(
        "release", "--dry-run", "--adapter", "mapping", "--mapping", mapping, "--checkpoint", ckpt, "--output", out
    )
    assert r.returncode == 1
    assert "release failed at smoke: parity" in r.stderr
    assert not os.path.exists(out)


def test_lm_head_bias_is_refused_then_dropped_with_its_cost_shown(tmp_path: Path) -> None:
    model, ckpt = tutorial_ckpt(tmp_path, lm_head_bias=True)
    with pytest.raises(MappingError, match=r"tensor lm_head\.bias \[80\] is accounted for by no rule of mapping\.yml"):
        convert("mapping", ckpt, str(tmp_path / "hf"), mapping=GPT_MAPPING)
    r = hubconv(
        "convert",
        "--adapter",
        "mapping",
        "--mapping",
        GPT_MAPPING,
        "--checkpoint",
        ckpt,
        "--output",
        str(tmp_path / "x"),
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "lm_head.bias" in r.stderr

    reason = "GPT-2 has no lm_head bias"
    mapping = edited(tmp_path, GPT_MAPPING, lambda d: d["rules"].append({"drop": "lm_head.bias", "reason": reason}))
    out = str(tmp_path / "hf")
    result = convert("mapping", ckpt, out, mapping=mapping, progress=False)
    assert result.dropped["lm_head.bias"] == reason
    report = run_smoke(out, max_new_tokens=2, native=("mapping:gpt2", ckpt, mapping))
    p = report.parity
    assert p is not None and not p.passed and report.status == "fail"
    bias = model.lm_head.bias.detach()
    # the converted logits lack exactly the bias: the report's max |dlogit| is the largest bias shift
    ids = torch.randint(0, VOCAB, (1, 96), generator=torch.Generator().manual_seed(20260501))
    with torch.no_grad():
        shift = (model(ids)[0] - hf_logits(out, ids)) - bias
    assert float(shift.abs().max()) < 1e-4
    assert p.max_abs_diff == pytest.approx(float(bias.abs().max()), abs=1e-4)
    assert p.max_position == 95  # forward(idx) takes no positions: parity ran on 0..95


# ----------------------------------------------------------------------------------------- round trips


def round_trip(adapter: MappingAdapter, ckpt_path: str) -> tuple[dict[str, str], int]:
    """Every exact rule inverted back to bytes identical to the source; returns the lossy targets."""
    with open_checkpoint(ckpt_path) as c:
        tensors = adapter.model_tensors(c)
        args = adapter.resolve_args(c, tensors, {})
        table = adapter.table(args)
        targets, _, records = table.apply(tensors, args)
        hf = {t.name: t for t in targets}
        exact = [r for r in records if r.inverse is not None]
        back = table.invert(hf, exact)
        sources = [s for r in exact for s in r.sources]
        for name, t in zip(sources, back, strict=True):
            assert t.name == name
            a, b = materialize(t), materialize(tensors[name])
            assert a.shape == b.shape and a.tobytes() == b.tobytes(), name
        return {t: "; ".join(r.lossy) for r in records if r.lossy for t in r.targets}, len(exact)


def test_round_trips_of_the_shipped_mappings(tmp_path: Path) -> None:
    _, ckpt = tutorial_ckpt(tmp_path)
    lossy, n = round_trip(load_adapter("mapping", GPT_MAPPING)[0], ckpt)
    assert n == 2 * 11 + 5  # 11 exact rules per layer (c_attn with its 0.5 scale included) + 5 outside
    assert set(lossy) == {"transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"}
    llama = make.llama_model(VOCAB)
    make.save_llama(llama, str(tmp_path / "llama.pt"))
    lossy, n = round_trip(load_adapter("mapping", LLAMA_MAPPING)[0], str(tmp_path / "llama.pt"))
    assert lossy == {} and n == 2 * 8 + 3


def test_round_trips_of_every_layout_op(tmp_path: Path) -> None:
    """Split by layout (concatenated, per-KV-group), concat columns, slice, widening cast, tie: exact ones
    invert bit for bit, lossy ones (trimmed rows, tie) are listed."""
    g = np.random.default_rng(0)
    arrays = {
        "qkv.weight": g.standard_normal((24, 8)).astype(np.float32),
        "a.weight": g.standard_normal((6, 4)).astype(np.float32),
        "b.weight": g.standard_normal((6, 2)).astype(np.float32),
        "emb.weight": g.standard_normal((10, 8)).astype(np.float32),
        "h.weight": g.standard_normal((6, 8)).astype(np.float16),
        "p.weight": g.standard_normal((4, 4)).astype(np.float32),
    }
    path = str(tmp_path / "toy.pt")
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    spec = {
        "architecture": "llama",
        "args": {"groups": 2},
        "rules": [
            {
                "from": "qkv.weight",
                "to": ["q", "k", "v"],
                "ops": [{"split_groups": {"groups": "groups", "rows": [4, 4, 4]}}],
            },
            {"from": {"a": "a.weight", "b": "b.weight"}, "to": "ab", "ops": ["concat_columns"]},
            {"from": "emb.weight", "to": ["wte", "head"], "ops": [{"slice_rows": {"stop": 8}}, "tie"]},
            {"from": "h.weight", "to": "h32", "ops": [{"cast": {"dtype": "float32"}}]},
            {"from": "p.weight", "to": "p", "ops": [{"rope_permute": {"heads": 2}}, {"scale": {"factor": 4}}]},
        ],
    }
    mapping = tmp_path / "toy.yml"
    mapping.write_text(yaml.safe_dump(spec))
    lossy, n = round_trip(load_adapter("mapping", str(mapping))[0], path)
    assert n == 4
    assert set(lossy) == {"wte", "head"} and "vocabulary padding" in lossy["wte"] and "tied" in lossy["head"]


# -------------------------------------------------------------------------------------- errors name the rule


def _gpt_error(tmp_path: Path, edit: Any, match: str, ckpt_kw: dict | None = None) -> None:
    _, ckpt = tutorial_ckpt(tmp_path, **(ckpt_kw or {}))
    with pytest.raises(HubconvError, match=match) as info:
        convert("mapping", ckpt, str(tmp_path / "hf"), mapping=edited(tmp_path, GPT_MAPPING, edit))
    assert "\n" not in str(info.value)


def _set_ops(target: str, ops: list) -> Any:
    def edit(d: dict) -> None:
        d["rules"][rule_index(d, target)]["ops"] = ops

    return edit


def test_unknown_op(tmp_path: Path) -> None:
    n = rule_index(yaml.safe_load(open(GPT_MAPPING)), "transformer.h.{i}.attn.c_proj.weight")
    _gpt_error(
        tmp_path,
        _set_ops("transformer.h.{i}.attn.c_proj.weight", ["transpos"]),
        rf"^mapping\.yml: rules\[{n}\]: unknown op 'transpos'; known ops: ",
    )


def test_rule_matching_nothing(tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        d["rules"][0]["from"] = "tok_emb.weight"

    _gpt_error(tmp_path, edit, r"mapping\.yml: rules\[0\] \(from tok_emb\.weight\) matches no tensor of .*ckpt\.pt")


def test_two_rules_producing_one_key(tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        d["rules"][1]["to"] = "transformer.wte.weight"

    _gpt_error(
        tmp_path, edit, r"mapping\.yml: rules\[0\] and mapping\.yml: rules\[1\] both produce 'transformer\.wte\.weight'"
    )


def test_shape_mismatch_inside_a_rule(tmp_path: Path) -> None:
    n = rule_index(yaml.safe_load(open(GPT_MAPPING)), "transformer.h.{i}.mlp.c_fc.weight")
    _gpt_error(
        tmp_path,
        _set_ops("transformer.h.{i}.mlp.c_fc.weight", [{"split_rows": {"sizes": [100, 100]}}]),
        rf"ckpt\.pt: mapping\.yml: rules\[{n}\]: blocks\.0\.ffwd\.net\.0\.weight: 128 rows cannot be split into parts "
        r"of \[100, 100\] rows",
    )


def test_source_tensor_no_rule_accounts_for(tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        d["rules"].pop(rule_index(d, "blocks.{i}.sa.heads.{h}.tril"))

    _gpt_error(
        tmp_path, edit, r"tensor blocks\.0\.sa\.heads\.0\.tril \[96, 96\] is accounted for by no rule of mapping"
    )


def test_schema_errors_name_the_rule(tmp_path: Path) -> None:
    def no_reason(d: dict) -> None:
        d["rules"][rule_index(d, "blocks.{i}.sa.heads.{h}.tril")].pop("reason")

    n = rule_index(yaml.safe_load(open(GPT_MAPPING)), "blocks.{i}.sa.heads.{h}.tril")
    _gpt_error(tmp_path, no_reason, rf"mapping\.yml: rules\[{n}\]: drop '.*' needs a `reason:`")
    _gpt_error(tmp_path, lambda d: d["rules"][2].update(too="x"), r"mapping\.yml: rules\[2\]: unknown field\(s\) too")
    _gpt_error(
        tmp_path,
        lambda d: d["args"].update(n_embd="shape(nope.weight)[1]"),
        r"mapping\.yml: args\.n_embd: no tensor 'nope\.weight'",
    )
    _gpt_error(tmp_path, lambda d: d["args"].update(n_embd="n_emb + 1"), r"mapping\.yml: args\.n_embd: .*'n_emb'")


def test_adapter_and_mapping_must_go_together(tmp_path: Path) -> None:
    _, ckpt = tutorial_ckpt(tmp_path)
    r = hubconv("convert", "--adapter", "mapping", "--checkpoint", ckpt, "--output", str(tmp_path / "a"))
    assert r.returncode == 1 and "needs a mapping file: pass --mapping" in r.stderr
    r = hubconv("convert", "--adapter", "torchtitan", "--mapping", GPT_MAPPING, "--checkpoint", ckpt, "--output", "b")
    assert r.returncode == 1 and "takes no mapping file" in r.stderr
    assert "mapping" in hubconv("adapters").stdout
    with pytest.raises(MappingError, match=r"reference\.positions is not set"):
        with open_checkpoint(ckpt) as c:
            load_adapter("mapping", GPT_MAPPING)[0].reference_logits(c, {}, tokens(), parity_positions(96, 2048))
    assert load_spec(GPT_MAPPING).reference is not None


# ------------------------------------------------------------------------------------------ release


def test_release_dry_run_with_the_shipped_example(tmp_path: Path) -> None:
    """The committed example through `.hubconv.yml` (`mapping:` relative to the config): char tokenizer from
    meta.pkl, smoke with parity against model.py, card naming the adapter."""
    for f in ("model.py", "mapping.yml", "ckpt.pt", "meta.pkl"):
        shutil.copy(os.path.join(HERE, f), tmp_path / f)
    (tmp_path / ".hubconv.yml").write_text(
        "adapter: mapping\nmapping: mapping.yml\ncheckpoint: ckpt.pt\ntokenizer: {path: meta.pkl}\n"
        "output: release\nsmoke: {prompts: [The]}\n"
    )
    r = hubconv("release", "--dry-run", "--json", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "release"
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["status"] == "pass" and smoke["parity"]["passed"] and smoke["parity"]["positions"] == 96
    assert smoke["parity"]["max_abs_diff"] <= 1e-4
    record = json.loads((out / "hubconv.json").read_text())
    assert record["adapter"] == "mapping" and record["family"] == "gpt2"
    assert record["mapping"]["path"].endswith("mapping.yml")
    assert "mapping" in (out / "README.md").read_text()
    # the same through flags alone, as in the issue
    r = hubconv(
        "release", "--dry-run", "--adapter", "mapping", "--mapping", GPT_MAPPING, "--checkpoint",
        os.path.join(HERE, "ckpt.pt"), "--tokenizer", os.path.join(HERE, "meta.pkl"), "--output", str(tmp_path / "r2"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "| smoke | parity | ✅ |" in r.stdout
