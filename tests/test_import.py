"""`hubconv import` into TorchTitan DCP and nanoGPT ckpt.pt: bit-exact round trips, interop loads, parity, refusals."""

from __future__ import annotations

import argparse
import json
import os
import zipfile

import numpy as np
import pytest
import torch

import hubconv.io.torch_zip_writer as zip_writer
from hubconv.convert import convert
from hubconv.dtypes import BF16, F32
from hubconv.errors import HubconvError, MappingError
from hubconv.importer import import_model
from hubconv.io.checkpoint import open_checkpoint
from hubconv.io.dcp_writer import write_dcp
from hubconv.io.tensor import ArrayTensor, read_all
from hubconv.io.torch_zip_writer import TensorRef, write_torch_file
from tests.native import nanogpt as N
from tests.native import torchtitan_llama3 as tt

SCALING = {
    "scaling_factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _bytes(t) -> bytes:
    return np.ascontiguousarray(read_all(t)).tobytes()


def _native_bytes(sd: dict[str, torch.Tensor]) -> dict[str, bytes]:
    out = {}
    for k, v in sd.items():
        v = v.contiguous()
        out[k] = (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy().tobytes()
    return out


def _hf_tensors(folder: str) -> dict[str, bytes]:
    with open_checkpoint(folder) as ckpt:
        return {k: _bytes(t) for k, t in ckpt.tensors.items()}


# ------------------------------------------------------------------------------------------------ writers


def test_torch_zip_writer_loads_with_weights_only(tmp_path) -> None:
    a = ArrayTensor("a", F32, np.arange(12, dtype=np.float32).reshape(3, 4))
    b = ArrayTensor("b", BF16, np.array([0x3F80, 0x4000, 0xC040], dtype=np.uint16))
    obj = {
        "model": {"a": TensorRef(a), "b": TensorRef(b), "tied": TensorRef(a), "as_bf16": TensorRef(a, BF16)},
        "model_args": {"n_layer": 3, "bias": False, "dropout": 0.0, "none": None, "big": 2**40, "t": (1, 2, 3, 4)},
    }
    path = str(tmp_path / "ckpt.pt")
    write_torch_file(path, obj)
    assert zipfile.ZipFile(path).testzip() is None  # every CRC-32 right
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["model"]["a"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert loaded["model"]["b"].tolist() == [1.0, 2.0, -3.0] and loaded["model"]["b"].dtype == torch.bfloat16
    assert loaded["model"]["tied"].data_ptr() == loaded["model"]["a"].data_ptr()  # one storage, as torch.save
    assert torch.equal(loaded["model"]["as_bf16"], loaded["model"]["a"].bfloat16())
    assert loaded["model_args"] == obj["model_args"]
    names = [i.filename for i in zipfile.ZipFile(path).infolist()]
    assert names[:4] == ["ckpt/data.pkl", "ckpt/.format_version", "ckpt/.storage_alignment", "ckpt/byteorder"]
    assert names[-2:] == ["ckpt/version", "ckpt/.data/serialization_id"]
    # torch's mmap loader needs 64-byte aligned storages
    assert torch.equal(torch.load(path, weights_only=True, mmap=True)["model"]["a"], loaded["model"]["a"])
    # hubconv's own reader sees the same bytes, as file segments
    with open_checkpoint(path) as ckpt:
        assert ckpt.tensors["model.a"].segments() is not None
        assert _bytes(ckpt.tensors["model.b"]) == b.array.tobytes()


def test_torch_zip_writer_namespace_needs_the_documented_safe_global(tmp_path) -> None:
    path = str(tmp_path / "model_optim_rng.pt")
    write_torch_file(path, {"args": argparse.Namespace(num_layers=2, hidden_size=8), "checkpoint_version": 3.0})
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)  # negative control: not allowed by default
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = torch.load(path, weights_only=True)
    assert loaded["args"] == argparse.Namespace(num_layers=2, hidden_size=8) and loaded["checkpoint_version"] == 3.0


def test_torch_zip_writer_zip64(tmp_path, monkeypatch) -> None:
    """Offsets and sizes past the zip64 limit (lowered here) are written as zip64 records torch and zipfile read."""
    monkeypatch.setattr(zip_writer, "_ZIP64_LIMIT", 100)
    w = ArrayTensor("w", F32, np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    path = str(tmp_path / "big.pt")
    write_torch_file(path, {"w": TensorRef(w), "v": TensorRef(w, BF16)})
    assert zipfile.ZipFile(path).testzip() is None
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.from_numpy(w.array))


def test_dcp_writer_loads_with_torch_distributed_checkpoint(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    rng = np.random.default_rng(1)
    a = ArrayTensor("tok_embeddings.weight", F32, rng.standard_normal((10, 4)).astype(np.float32))
    b = ArrayTensor("layers.0.attention_norm.weight", BF16, np.array([0x3F80] * 4, dtype=np.uint16))
    write_dcp(str(tmp_path), [a, TensorRef(b)])
    sd = {"tok_embeddings.weight": torch.zeros(10, 4), "layers.0.attention_norm.weight": torch.zeros(4).bfloat16()}
    dcp.load(sd, checkpoint_id=str(tmp_path))
    assert np.array_equal(sd["tok_embeddings.weight"].numpy(), a.array)
    assert sd["layers.0.attention_norm.weight"].tolist() == [1.0] * 4
    with pytest.raises(
        BaseException
    ) as err:  # negative control (CheckpointException is a BaseException): a state dict of the wrong shape is refused
        dcp.load({"tok_embeddings.weight": torch.zeros(11, 4)}, checkpoint_id=str(tmp_path))
    assert "Size mismatch" in str(err.value.failures)


# --------------------------------------------------------------------------------------------- TorchTitan

TT_CASES = {
    "qkv_linear-gqa-untied": dict(key_style="qkv_linear", args={}),
    "legacy-gqa-tied-scaled": dict(key_style="legacy", args=dict(tie_word_embeddings=True, rope_scaling=SCALING)),
    "qkv_linear-mha-bf16": dict(key_style="qkv_linear", args=dict(n_kv_heads=None), dtype=torch.bfloat16),
}


def _titan(tmp_path, case: str):
    c = TT_CASES[case]
    a = tt.TitanArgs(
        **{
            **dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32),
            **dict(rope_theta=500000.0, max_seq_len=256),
            **c["args"],
        }
    )
    sd = tt.random_state_dict(a, seed=0, dtype=c.get("dtype", torch.float32), key_style=c["key_style"])
    ckpt = str(tmp_path / "step-10")
    tt.save_dcp(ckpt, sd)
    user = {"n_heads": a.n_heads, "rope_theta": a.rope_theta, "rope_scaling_args": a.rope_scaling}
    user |= {"max_seq_len": a.max_seq_len, "tie_word_embeddings": a.tie_word_embeddings}
    hf = str(tmp_path / "hf")
    convert("torchtitan", ckpt, hf, model_args=user, progress=False)
    return a, sd, hf, c["key_style"]


@pytest.mark.parametrize("case", list(TT_CASES))
def test_torchtitan_round_trips_bit_exact(tmp_path, case) -> None:
    """native -> HF -> native reproduces every tensor; HF -> native -> HF reproduces every HF tensor; parity passes."""
    a, sd, hf, style = _titan(tmp_path, case)
    out = str(tmp_path / "imported")
    result = import_model("torchtitan", hf, out, model_args={"key_style": style}, progress=False)
    par = result.parity
    assert par["status"] == "pass" and par["positions"] >= 64 and par["max_abs_diff"] <= 1e-4
    assert par["argmax_identical"] and par["max_position"] > 64
    report = json.load(open(os.path.join(out, "import.json")))
    assert report["parity"] == par and report["native_args"]["key_style"] == style
    with open_checkpoint(os.path.join(out, "checkpoint")) as ckpt:
        got = {k: _bytes(t) for k, t in ckpt.tensors.items()}
    want = _native_bytes(sd)
    head = "lm_head.weight" if style == "qkv_linear" else "output.weight"
    if a.tie_word_embeddings:  # the model's state dict holds the tied head too: written with the embedding's bytes
        assert got.pop(head) == want["tok_embeddings.weight"]
        assert result.dropped == {}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == want[k], k
    back = str(tmp_path / "hf-again")
    convert(
        "torchtitan",
        os.path.join(out, "checkpoint"),
        back,
        model_args=os.path.join(out, "model_args.yaml"),
        progress=False,
    )
    assert _hf_tensors(back) == _hf_tensors(hf)
    cfg, cfg_back = json.load(open(os.path.join(hf, "config.json"))), json.load(open(os.path.join(back, "config.json")))
    assert cfg == cfg_back


def test_torchtitan_dcp_loads_into_a_torchtitan_state_dict(tmp_path) -> None:
    """Interop: torch.distributed.checkpoint fills the 0.3 model's state dict (qkv_linear names, lm_head) by default,
    the older names with key_style: legacy."""
    import torch.distributed.checkpoint as dcp

    a, _, hf, _ = _titan(tmp_path, "legacy-gqa-tied-scaled")
    for style in ("qkv_linear", "legacy"):
        out = str(tmp_path / f"tt-{style}")
        import_model("torchtitan", hf, out, model_args={"key_style": style}, verify_parity=False, progress=False)
        keys = [*tt.model_keys(a, style), "lm_head.weight" if style == "qkv_linear" else "output.weight"]
        ref = tt.random_state_dict(a, seed=0, key_style=style, include_tied_output=True)
        state = {k: torch.empty_like(ref[k]) for k in keys}
        dcp.load(state, checkpoint_id=os.path.join(out, "checkpoint"))
        for k in keys:
            assert torch.equal(state[k], ref[k]), k
        toml = open(os.path.join(out, "torchtitan.toml")).read()
        assert 'initial_load_path = "./checkpoint"' in toml and "scaling_factor=8.0" in toml


def test_large_imports_verify_through_the_streamed_transformers_forward(tmp_path, monkeypatch) -> None:
    """Above the full-load size the transformers side of the parity check runs one module at a time (memory flat
    in the model size), with the same verdict; a wrong native hyperparameter still fails it."""
    import hubconv.import_formats as formats
    import hubconv.streamed_forward as streamed

    _, _, hf, _ = _titan(tmp_path, "qkv_linear-gqa-untied")
    monkeypatch.setattr(streamed, "FULL_LOAD_MAX_BYTES", 0)
    result = import_model("torchtitan", hf, str(tmp_path / "imported"), progress=False)
    assert result.parity["status"] == "pass" and result.parity["transformers_load"] == "streamed"
    assert result.parity["max_abs_diff"] <= 1e-5
    real = formats.llama_common
    monkeypatch.setattr(formats, "llama_common", lambda config, native: {**real(config, native), "rope_theta": 1e4})
    with pytest.raises(HubconvError, match=r"parity failed"):
        import_model("torchtitan", hf, str(tmp_path / "wrong"), progress=False)


def test_torchtitan_parity_can_fail(tmp_path, monkeypatch) -> None:
    """Negative control: a wrong native hyperparameter (RoPE theta) makes the parity check fail; nothing is written."""
    import hubconv.import_formats as formats

    _, _, hf, _ = _titan(tmp_path, "qkv_linear-gqa-untied")
    real = formats.llama_common

    def wrong_theta(config, native):
        return {**real(config, native), "rope_theta": 10000.0}

    monkeypatch.setattr(formats, "llama_common", wrong_theta)
    out = str(tmp_path / "imported")
    with pytest.raises(HubconvError, match=r"parity failed: max \|diff\|"):
        import_model("torchtitan", hf, out, progress=False)
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if ".hubconv-import-" in n]  # staging removed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_bias": True}, r"config.json: attention_bias=True cannot be represented"),
        ({"hidden_act": "gelu"}, r"config.json: hidden_act='gelu' cannot be represented"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, r"rope_type='yarn'"),
        ({"model_type": "mistral"}, r"model_type='mistral' cannot be imported into torchtitan"),
    ],
)
def test_torchtitan_refuses_features_it_lacks_by_name(tmp_path, change, message) -> None:
    _, _, hf, _ = _titan(tmp_path, "qkv_linear-gqa-untied")
    cfg = json.load(open(os.path.join(hf, "config.json")))
    json.dump({**cfg, **change}, open(os.path.join(hf, "config.json"), "w"))
    with pytest.raises(HubconvError, match=message):
        import_model("torchtitan", hf, str(tmp_path / "out"), verify_parity=False, progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_import_refuses_an_extra_hf_tensor(tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    _, _, hf, _ = _titan(tmp_path, "qkv_linear-gqa-untied")
    path = os.path.join(hf, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, dtype=np.float32)
    save_file(tensors, path)
    with pytest.raises(MappingError, match=r"model.layers.0.self_attn.q_proj.bias has no place in the torchtitan"):
        import_model("torchtitan", hf, str(tmp_path / "out"), verify_parity=False, progress=False)


# ------------------------------------------------------------------------------------------------- nanoGPT


def _nanogpt(tmp_path, *, bias: bool, vocab: int, keep_padded: bool = False, dtype=None):
    model = N.build(bias=bias, vocab_size=vocab, n_layer=2, n_head=4, n_embd=32, block_size=64)
    ckpt = str(tmp_path / "ckpt.pt")
    N.save_ckpt(model, ckpt, optimizer=False, dtype=dtype)
    hf = str(tmp_path / "hf")
    args = {"keep_padded_vocab": True} if keep_padded else None
    convert("nanogpt", ckpt, hf, model_args=args, progress=False)
    sd = torch.load(ckpt, weights_only=True)["model"]
    return model, sd, hf


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_round_trip_bit_exact(tmp_path, bias) -> None:
    (
        _,
        sd,
        hf,
    ) = _nanogpt(tmp_path, bias=bias, vocab=120)
    out = str(tmp_path / "imported")
    result = import_model("nanogpt", hf, out, progress=False)
    assert result.parity["status"] == "pass" and result.parity["positions"] >= 64
    assert result.parity["sequences"] == 2  # block_size 64 < 96 positions: two sequences
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)  # no safe globals needed
    got = ckpt["model"]
    assert got.keys() == sd.keys()
    for k in sd:
        assert torch.equal(got[k], sd[k]), k
    assert got["lm_head.weight"].data_ptr() == got["transformer.wte.weight"].data_ptr()
    assert ckpt["model_args"] == {
        "n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 64, "bias": bias, "vocab_size": 120, "dropout": 0.0,
    }  # fmt: skip
    if not bias:  # the zero biases convert added are not brought back
        assert not [k for k in got if k.endswith(".bias")]
        assert all("bias=False" in why for why in result.dropped.values()) and result.dropped
    back = str(tmp_path / "hf-again")
    convert("nanogpt", os.path.join(out, "ckpt.pt"), back, progress=False)
    assert _hf_tensors(back) == _hf_tensors(hf)


def test_nanogpt_gpt2_vocab_is_padded_again_and_reported(tmp_path) -> None:
    """GPT-2's 50257 tokens: convert trims nanoGPT's 50304 rows, import pads them back (zeros, reported as inexact)."""
    _, sd, hf = _nanogpt(tmp_path, bias=True, vocab=50304)
    out = str(tmp_path / "imported")
    result = import_model("nanogpt", hf, out, progress=False)
    got = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    wte = got["transformer.wte.weight"]
    assert wte.shape == (50304, 32)
    assert torch.equal(wte[:50257], sd["transformer.wte.weight"][:50257])
    assert not wte[50257:].any()
    assert "rows 50257..50303 re-added as zeros" in result.lossy["transformer.wte.weight"]
    # the nanoGPT model itself loads the file strictly and computes the HF model's logits
    from transformers import AutoModelForCausalLM

    native = N.GPT(N.GPTConfig(**torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model_args"])).eval()
    native.load_state_dict(got)
    tokens = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(0))
    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf_model(tokens).logits
        logits = native(tokens)[0] if isinstance(native(tokens), tuple) else native(tokens)
    assert (logits[..., :50257] - ref).abs().max() <= 1e-4


def test_nanogpt_keep_padded_vocab_round_trips_exactly(tmp_path) -> None:
    _, sd, hf = _nanogpt(tmp_path, bias=True, vocab=50304, keep_padded=True)
    out = str(tmp_path / "imported")
    result = import_model("nanogpt", hf, out, verify_parity=False, progress=False)
    got = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    assert torch.equal(got["transformer.wte.weight"], sd["transformer.wte.weight"]) and not result.lossy


def test_nanogpt_refuses_gelu_new(tmp_path) -> None:
    _, _, hf = _nanogpt(tmp_path, bias=True, vocab=120)
    cfg = json.load(open(os.path.join(hf, "config.json")))
    json.dump({**cfg, "activation_function": "gelu_new"}, open(os.path.join(hf, "config.json"), "w"))
    with pytest.raises(MappingError, match=r"activation_function='gelu_new' cannot be represented: .*exact"):
        import_model("nanogpt", hf, str(tmp_path / "out"), progress=False)


def test_dtype_cast_on_import_and_cli_output(tmp_path) -> None:
    """--dtype bfloat16 on a float32 model: the DCP holds bf16 (rounded as torch rounds), parity compares with the
    HF model rounded the same way; the command line prints the report and writes import.json."""
    from tests.helpers import hubconv

    _, sd, hf, _ = _titan(tmp_path, "qkv_linear-gqa-untied")
    out = str(tmp_path / "bf16")
    r = hubconv("import", "--adapter", "torchtitan", "--model", hf, "--output", out, "--dtype", "bfloat16", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "parity: pass on 96 positions" in r.stdout and "checkpoint/__0_0.distcp" in r.stdout
    with open_checkpoint(os.path.join(out, "checkpoint")) as ckpt:
        emb = ckpt.tensors["tok_embeddings.weight"]
        assert emb.dtype is BF16
        want = sd["tok_embeddings.weight"].bfloat16().view(torch.int16).numpy().tobytes()
        assert _bytes(emb) == want
    assert json.load(open(os.path.join(out, "import.json")))["dtype"] == "bfloat16"
    again = hubconv("import", "--adapter", "torchtitan", "--model", hf, "--output", out, "--quiet")
    assert again.returncode == 1 and again.stderr.startswith("hubconv: error: ") and "--overwrite" in again.stderr


def test_hubconv_json_of_the_same_framework_sets_defaults(tmp_path) -> None:
    """A folder converted from TorchTitan's legacy names goes back to them without --model-args (its hubconv.json
    says so); an explicit key_style wins; a folder without hubconv.json gets the 0.3 names."""
    _, _, hf, _ = _titan(tmp_path, "legacy-gqa-tied-scaled")
    out = str(tmp_path / "auto")
    result = import_model("torchtitan", hf, out, verify_parity=False, progress=False)
    assert result.defaults_from_hubconv_json == {"key_style": "legacy"}
    with open_checkpoint(os.path.join(out, "checkpoint")) as ckpt:
        assert "layers.0.attention.wq.weight" in ckpt.tensors and "output.weight" in ckpt.tensors
    forced = str(tmp_path / "forced")
    import_model("torchtitan", hf, forced, model_args={"key_style": "qkv_linear"}, verify_parity=False, progress=False)
    with open_checkpoint(os.path.join(forced, "checkpoint")) as ckpt:
        assert "layers.0.attention.qkv_linear.wq.weight" in ckpt.tensors
    os.remove(os.path.join(hf, "hubconv.json"))
    plain = str(tmp_path / "plain")
    assert import_model("torchtitan", hf, plain, verify_parity=False, progress=False).defaults_from_hubconv_json == {}
    with open_checkpoint(os.path.join(plain, "checkpoint")) as ckpt:
        assert "lm_head.weight" in ckpt.tensors and "layers.0.attention.qkv_linear.wk.weight" in ckpt.tensors
