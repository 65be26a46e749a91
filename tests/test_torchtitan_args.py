"""TorchTitan 0.2 and 0.3 model-args vocabulary, shape contradictions, did-you-mean, nonsense values.

Spelling rows resolve against the bundled example checkpoint (examples/tiny-llama3-torchtitan) and must
give exactly the config its canonical model_args.yaml gives; one 0.3-style file is converted in full and
checked for logits parity against the native reference.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from hubconv.adapters.registry import get
from hubconv.adapters.torchtitan_args import SPELLING
from hubconv.convert import build_plan, convert
from hubconv.errors import ModelArgsError
from hubconv.io.checkpoint import Checkpoint, open_checkpoint
from tests.native.parity import check_dir
from tests.test_model_args_and_cli import shapes_of_flavor

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny-llama3-torchtitan")
CKPT = os.path.join(EXAMPLE, "step-800")
CANONICAL = os.path.join(EXAMPLE, "model_args.yaml")
TOKENS = {"bos_token_id": 512, "eos_token_id": 513}

# The example's model (dim 128, 2 layers, 4/2 heads of 32, FFN 352, vocab 522, theta 5e5, plain RoPE,
# 256 positions, untied) in TorchTitan 0.3's nested config spelling.
ROPE_03 = {"dim": 32, "max_seq_len": 256, "theta": 500000.0, "scaling": "none"}
BLOCK_03 = {
    "attention": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 32, "dim": 128, "rope": ROPE_03},
    "feed_forward": {
        "w1": {"in_features": 128, "out_features": 352},
        "w2": {"in_features": 352, "out_features": 128},
        "w3": {"in_features": 128, "out_features": 352},
    },
    "attention_norm": {"normalized_shape": 128, "eps": 1e-5},
    "ffn_norm": {"normalized_shape": 128, "eps": 1e-5},
}
MODEL_03_YAML = """\
# TorchTitan 0.3: Llama3Model.Config(dim, vocab_size, layers=...), FFN hidden_dim, RoPE.Config
model_name: llama3
dim: 128
vocab_size: 522
n_layers: 2
enable_weight_tying: false
head_dim: 32
n_kv_heads: 2
hidden_dim: 352
norm_eps: 1e-5          # YAML 1.1 reads this as a string; it is a float literal, so it counts
rope:
  dim: 32
  max_seq_len: 256
  theta: 500000
  scaling: none
bos_token_id: 512
eos_token_id: 513
"""

# name -> (file name, file text): every spelling of the example's model.
SPELLINGS: dict[str, tuple[str, str]] = {
    "0.2-json": (
        "args.json",
        json.dumps(
            {
                "dim": 128,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "vocab_size": 522,
                "multiple_of": 32,
                "norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "rope_scaling_args": None,
                "max_seq_len": 256,
                **TOKENS,
            }
        ),
    ),
    "0.2-toml-with-0.3-rope-table": (  # TOML has no null: unscaled RoPE is stated with 0.3's rope table
        "args.toml",
        "n_heads = 4\nmax_seq_len = 256\nbos_token_id = 512\neos_token_id = 513\n\n"
        '[rope]\ntheta = 500000.0\nscaling = "none"\n',
    ),
    "0.3-flat-head_dim-hidden_dim-rope": ("args.yaml", MODEL_03_YAML),
    "0.3-layers-list": (
        "args.yaml",
        yaml.safe_dump(
            {
                "name": "llama3",
                "dim": 128,
                "vocab_size": 522,
                "tok_embeddings": {"num_embeddings": 522, "embedding_dim": 128},
                "norm": {"normalized_shape": 128, "eps": 1e-5},
                "lm_head": {"in_features": 128, "out_features": 522},
                "enable_weight_tying": False,
                "layers": [BLOCK_03, BLOCK_03],
                **TOKENS,
            }
        ),
    ),
    "early-0.3-single-layer": (
        "args.yaml",
        yaml.safe_dump(
            {
                "dim": 128,
                "n_layers": 2,
                "vocab_size": 522,
                "norm_eps": 1e-5,
                "layer": {
                    "attention": {"n_heads": 4, "n_kv_heads": 2, "attn_backend": "sdpa", "rope_backend": "complex"},
                    "feed_forward": {"hidden_dim": 352},
                },
                "rope": {"dim": 32, "max_seq_len": 256, "theta": 500000, "backend": "complex", "scaling": "none"},
                **TOKENS,
            }
        ),
    ),
    "ffn_hidden_dim-theta-max_context_length": (
        "args.json",
        json.dumps(
            {
                "module": "llama3",
                "n_heads": 4,
                "ffn_hidden_dim": 352,
                "theta": 500000,
                "max_context_length": 256,
                "rope_scaling": None,
                **TOKENS,
            }
        ),
    ),
    "hf-rope_parameters-default": (
        "args.yaml",
        "n_heads: 4\nmax_seq_len: 256\nrope_parameters: {rope_type: default, rope_theta: 500000.0}\n"
        "bos_token_id: 512\neos_token_id: 513\n",
    ),
}
SCALING = {
    "scaling_factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# Llama 3.1 RoPE scaling, in each spelling (TorchTitan 0.2, 0.3, transformers), on the same checkpoint.
SCALED: dict[str, dict[str, Any]] = {
    "0.3-rope-scaling-llama": {
        "rope": {"theta": 500000, "scaling": "llama", **SCALING},
    },
    "hf-rope_scaling-rope_type-llama3-factor": {
        "rope_theta": 500000,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8,
            "low_freq_factor": 1,
            "high_freq_factor": 4,
            "original_max_position_embeddings": 64,
        },
    },
    "rope_scaling-type-llama-scaling_factor": {
        "theta": 500000.0,
        "rope_scaling": {"type": "llama", **SCALING},
    },
    "hf-rope_parameters": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **SCALING}},
}


@pytest.fixture(scope="module")
def ckpt() -> Iterator[Checkpoint]:
    with open_checkpoint(CKPT) as c:
        yield c


@pytest.fixture(scope="module")
def canonical(ckpt) -> dict[str, Any]:
    plan = build_plan("torchtitan", ckpt, CANONICAL)
    return {"config": plan.config, "generation": plan.generation_config}


def plan_config(ckpt: Checkpoint, args: Any) -> dict[str, Any]:
    plan = build_plan("torchtitan", ckpt, args)
    return {"config": plan.config, "generation": plan.generation_config}


# ---- accepted spellings ---------------------------------------------------------------------------


@pytest.mark.parametrize("row", list(SPELLINGS))
def test_every_spelling_gives_the_canonical_config(tmp_path, ckpt, canonical, row) -> None:
    name, text = SPELLINGS[row]
    (tmp_path / name).write_text(text)
    assert plan_config(ckpt, str(tmp_path / name)) == canonical


def test_canonical_config_is_what_the_example_describes(canonical) -> None:
    """Anchors the comparisons above: the canonical config is the example's model, not a default."""
    cfg = canonical["config"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (128, 352, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 32)
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert (cfg["max_position_embeddings"], cfg["rms_norm_eps"], cfg["vocab_size"]) == (256, 1e-5, 522)


def test_a_wrong_value_in_a_spelling_changes_the_config(tmp_path, ckpt, canonical) -> None:
    """Negative control: the spelling rows could fail (a different max_seq_len is not silently dropped)."""
    (tmp_path / "args.yaml").write_text(MODEL_03_YAML.replace("max_seq_len: 256", "max_seq_len: 512"))
    got = plan_config(ckpt, str(tmp_path / "args.yaml"))
    assert got != canonical and got["config"]["max_position_embeddings"] == 512


@pytest.mark.parametrize("row", list(SCALED))
def test_every_rope_scaling_spelling_gives_the_same_config(ckpt, row) -> None:
    base = {"n_heads": 4, "max_seq_len": 256, **TOKENS}
    want = plan_config(ckpt, {**base, "rope_theta": 500000.0, "rope_scaling_args": SCALING})["config"]
    assert want["rope_parameters"]["rope_type"] == "llama3" and want["rope_parameters"]["factor"] == 8.0
    assert want["rope_parameters"]["original_max_position_embeddings"] == 64
    assert plan_config(ckpt, {**base, **SCALED[row]})["config"] == want


def test_scaling_defaults_are_the_same_in_0_2_and_0_3(ckpt) -> None:
    base = {"n_heads": 4, "rope_theta": 500000}
    old = plan_config(ckpt, {**base, "rope_scaling_args": {}})["config"]["rope_parameters"]
    new = plan_config(ckpt, {"n_heads": 4, "rope": {"theta": 500000, "scaling": "llama"}})["config"]["rope_parameters"]
    assert old == new and new["factor"] == 8.0 and new["original_max_position_embeddings"] == 8192
    # A 0.3 RoPE.Config that does not name `scaling` has TorchTitan's default: none.
    bare = plan_config(ckpt, {"n_heads": 4, "rope": {"theta": 500000}})["config"]["rope_parameters"]
    assert bare["rope_type"] == "default"


def resolved_config(value: Any) -> dict[str, Any]:
    adapter, _ = get("torchtitan")
    return adapter.hf_config(adapter.resolve_args("t", shapes_of_flavor("debugmodel"), adapter.load_args(value)))


def test_registry_names_select_the_flavor_and_its_training_seq_len(tmp_path) -> None:
    job = tmp_path / "debug_model.toml"  # TorchTitan 0.2's job TOML
    job.write_text('[model]\nname = "llama3"\nflavor = "debugmodel"\n\n[training]\nseq_len = 2048\n')
    (tmp_path / "03.yaml").write_text("module: llama3\nconfig: llama3_debugmodel\n")  # --module/--config of 0.3
    want = resolved_config(str(job))
    assert want["max_position_embeddings"] == 2048 and want["num_attention_heads"] == 16
    for value in ("llama3_debugmodel", {"flavor": "llama3_debugmodel"}, str(tmp_path / "03.yaml")):
        assert resolved_config(value) == want, value
    # The bare model flavor has no training job, so RoPE keeps its own 131072 positions.
    assert resolved_config("debugmodel")["max_position_embeddings"] == 131072


@pytest.mark.parametrize(
    ("name", "flavor", "n_layers", "max_seq_len"),
    [("llama3_8b", "8B", 32, 8192), ("llama3_1b", "1B", 16, 131072), ("llama3_405b", "405B", 126, 8192)],
)
def test_registry_names_of_large_models(name, flavor, n_layers, max_seq_len) -> None:
    args = get("torchtitan")[0].load_args(name)
    assert (args["flavor"], args["n_layers"], args["max_seq_len"]) == (flavor, n_layers, max_seq_len)
    explicit = get("torchtitan")[0].load_args({"flavor": flavor, "max_seq_len": max_seq_len})
    assert {k: v for k, v in args.items() if k != SPELLING} == {k: v for k, v in explicit.items() if k != SPELLING}


def test_full_conversion_of_a_0_3_args_file_keeps_parity(tmp_path) -> None:
    (tmp_path / "args.yaml").write_text(MODEL_03_YAML)
    out03, out02 = str(tmp_path / "hf03"), str(tmp_path / "hf02")
    r03 = convert("torchtitan", CKPT, out03, model_args=str(tmp_path / "args.yaml"), progress=False)
    convert("torchtitan", CKPT, out02, model_args=CANONICAL, progress=False)
    parity = check_dir(CKPT, out03, r03.native_args, positions=96)
    assert parity.ok, str(parity)
    for name in ("config.json", "generation_config.json"):
        assert open(os.path.join(out03, name)).read() == open(os.path.join(out02, name)).read()
    recorded = json.load(open(os.path.join(out03, "hubconv.json")))["native_args"]
    assert (recorded["head_dim"], recorded["ffn_hidden_dim"], recorded["n_heads"]) == (32, 352, 4)
    assert SPELLING not in recorded


# ---- contradictions with the checkpoint -------------------------------------------------------------

BASE = {"n_heads": 4, "rope_theta": 500000.0, "rope_scaling_args": None}
WQ = r"layers\.0\.attention\.wq\.weight \[128, 128\]"
CONTRADICTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "head_dim": ({"head_dim": 64}, rf"head_dim=64 contradicts the checkpoint: {WQ} with n_heads=4 implies head_dim=32"),
    "rope.dim": (
        {"rope_scaling_args": None, "rope": {"dim": 16}},
        rf"rope\.dim=16 contradicts the checkpoint: {WQ} with n_heads=4 implies head_dim=32",
    ),
    "hidden_dim": (
        {"hidden_dim": 512},
        r"hidden_dim=512 contradicts the checkpoint: layers\.0\.feed_forward\.w1\.weight \[352, 128\] implies "
        r"ffn_hidden_dim=352",
    ),
    "ffn_hidden_dim": ({"ffn_hidden_dim": 384}, r"ffn_hidden_dim=384 contradicts .* implies ffn_hidden_dim=352"),
    "dim": ({"dim": 256}, r"dim=256 contradicts the checkpoint: tok_embeddings\.weight \[522, 128\] implies dim=128"),
    "vocab_size": ({"vocab_size": 128256}, r"vocab_size=128256 contradicts .* implies vocab_size=522"),
    "n_kv_heads": ({"n_kv_heads": 4}, r"n_kv_heads=4 contradicts the checkpoint: .*wk\.weight .* implies n_kv_heads=2"),
    "layers-list-length": (
        {"layers": [{"attention": {"n_heads": 4}}] * 3},
        r"layers \(list length\)=3 contradicts the checkpoint: 2 layers\.N blocks implies n_layers=2",
    ),
    "head_dim-alone": ({"n_heads": None, "head_dim": 48}, r"head_dim=48 contradicts .* 128 rows, not a multiple"),
    "flavor": (
        {"n_heads": None, "flavor": "llama3_8b"},
        r"dim=4096 contradicts the checkpoint: tok_embeddings\.weight \[522, 128\]",
    ),
    "two-spellings": ({"rope": {"theta": 10000.0}}, r"rope_theta=500000\.0 and rope\.theta=10000\.0 disagree"),
    "two-layers": (
        {"n_heads": None, "layers": [{"attention": {"n_heads": 4}}, {"attention": {"n_heads": 8}}]},
        r"layers\.0\.attention\.n_heads=4 and layers\.1\.attention\.n_heads=8 disagree",
    ),
    "two-scaling-spellings": (
        {"rope_scaling_args": None, "rope": {"scaling": "llama"}},
        r"rope_scaling_args and rope\.scaling='llama' disagree",
    ),
    "factor-and-scaling_factor": (
        {"rope_scaling_args": None, "rope_scaling": {"factor": 8, "scaling_factor": 16}},
        r"rope_scaling\.factor=8 and rope_scaling\.scaling_factor=16 disagree",
    ),
}


@pytest.mark.parametrize("row", list(CONTRADICTIONS))
def test_contradiction_names_both_values(ckpt, row) -> None:
    override, message = CONTRADICTIONS[row]
    args = {k: v for k, v in {**BASE, **override}.items() if v is not None or k == "rope_scaling_args"}
    if "rope_scaling" in override:
        del args["rope_scaling_args"]
    with pytest.raises(ModelArgsError, match=message) as e:
        build_plan("torchtitan", ckpt, args)
    assert "\n" not in str(e.value)


def test_contradiction_rows_pass_without_the_contradicting_field(ckpt) -> None:
    """Negative control for the table: the base args alone convert."""
    assert plan_config(ckpt, BASE)["config"]["head_dim"] == 32


# ---- unknown fields ---------------------------------------------------------------------------------

UNKNOWN: dict[str, tuple[Any, str]] = {
    "top-level": ({"n_head": 4}, r"unknown field\(s\) n_head \(did you mean 'n_heads'\?\)"),
    "hf-name": ({"num_attention_heads": 4}, r"unknown field\(s\) num_attention_heads.*\(known: .*n_heads"),
    "in-rope": ({"rope": {"thetaa": 5e5}}, r"unknown field\(s\) rope\.thetaa \(did you mean 'rope\.theta'\?\)"),
    "in-a-layer": (
        {"layers": [{"attention": {"n_head": 4}}]},
        r"layers\.0\.attention\.n_head \(did you mean 'layers\.0\.attention\.n_heads'\?\)",
    ),
    "in-rope-scaling": ({"rope_scaling": {"facter": 8}}, r"rope_scaling: unknown field facter \(did you mean 'factor'"),
    "flavor": (
        {"flavor": "llama3_debugmodl"},
        r"flavor 'llama3_debugmodl' is unknown.*did you mean 'llama3_debugmodel'",
    ),
    "bare-value": ("llama3_8", r"no such file, and not a TorchTitan llama3 flavor.*did you mean 'llama3_8b'"),
}


@pytest.mark.parametrize("row", list(UNKNOWN))
def test_unknown_field_is_rejected_with_a_suggestion(row) -> None:
    value, message = UNKNOWN[row]
    with pytest.raises(ModelArgsError, match=message) as e:
        get("torchtitan")[0].load_args(value)
    assert "\n" not in str(e.value)


# ---- nonsense values --------------------------------------------------------------------------------

NONSENSE: dict[str, tuple[dict[str, Any], str]] = {
    "n_heads-bool": ({"n_heads": True}, "n_heads=True must be a positive integer"),
    "n_heads-float": ({"n_heads": 3.5}, "n_heads=3.5 must be a positive integer"),
    "n_heads-string": ({"n_heads": "4"}, "n_heads='4' must be a positive integer"),
    "n_heads-zero": ({"n_heads": 0}, "n_heads=0 must be a positive integer"),
    "n_heads-negative": ({"n_heads": -4}, "n_heads=-4 must be a positive integer"),
    "n_kv_heads-zero": ({"n_kv_heads": 0}, "n_kv_heads=0 must be a positive integer"),
    "n_kv_heads-not-dividing": ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"),
    "heads-not-dividing-width": ({"n_heads": 3, "dim": 128}, "n_heads=3 does not divide dim=128"),
    "layer-heads-not-dividing": (
        {"layer": {"attention": {"n_heads": 4, "n_kv_heads": 3}}},
        r"layer\.attention\.n_kv_heads=3 does not divide layer\.attention\.n_heads=4",
    ),
    "head_dim-odd": ({"head_dim": 33}, "head_dim=33 must be even"),
    "head_dim-vs-rope.dim": ({"head_dim": 32, "rope": {"dim": 16}}, r"rope\.dim=16 differs from head_dim=32"),
    "norm_eps-zero": ({"norm_eps": 0}, "norm_eps=0 must be a positive finite number"),
    "norm_eps-negative": ({"norm_eps": -1e-5}, "norm_eps=-1e-05 must be a positive finite number"),
    "norm_eps-word": ({"norm_eps": "small"}, "norm_eps='small' must be a number"),
    "max_seq_len-zero": ({"max_seq_len": 0}, "max_seq_len=0 must be a positive integer"),
    "max_context_length-float": ({"max_context_length": 2048.5}, "max_context_length=2048.5 must be a positive"),
    "rope_theta-zero": ({"rope_theta": 0}, "rope_theta=0 must be a positive finite number"),
    "rope_theta-inf": ({"rope_theta": float("inf")}, "rope_theta=inf must be a positive finite number"),
    "rope.theta-negative": ({"rope": {"theta": -1}}, r"rope\.theta=-1 must be a positive finite number"),
    "scaling-factor-zero": ({"rope_scaling": {"factor": 0}}, r"rope_scaling\.factor=0 must be a positive"),
    "scaling-factor-negative": (
        {"rope": {"scaling": "llama", "scaling_factor": -8}},
        r"rope\.scaling_factor=-8 must be a positive",
    ),
    "scaling-high-not-above-low": (
        {"rope_scaling_args": {"low_freq_factor": 4, "high_freq_factor": 4}},
        r"high_freq_factor=4\.0 must be greater than low_freq_factor=4\.0",
    ),
    "scaling-original-zero": (
        {"rope_scaling_args": {"original_max_position_embeddings": 0}},
        r"original_max_position_embeddings=0 must be a positive integer",
    ),
    "scaling-not-a-mapping": ({"rope_scaling": "yes"}, "rope_scaling must be a mapping of RoPE scaling fields or null"),
    "scaling-yarn": ({"rope": {"scaling": "yarn"}}, r"rope\.scaling='yarn': yarn RoPE scaling is not supported"),
    "scaling-factor-without-scaling": (
        {"rope": {"scaling_factor": 8}},
        r"rope\.scaling_factor has no effect without rope\.scaling: llama",
    ),
    "rope-not-a-mapping": ({"rope": [1, 2]}, "rope must be a mapping, not list"),
    "layers-a-count": ({"layers": 2}, "layers must be a non-empty list of TorchTitan block configs"),
    "ffn_dim_multiplier-word": ({"ffn_dim_multiplier": "big"}, "ffn_dim_multiplier='big' must be a number"),
    "multiple_of-zero": ({"multiple_of": 0}, "multiple_of=0 must be a positive integer"),
    "vocab-zero": ({"vocab_size": 0}, "vocab_size=0 must be a positive integer"),
    "tying-string": ({"enable_weight_tying": "yes"}, "enable_weight_tying='yes' must be true or false"),
    "bos-negative": ({"bos_token_id": -1}, "bos_token_id=-1 must be a non-negative integer token id"),
    "wrong-family": ({"model_name": "qwen3"}, "model_name = 'qwen3' is not a TorchTitan llama3 model"),
    "cos_sin-rope": ({"rope": {"backend": "cos_sin"}}, r"rope\.backend='cos_sin' is not supported"),
    "qk_norm": ({"layer": {"attention": {"qk_norm": {"eps": 1e-6}}}}, r"layer\.attention\.qk_norm=.* not supported"),
}


@pytest.mark.parametrize("row", list(NONSENSE))
def test_nonsense_value_is_a_one_line_error_naming_the_field(row) -> None:
    value, message = NONSENSE[row]
    with pytest.raises(ModelArgsError, match=message) as e:
        get("torchtitan")[0].load_args(value)
    assert "\n" not in str(e.value) and str(e.value).startswith("--model-args: ")


def test_nonsense_in_a_file_names_the_file_and_exits_1(tmp_path) -> None:
    args = tmp_path / "args.yaml"
    args.write_text("n_heads: 4\nn_kv_heads: 3\nrope_theta: 500000\n")
    cli = [sys.executable, "-m", "hubconv", "convert", "--adapter", "torchtitan", "--checkpoint", CKPT, "--quiet"]
    r = subprocess.run(
        [*cli, "--output", str(tmp_path / "out"), "--model-args", str(args)], capture_output=True, text=True
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert re.fullmatch(
        rf"hubconv: error: {re.escape(str(args))}: n_kv_heads=3 does not divide n_heads=4 .*\n", r.stderr
    )
    assert not os.path.exists(tmp_path / "out")
