"""`--adapter megatron` / `nemo` end to end: checkpoints written in every on-disk layout from a known model
(tests/native/megatron_gpt.py), converted by the CLI, loaded with transformers and compared with the
reference forward of Megatron's GPT on 64 spread positions; the adapter's own rank-by-rank reference (what
the smoke test uses) checked against the same forward; negative controls through the adapter; vocabulary
handling; refusals and corrupt inputs as one-line errors with nothing written; GPT-SW3 `release --dry-run`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hubconv.adapters import megatron_layouts as ML
from hubconv.adapters import megatron_source as MS
from hubconv.adapters.megatron import HEAD
from hubconv.adapters.registry import get as get_adapter_spec
from hubconv.cli import main
from hubconv.io.checkpoint import open_checkpoint
from tests.helpers import hubconv
from tests.native.megatron_gpt import MegatronGPT, MegatronGPTConfig, gpt2_like, llama_like
from tests.native.megatron_save import (
    save_legacy,
    save_legacy_virtual,
    save_nemo_archive,
    save_nemo_ckpt,
    save_torch_dist,
    train_gpt_sw3_style_tokenizer,
)

SEQ = 64


def tokens_positions(cfg: MegatronGPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=g)
    positions = torch.linspace(0, cfg.max_position_embeddings - 1, SEQ).round().long().expand(2, SEQ)
    return tokens, positions


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> tuple[Path, int]:
    return train_gpt_sw3_style_tokenizer(tmp_path_factory.mktemp("spm"), 400)


# name -> (config, TP, PP, how to save: (model, cfg, path) -> checkpoint path)
def _legacy(tp: int, pp: int, **kw: object) -> Callable[[MegatronGPT, MegatronGPTConfig, Path], str]:
    return lambda m, c, p: (save_legacy(m, c, p, tp=tp, pp=pp, **kw), str(p))[1]


def _dist(tp: int, **kw: object) -> Callable[[MegatronGPT, MegatronGPTConfig, Path], str]:
    return lambda m, c, p: (save_torch_dist(m, c, p, tp=tp, **kw), str(p))[1]


CASES: dict[str, tuple[MegatronGPTConfig, int, Callable[[MegatronGPT, MegatronGPTConfig, Path], str]]] = {
    "core-te-tp1": (gpt2_like(), 1, _legacy(1, 1)),
    "core-te-tp2-pp2-tied": (gpt2_like(), 2, _legacy(2, 2)),
    "core-local-pp2-bytesio-extra-state": (gpt2_like(), 1, _legacy(1, 2, spec="local", extra_state="bytesio")),
    "core-gelu-tanh-bias-gelu-fusion": (gpt2_like(activation="gelu_tanh"), 2, _legacy(2, 1)),
    "core-no-bias-zero-biases": (gpt2_like(add_bias_linear=False), 2, _legacy(2, 1)),
    "gpt-sw3-legacy-v3-tp2-pp2": (gpt2_like(make_vocab_size_divisible_by=64), 2, _legacy(2, 2, naming="legacy")),
    "legacy-v0-tp2": (gpt2_like(), 2, _legacy(2, 1, naming="legacy", checkpoint_version=0)),
    "legacy-v1-tp2": (gpt2_like(), 2, _legacy(2, 1, naming="legacy", checkpoint_version=1.0)),
    "llama-gqa-tp2-pp2": (llama_like(), 2, _legacy(2, 2)),
    "llama-gqa-legacy-tp2": (llama_like(), 2, _legacy(2, 1, naming="legacy")),
    "qwen2-style-qkv-bias-tp2": (llama_like(add_qkv_bias=True, num_layers=2), 2, _legacy(2, 1)),
    "llama-rope-llama31-scaling": (llama_like(use_rope_scaling=True, rope_scaling_factor=8.0), 1, _legacy(1, 1)),
    "llama-rope-linear-interpolation": (llama_like(rotary_seq_len_interpolation_factor=4.0), 2, _legacy(2, 1)),
    "llama-virtual-pipeline-tp2-pp2-vp2": (
        llama_like(num_layers=8),
        2,
        lambda m, c, p: (save_legacy_virtual(m, c, p, tp=2, pp=2, vp=2), str(p))[1],
    ),
    "gpt2-virtual-pipeline-tied-pp2-vp2": (
        gpt2_like(num_layers=4),
        1,
        lambda m, c, p: (save_legacy_virtual(m, c, p, tp=1, pp=2, vp=2), str(p))[1],
    ),
    "llama-torch-dist-tp2": (llama_like(), 2, _dist(2)),
    "llama-torch-dist-swiglu-w-v": (llama_like(), 2, _dist(2, swiglu_split_keys=True)),
    "gpt2-torch-dist-tp2": (gpt2_like(), 2, _dist(2)),
    "nemo-ckpt-dictconfig": (gpt2_like(), 1, lambda m, c, p: str(save_nemo_ckpt(m, c, p.with_suffix(".ckpt")))),
    "nemo-ckpt-legacy-o2": (
        gpt2_like(),
        1,
        lambda m, c, p: str(save_nemo_ckpt(m, c, p.with_suffix(".ckpt"), naming="legacy", amp_o2=True)),
    ),
    "nemo-archive-tp2-legacy": (
        gpt2_like(),
        2,
        lambda m, c, p: str(save_nemo_archive(m, c, p.with_suffix(".nemo"), tp=2, naming="legacy")),
    ),
    "nemo-archive-llama-tp2": (
        llama_like(),
        2,
        lambda m, c, p: str(save_nemo_archive(m, c, p.with_suffix(".nemo"), tp=2, naming="legacy")),
    ),
}


def build(tmp: Path, name: str, seed: int = 3) -> tuple[MegatronGPT, str]:
    cfg, tp, save = CASES[name]
    model = MegatronGPT(cfg, tp=tp).init_random(seed=seed).eval()
    return model, save(model, cfg, tmp / name)


def convert(ckpt: str, out: Path, capsys, *extra: str, model_args: dict | None = None) -> tuple[int, str]:
    args = ["convert", "--adapter", "megatron", "--checkpoint", ckpt, "--output", str(out), "--quiet"]
    if model_args is not None:
        path = out.parent / f"{out.name}-args.json"
        path.write_text(json.dumps(model_args))
        args += ["--model-args", str(path)]
    capsys.readouterr()
    rc = main([*args, *extra])
    return rc, capsys.readouterr().err


def max_diff(model: MegatronGPT, out: Path) -> tuple[float, bool]:
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens, positions = tokens_positions(model.cfg)
    with torch.no_grad():
        ref, got = model(tokens, positions), hf(input_ids=tokens, position_ids=positions).logits
    assert ref.shape == got.shape and ref.shape[1] >= 64
    return float((ref - got).abs().max()), bool(torch.equal(ref.argmax(-1), got.argmax(-1)))


def native_reference(ckpt_path: str, out: Path) -> torch.Tensor:
    """The adapter's own reference forward (what `hubconv smoke` compares with), on the checkpoint's ranks."""
    native_args = json.loads((out / "hubconv.json").read_text())["native_args"]
    adapter = get_adapter_spec("megatron")[0]
    cfg = AutoModelForCausalLM.from_pretrained(str(out)).config
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.linspace(0, cfg.max_position_embeddings - 1, SEQ).round().long()
    with open_checkpoint(ckpt_path) as ckpt:
        return adapter.reference_logits(ckpt, native_args, tokens, positions), tokens, positions


@pytest.mark.parametrize("name", list(CASES))
def test_parity_through_convert(tmp_path: Path, capsys, name: str) -> None:
    model, ckpt = build(tmp_path, name)
    out = tmp_path / "hf"
    rc, err = convert(ckpt, out, capsys, model_args={"vocab_size": model.cfg.vocab_size})
    assert rc == 0, err
    diff, argmax_equal = max_diff(model, out)
    assert diff <= 1e-4 and argmax_equal, (name, diff)
    record = json.loads((out / "hubconv.json").read_text())
    assert record["native_args"]["hf_vocab_size"] == model.cfg.vocab_size < model.padded_vocab
    assert any("slice_rows" in why for why in record["lossy"].values())  # the trim is recorded
    # the smoke test's reference (Megatron's forward, rank by rank, on the native tensors) agrees too
    ref, tokens, positions = native_reference(ckpt, out)
    with torch.no_grad():
        want = model(tokens, positions[None].expand_as(tokens))
    assert (ref - want).abs().max() <= 1e-4


def test_rope_scaling_is_carried_into_rope_parameters(tmp_path: Path, capsys) -> None:
    """Llama 3.1 scaling and linear interpolation become transformers' rope_parameters (parity above proves the
    numbers); dropping them would change the logits, which is checked here as the negative control."""
    for name, kind in (("llama-rope-llama31-scaling", "llama3"), ("llama-rope-linear-interpolation", "linear")):
        model, ckpt = build(tmp_path, name)
        out = tmp_path / f"hf-{name}"
        rc, err = convert(ckpt, out, capsys, model_args={"vocab_size": 100})
        assert rc == 0, err
        config = json.loads((out / "config.json").read_text())
        assert config["rope_parameters"]["rope_type"] == kind
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
        (out / "config.json").write_text(json.dumps(config))
        assert max_diff(model, out)[0] > 1e-3


def test_every_source_tensor_is_accounted_for(tmp_path: Path, capsys) -> None:
    _, ckpt = build(tmp_path, "core-te-tp2-pp2-tied")
    out = tmp_path / "hf"
    rc, err = convert(ckpt, out, capsys, model_args={"vocab_size": 100})
    assert rc == 0, err
    dropped = json.loads((out / "hubconv.json").read_text())["dropped"]
    reasons = " ".join(dropped.values())
    for why in ("optimizer state", "_extra_state", "random-number-generator", "training arguments", "tied to"):
        assert why in reasons, why
    assert "output_layer.weight" in dropped  # the last stage's copy of the tied embeddings, compared byte by byte


# ----------------------------------------------------------------------------------------- negative controls


def test_negative_control_qkv_split_as_q_k_v_blocks(tmp_path: Path, capsys, monkeypatch) -> None:
    """Reading fused QKV as [all Q | all K | all V] instead of per query group produces a model that fails parity,
    against the test's forward and against the adapter's independent rank-by-rank reference."""
    model, ckpt = build(tmp_path, "llama-torch-dist-tp2")  # two query groups in one fused tensor
    real = ML._qkv_parts

    def blocks(att, heads, groups):
        sizes, n = real(att, heads, groups)
        return [s * n for s in sizes], 1

    monkeypatch.setattr(ML, "_qkv_parts", blocks)
    rc, err = convert(ckpt, tmp_path / "hf", capsys, model_args={"vocab_size": 100})
    assert rc == 0, err
    diff, _ = max_diff(model, tmp_path / "hf")
    assert diff > 1e-2
    ref, tokens, positions = native_reference(ckpt, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        got = hf(input_ids=tokens, position_ids=positions[None].expand_as(tokens)).logits
    assert (ref - got).abs().max() > 1e-2


def test_negative_control_tp_ranks_in_the_wrong_order(tmp_path: Path, capsys, monkeypatch) -> None:
    model, ckpt = build(tmp_path, "core-te-tp2-pp2-tied")
    real = MS.merge_model

    def swapped(shards, layout, tp, pp, **kw):
        return real({(tp - 1 - k[0], *k[1:]): v for k, v in shards.items()}, layout, tp, pp, **kw)

    monkeypatch.setattr(MS, "merge_model", swapped)
    rc, err = convert(ckpt, tmp_path / "hf", capsys, model_args={"vocab_size": 100})
    assert rc == 0, err
    assert max_diff(model, tmp_path / "hf")[0] > 1e-2


def test_negative_control_checkpoint_version_0_read_as_3(tmp_path: Path, capsys) -> None:
    model, ckpt = build(tmp_path, "legacy-v0-tp2")
    rc, err = convert(ckpt, tmp_path / "hf", capsys, model_args={"vocab_size": 100, "checkpoint_version": 3.0})
    assert rc == 0, err
    assert max_diff(model, tmp_path / "hf")[0] > 1e-2
    rc, err = convert(ckpt, tmp_path / "ok", capsys, model_args={"vocab_size": 100})
    assert rc == 0 and max_diff(model, tmp_path / "ok")[0] <= 1e-4


# ------------------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_unknown_keeps_padded_rows_and_says_so(tmp_path: Path, capsys) -> None:
    cfg = llama_like()
    model = MegatronGPT(cfg, tp=1).init_random(seed=1).eval()
    save_legacy(model, cfg, tmp_path / "ck", args_overrides={"tokenizer_type": "HuggingFaceTokenizer"})
    rc, err = convert(str(tmp_path / "ck"), tmp_path / "hf", capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "hf" / "hubconv.json").read_text())
    assert record["native_args"]["hf_vocab_size"] == 112 and record["native_args"]["vocab_size"] is None
    assert "padded vocabulary rows kept" in record["lossy"]["model.embed_tokens.weight"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens, positions = tokens_positions(cfg)
    with torch.no_grad():
        ref, got = model.forward_padded(tokens, positions), hf(input_ids=tokens, position_ids=positions).logits
    assert (ref - got).abs().max() <= 1e-4  # every padded row kept, logits over all of them


def test_vocabulary_size_must_match_the_padding(tmp_path: Path, capsys) -> None:
    _, ckpt = build(tmp_path, "core-te-tp1")
    rc, err = convert(ckpt, tmp_path / "hf", capsys, model_args={"vocab_size": 40})
    assert rc == 1 and not (tmp_path / "hf").exists()
    assert "a vocabulary of 40" in err and "pads to 48 rows" in err and err.count("\n") == 1, err
    rc, err = convert(ckpt, tmp_path / "hf", capsys, model_args={"vocab_size": 500})
    assert rc == 1 and "500 tokens but the embedding 112 rows" in err


def test_vocabulary_from_megatron_gpt2_bpe_tokenizer(tmp_path: Path, capsys) -> None:
    cfg = gpt2_like(vocab_size=50257, make_vocab_size_divisible_by=128, hidden_size=32, num_layers=1)
    model = MegatronGPT(cfg, tp=1).init_random(seed=2).eval()
    save_legacy(model, cfg, tmp_path / "ck", with_optimizer=False)
    rc, err = convert(str(tmp_path / "ck"), tmp_path / "hf", capsys)
    assert rc == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 50257 and config["eos_token_id"] == 50256 == config["bos_token_id"]


def test_vocabulary_from_tokenizer_model(tmp_path: Path, capsys, spm) -> None:
    tok, pieces = spm
    cfg = gpt2_like(vocab_size=pieces)
    model = MegatronGPT(cfg, tp=1).init_random(seed=2).eval()
    save_legacy(model, cfg, tmp_path / "ck", naming="legacy")
    rc, err = convert(str(tmp_path / "ck"), tmp_path / "hf", capsys, model_args={"tokenizer_model": str(tok)})
    assert rc == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == pieces and config["tokenizer_class"] == "GPTSw3Tokenizer"
    assert (tmp_path / "hf" / "spiece.model").is_file()
    assert max_diff(model, tmp_path / "hf")[0] <= 1e-4


# -------------------------------------------------------------------------------------- refusals and errors


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"num_experts": 8}, "mixture-of-experts"),
        ({"qk_layernorm": True}, "query/key layer norms"),
        ({"rotary_interleaved": True}, "interleaved rotary"),
        ({"apply_layernorm_1p": True}, "1 + weight"),
        ({"apply_residual_connection_post_layernorm": True}, "post-LayerNorm"),
        ({"squared_relu": True, "swiglu": False}, "activation 'squared_relu' is not supported"),
        ({"position_embedding_type": "relative"}, "position_embedding_type 'relative' is not supported"),
    ],
)
def test_unsupported_features_are_refused(tmp_path: Path, capsys, override: dict, message: str) -> None:
    cfg = llama_like(num_layers=1)
    model = MegatronGPT(cfg, tp=1).init_random(seed=1)
    save_legacy(model, cfg, tmp_path / "ck", args_overrides=override, with_optimizer=False)
    rc, err = convert(str(tmp_path / "ck"), tmp_path / "hf", capsys, model_args={"vocab_size": 100})
    assert rc == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "hf").exists()


def test_unknown_tensor_and_model_args_field_are_errors(tmp_path: Path, capsys) -> None:
    cfg = gpt2_like(num_layers=1)
    model = MegatronGPT(cfg, tp=1).init_random(seed=1)
    model.register_buffer("mystery", torch.zeros(3))
    save_legacy(model, cfg, tmp_path / "ck", with_optimizer=False)
    rc, err = convert(str(tmp_path / "ck"), tmp_path / "hf", capsys, model_args={"vocab_size": 100})
    assert rc == 1 and "'model.mystery' is not a parameter of Megatron's GPT model" in err, err
    _, ckpt = build(tmp_path, "core-te-tp1")
    rc, err = convert(ckpt, tmp_path / "hf", capsys, model_args={"vocab_sise": 100})
    assert rc == 1 and "unknown field 'vocab_sise' (did you mean 'vocab_size'?)" in err, err


def test_corrupt_inputs_are_one_line_errors_and_write_nothing(tmp_path: Path) -> None:
    cfg = gpt2_like(num_layers=2)
    model = MegatronGPT(cfg, tp=2).init_random(seed=1)
    files = save_legacy(model, cfg, tmp_path / "ck", tp=2, pp=2, with_optimizer=False)
    out = tmp_path / "hf"

    def fails(ckpt: Path | str, *want: str) -> None:
        r = hubconv("convert", "--adapter", "megatron", "--checkpoint", str(ckpt), "--output", str(out))
        assert r.returncode == 1 and r.stderr.startswith("hubconv: error: ") and r.stderr.count("\n") == 1, r.stderr
        for w in want:
            assert w in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not out.exists()

    # a truncated rank file
    data = files[(1, 1)].read_bytes()
    files[(1, 1)].write_bytes(data[: len(data) // 2])
    fails(tmp_path / "ck", "mp_rank_01_001")
    files[(1, 1)].write_bytes(data)
    # a missing rank
    folder = files[(1, 0)].parent
    folder.rename(tmp_path / "aside")
    fails(tmp_path / "ck", "mp_rank_01_000 is missing")
    (tmp_path / "aside").rename(folder)
    # a Namespace pickle referencing a global outside the allow-list
    state = torch.load(files[(0, 0)], weights_only=False)
    state["args"].hook = _Evil()
    torch.save(state, files[(0, 0)])
    fails(tmp_path / "ck", "refusing to load", "system")
    # a .nemo archive without its weights member
    import tarfile

    nemo = save_nemo_archive(MegatronGPT(cfg, tp=1).init_random(), cfg, tmp_path / "m.nemo")
    with tarfile.open(nemo) as tar, tarfile.open(tmp_path / "broken.nemo", "w") as bad:
        for member in tar.getmembers():
            if not member.name.endswith("model_weights.ckpt"):
                bad.addfile(member, tar.extractfile(member) if member.isfile() else None)
    fails(tmp_path / "broken.nemo", "no model_weights.ckpt member")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


# ----------------------------------------------------------------------------------------------- round trip


def test_round_trip_hf_to_native_is_bit_exact(tmp_path: Path, capsys) -> None:
    """from_hf (the inverse rules, planned on `native_shapes`) gives back the merged native tensors bit for bit."""
    from safetensors.numpy import load_file

    from hubconv.dtypes import BY_NAME
    from hubconv.io.tensor import ArrayTensor, read_all

    F32 = BY_NAME["F32"]

    for name in ("llama-gqa-tp2-pp2", "core-te-tp2-pp2-tied"):
        _, ckpt = build(tmp_path, name)
        out = tmp_path / f"hf-{name}"
        rc, err = convert(ckpt, out, capsys, model_args={"vocab_size": 100, "keep_padded_vocab": True})
        assert rc == 0, err
        args = json.loads((out / "hubconv.json").read_text())["native_args"]
        hf = {k: ArrayTensor(k, F32, v) for k, v in load_file(str(out / "model.safetensors")).items()}
        adapter = get_adapter_spec("megatron")[0]
        back = {t.name: read_all(t) for t in adapter.from_hf(hf, args)}
        with open_checkpoint(ckpt) as c:
            native = adapter.prepare(c, {"vocab_size": 100, "keep_padded_vocab": True}).merged.tensors
            native = {k: read_all(v) for k, v in native.items() if not (args["tie_word_embeddings"] and k == HEAD)}
        assert set(back) == set(native)
        for k, v in native.items():
            assert back[k].tobytes() == v.tobytes() and back[k].shape == v.shape, k


# ------------------------------------------------------------------------------------------ GPT-SW3 release


def test_gpt_sw3_release_dry_run(tmp_path: Path, spm) -> None:
    """A .nemo in the GPT-SW3 layout (legacy names, TP=2, padded vocabulary, its SentencePiece model inside):
    release --dry-run writes a GPT2LMHeadModel with GPTSw3Tokenizer, passes parity and names NeMo on the card."""
    tok, pieces = spm
    cfg = gpt2_like(vocab_size=pieces, make_vocab_size_divisible_by=128, activation="gelu_tanh")
    model = MegatronGPT(cfg, tp=2).init_random(seed=4)
    repo = tmp_path / "repo"
    save_nemo_archive(model, cfg, repo / "gpt-sw3.nemo", tp=2, naming="legacy", tokenizer_model=tok)
    (repo / ".hubconv.yml").write_text(
        "adapter: nemo\ncheckpoint: gpt-sw3.nemo\noutput: release\nsmoke:\n  prompts:\n"
        '    - prompt: "hej och"\n  max_new_tokens: 8\n  parity: true\n'
    )
    r = hubconv("release", "--dry-run", "--json", cwd=str(repo))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["smoke_status"] == "pass"
    release = repo / "release"
    config = json.loads((release / "config.json").read_text())
    assert config["tokenizer_class"] == "GPTSw3Tokenizer" and config["vocab_size"] == pieces
    assert config["activation_function"] == "gelu_pytorch_tanh"  # NeMo's default bias-GELU fusion
    assert (release / "spiece.model").read_bytes() == Path(tok).read_bytes()
    smoke = json.loads((release / "smoke.json").read_text())
    assert smoke["parity"]["passed"] and smoke["parity"]["positions"] >= 64
    card = (release / "README.md").read_text()
    assert re.search(r"Source framework \| NVIDIA NeMo", card) and "slice" in card
    from transformers import AutoTokenizer

    assert type(AutoTokenizer.from_pretrained(str(release))).__name__ == "GPTSw3Tokenizer"


def test_nemo_lightning_ckpt_with_tensor_parallel_config_is_refused(tmp_path: Path, capsys) -> None:
    cfg = gpt2_like(num_layers=1)
    model = MegatronGPT(cfg, tp=1).init_random(seed=1)
    path = save_nemo_ckpt(model, cfg, tmp_path / "x.ckpt", with_optimizer=False)
    state = torch.load(path, weights_only=False)
    state["hyper_parameters"]["cfg"]["tensor_model_parallel_size"] = 2
    torch.save(state, path)
    rc, err = convert(str(path), tmp_path / "hf", capsys, model_args={"vocab_size": 100})
    assert rc == 1 and "one rank of a tensor-parallel 2 model" in err, err


def test_megatron_enums_in_saved_args_are_read_inertly(tmp_path: Path, capsys, monkeypatch) -> None:
    """Megatron-LM >= core 0.10 saves enums in `args` (`attention_backend=AttnBackend.auto`): read as inert
    records without importing megatron, so the checkpoint converts; other foreign globals are still refused."""
    import enum
    import sys
    import types

    names = ["megatron", "megatron.core", "megatron.core.transformer", "megatron.core.transformer.enums"]
    for n in names:
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
    attn = enum.Enum("AttnBackend", {"flash": 1, "auto": 5})
    attn.__module__ = "megatron.core.transformer.enums"
    sys.modules["megatron.core.transformer.enums"].AttnBackend = attn
    cfg = gpt2_like(num_layers=1)
    model = MegatronGPT(cfg, tp=1).init_random(seed=1).eval()
    save_legacy(model, cfg, tmp_path / "ck", args_overrides={"attention_backend": attn.auto}, with_optimizer=False)
    for n in names:
        monkeypatch.delitem(sys.modules, n)
    rc, err = convert(str(tmp_path / "ck"), tmp_path / "hf", capsys, model_args={"vocab_size": 100})
    assert rc == 0, err
    assert "megatron" not in sys.modules
    assert max_diff(model, tmp_path / "hf")[0] <= 1e-4
    record = json.loads((tmp_path / "hf" / "hubconv.json").read_text())
    assert record["native_args"]["config_source"] == "Megatron args"


@pytest.mark.parametrize(
    ("native", "canonical"),
    [
        ("language_model.encoder.layers.3.input_norm.weight", "decoder.layers.3.input_layernorm.weight"),
        ("language_model.encoder.layers.3.input_layernorm.bias", "decoder.layers.3.input_layernorm.bias"),
        ("language_model.encoder.layers.0.post_attention_norm.weight", "decoder.layers.0.pre_mlp_layernorm.weight"),
        ("language_model.transformer.layers.1.attention.query_key_value.weight",
         "decoder.layers.1.self_attention.linear_qkv.weight"),
        ("language_model.encoder.layers.1.self_attention.dense.bias",
         "decoder.layers.1.self_attention.linear_proj.bias"),
        ("language_model.encoder.layers.1.mlp.dense_h_to_4h.weight", "decoder.layers.1.mlp.linear_fc1.weight"),
        ("language_model.encoder.final_norm.weight", "decoder.final_layernorm.weight"),
        ("language_model.encoder.final_layernorm.bias", "decoder.final_layernorm.bias"),
        ("word_embeddings_for_head.weight", "output_layer.weight"),
        ("decoder.layers.2.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.2.input_layernorm.weight"),
        ("decoder.layers.2.mlp.linear_fc1.layer_norm_bias", "decoder.layers.2.pre_mlp_layernorm.bias"),
        ("decoder.final_norm.weight", "decoder.final_layernorm.weight"),
    ],
)  # fmt: skip
def test_canonical_names_of_every_megatron_generation(native: str, canonical: str) -> None:
    assert MS.canonical(native) == canonical


def test_position_embedding_type_missing_or_unreadable_is_taken_from_the_tensors(tmp_path: Path, capsys) -> None:
    """Older Megatron versions saved no `position_embedding_type` (or an enum): learned positions when the
    checkpoint has position embeddings, rotary otherwise."""
    from tests.native.megatron_save import DROP

    for cfg, name in ((gpt2_like(num_layers=1), "gpt2"), (llama_like(num_layers=1), "llama")):
        model = MegatronGPT(cfg, tp=1).init_random(seed=1).eval()
        overrides = {"position_embedding_type": DROP, "use_rotary_position_embeddings": DROP}
        save_legacy(model, cfg, tmp_path / name, args_overrides=overrides, with_optimizer=False)
        rc, err = convert(str(tmp_path / name), tmp_path / f"hf-{name}", capsys, model_args={"vocab_size": 100})
        assert rc == 0, err
        assert max_diff(model, tmp_path / f"hf-{name}")[0] <= 1e-4
