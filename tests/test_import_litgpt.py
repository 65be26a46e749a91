"""`hubconv import --adapter litgpt`: HF -> lit_model.pth + model_config.yaml, round trips and parity."""

from __future__ import annotations

import os

import pytest
import torch

from hubconv.convert import convert
from hubconv.errors import HubconvError
from hubconv.importer import import_model
from hubconv.io.checkpoint import open_checkpoint
from tests.native import litgpt_model as L


def _hf_bytes(folder: str) -> dict[str, bytes]:
    with open_checkpoint(folder) as ckpt:
        return {k: t.read_rows(0, t.shape[0] if t.shape else 1).tobytes() for k, t in ckpt.tensors.items()}


LLAMA31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 64}
CASES = {
    "llama-gqa-padded": (L.llama_like(), {"padded_vocab_size": 256}),
    "llama31-scaled": (L.llama_like(rope_adjustments=LLAMA31, padded_vocab_size=250), {}),
    "qwen2-qkv-bias": (L.qwen2_like(), {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_litgpt_round_trips(tmp_path, name) -> None:
    """native -> HF -> native: every tensor (padding rows re-added as zeros); HF -> native -> HF bit for bit."""
    cfg, import_args = CASES[name]
    model = L.build(cfg, seed=1)
    src = L.save(model, str(tmp_path / "lit"))
    hf = str(tmp_path / "hf")
    convert("litgpt", src, hf, progress=False)
    out = str(tmp_path / "imported")
    result = import_model("litgpt", hf, out, model_args=import_args, progress=False)
    assert result.parity["status"] == "pass" and result.parity["positions"] >= 64
    got = torch.load(os.path.join(out, "lit_model.pth"), weights_only=True)
    want = L.state_dict(model)
    assert set(got) >= set(want) - {"lm_head.weight"}
    vocab = cfg.vocab_size
    for k, v in want.items():
        if k not in got:
            continue
        if k in ("transformer.wte.weight", "lm_head.weight") and v.shape[0] > vocab:
            assert torch.equal(got[k][:vocab], v[:vocab]) and not got[k][vocab:].any(), k
            assert "re-added as zeros" in result.lossy[k]
        else:
            assert torch.equal(got[k], v), k
    back = str(tmp_path / "hf-again")
    convert("litgpt", out, back, progress=False)
    assert _hf_bytes(back) == _hf_bytes(hf)


def test_litgpt_refuses_partial_biases(tmp_path) -> None:
    import json

    model = L.build(L.llama_like(), seed=1)
    hf = str(tmp_path / "hf")
    convert("litgpt", L.save(model, str(tmp_path / "lit")), hf, progress=False)
    cfg = json.load(open(os.path.join(hf, "config.json")))
    json.dump({**cfg, "attention_bias": True}, open(os.path.join(hf, "config.json"), "w"))
    with pytest.raises(HubconvError, match=r"attention_bias=True with mlp_bias=False cannot be represented"):
        import_model("litgpt", hf, str(tmp_path / "out"), verify_parity=False, progress=False)
