"""Parity criterion of `hubconv smoke` (issue 9, "Parity that holds at real sizes").

The bound scales with the logits' spread, depth and the smoke dtype's epsilon: correct conversions pass
at two sizes and in both smoke dtypes, and each negative control fails there with a clear margin.
The 1B-class calibration (too slow for the suite) is benchmarks/parity.py."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubconv.convert import convert
from hubconv.smoke import compare_logits, parity_bounds, parity_positions, run_smoke
from tests.test_torchtitan import make, tiny, user_args

LLAMA31_SCALING = {  # Llama 3.1's own values: they only change wavelengths beyond ~2k tokens
    "scaling_factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SIZES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256),
    "deeper": dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=1024),
}
CONTROLS = ["no-qk-permute", "k-permuted-with-n_heads", "wrong-rope_theta", "rope-scaling-dropped"]


@pytest.fixture(scope="module", params=list(SIZES))
def converted(request, tmp_path_factory):
    """A bf16 checkpoint with Llama 3.1 RoPE scaling and a 32k context, converted correctly."""
    a = tiny(**SIZES[request.param], rope_scaling=LLAMA31_SCALING, max_seq_len=32768)
    root = tmp_path_factory.mktemp(request.param)
    ckpt, _ = make(root, a, dtype=torch.bfloat16)
    out = str(root / "hf")
    convert("torchtitan", ckpt, out, model_args=user_args(a), progress=False)
    return a, ckpt, out


def _permute(w: torch.Tensor, n: int, to_hf: bool) -> torch.Tensor:
    """HF's rotate-half permute of a Q/K weight with `n` heads, or its inverse."""
    o, d = w.shape
    if to_hf:
        return w.view(n, o // n // 2, 2, d).transpose(1, 2).reshape(o, d).contiguous()
    return w.view(n, 2, o // n // 2, d).transpose(1, 2).reshape(o, d).contiguous()


def corrupt(folder: str, a, control: str) -> None:
    """Turn a correct conversion into what a buggy converter writes."""
    if control in ("no-qk-permute", "k-permuted-with-n_heads"):
        path = os.path.join(folder, "model.safetensors")
        w = load_file(path)
        for i in range(a.n_layers):
            for proj, n in (("q", a.n_heads), ("k", a.kv_heads)):
                key = f"model.layers.{i}.self_attn.{proj}_proj.weight"
                native = _permute(w[key], n, to_hf=False)
                if control == "no-qk-permute":
                    w[key] = native
                elif proj == "k":
                    w[key] = _permute(native, a.n_heads, to_hf=True)
        save_file(w, path, metadata={"format": "pt"})
        return
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    rope = cfg["rope_parameters"]
    if control == "wrong-rope_theta":
        rope["rope_theta"] = 10000.0  # Llama 2's value for a Llama 3 model (500000)
    else:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    json.dump(cfg, open(path, "w"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_correct_conversion_passes_with_headroom(converted, dtype) -> None:
    a, ckpt, out = converted
    report = run_smoke(out, native=("torchtitan", ckpt), dtype=dtype, max_new_tokens=1)
    p = report.parity
    assert p is not None and p.passed and report.status == "pass", report.checks
    assert p.margin < 0.6 and p.kl_divergence < p.thresholds["kl_divergence"] / 4, p
    assert p.max_position > 8192 and p.thresholds["n_layers"] == a.n_layers  # long distances are compared
    detail = next(c.detail for c in report.checks if c.name == "parity")
    assert f"bound {p.thresholds['max_abs_diff']:.3g}" in detail


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("control", CONTROLS)
def test_negative_control_fails_with_a_clear_margin(converted, tmp_path, control, dtype) -> None:
    a, ckpt, out = converted
    broken = str(tmp_path / "hf")
    shutil.copytree(out, broken)
    corrupt(broken, a, control)
    report = run_smoke(broken, native=("torchtitan", ckpt), dtype=dtype, max_new_tokens=1)
    p = report.parity
    assert p is not None and not p.passed and report.status == "fail"
    assert p.margin > 5, f"{control}: max |dlogit| only {p.margin:.2f}x the bound"
    assert next(c.status for c in report.checks if c.name == "parity") == "fail"


def test_bound_scales_with_logits_depth_and_dtype() -> None:
    f32 = parity_bounds(1.0, "float32", 4)["max_abs_diff"]
    assert f32 == pytest.approx(256 * 2**-23 * 2)
    assert parity_bounds(3.0, "float32", 16)["max_abs_diff"] == pytest.approx(f32 * 3 * 2)
    bf16 = parity_bounds(1.0, "bfloat16", 4)
    assert bf16["max_abs_diff"] == pytest.approx(8 * 2**-7 * 2)
    assert bf16["kl_divergence"] == pytest.approx(0.5 * (bf16["max_abs_diff"] / 4) ** 2)
    assert bf16["top1_agreement"] == 1.0


def _swap_leaders(logits: torch.Tensor, position: int, gap: float, shift: float) -> torch.Tensor:
    """Reference logits whose two leaders at `position` are `gap` apart, and a copy where each moved by
    `shift` towards the other (past it when shift > gap / 2)."""
    logits[0, position, 0], logits[0, position, 1] = 6.0, 6.0 - gap
    got = logits.clone()
    got[0, position, 0] -= shift
    got[0, position, 1] += shift
    return got


def test_top1_swap_counts_unless_the_reference_is_a_near_tie() -> None:
    ref = torch.randn(1, 64, 512, generator=torch.Generator().manual_seed(0))
    bound = parity_bounds(float(ref.std()), "bfloat16", 1)["max_abs_diff"]
    assert 0.05 < bound < 0.07
    # Leaders 1.6 bounds apart, each moved 0.95 bound: every logit within the bound, yet the top-1 flips.
    got = _swap_leaders(ref, 5, 1.6 * bound, 0.95 * bound)
    real = compare_logits(ref, got, "bfloat16", 1)
    assert real.max_abs_diff < real.thresholds["max_abs_diff"] and real.top1_agreement < 1
    assert not real.passed and real.first_divergent_position == 5 and real.near_ties == 0
    # Leaders 0.5 bound apart: the same flip is rounding.
    got = _swap_leaders(ref, 5, 0.5 * bound, 0.4 * bound)
    tie = compare_logits(ref, got, "bfloat16", 1)
    assert tie.passed and tie.top1_agreement == 1.0 and tie.near_ties == 1


def test_positions_reach_the_context_and_stay_increasing() -> None:
    pos = parity_positions(96, 131072).tolist()
    assert pos[:48] == list(range(48)) and pos[-1] == 131071 and len(pos) == 96
    assert all(b > a for a, b in itertools.pairwise(pos))
    assert parity_positions(96, 80).tolist() == list(range(96))  # short context: nothing to spread
    assert math.isclose(pos[72] / pos[71], pos[90] / pos[89], rel_tol=0.05)  # geometric spacing
