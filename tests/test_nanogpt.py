"""nanoGPT adapter: parity with nanoGPT's own model, checkpoint variants, tokenizers, errors, round trips, release."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hubconv import views as V
from hubconv.adapters.nanogpt import NanoGPTAdapter, find_meta, strip_wrappers
from hubconv.convert import convert
from hubconv.dtypes import BY_NAME
from hubconv.io.tensor import ArrayTensor
from hubconv.smoke import parity_positions
from tests.helpers import hubconv
from tests.native import nanogpt as N
from tests.native.parity import Parity, compare

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
POSITIONS = 96


def _save(tmp: Path, *, name: str = "out", seed: int = 0, dtype: torch.dtype | None = None, **kw) -> tuple[N.GPT, str]:
    """A nanoGPT run folder `tmp/name` holding ckpt.pt; returns the model as saved (float32) and the folder."""
    arch = {k: kw.pop(k) for k in ("bias", "vocab_size", "block_size", "n_layer", "n_head", "n_embd") if k in kw}
    model = N.build(seed=seed, **{"block_size": 256, **arch})
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    N.save_ckpt(model, str(folder / "ckpt.pt"), dtype=dtype, **kw)
    if dtype is not None:  # the reference computes with the weights as stored
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
    return model, str(folder)


def _parity(model: N.GPT, out: str, *, vocab: int | None = None, spread: bool = True) -> Parity:
    """nanoGPT's forward (float32) vs the converted folder on POSITIONS tokens (spread positions by default)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    v = vocab or hf.config.vocab_size
    tokens = torch.randint(0, v, (1, POSITIONS), generator=torch.Generator().manual_seed(7))
    pos = parity_positions(POSITIONS, model.config.block_size) if spread else torch.arange(POSITIONS)
    with torch.no_grad():
        ref = model(tokens, pos)[..., : hf.config.vocab_size]
        got = hf(tokens, position_ids=pos[None]).logits
    return compare(ref, got)


def _convert(src: str, out: Path, **kw) -> dict:
    convert("nanogpt", src, str(out), progress=False, overwrite=True, **kw)
    return json.loads((out / "hubconv.json").read_text())


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize(
    "variant",
    [
        {"bias": True},
        {"bias": False},
        {"bias": True, "compiled": True},
        {"bias": False, "ddp": True},
        {"bias": True, "compiled": True, "ddp": True, "mask_buffers": True},
        {"bias": True, "dtype": torch.bfloat16},
    ],
    ids=["bias", "no-bias", "compiled", "ddp", "ddp+compiled+mask-buffers", "bf16"],
)
def test_parity_with_nanogpt(tmp_path: Path, variant: dict) -> None:
    model, folder = _save(tmp_path, **variant)
    record = _convert(os.path.join(folder, "ckpt.pt"), tmp_path / "hf")
    for spread in (False, True):
        p = _parity(model, str(tmp_path / "hf"), spread=spread)
        assert p.ok, f"{variant} spread={spread}: {p}"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["activation_function"], config["layer_norm_epsilon"], config["n_positions"]) == ("gelu", 1e-5, 256)
    assert config["tie_word_embeddings"] is True
    assert record["dropped"]["lm_head.weight"].startswith("tied to transformer.wte.weight")
    zero_biases = {k for k, why in record["lossy"].items() if "synthesized zeros" in why}
    assert bool(zero_biases) == (not variant["bias"])
    if not variant["bias"]:
        assert len(zero_biases) == 6 * 2 + 1  # six biases per layer, two layers, and ln_f
    if variant.get("mask_buffers"):
        assert "causal-mask buffer" in record["dropped"]["transformer.h.1.attn.bias"]  # native names, unwrapped
    if variant.get("dtype") is torch.bfloat16:
        from safetensors import safe_open

        with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
            assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_dtype() == "BF16"


@pytest.mark.parametrize("keep", [False, True], ids=["trimmed", "kept"])
def test_padded_gpt2_vocabulary(tmp_path: Path, keep: bool) -> None:
    """A GPT-2 BPE run pads 50257 to 50304 rows: trimmed to 50257 (recorded as lossy) or kept on request."""
    model, folder = _save(tmp_path, vocab_size=50304, n_embd=16, n_head=2, extra_config={"dataset": "openwebtext"})
    args = {"keep_padded_vocab": True} if keep else None
    record = _convert(folder, tmp_path / "hf", model_args=args)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == (50304 if keep else 50257)
    assert (config["bos_token_id"], config["eos_token_id"]) == (50256, 50256)
    assert record["native_args"]["tokenizer"] == {"kind": "gpt2-bpe", "vocab_size": 50257}
    assert record["native_args"]["keep_padded_vocab"] is keep
    if keep:
        assert "transformer.wte.weight" not in record["lossy"]
    else:
        assert "0..50257 of 50304 dropped" in record["lossy"]["transformer.wte.weight"]
    p = _parity(model, str(tmp_path / "hf"), vocab=50257)
    assert p.ok, p


def test_gelu_new_fails_parity(tmp_path: Path) -> None:
    """Negative control: GPT-2's default tanh-approximated GELU is measurably different from nanoGPT's exact one."""
    model, folder = _save(tmp_path)
    _convert(folder, tmp_path / "hf")
    assert _parity(model, str(tmp_path / "hf")).ok
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["activation_function"] = "gelu_new"
    cfg_path.write_text(json.dumps(cfg))
    p = _parity(model, str(tmp_path / "hf"))
    assert not p.ok and p.max_abs_diff > 1e-3, p


def test_streamed_reference_matches_nanogpt(tmp_path: Path) -> None:
    """hubconv.native.nanogpt (used by smoke parity) computes nanoGPT's logits, at spread positions, from the file."""
    model, folder = _save(tmp_path, bias=False, compiled=True, vocab_size=120)
    adapter = NanoGPTAdapter()
    tokens = torch.randint(0, 120, (1, POSITIONS), generator=torch.Generator().manual_seed(3))
    pos = parity_positions(POSITIONS, 256)
    with adapter.open(folder) as ckpt:
        plan = adapter.plan(ckpt, "gpt", {"tokenizer_vocab_size": 100})
        ref = adapter.reference_logits(ckpt, plan.native_args, tokens, pos)
    with torch.no_grad():
        want = model(tokens, pos)[..., :100]
    assert ref.shape == (1, POSITIONS, 100)
    assert compare(want, ref).ok
    assert not compare(model(tokens)[..., :100].detach(), ref).ok  # positions matter: 0..95 differs


# ------------------------------------------------------------------------------------------------ errors


def test_missing_layer_tensor_is_a_one_line_error(tmp_path: Path) -> None:
    _, folder = _save(tmp_path, compiled=True, drop_keys=("transformer.h.1.mlp.c_fc.weight",))
    r = hubconv("convert", "--adapter", "nanogpt", "--checkpoint", folder, "--output", str(tmp_path / "hf"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "transformer.h.1.mlp.c_fc.weight" in r.stderr, r.stderr
    assert not (tmp_path / "hf").exists()


def test_unknown_tensor_is_a_one_line_error(tmp_path: Path) -> None:
    _, folder = _save(tmp_path, ddp=True, extra_tensors={"transformer.h.0.attn.rotary.inv_freq": torch.zeros(4)})
    r = hubconv("convert", "--adapter", "nanogpt", "--checkpoint", folder, "--output", str(tmp_path / "hf"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "transformer.h.0.attn.rotary.inv_freq" in r.stderr, r.stderr


def test_model_args_are_checked(tmp_path: Path) -> None:
    _, folder = _save(tmp_path)
    args = tmp_path / "args.yaml"
    args.write_text("n_head: 8\n")
    r = hubconv("convert", "--adapter", "nanogpt", "--checkpoint", folder, "--model-args", str(args), "--output", "x")
    assert r.returncode == 1 and "n_head=8 contradicts the checkpoint's model_args n_head=4" in r.stderr, r.stderr
    args.write_text("keep_paded_vocab: true\n")
    r = hubconv("convert", "--adapter", "nanogpt", "--checkpoint", folder, "--model-args", str(args), "--output", "x")
    assert r.returncode == 1 and "did you mean 'keep_padded_vocab'" in r.stderr, r.stderr
    r = hubconv("convert", "--adapter", "nanogpt", "--checkpoint", str(tmp_path), "--output", "x")
    assert r.returncode == 1 and "no ckpt.pt in this folder" in r.stderr, r.stderr


def test_untied_head_is_refused(tmp_path: Path) -> None:
    _, folder = _save(tmp_path, extra_tensors={"lm_head.weight": torch.zeros(96, 32)})
    r = hubconv("convert", "--adapter", "nanogpt", "--checkpoint", folder, "--output", str(tmp_path / "hf"))
    assert r.returncode == 1 and "lm_head.weight differs from transformer.wte.weight" in r.stderr, r.stderr


def test_prefixes_in_any_combination() -> None:
    assert strip_wrappers("module._orig_mod.transformer.wte.weight") == "transformer.wte.weight"
    assert strip_wrappers("_orig_mod.module.lm_head.weight") == "lm_head.weight"
    assert strip_wrappers("transformer.h.0.attn.module.x") == "transformer.h.0.attn.module.x"


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("bias", [True, False])
def test_round_trip(bias: bool) -> None:
    """from_hf(to_hf(x)) == x bit-exact for every exact rule (planned from args alone); lossy ones are listed."""
    model = N.build(bias=bias, vocab_size=120)
    f32 = BY_NAME["F32"]
    native = {
        k: ArrayTensor(k, f32, v.numpy().copy())
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"  # tied: the same tensor as transformer.wte.weight
    }
    adapter = NanoGPTAdapter()
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=64, bias=bias, vocab_size=120, dtype="F32")
    for hf_vocab in (120, 100):
        args = {**base, "hf_vocab_size": hf_vocab}
        table = adapter.table(args)
        targets, _, records = table.apply(native, args)
        hf = {t.name: ArrayTensor(t.name, t.dtype, V.materialize(t)) for t in targets}
        assert hf["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D layout
        back = {t.name: V.materialize(t) for t in adapter.from_hf(hf, args)}
        lossy = {t for r in records if r.lossy for t in r.targets}
        expected_lossy = set() if bias else {k for k in hf if k.endswith(".bias")}
        if hf_vocab < 120:
            expected_lossy.add("transformer.wte.weight")
        assert lossy == expected_lossy
        assert set(back) == {k for k in native if k not in lossy}
        for k, v in back.items():
            assert v.tobytes() == native[k].array.tobytes(), k


# ------------------------------------------------------------------------------------------------ vocabularies


def test_out_dir_and_meta_pickup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """meta.pkl beside ckpt.pt wins; else data/<config.dataset>/meta.pkl under an ancestor or the current folder."""
    repo = tmp_path / "nanoGPT"
    (repo / "data" / "shakespeare_char").mkdir(parents=True)
    N.save_meta(str(repo / "data" / "shakespeare_char" / "meta.pkl"), CHARS)
    model, folder = _save(repo, name="out-shakespeare-char", vocab_size=len(CHARS))
    ckpt = os.path.join(folder, "ckpt.pt")
    assert find_meta(ckpt, "shakespeare_char") == str(repo / "data" / "shakespeare_char" / "meta.pkl")
    assert find_meta(ckpt, "openwebtext") is None
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(folder, elsewhere)
    assert find_meta(str(elsewhere / "ckpt.pt"), "shakespeare_char") is None
    monkeypatch.chdir(repo)
    assert find_meta(str(elsewhere / "ckpt.pt"), "shakespeare_char") == str(repo / "data/shakespeare_char/meta.pkl")
    N.save_meta(str(elsewhere / "meta.pkl"), CHARS[:50])
    assert find_meta(str(elsewhere / "ckpt.pt"), "shakespeare_char") == str(elsewhere / "meta.pkl")
    record = _convert(folder, tmp_path / "hf")
    assert record["native_args"]["tokenizer"] == {
        "kind": "char",
        "meta_pkl": "data/shakespeare_char/meta.pkl",
        "vocab_size": len(CHARS),
    }
    assert _parity(model, str(tmp_path / "hf")).ok


def test_char_tokenizer_matches_stoi(tmp_path: Path) -> None:
    """The char vocabulary becomes a tokenizer.json whose ids are meta.pkl's stoi, loadable from the GPT-2 folder."""
    from transformers import AutoTokenizer

    meta = tmp_path / "meta.pkl"
    N.save_meta(str(meta), CHARS[::-1])  # a non-alphabetical order, so ids cannot match by accident
    _, folder = _save(tmp_path, vocab_size=len(CHARS))
    shutil.copy(meta, Path(folder) / "meta.pkl")
    convert("nanogpt", folder, str(tmp_path / "hf"), progress=False, tokenizer=str(meta))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    stoi = {c: i for i, c in enumerate(CHARS[::-1])}
    assert tok.encode(text) == [stoi[c] for c in text]
    assert tok.decode(tok.encode(text)) == text


def _bpe_folder(path: Path, vocab_size: int) -> int:
    """A small byte-level BPE tokenizer (GPT-2's algorithm) saved as an HF folder; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["First Citizen: Before we proceed any further, hear me speak."] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    return len(fast)


def test_hf_bpe_tokenizer_folder(tmp_path: Path) -> None:
    """No meta.pkl: an HF tokenizer folder (how a local GPT-2 snapshot is used) is written beside the weights;
    tokenizer_vocab_size trims the padded embedding to it."""
    from transformers import AutoTokenizer

    size = _bpe_folder(tmp_path / "bpe", 300)
    model, folder = _save(tmp_path, vocab_size=320, extra_config={"dataset": "openwebtext"})
    args = tmp_path / "args.yaml"
    args.write_text(f"tokenizer_vocab_size: {size}\n")
    record = _convert(folder, tmp_path / "hf", model_args=str(args), tokenizer=str(tmp_path / "bpe"))
    assert record["native_args"]["tokenizer"] == {"kind": "stated in --model-args", "vocab_size": size}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    eot = AutoTokenizer.from_pretrained(str(tmp_path / "bpe")).convert_tokens_to_ids("<|endoftext|>")
    assert (config["vocab_size"], config["eos_token_id"]) == (size, eot)  # eos filled from the tokenizer
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    src = AutoTokenizer.from_pretrained(str(tmp_path / "bpe"))
    text = "Before we proceed, hear me speak: ünïcödé too"
    assert tok.encode(text) == src.encode(text)
    assert _parity(model, str(tmp_path / "hf"), vocab=size).ok
    # a tokenizer larger than the model's vocabulary is refused before anything is written
    args.write_text("tokenizer_vocab_size: 400\n")
    r = hubconv("convert", "--adapter", "nanogpt", "--checkpoint", folder, "--model-args", str(args), "--output", "y")
    assert r.returncode == 1 and "400 tokens but transformer.wte.weight only 320 rows" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------------ release


def test_release_dry_run(tmp_path: Path) -> None:
    """`release --dry-run` of a char-level run: tokenizer from meta.pkl, smoke with parity at spread positions,
    a card naming nanoGPT as the framework and listing the inexact steps."""
    repo = tmp_path / "repo"
    (repo / "data" / "shakespeare_char").mkdir(parents=True)
    N.save_meta(str(repo / "data" / "shakespeare_char" / "meta.pkl"), CHARS)
    _save(repo, name="out-shakespeare-char", vocab_size=len(CHARS), bias=False, compiled=True)
    (repo / ".hubconv.yml").write_text(
        "adapter: nanogpt\ncheckpoint: out-shakespeare-char\ntokenizer:\n  path: data/shakespeare_char/meta.pkl\n"
        'output: release\nsmoke:\n  prompts:\n    - prompt: "ROMEO:"\n  max_new_tokens: 8\n  parity: true\n'
    )
    r = hubconv("release", "--dry-run", "--json", cwd=str(repo))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["smoke_status"] == "pass"
    smoke = json.loads((repo / "release" / "smoke.json").read_text())
    parity = smoke["parity"]
    assert parity["positions"] == 96 and parity["max_position"] == 255 and parity["top1_agreement"] == 1.0
    card = (repo / "release" / "README.md").read_text()
    assert "nanoGPT" in card and re.search(r"Source framework \| nanoGPT", card), card[:2000]
    assert "synthesized zeros" in card
    assert (repo / "release" / "tokenizer.json").is_file()
    record = json.loads((repo / "release" / "hubconv.json").read_text())
    assert record["native_args"]["tokenizer"]["kind"] == "char"
    assert np.isfinite(parity["max_abs_diff"])


def test_bundled_example_releases(tmp_path: Path) -> None:
    """examples/tiny-nanogpt: the shipped char-level run releases with passing parity and a sensible generation."""
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "tiny-nanogpt")
    r = hubconv("release", "--dry-run", "--json", "--output", str(tmp_path / "release"), cwd=example)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["smoke_status"] == "pass"
    smoke = json.loads((tmp_path / "release" / "smoke.json").read_text())
    assert smoke["parity"]["passed"] and smoke["parity"]["max_position"] == 127
    assert "summer" in smoke["generations"][0]["output"]  # the sonnet it was trained on


def test_meta_pkl_found_with_the_checkpoint_becomes_the_tokenizer(tmp_path: Path) -> None:
    """Without any tokenizer setting, the char vocabulary nanoGPT's sample.py would use is written (release and
    convert alike), with ids identical to its stoi."""
    import pickle

    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "tiny-nanogpt")
    ckpt = os.path.join(example, "out-sonnets-char")
    out = tmp_path / "release"
    r = hubconv("release", "--dry-run", "--json", "--adapter", "nanogpt", "--checkpoint", ckpt, "--output", str(out),
                "--prompt", "Shall I", cwd=str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert any(c["name"] == "source" and "meta.pkl found with the checkpoint" in c["detail"] for c in result["checks"])
    from transformers import AutoTokenizer

    with open(os.path.join(example, "data", "sonnets_char", "meta.pkl"), "rb") as f:
        stoi = pickle.load(f)["stoi"]
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "Shall I compare thee"
    assert tok(text, add_special_tokens=False).input_ids == [stoi[c] for c in text]
    converted = tmp_path / "converted"
    r = hubconv("convert", "--adapter", "nanogpt", "--checkpoint", ckpt, "--output", str(converted), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "meta.pkl found with the checkpoint" in r.stdout and (converted / "tokenizer.json").is_file()
