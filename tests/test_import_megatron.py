"""`hubconv import --adapter megatron`: HF -> Megatron-LM legacy rank files, bit for bit against its own layout."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from hubconv.convert import convert
from hubconv.errors import HubconvError
from hubconv.importer import import_model
from hubconv.io.checkpoint import open_checkpoint
from tests.native.megatron_gpt import MegatronGPT, gpt2_like, llama_like
from tests.native.megatron_save import save_legacy

CASES = {
    "llama-gqa-untied-tp2-pp2": (llama_like(), 2, 2),
    "gpt2-tied-tp2-pp2": (gpt2_like(), 2, 2),
    "llama-tied-tp1-pp1": (llama_like(untie_embeddings_and_output_weights=False), 1, 1),
}


def _hf_bytes(folder: str) -> dict[str, bytes]:
    with open_checkpoint(folder) as ckpt:
        return {k: t.read_rows(0, t.shape[0] if t.shape else 1).tobytes() for k, t in ckpt.tensors.items()}


def _megatron(tmp_path: Path, name: str, *, keep_padded: bool = False):
    cfg, tp, pp = CASES[name]
    model = MegatronGPT(cfg, tp=tp).init_random(seed=3).eval()
    files = save_legacy(model, cfg, tmp_path / "ck", tp=tp, pp=pp, spec="local", with_optimizer=False)
    hf = str(tmp_path / "hf")
    args = {"vocab_size": cfg.vocab_size, **({"keep_padded_vocab": True} if keep_padded else {})}
    convert("megatron", str(tmp_path / "ck"), hf, model_args=args, progress=False)
    return cfg, tp, pp, files, hf


def _rank(out: str, t: int, p: int, pp: int) -> dict:
    folder = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
    with torch.serialization.safe_globals([argparse.Namespace]):  # the documented safe global for `args`
        return torch.load(os.path.join(out, "megatron", "release", folder, "model_optim_rng.pt"), weights_only=True)


@pytest.mark.parametrize("name", list(CASES))
def test_megatron_round_trips(tmp_path, name) -> None:
    """native (TP x PP rank files) -> HF -> native: every rank's tensors as Megatron saved them (the vocabulary
    padding rows come back as zeros, reported); HF -> native -> HF: every HF tensor bit for bit; parity passes."""
    cfg, tp, pp, files, hf = _megatron(tmp_path, name)
    out = str(tmp_path / "imported")
    result = import_model(
        "megatron", hf, out, tp=tp, pp=pp, model_args={"make_vocab_size_divisible_by": 16}, progress=False
    )
    assert result.parity["status"] == "pass" and result.parity["positions"] >= 64
    assert result.parity["max_abs_diff"] <= 1e-4 and result.parity["argmax_identical"]
    padded = cfg.padded_vocab_size(tp)
    assert "re-added as zeros" in result.lossy["embedding.word_embeddings.weight"]
    assert open(os.path.join(out, "megatron", "latest_checkpointed_iteration.txt")).read() == "release"
    for (t, p), path in files.items():
        orig = torch.load(path, weights_only=False)["model"]
        saved = _rank(out, t, p, pp)
        assert saved["checkpoint_version"] == 3.0 and saved["args"].padded_vocab_size == padded
        assert saved["args"].tensor_model_parallel_size == tp and saved["args"].pipeline_model_parallel_size == pp
        got = saved["model"]
        assert set(got) == set(orig), (t, p)
        for k, v in orig.items():
            if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
                rows = v.shape[0]
                start = t * rows  # this rank's first global row
                real = max(0, min(rows, cfg.vocab_size - start))
                assert torch.equal(got[k][:real], v[:real]), (k, t, p)
                assert not got[k][real:].any(), (k, t, p)  # padding: zeros
            else:
                assert torch.equal(got[k], v), (k, t, p)
    back = str(tmp_path / "hf-again")
    convert("megatron", os.path.join(out, "megatron"), back, model_args={"vocab_size": cfg.vocab_size}, progress=False)
    assert _hf_bytes(back) == _hf_bytes(hf)
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(hf, "config.json")))


def test_megatron_padded_vocab_kept_round_trips_bit_exact(tmp_path) -> None:
    """With the padded rows kept in the HF model, native -> HF -> native is exact on every rank, padding included."""
    _, tp, pp, files, hf = _megatron(tmp_path, "llama-gqa-untied-tp2-pp2", keep_padded=True)
    out = str(tmp_path / "imported")
    result = import_model(
        "megatron", hf, out, tp=tp, pp=pp, model_args={"make_vocab_size_divisible_by": 16}, progress=False
    )
    assert not result.lossy
    for (t, p), path in files.items():
        orig = torch.load(path, weights_only=False)["model"]
        got = _rank(out, t, p, pp)["model"]
        assert set(got) == set(orig) and all(torch.equal(got[k], v) for k, v in orig.items())


def test_megatron_files_need_the_namespace_safe_global(tmp_path) -> None:
    _, _, _, _, hf = _megatron(tmp_path, "llama-tied-tp1-pp1")
    out = str(tmp_path / "imported")
    import_model("megatron", hf, out, model_args={"make_vocab_size_divisible_by": 16}, verify_parity=False)
    path = os.path.join(out, "megatron", "release", "mp_rank_00", "model_optim_rng.pt")
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)
    assert _rank(out, 0, 0, 1)["args"].untie_embeddings_and_output_weights is False


@pytest.mark.parametrize(
    ("tp", "pp", "message"),
    [
        (3, 1, r"cannot be split over 3 ranks"),
        (1, 3, r"2 layers cannot be split over 3 pipeline stages"),
    ],
)
def test_megatron_impossible_splits_are_refused(tmp_path, tp, pp, message) -> None:
    _, _, _, _, hf = _megatron(tmp_path, "llama-tied-tp1-pp1")
    with pytest.raises(HubconvError, match=message):
        import_model("megatron", hf, str(tmp_path / "out"), tp=tp, pp=pp, verify_parity=False, progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_megatron_refuses_llama_with_attention_bias_only(tmp_path) -> None:
    _, _, _, _, hf = _megatron(tmp_path, "llama-tied-tp1-pp1")
    cfg = json.load(open(os.path.join(hf, "config.json")))
    json.dump({**cfg, "attention_bias": True}, open(os.path.join(hf, "config.json"), "w"))
    with pytest.raises(HubconvError, match=r"attention_bias=True with mlp_bias=False cannot be represented"):
        import_model("megatron", hf, str(tmp_path / "out"), verify_parity=False, progress=False)


def test_megatron_import_of_qwen2(tmp_path) -> None:
    """Qwen2 (biases on q/k/v only) -> Megatron add_qkv_bias without add_bias_linear, TP=2: parity passes and
    convert reads it back to the same HF tensors."""
    from tests.native import litgpt_model as LG

    model = LG.build(LG.qwen2_like(n_query_groups=2), seed=1)
    hf = str(tmp_path / "hf")
    convert("litgpt", LG.save(model, str(tmp_path / "lit")), hf, progress=False)
    out = str(tmp_path / "imported")
    result = import_model("megatron", hf, out, tp=2, model_args={"make_vocab_size_divisible_by": 16}, progress=False)
    assert result.parity["status"] == "pass"
    args = _rank(out, 1, 0, 1)["args"]
    assert args.add_qkv_bias and not args.add_bias_linear and args.num_query_groups == 2
    back = str(tmp_path / "hf-again")
    convert("megatron", os.path.join(out, "megatron"), back, model_args={"vocab_size": 300}, progress=False)
    assert _hf_bytes(back) == _hf_bytes(hf)
