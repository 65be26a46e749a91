"""MindFormers adapter: `.ckpt` written per MindSpore's schema -> `hubconv convert` (CLI) -> transformers, with logits
parity against MindFormers' Llama written in tests/native; fused layouts and their negative controls, Meta Q/K
permute, training checkpoints, rank folders and safetensors, argument checks, damaged files, release --dry-run."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from hubconv.adapters.mindformers import MindFormersAdapter, mindformers_ffn_dim, model_config
from hubconv.dtypes import F32
from hubconv.io.checkpoint import open_checkpoint
from hubconv.io.tensor import ArrayTensor, read_all
from hubconv.smoke import parity_positions
from tests.helpers import hubconv
from tests.native import mindformers_ckpt as W
from tests.native import mindformers_llama as L
from tests.native.parity import Parity, compare

POSITIONS = 96
ADAPTER = MindFormersAdapter()


def _run_config(path: Path, model: L.Llama, **extra: Any) -> str:
    """MindFormers' YAML run config (trimmed): the model_config section under model, beside unrelated sections."""
    a = model.config
    cfg = {
        "run_mode": "train",
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": "llama_tiny"},
        "parallel_config": {"data_parallel": 1, "model_parallel": 1},
        "model": {
            "model_config": {
                "type": "LlamaConfig",
                "batch_size": 1,
                "seq_length": a.seq_length,
                "hidden_size": a.hidden_size,
                "num_layers": a.num_layers,
                "num_heads": a.num_heads,
                "n_kv_heads": a.n_kv_heads,
                "vocab_size": a.vocab_size,
                "intermediate_size": a.intermediate_size,
                "rms_norm_eps": a.rms_norm_eps,
                "theta": a.theta,
                "qkv_has_bias": a.qkv_has_bias,
                "compute_dtype": "bfloat16",
                "param_init_type": "float32",
                "use_flash_attention": True,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 0,
                **extra,
            },
            "arch": {"type": "LlamaForCausalLM"},
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _save(tmp: Path, model: L.Llama, *, dtype: torch.dtype | None = None, training: bool = False,
          name: str = "llama.ckpt", crc: bool = False, slice_bytes: int = W.SLICE_BYTES,
          **layout: Any) -> str:  # fmt: skip
    sd = W.llama_state_dict(model, **layout)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
        with torch.no_grad():  # the reference computes with the weights as stored
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
    items = {**sd, **W.training_entries(sd)} if training else sd
    return W.save_checkpoint(items, str(tmp / name), crc=crc, slice_bytes=slice_bytes)


def _cli_convert(src: str, out: Path, args: str, *extra: str) -> dict:
    r = hubconv("convert", "--adapter", "mindformers", "--checkpoint", src, "--model-args", args, "--output", str(out),
                "--quiet", "--overwrite", *extra)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads((out / "hubconv.json").read_text())


def _parity(model: L.Llama, out: Path, spread: bool = True) -> Parity:
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = torch.randint(0, hf.config.vocab_size, (1, POSITIONS), generator=torch.Generator().manual_seed(7))
    pos = parity_positions(POSITIONS, model.config.seq_length) if spread else torch.arange(POSITIONS)
    with torch.no_grad():
        ref = model(tokens, pos)[..., : hf.config.vocab_size]
        got = hf.eval()(tokens, position_ids=pos[None]).logits
    return compare(ref, got)


# ------------------------------------------------------------------------------------------------ parity

CASES = {
    "llama": ({}, {}),
    "llama-gqa-bf16": ({"num_heads": 8, "n_kv_heads": 2}, {"dtype": torch.bfloat16}),
    "qwen2-biases": ({"qkv_has_bias": True}, {}),
    "llama-fused": ({"num_heads": 8, "n_kv_heads": 2}, {"qkv_concat": True}),
    "qwen2-fused-biases": ({"qkv_has_bias": True, "num_heads": 8, "n_kv_heads": 4}, {"qkv_concat": True}),
    "llama-training-crc": ({}, {"training": True, "crc": True, "slice_bytes": 4096}),
    "llama-tied": ({"tie_word_embeddings": True}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_convert_matches_mindformers_logits(tmp_path: Path, case: str) -> None:
    arch, save = CASES[case]
    model = L.build(seed=3, **arch)
    src = _save(tmp_path, model, **save)
    extra = {"qkv_concat": True} if save.get("qkv_concat") else {}
    record = _cli_convert(src, tmp_path / "hf", _run_config(tmp_path / "run.yaml", model, **extra))
    for spread in (False, True):
        p = _parity(model, tmp_path / "hf", spread)
        assert p.positions >= 64 and p.max_abs_diff <= 1e-4 and p.argmax_agreement == 1.0, (case, spread, str(p))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == ("qwen2" if arch.get("qkv_has_bias") else "llama")
    assert cfg["num_key_value_heads"] == arch.get("n_kv_heads", 2) and cfg["bos_token_id"] == 1
    assert record["adapter"] == "mindformers"
    if save.get("training"):
        dropped = record["dropped"]
        assert dropped["adam_m.model.norm_out.weight"].startswith("AdamW first moment")
        assert dropped["adam_v.lm_head.weight"].startswith("AdamW second moment")
        for key in ("global_step", "learning_rate", "epoch_num", "step_num", "scale_sense", "loss_scale",
                    "accu_grads.model.norm_out.weight", "beta1_power", "model_name"):  # fmt: skip
            assert key in dropped, key
    if arch.get("tie_word_embeddings"):
        assert cfg["tie_word_embeddings"] is True


@pytest.mark.parametrize(
    ("layout", "wrong"),
    [({"qkv_layout": "grouped"}, {"qkv_layout": "concat"}), ({"ffn_layout": "interleaved"}, {"ffn_layout": "concat"})],
    ids=["qkv-split", "gate-hidden-split"],
)
def test_negative_control_wrong_fused_split_fails_parity(tmp_path: Path, layout: dict, wrong: dict) -> None:
    model = L.build(seed=5, num_heads=8, n_kv_heads=2)
    src = _save(tmp_path, model, qkv_concat=True, **layout)
    _cli_convert(src, tmp_path / "ok", _run_config(tmp_path / "a.yaml", model, qkv_concat=True, **layout))
    assert _parity(model, tmp_path / "ok").max_abs_diff <= 1e-4
    _cli_convert(src, tmp_path / "bad", _run_config(tmp_path / "b.yaml", model, qkv_concat=True, **wrong))
    bad = _parity(model, tmp_path / "bad")
    assert bad.max_abs_diff > 1e-2 and bad.first_bad_position == 0, str(bad)


def test_older_concatenated_fusion_layout(tmp_path: Path) -> None:
    """MindFormers' earlier `convert_weight.py --qkv_concat` wrote [Q; K; V] and [W1; W3]: `concat` layouts."""
    model = L.build(seed=6, num_heads=8, n_kv_heads=2)
    src = _save(tmp_path, model, qkv_concat=True, qkv_layout="concat", ffn_layout="concat")
    args = _run_config(tmp_path / "a.yaml", model, qkv_concat=True, qkv_layout="concat", ffn_layout="concat")
    _cli_convert(src, tmp_path / "hf", args)
    assert _parity(model, tmp_path / "hf").ok


def test_meta_layout_needs_rope_permute_and_parity_tells(tmp_path: Path) -> None:
    """Weights still in Meta's interleaved RoPE layout: converted as-is they fail parity after position 0;
    with rope_permute: true they match (Q permuted with num_heads, K with n_kv_heads)."""
    model = L.build(seed=7, num_heads=8, n_kv_heads=2, meta_rope=True)
    src = _save(tmp_path, model)
    _cli_convert(src, tmp_path / "off", _run_config(tmp_path / "a.yaml", model))
    off = _parity(model, tmp_path / "off")
    assert not off.ok and off.first_bad_position is not None
    record = _cli_convert(src, tmp_path / "on", _run_config(tmp_path / "b.yaml", model, rope_permute=True))
    assert record["native_args"]["rope_permute"] is True
    assert _parity(model, tmp_path / "on").ok


def test_rope_scaling_extend_methods(tmp_path: Path) -> None:
    model = L.build(seed=8, scaling_factor=4.0)
    src = _save(tmp_path, model)
    _cli_convert(src, tmp_path / "pi", _run_config(tmp_path / "a.yaml", model, extend_method="PI", scaling_factor=4.0))
    assert _parity(model, tmp_path / "pi").ok
    cfg = json.loads((tmp_path / "pi" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "linear" and cfg["rope_parameters"]["factor"] == 4.0
    _cli_convert(src, tmp_path / "none", _run_config(tmp_path / "b.yaml", model))
    assert not _parity(model, tmp_path / "none").ok  # forgetting the interpolation shows


@pytest.mark.parametrize("case", ["llama-fused", "qwen2-biases", "meta", "pi"])
def test_streamed_reference_matches_the_test_reference(tmp_path: Path, case: str) -> None:
    """hubconv's own native forward (used by smoke parity) agrees with tests/native/mindformers_llama."""
    arch = {"llama-fused": {"num_heads": 8, "n_kv_heads": 2}, "qwen2-biases": {"qkv_has_bias": True},
            "meta": {"meta_rope": True}, "pi": {"scaling_factor": 2.0}}[case]  # fmt: skip
    extra = {"qkv_concat": True} if case == "llama-fused" else {}
    extra |= {"rope_permute": True} if case == "meta" else {}
    extra |= {"extend_method": "PI", "scaling_factor": 2.0} if case == "pi" else {}
    model = L.build(seed=9, **arch)
    ckpt = open_checkpoint(_save(tmp_path, model, qkv_concat=bool(extra.get("qkv_concat"))))
    args = ADAPTER.resolve_args(ckpt, ckpt.tensors, ADAPTER.load_args(_run_config(tmp_path / "a.yaml", model, **extra)))
    tokens = torch.randint(0, 96, (2, 70), generator=torch.Generator().manual_seed(1))
    pos = parity_positions(70, 4096)
    with torch.no_grad():
        want = model(tokens, pos)
    got = ADAPTER.reference_logits(ckpt, args, tokens, pos)
    assert float((want - got).abs().max()) <= 1e-4


# ------------------------------------------------------------------------------------------------ containers


def test_rank_folder_and_mindformers_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = L.build(seed=10, num_heads=8, n_kv_heads=4)
    sd = W.llama_state_dict(model)
    args = _run_config(tmp_path / "run.yaml", model)
    W.save_rank_folder(str(tmp_path / "output" / "checkpoint"), {**sd, **W.training_entries(sd)}, ranks=2)
    _cli_convert(str(tmp_path / "output" / "checkpoint"), tmp_path / "from_ranks", args)
    assert _parity(model, tmp_path / "from_ranks").ok
    (tmp_path / "st").mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "st" / "llama.safetensors"), {"format": "ms"})
    _cli_convert(str(tmp_path / "st"), tmp_path / "from_st", args)
    a = (tmp_path / "from_ranks" / "model.safetensors").read_bytes()
    assert (tmp_path / "from_st" / "model.safetensors").read_bytes() == a  # same weights, byte for byte


def test_split_tensors_are_copied_as_segments(tmp_path: Path) -> None:
    model = L.build(seed=11)
    ckpt = open_checkpoint(_save(tmp_path, model, slice_bytes=1000))
    plan = ADAPTER.plan(ckpt, "llama", ADAPTER.load_args(_run_config(tmp_path / "a.yaml", model)))
    emb = next(t for t in plan.targets if t.name == "model.embed_tokens.weight")
    segs = emb.segments()
    assert segs is not None and len(segs) == -(-96 * 64 * 4 // 1000)
    assert read_all(emb).tobytes() == W.raw_bytes(model.tok_embeddings.weight)


def test_interleaved_gate_hidden_is_read_in_blocks_not_per_row_segments(tmp_path: Path) -> None:
    """The row-interleaved w_gate_hidden halves are served by a strided block view (memory flat in the model size),
    and hold exactly w1's and w3's rows; the grouped w_qkv split stays a file-segment view."""
    model = L.build(seed=19, num_heads=8, n_kv_heads=2)
    ckpt = open_checkpoint(_save(tmp_path, model, qkv_concat=True))
    args = ADAPTER.load_args(_run_config(tmp_path / "a.yaml", model, qkv_concat=True))
    targets = {t.name: t for t in ADAPTER.plan(ckpt, "llama", args).targets}
    gate, up = targets["model.layers.1.mlp.gate_proj.weight"], targets["model.layers.1.mlp.up_proj.weight"]
    assert gate.segments() is None and up.segments() is None
    ffn = model.layers[1].feed_forward
    assert read_all(gate).tobytes() == W.raw_bytes(ffn.w1.weight)
    assert read_all(up).tobytes() == W.raw_bytes(ffn.w3.weight)
    assert gate.read_rows(5, 9).tobytes() == W.raw_bytes(ffn.w1.weight[5:9])
    k = targets["model.layers.1.self_attn.k_proj.weight"]
    assert len(k.segments()) == 2 and read_all(k).tobytes() == W.raw_bytes(model.layers[1].attention.wk.weight)


def test_padded_vocabulary_is_trimmed_to_the_tokenizer(tmp_path: Path) -> None:
    model = L.build(seed=12, vocab_size=128)
    src = _save(tmp_path, model)
    record = _cli_convert(src, tmp_path / "hf", _run_config(tmp_path / "a.yaml", model, tokenizer_vocab_size=100))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vocab_size"] == 100 and "model.embed_tokens.weight" in record["lossy"]
    assert _parity(model, tmp_path / "hf").ok


def test_round_trip_from_hf_is_exact() -> None:
    model = L.build(seed=13, num_heads=8, n_kv_heads=2, qkv_has_bias=True)
    sd = W.llama_state_dict(model, qkv_concat=True)
    native = {k: ArrayTensor(k, F32, v.numpy()) for k, v in sd.items()}
    args = {"hidden_size": 64, "num_layers": 2, "vocab_size": 96, "hf_vocab_size": 96, "num_heads": 8,
            "n_kv_heads": 2, "head_dim": 8, "intermediate_size": 96, "qkv_has_bias": True, "qkv_concat": True,
            "qkv_layout": "grouped", "ffn_layout": "interleaved", "rope_permute": False, "tie_word_embeddings": False,
            "dtype": "F32"}  # fmt: skip
    hf = {t.name: t for t in ADAPTER.to_hf(native, args)}
    back = {t.name: t for t in ADAPTER.from_hf(hf, args)}
    assert set(back) == set(native)
    for k, t in native.items():
        assert read_all(back[k]).tobytes() == read_all(t).tobytes(), k


# ------------------------------------------------------------------------------------------------ arguments


def test_model_config_sources_and_ffn_width() -> None:
    assert model_config({"model": {"model_config": {"num_heads": 4}}}, "x") == {"num_heads": 4}
    assert model_config({"model_config": {"num_heads": 4}}, "x") == {"num_heads": 4}
    assert model_config({"num_heads": 4, "use_past": False}, "x") == {"num_heads": 4, "use_past": False}
    with pytest.raises(Exception, match=r"unknown field 'num_head' \(did you mean 'num_heads'\?\)"):
        model_config({"num_head": 4}, "x.yaml")
    assert mindformers_ffn_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert mindformers_ffn_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            {"n_kv_heads": 4},
            r"n_kv_heads=4 contradicts the checkpoint: model.layers.0.attention.wk.weight rows .* n_kv_heads=2",
        ),
        ({"num_heads": None}, r"num_heads cannot be read from the tensor shapes"),
        ({"hidden_size": 32}, r"hidden_size=32 contradicts the checkpoint"),
        ({"intermediate_size": None, "multiple_of": 64}, r"give an FFN width of 192, but .*w1.weight rows gives 96"),
        ({"qkv_concat": True}, r"qkv_concat=True contradicts the checkpoint"),
        ({"extend_method": "NTK"}, r"extend_method='NTK' is not supported"),
        ({"qkv_layout": "per_head"}, r"qkv_layout='per_head': expected one of grouped, concat"),
        ({"vocab_size": 32000}, r"vocab_size=32000 contradicts the checkpoint"),
        ({"theta": "ten thousand"}, r"theta='ten thousand' is not a positive number"),
        ({"rope_permute": "yes"}, r"rope_permute='yes' must be true or false"),
    ],
)
def test_model_args_are_checked_against_the_shapes(tmp_path: Path, args: dict, match: str) -> None:
    model = L.build(seed=14)
    src = _save(tmp_path, model)
    cfg = _run_config(tmp_path / "a.yaml", model, **{k: v for k, v in args.items()})
    if args.get("num_heads", 0) is None:
        text = yaml.safe_load(Path(cfg).read_text())
        del text["model"]["model_config"]["num_heads"]
        Path(cfg).write_text(yaml.safe_dump(text))
    r = hubconv("convert", "--adapter", "mindformers", "--checkpoint", src, "--model-args", cfg, "--output",
                str(tmp_path / "out"), "--quiet")  # fmt: skip
    assert r.returncode == 1 and re.search(match, r.stderr), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_multiple_of_gives_the_ffn_width(tmp_path: Path) -> None:
    model = L.build(seed=15, intermediate_size=mindformers_ffn_dim(64, 32, None))
    src = _save(tmp_path, model)
    cfg = yaml.safe_load(Path(_run_config(tmp_path / "a.yaml", model)).read_text())
    del cfg["model"]["model_config"]["intermediate_size"]
    cfg["model"]["model_config"]["multiple_of"] = 32
    (tmp_path / "b.json").write_text(json.dumps(cfg["model"]["model_config"]))  # the JSON model_config form
    record = _cli_convert(src, tmp_path / "hf", str(tmp_path / "b.json"))
    assert record["native_args"]["intermediate_size"] == 192
    assert _parity(model, tmp_path / "hf").ok


# ------------------------------------------------------------------------------------------------ errors


def _cli_error(tmp_path: Path, src: str, args: str) -> str:
    out = tmp_path / "out"
    r = hubconv("convert", "--adapter", "mindformers", "--checkpoint", src, "--model-args", args, "--output", str(out),
                "--quiet")  # fmt: skip
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hubconv: error: "), r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out."))]
    return lines[0]


def test_unknown_and_missing_tensors_are_errors(tmp_path: Path) -> None:
    model = L.build(seed=16)
    sd = W.llama_state_dict(model)
    args = _run_config(tmp_path / "a.yaml", model)
    W.save_checkpoint({**sd, "model.layers.0.attention.rotary.inv_freq": torch.ones(4)}, str(tmp_path / "u.ckpt"))
    assert "model.layers.0.attention.rotary.inv_freq" in _cli_error(tmp_path, str(tmp_path / "u.ckpt"), args)
    del sd["model.layers.1.feed_forward.w3.weight"]
    W.save_checkpoint(sd, str(tmp_path / "m.ckpt"))
    assert "model.layers.1.feed_forward.w3.weight" in _cli_error(tmp_path, str(tmp_path / "m.ckpt"), args)


@pytest.mark.parametrize("damage", ["truncated", "content", "varint", "path_tag", "crc"])
def test_damaged_checkpoints_fail_in_one_line_and_write_nothing(tmp_path: Path, damage: str) -> None:
    model = L.build(seed=17)
    src = Path(_save(tmp_path, model, crc=damage == "crc"))
    data = bytearray(src.read_bytes())
    sd = W.llama_state_dict(model)
    emb = W.raw_bytes(sd["model.tok_embeddings.embedding_weight"])
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "content":
        data = bytearray(W.value_message("model.tok_embeddings.embedding_weight", [96, 64], "Float32", emb[:-4])) + data
    elif damage == "varint":
        data = bytearray(b"\x0a" + b"\x80" * 10 + b"\x01") + data
    elif damage == "path_tag":
        data += W.value_message("model/../../secrets", [1], "Float32", bytes(4))
    else:
        data[100] ^= 0xFF
    src.write_bytes(bytes(data))
    msg = _cli_error(tmp_path, str(src), _run_config(tmp_path / "a.yaml", model))
    assert str(src) in msg
    expected = {"truncated": "are left", "content": "tensor_content holds", "varint": "longer than 10 bytes",
                "path_tag": "not a parameter name", "crc": "CRC check failed"}[damage]  # fmt: skip
    assert expected in msg


def test_not_a_mindformers_checkpoint(tmp_path: Path) -> None:
    path = W.save_checkpoint({"conv1.weight": torch.ones(6, 1, 5, 5)}, str(tmp_path / "lenet.ckpt"))
    msg = _cli_error(tmp_path, path, _run_config(tmp_path / "a.yaml", L.build()))
    assert "not a MindFormers Llama-family checkpoint" in msg and "conv1.weight" in msg


# ------------------------------------------------------------------------------------------------ release


def test_release_dry_run_with_a_sentencepiece_tokenizer(tmp_path: Path) -> None:
    """`release --dry-run`: MindFormers .ckpt (training checkpoint, fused, bf16) + its run YAML + tokenizer.model ->
    tokenizer files, smoke with parity, a card naming MindSpore Transformers and listing what was dropped."""
    from tests.native.megatron_save import train_gpt_sw3_style_tokenizer

    repo = tmp_path / "repo"
    repo.mkdir()
    _, pieces = train_gpt_sw3_style_tokenizer(repo / "tok", vocab_size=400)
    model = L.build(seed=18, vocab_size=512, num_heads=8, n_kv_heads=2)
    _save(repo, model, name="llama_rank_0-10_2.ckpt", training=True, qkv_concat=True, dtype=torch.bfloat16)
    _run_config(repo / "run_llama_tiny.yaml", model, qkv_concat=True, bos_token_id=2, eos_token_id=3,
                tokenizer_vocab_size=pieces)  # fmt: skip
    (repo / ".hubconv.yml").write_text(
        "adapter: mindformers\ncheckpoint: llama_rank_0-10_2.ckpt\nmodel_args: run_llama_tiny.yaml\n"
        "tokenizer:\n  path: tok/tokenizer.model\noutput: release\n"
        'smoke:\n  prompts:\n    - prompt: "hej och"\n  max_new_tokens: 6\n  parity: true\n'
    )
    r = hubconv("release", "--dry-run", "--json", cwd=str(repo))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["smoke_status"] == "pass", r.stdout[-2000:]
    smoke = json.loads((repo / "release" / "smoke.json").read_text())
    assert smoke["parity"]["positions"] >= 64 and smoke["parity"]["top1_agreement"] == 1.0
    assert (repo / "release" / "tokenizer.json").is_file()
    card = (repo / "release" / "README.md").read_text()
    assert re.search(r"Source framework \| MindSpore Transformers", card), card[:2000]
    assert "adam_m" in card and "global_step" in card, card[:3000]
    record = json.loads((repo / "release" / "hubconv.json").read_text())
    assert record["native_args"]["hf_vocab_size"] == pieces and os.path.isfile(repo / "release" / "config.json")
