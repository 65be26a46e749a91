"""`hubconv import --adapter mindformers`: HF -> MindSpore `.ckpt` (+ model_config), read back by hubconv's reader."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml

import hubconv.io.mindspore_ckpt_writer as ms_writer
from hubconv.convert import convert
from hubconv.dtypes import F32
from hubconv.importer import import_model
from hubconv.io.checkpoint import open_checkpoint
from hubconv.io.mindspore_ckpt_writer import write_mindspore_ckpt
from hubconv.io.tensor import ArrayTensor, read_all
from tests.native import mindformers_ckpt as W
from tests.native import mindformers_llama as M

CASES = {
    "llama-gqa": ({"num_heads": 8, "n_kv_heads": 2}, {}),
    "llama-tied-bf16": ({"tie_word_embeddings": True}, {"dtype": torch.bfloat16}),
    "qwen2-fused-biases": ({"qkv_has_bias": True, "num_heads": 8, "n_kv_heads": 4}, {"qkv_concat": True}),
}


def _hf_bytes(folder: str) -> dict[str, bytes]:
    with open_checkpoint(folder) as ckpt:
        return {k: np.ascontiguousarray(read_all(t)).tobytes() for k, t in ckpt.tensors.items()}


def _model_config(a: M.LlamaArgs) -> dict:
    fields = ("seq_length", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "vocab_size",
              "intermediate_size", "rms_norm_eps", "theta", "qkv_has_bias", "tie_word_embeddings")  # fmt: skip
    return {"model": {"model_config": {k: getattr(a, k) for k in fields}}}


@pytest.mark.parametrize("case", list(CASES))
def test_mindformers_round_trips(tmp_path, case) -> None:
    """native .ckpt -> HF -> native: every tensor bit for bit in MindFormers' names (fused layout too);
    HF -> native -> HF bit for bit; the .ckpt reads back through hubconv's reader; parity passes."""
    kw, layout = CASES[case]
    model = M.build(seed=2, **kw)
    sd = W.llama_state_dict(model, qkv_concat=layout.get("qkv_concat", False))
    if "dtype" in layout:
        sd = {k: v.to(layout["dtype"]) for k, v in sd.items()}
    src = W.save_checkpoint(sd, str(tmp_path / "llama.ckpt"))
    args = tmp_path / "run.yaml"
    args.write_text(yaml.safe_dump(_model_config(model.config)))
    hf = str(tmp_path / "hf")
    convert("mindformers", src, hf, model_args=str(args), progress=False)
    out = str(tmp_path / "imported")
    user = {"qkv_concat": True} if layout.get("qkv_concat") else None
    result = import_model("mindformers", hf, out, model_args=user, progress=False)
    assert result.parity["status"] == "pass" and result.parity["positions"] >= 64
    with open_checkpoint(os.path.join(out, "model.ckpt")) as ckpt:
        assert ckpt.format == "mindspore-ckpt"
        got = {k: np.ascontiguousarray(read_all(t)).tobytes() for k, t in ckpt.tensors.items()}
    want = {k: (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy().tobytes() for k, v in sd.items()}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == want[k], k
    back = str(tmp_path / "hf-again")
    convert("mindformers", os.path.join(out, "model.ckpt"), back, model_args=os.path.join(out, "model_config.yaml"),
            progress=False)  # fmt: skip
    assert _hf_bytes(back) == _hf_bytes(hf)


def test_mindspore_writer_chunks_large_tensors(tmp_path, monkeypatch) -> None:
    """Tensors above the chunk size are written as consecutive Values of one tag, as MindSpore does; the reader
    joins them."""
    monkeypatch.setattr(ms_writer, "CHUNK_BYTES", 64)
    w = ArrayTensor("w", F32, np.arange(48, dtype=np.float32).reshape(12, 4))
    path = str(tmp_path / "x.ckpt")
    write_mindspore_ckpt(path, [w, ArrayTensor("b", F32, np.ones(3, dtype=np.float32))])
    raw = open(path, "rb").read()
    assert raw.count(b"\n\x01w") == 3  # 12 rows of 16 bytes in 64-byte chunks: three Values tagged "w"
    with open_checkpoint(path) as ckpt:
        assert np.array_equal(read_all(ckpt.tensors["w"]), w.array)
        assert read_all(ckpt.tensors["b"]).tolist() == [1.0, 1.0, 1.0]
