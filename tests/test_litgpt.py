"""LitGPT adapter: parity with LitGPT's own model (tests/native/litgpt_model.py) through `hubconv convert`, both QKV
layouts, pretrain checkpoints, refusals, hostile inputs, round trips and `release --dry-run` with a tokenizer."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from hubconv import views as V
from hubconv.adapters.litgpt import REFUSED, LitGPTAdapter
from hubconv.errors import HubconvError
from hubconv.io.tensor import ArrayTensor
from hubconv.smoke import parity_positions
from tests.helpers import hubconv
from tests.native import litgpt_model as M
from tests.native.parity import Parity, compare

POSITIONS = 96


def _hf_parity(model: M.GPT, out: Path, *, spread: bool = True) -> Parity:
    """LitGPT's forward (float32) vs the converted folder loaded by transformers, on POSITIONS tokens."""
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    c = model.config
    tokens = torch.randint(0, c.vocab_size, (1, POSITIONS), generator=torch.Generator().manual_seed(11))
    pos = parity_positions(POSITIONS, c.block_size) if spread else torch.arange(POSITIONS)
    with torch.no_grad():
        ref = model(tokens, pos)[..., : hf.config.vocab_size]
        got = hf.eval()(tokens, position_ids=pos[None]).logits
    return compare(ref, got)


def _cli_convert(folder: Path | str, out: Path, args: dict[str, Any] | None = None, *extra: str) -> dict:
    """`hubconv convert --adapter litgpt` in a child process; returns hubconv.json."""
    cmd = ["convert", "--adapter", "litgpt", "--checkpoint", str(folder), "--output", str(out), *extra]
    if args:
        path = out.parent / f"{out.name}-args.yaml"
        path.write_text(yaml.safe_dump(args))
        cmd += ["--model-args", str(path)]
    r = hubconv(*cmd)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "hubconv.json").read_text())


def _config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def _tie(model: M.GPT) -> M.GPT:
    with torch.no_grad():
        model.lm_head.weight.copy_(model.transformer.wte.weight)
    return model


LLAMA31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 32}

# id -> (config, save options, tie the head, expected HF model type)
CASES: dict[str, tuple[M.Config, dict[str, Any], bool, str]] = {
    "llama-gqa": (M.llama_like(), {}, False, "llama"),
    "llama-gqa-legacy": (M.llama_like(), {"legacy": True}, False, "llama"),
    "llama-finetune-step-compiled": (M.llama_like(), {"wrapper": "finetune", "compiled": True}, False, "llama"),
    "llama-bf16-wide-heads": (M.llama_like(head_size=32), {"dtype": torch.bfloat16}, False, "llama"),
    "llama-bias-mqa-pretrain": (M.llama_like(bias=True, n_query_groups=1), {"pretrain": True}, False, "llama"),
    "llama31-rope-tied": (M.llama_like(rope_adjustments=LLAMA31), {}, True, "llama"),
    "llama-condensed-rope": (M.llama_like(rope_condense_ratio=4, rope_base=10000), {}, False, "llama"),
    "mistral-sliding-window": (M.llama_like(sliding_window_size=24), {}, False, "mistral"),
    "qwen2-tied": (M.qwen2_like(), {}, True, "qwen2"),
    "qwen2-legacy-pretrain": (M.qwen2_like(n_query_groups=2), {"legacy": True, "pretrain": True}, False, "qwen2"),
    "gemma-tied": (M.gemma_like(), {}, True, "gemma"),
    "gemma-gqa-legacy": (M.gemma_like(n_query_groups=2), {"legacy": True}, False, "gemma"),
    "phi": (M.phi_like(), {}, False, "phi"),
    "phi-legacy-pretrain": (M.phi_like(rotary_percentage=0.5), {"legacy": True, "pretrain": True}, False, "phi"),
    "pythia": (M.pythia_like(), {}, False, "gpt_neox"),
    "pythia-legacy": (M.pythia_like(), {"legacy": True}, False, "gpt_neox"),
    "pythia-finetune-final": (M.pythia_like(), {"wrapper": "model"}, False, "gpt_neox"),
    "pythia-sequential-pretrain": (M.pythia_like(parallel_residual=False), {"pretrain": True}, False, "gpt_neox"),
    "neox-tanh-no-bias": (M.pythia_like(bias=False, gelu_approximate="tanh"), {}, False, "gpt_neox"),
}


# ------------------------------------------------------------------------------------------------ parity


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """case -> (LitGPT model as saved, its checkpoint folder, the folder `hubconv convert` wrote, hubconv.json),
    converted once per module through the command line."""
    done: dict[str, tuple[M.GPT, str, Path, dict]] = {}

    def get(case: str) -> tuple[M.GPT, str, Path, dict]:
        if case not in done:
            config, save, tie, _ = CASES[case]
            base = tmp_path_factory.mktemp(case)
            model = M.build(config, seed=3)
            if tie:
                _tie(model)
            folder = M.save(model, str(base / "ckpt"), **save)
            if save.get("dtype") is not None:  # the reference computes with the weights as stored
                with torch.no_grad():
                    for p in model.parameters():
                        p.copy_(p.to(save["dtype"]).float())
            done[case] = (model, folder, base / "hf", _cli_convert(folder, base / "hf"))
        return done[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_litgpt(converted, case: str) -> None:
    config, save, tie, model_type = CASES[case]
    model, _, out, record = converted(case)
    for spread in (False, True):
        p = _hf_parity(model, out, spread=spread)
        assert p.ok and p.positions >= 64, f"{case} spread={spread}: {p}"
    if save.get("dtype") is torch.bfloat16:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"
        assert _config(out)["head_dim"] == 32
    hf = _config(out)
    assert hf["model_type"] == model_type and record["native_args"]["family"] == model_type
    assert hf["vocab_size"] == config.vocab_size and hf["tie_word_embeddings"] is tie
    assert hf["max_position_embeddings"] == config.block_size
    assert record["native_args"]["qkv_layout"] == ("legacy" if save.get("legacy") else "current")
    padded = config.padded_vocab_size != config.vocab_size
    trimmed = f"0..{config.vocab_size} of {config.padded_vocab_size} dropped"
    embed = "gpt_neox.embed_in.weight" if model_type == "gpt_neox" else "model.embed_tokens.weight"
    assert (trimmed in record["lossy"].get(embed, "")) is padded
    if tie:
        assert record["dropped"]["lm_head.weight"].startswith("tied to transformer.wte.weight")
    wrapper = "pretrain" if save.get("pretrain") else save.get("wrapper", "")
    if wrapper in ("pretrain", "finetune"):
        assert {"iter_num", "step_count", "optimizer.param_groups"} <= set(record["dropped"])
        assert ("train_dataloader" if wrapper == "pretrain" else "scheduler") in record["dropped"]
        assert any(k.startswith("optimizer.state.") for k in record["dropped"])
    else:
        assert not record["dropped"] or tie
    if model_type == "phi":
        assert record["lossy"]["lm_head.bias"] == record["lossy"]["lm_head.weight"]  # both trimmed
    if model_type == "gpt_neox":
        assert hf["use_parallel_residual"] is config.parallel_residual
        assert hf["rope_parameters"]["partial_rotary_factor"] == config.rotary_percentage
        assert hf["hidden_act"] == ("gelu" if config.gelu_approximate == "none" else "gelu_pytorch_tanh")
    if model_type == "mistral":
        assert hf["sliding_window"] == config.sliding_window_size


def test_streamed_reference_matches_litgpt(tmp_path: Path) -> None:
    """hubconv's own reference forward (used by smoke parity) against LitGPT's model, each family and layout."""
    names = ["llama-gqa-legacy", "qwen2-tied", "pythia", "mistral-sliding-window", "llama31-rope-tied", "gemma-tied"]
    for name in [*names, "phi-legacy-pretrain"]:
        config, save, tie, _ = CASES[name]
        model = M.build(config, seed=5)
        if tie:
            _tie(model)
        folder = M.save(model, str(tmp_path / name), **save)
        adapter = LitGPTAdapter()
        with adapter.open(folder) as ckpt:
            plan = adapter.plan(ckpt, adapter.detect_family(ckpt), {})
            tokens = torch.randint(0, config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(2))
            pos = parity_positions(80, config.block_size)
            ref = adapter.reference_logits(ckpt, plan.native_args, tokens, pos)
        with torch.no_grad():
            want = model(tokens, pos)[..., : config.vocab_size]
        assert compare(want, ref).ok, name


# ------------------------------------------------------------------------------------------------ negative controls


def _edit_config(out: Path, **changes: Any) -> None:
    cfg = _config(out)
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))


def test_pythia_without_the_per_head_interleave_fails(tmp_path: Path) -> None:
    """Negative control: current-layout [Q; K; V] copied into query_key_value as if it were per head."""
    model = M.build(M.pythia_like(), seed=3)
    folder = M.save(model, str(tmp_path / "ckpt"))
    _cli_convert(folder, tmp_path / "hf", {"qkv_layout": "legacy"})  # forced: no re-interleave
    assert not _hf_parity(model, tmp_path / "hf").ok


def test_legacy_layout_read_as_current_fails(tmp_path: Path) -> None:
    """Negative control: a pre-0.5.5 per-group QKV split as if it were [Q; K; V]."""
    model = M.build(M.llama_like(), seed=3)
    folder = M.save(model, str(tmp_path / "ckpt"), legacy=True)
    _cli_convert(folder, tmp_path / "hf", {"qkv_layout": "current"})
    assert not _hf_parity(model, tmp_path / "hf").ok


@pytest.mark.parametrize(
    "case, change",
    [
        ("mistral-sliding-window", {"sliding_window": None}),
        ("llama31-rope-tied", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
        ("llama-condensed-rope", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
        ("pythia", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}),
        ("pythia", {"hidden_act": "gelu_new"}),
        ("pythia", {"use_parallel_residual": False}),
        ("gemma-tied", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}),
        ("phi", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}),
    ],
    ids=[
        "no-sliding-window",
        "no-llama3-scaling",
        "no-condense",
        "full-rotary",
        "gelu-tanh",
        "sequential",
        "gemma-as-llama",
        "phi-full-rotary",
    ],
)
def test_each_config_setting_matters(tmp_path: Path, converted, case: str, change: dict) -> None:
    """Negative controls: undoing one translated setting in config.json breaks parity, so each one is needed."""
    model, _, out, _ = converted(case)
    shutil.copytree(out, tmp_path / "hf")
    assert _hf_parity(model, tmp_path / "hf").ok
    _edit_config(tmp_path / "hf", **change)
    assert not _hf_parity(model, tmp_path / "hf").ok


# ------------------------------------------------------------------------------------------------ refusals and errors


def _fails(tmp_path: Path, folder: str | Path, pattern: str, *args: str) -> str:
    """A one-line `hubconv: error:` matching `pattern`, exit 1, and no output folder."""
    out = tmp_path / "never"
    r = hubconv("convert", "--adapter", "litgpt", "--checkpoint", str(folder), "--output", str(out), *args)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hubconv: error: "), r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()
    return lines[0]


def test_unmerged_lora_is_refused(tmp_path: Path) -> None:
    model = M.build(M.llama_like(), seed=1)
    c = model.config
    extra = {
        "transformer.h.0.attn.qkv.lora_A": torch.zeros(4, c.n_embd),
        "transformer.h.0.attn.qkv.lora_B": torch.zeros((c.n_head + 2 * c.n_query_groups) * c.head_size, 4),
    }
    folder = M.save(model, str(tmp_path / "lora"), extra=extra)
    _fails(tmp_path, folder, r"unmerged LoRA weights \(transformer\.h\.0\.attn\.qkv\.lora_[AB]\).*litgpt merge_lora")
    only = tmp_path / "only-lora"
    only.mkdir()
    torch.save(extra, only / "lit_model.pth.lora")
    _fails(tmp_path, only, r"only LoRA weights \(lit_model\.pth\.lora\).*litgpt merge_lora")


def test_unknown_tensor_is_a_one_line_error(tmp_path: Path) -> None:
    model = M.build(M.pythia_like(), seed=1)
    folder = M.save(model, str(tmp_path / "ckpt"), extra={"transformer.h.0.attn.rotary.inv_freq": torch.ones(4)})
    _fails(tmp_path, folder, r"1 tensor\(s\) match no mapping rule: transformer\.h\.0\.attn\.rotary\.inv_freq")


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    model = M.build(M.llama_like(), seed=1)
    folder = Path(M.save(model, str(tmp_path / "ckpt")))
    sd = torch.load(folder / "lit_model.pth")
    del sd["transformer.h.1.mlp.fc_2.weight"]
    torch.save(sd, folder / "lit_model.pth")
    _fails(tmp_path, folder, r"transformer\.h\.1\.mlp\.fc_2\.weight")


@pytest.mark.parametrize(
    "yaml_text, pattern",
    [
        (None, r"no model_config\.yaml beside lit_model\.pth"),
        ("- n_layer: 2\n", r"model_config\.yaml: not a LitGPT model config \(expected a mapping"),
        ("n_layer: [1, 2\n", r"model_config\.yaml:\d+: invalid YAML"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                for p, n in zip("abcdef", "bcdefg", strict=True)
            ),
            r"model_config\.yaml.*(expands|nodes)",
        ),
        ("name: x\n" + "# padding\n" * 200_000, r"model_config\.yaml: LitGPT model config is larger than 1024 KiB"),
        ("n_layer: 2\nn_embd: 64\nn_head: 4\nmystery_field: 1\n", r"unknown LitGPT Config field\(s\) mystery_field"),
        ("n_layer: 2\nn_embd: 64\nn_head: 0\n", r"n_head=0 is not a positive integer"),
    ],
    ids=["missing", "not-a-mapping", "invalid", "alias-bomb", "too-large", "unknown-field", "zero-heads"],
)
def test_hostile_or_broken_model_config(tmp_path: Path, yaml_text: str | None, pattern: str) -> None:
    folder = Path(M.save(M.build(M.pythia_like(), seed=1), str(tmp_path / "ckpt"), config=False))
    if yaml_text is not None:
        (folder / "model_config.yaml").write_text(yaml_text)
    _fails(tmp_path, folder, pattern)


def test_truncated_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    folder = Path(M.save(M.build(M.pythia_like(), seed=1), str(tmp_path / "ckpt")))
    data = (folder / "lit_model.pth").read_bytes()
    (folder / "lit_model.pth").write_bytes(data[: len(data) // 2])
    _fails(tmp_path, folder, r"lit_model\.pth")
    (tmp_path / "empty").mkdir()
    _fails(tmp_path, tmp_path / "empty", r"no lit_model\.pth in this folder")


def test_config_contradicting_the_tensors_is_refused(tmp_path: Path) -> None:
    model = M.build(M.llama_like(), seed=1)
    folder = Path(M.save(model, str(tmp_path / "ckpt")))
    cfg = yaml.safe_load((folder / "model_config.yaml").read_text())
    (folder / "model_config.yaml").write_text(yaml.safe_dump({**cfg, "n_query_groups": 4}))
    _fails(tmp_path, folder, r"attn\.qkv\.weight is \[128, 64\] but the config gives .* = \[192, 64\]")
    (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    args = tmp_path / "args.yaml"
    args.write_text("n_head: 8\n")
    _fails(
        tmp_path, folder, r"--model-args n_head=8 contradicts .*model_config\.yaml: n_head=4", "--model-args", str(args)
    )
    args.write_text("qkv_layout: interleaved\n")
    _fails(tmp_path, folder, r"qkv_layout='interleaved': expected 'current' or 'legacy'", "--model-args", str(args))


def test_model_config_from_model_args(tmp_path: Path) -> None:
    """No model_config.yaml in the folder: LitGPT's file passed as --model-args gives the same model."""
    model = M.build(M.qwen2_like(), seed=2)
    folder = Path(M.save(model, str(tmp_path / "ckpt"), config=False))
    cfg = tmp_path / "model_config.yaml"
    cfg.write_text(yaml.dump(asdict(model.config)))
    record = _cli_convert(folder, tmp_path / "hf", None, "--model-args", str(cfg))
    assert record["native_args"]["family"] == "qwen2"
    assert _hf_parity(model, tmp_path / "hf").ok


REFUSAL_CASES = {
    "moe": (M.llama_like(mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2), r"mixture-of-experts"),
    "yarn": (
        M.llama_like(rope_adjustments={"factor": 4.0, "beta_fast": 32, "beta_slow": 1, "original_max_seq_len": 64}),
        r"YaRN",
    ),
    "gemma-name-only": (M.llama_like(name="Gemma-2b"), r"scale_embeddings, mlp_class_name: only the whole Gemma"),
    "gemma-unscaled": (M.gemma_like(scale_embeddings=False), r"scale_embeddings: only the whole Gemma combination"),
    "shared-norm-sequential": (M.phi_like(parallel_residual=False), r"parallel_residual only"),
    "phi-without-head-bias": (M.phi_like(lm_head_bias=False), r"Phi has biases everywhere, lm_head included"),
    "falcon-style": (
        M.phi_like(bias=False, lm_head_bias=False, n_query_groups=1),
        r"without biases .*\(Falcon style\)",
    ),
    "llama-head-bias": (M.llama_like(lm_head_bias=True), r"lm_head_bias: a bias on lm_head exists in Phi-style"),
    "olmo": (M.pythia_like(name="OLMo-1B"), r"OLMo config"),
    # GemmaConfig rewrites hidden_act "gelu" to the tanh approximation: exact GELU cannot be expressed
    "gemma-exact-gelu": (M.gemma_like(gelu_approximate="none"), r"GemmaForCausalLM always uses the tanh GELU"),
    "partial-rotary-llama": (M.llama_like(rotary_percentage=0.5), r"rotary_percentage=0\.5"),
    "gqa-neox": (M.pythia_like(n_query_groups=2), r"GPT-NeoX has no grouped-query attention"),
    "parallel-llama": (M.llama_like(parallel_residual=True), r"parallel-residual LLaMAMLP"),
    "layernorm-llama": (M.llama_like(norm_class_name="LayerNorm"), r"LLaMAMLP.*LayerNorm.*no transformers class"),
    "softcapping": (M.llama_like(attention_logit_softcapping=50.0), r"attention softcapping"),
    "some-sliding-layers": (M.llama_like(sliding_window_size=8, sliding_window_indices=[1, 0]), r"some layers only"),
    "biased-mistral": (M.llama_like(sliding_window_size=8, bias=True), r"Mistral has no attention biases"),
}


@pytest.mark.parametrize("case", list(REFUSAL_CASES))
def test_refused_configs(tmp_path: Path, case: str) -> None:
    """Configs no transformers class computes exactly are refused in one line naming the field (the weights are a
    plain Llama/Pythia model: the refusal comes from model_config.yaml alone)."""
    config, pattern = REFUSAL_CASES[case]
    base = M.pythia_like() if config.mlp_class_name == "GptNeoxMLP" else M.llama_like()
    folder = Path(M.save(M.build(base, seed=1), str(tmp_path / "ckpt"), config=False))
    (folder / "model_config.yaml").write_text(yaml.dump(asdict(config)))
    message = _fails(tmp_path, folder, pattern)
    assert "model_config.yaml" in message


def test_refusal_table_is_documented() -> None:
    """Every refused setting appears in docs/litgpt.md."""
    doc = (Path(__file__).parent.parent / "docs" / "litgpt.md").read_text()
    for field, _, what in REFUSED:
        assert field in doc and what.split(" (")[0].lower() in doc.lower(), (field, what)


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("case", ["llama-gqa", "llama-gqa-legacy", "qwen2-legacy-pretrain", "gemma-gqa-legacy",
                                  "phi-legacy-pretrain", "pythia", "pythia-legacy", "neox-tanh-no-bias"])  # fmt: skip
def test_round_trip_through_from_hf(tmp_path: Path, case: str) -> None:
    """native -> HF -> native is bit-exact through each rule's recorded inverse (unpadded vocabulary, untied head;
    synthesized zero biases have no native counterpart and are left out)."""
    config, save, _, _ = CASES[case]
    if config.padded_vocab_size != config.vocab_size:
        config = type(config)(**{**asdict(config), "padded_vocab_size": config.vocab_size})
    model = M.build(config, seed=4)
    folder = M.save(model, str(tmp_path / "ckpt"), **save)
    adapter = LitGPTAdapter()
    with adapter.open(folder) as ckpt:
        plan = adapter.plan(ckpt, adapter.detect_family(ckpt), {})
        hf = {t.name: ArrayTensor(t.name, t.dtype, V.materialize(t)) for t in plan.targets}
        exact = {t for t in hf if t not in plan.lossy}
        native = {t.name: V.materialize(t) for t in adapter.from_hf({k: hf[k] for k in exact}, plan.native_args)}
        source = adapter.model_tensors(ckpt)
        model_keys = {k for k in source if k.startswith(("transformer.", "lm_head."))}
        assert set(native) == model_keys
        for k in model_keys:
            assert np.array_equal(native[k], V.materialize(source[k])), k


# ------------------------------------------------------------------------------------------------ tokenizer, release


def _tokenizer_files(folder: Path, vocab_size: int) -> tuple[int, int]:
    """A byte-level BPE tokenizer with <s>/</s> as LitGPT's checkpoint folders carry it (tokenizer.json,
    tokenizer_config.json, generation_config.json); returns the (bos, eos) ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["Lightning fast: a hackable implementation of language models."] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    bos, eos = fast.convert_tokens_to_ids("<s>"), fast.convert_tokens_to_ids("</s>")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
    return bos, eos


def test_special_tokens_from_tokenizer_config_only(tmp_path: Path) -> None:
    """Without generation_config.json, BOS/EOS come from tokenizer_config.json's tokens looked up in tokenizer.json."""
    model = M.build(M.llama_like(vocab_size=300), seed=1)
    folder = Path(M.save(model, str(tmp_path / "ckpt")))
    bos, eos = _tokenizer_files(folder, 300)
    (folder / "generation_config.json").unlink()
    record = _cli_convert(folder, tmp_path / "hf")
    assert (record["native_args"]["bos_token_id"], record["native_args"]["eos_token_id"]) == (bos, eos)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_release_dry_run(tmp_path: Path) -> None:
    """`release --dry-run` of a pretrain checkpoint folder with its tokenizer: smoke parity passes at spread positions,
    the card names LitGPT and lists what was dropped and the trimmed vocabulary."""
    repo = tmp_path / "repo"
    folder = repo / "out" / "pretrain" / "final"
    model = M.build(M.llama_like(vocab_size=300), seed=9)
    M.save(model, str(folder), pretrain=True)
    bos, eos = _tokenizer_files(folder, 300)
    (repo / ".hubconv.yml").write_text(
        "adapter: litgpt\ncheckpoint: out/pretrain/final\noutput: release\n"
        'smoke:\n  prompts:\n    - prompt: "Lightning"\n  max_new_tokens: 8\n  parity: true\n'
    )
    r = hubconv("release", "--dry-run", "--json", cwd=str(repo))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["smoke_status"] == "pass", r.stdout
    parity = json.loads((repo / "release" / "smoke.json").read_text())["parity"]
    assert parity["passed"] and parity["positions"] >= 64 and parity["max_position"] == 255
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] <= 1e-4
    card = (repo / "release" / "README.md").read_text()
    assert re.search(r"Source framework \| LitGPT", card), card[:2000]
    assert "optimizer" in card and "iter_num" in card and "0..300 of 320 dropped" in card
    config = _config(repo / "release")
    assert (config["bos_token_id"], config["eos_token_id"]) == (bos, eos)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(repo / "release"))
    assert tok.bos_token_id == bos and tok.eos_token_id == eos


def test_api_errors_are_hubconv_errors(tmp_path: Path) -> None:
    """The adapter's refusals are HubconvError subclasses (the CLI prints them in one line)."""
    folder = Path(M.save(M.build(M.llama_like(), seed=1), str(tmp_path / "ckpt"), config=False))
    adapter = LitGPTAdapter()
    with adapter.open(str(folder)) as ckpt, pytest.raises(HubconvError, match=r"no model_config\.yaml"):
        adapter.plan(ckpt, adapter.detect_family(ckpt), {})
    with pytest.raises(HubconvError, match=r"unknown field 'n_heads'.*did you mean 'n_head'"):
        adapter.load_args({"n_heads": 4})
    assert os.listdir(tmp_path) == ["ckpt"]


def test_sentencepiece_tokenizer_model_in_the_folder(tmp_path: Path) -> None:
    """A Llama-2 style LitGPT folder carries only tokenizer.model (SentencePiece): it is converted with the weights,
    ids identical to SentencePiece's, BOS/EOS from generation_config.json."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Lightning fast: a hackable implementation of language models, 42 of them.\n" * 200)
    model = M.build(M.llama_like(vocab_size=320), seed=1)
    folder = Path(M.save(model, str(tmp_path / "ckpt")))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
                                   num_threads=1)  # fmt: skip
    (folder / "tokenizer.vocab").unlink()
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    record = _cli_convert(folder, tmp_path / "hf")
    assert (record["native_args"]["bos_token_id"], record["native_args"]["eos_token_id"]) == (1, 2)
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "Lightning models: 42 hackable ünïcödé"
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert _hf_parity(model, tmp_path / "hf").ok


@pytest.mark.parametrize("case", ["llama-gqa", "llama-gqa-legacy", "qwen2-tied", "phi", "pythia", "pythia-legacy"])
def test_targets_are_file_segments(tmp_path: Path, case: str) -> None:
    """Every QKV split/regroup and vocabulary trim is a row view over lit_model.pth: the writer copies file
    segments (no decoding, no whole tensor in memory); only synthesized zeros have none."""
    config, save, tie, _ = CASES[case]
    model = M.build(config, seed=1)
    if tie:
        _tie(model)
    folder = M.save(model, str(tmp_path / "ckpt"), **save)
    adapter = LitGPTAdapter()
    with adapter.open(folder) as ckpt:
        plan = adapter.plan(ckpt, adapter.detect_family(ckpt), {})
        assert all(t.segments() for t in plan.targets), [t.name for t in plan.targets if not t.segments()]
        qkv = "gpt_neox.layers.0.attention.query_key_value.weight" if case.startswith("pythia") else None
        if qkv:  # the regrouped fused QKV is [q0; k0; v0; q1; ...], one head (16 rows) per piece
            assert len(next(t for t in plan.targets if t.name == qkv).segments()) == (1 if "legacy" in case else 12)


def test_family_named_on_the_command_line_must_match(tmp_path: Path) -> None:
    folder = M.save(M.build(M.llama_like(), seed=1), str(tmp_path / "ckpt"))
    _fails(tmp_path, folder, r"the config describes a llama model, not phi", "--adapter", "litgpt:phi")


def test_keep_padded_vocab(tmp_path: Path) -> None:
    """keep_padded_vocab: true keeps every embedding and head row (nothing inexact); logits agree on all of them."""
    model = M.build(M.pythia_like(), seed=6)
    record = _cli_convert(M.save(model, str(tmp_path / "ckpt")), tmp_path / "hf", {"keep_padded_vocab": True})
    assert _config(tmp_path / "hf")["vocab_size"] == model.config.padded_vocab_size == 256
    assert record["lossy"] == {} and record["native_args"]["keep_padded_vocab"] is True
    assert _hf_parity(model, tmp_path / "hf").ok
