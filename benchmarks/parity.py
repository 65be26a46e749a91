"""Calibrate `hubconv smoke`'s parity bound: correct conversions vs negative controls at 1B-class size.

    .venv/bin/python benchmarks/parity.py [--gigabytes 4] [--dtypes float32,bfloat16] [--workdir DIR] [--keep]

Writes a bf16 TorchTitan Llama 3 DCP of about `--gigabytes` GB with benchmarks/convert.py's generator
(at 4 GB: dim 2048, 31 layers, 32/8 heads, vocab 32768, FFN 8192; Llama 3.1 RoPE scaling, theta 5e5,
128k context), converts it with `hubconv convert`, computes the native reference logits once, then,
for each smoke dtype, loads the converted model once and compares its logits with the reference for
the correct conversion and four negative controls, each applied to the loaded model and undone:
(a) Q/K permute skipped, (b) K permuted with n_heads instead of n_kv_heads, (c) rope_theta 1e4
instead of 5e5, (d) Llama 3.1 RoPE scaling dropped. Each row is `hubconv.smoke.compare_logits` on
the smoke's own tokens and positions (`--layouts contiguous` adds positions 0..n-1 for comparison):
max |dlogit| vs its bound (ratio < 1 passes), KL vs its bound, top-1 agreement. The checkpoint and
the converted folder are deleted at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from convert import Shape, make_checkpoint  # noqa: E402

SHAPE = Shape(dim=2048, n_heads=32, n_kv_heads=8, vocab=32768, ffn=8192)
LLAMA31_SCALING = {
    "scaling_factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
MODEL_ARGS = {"rope_theta": 500000.0, "rope_scaling_args": LLAMA31_SCALING, "max_seq_len": 131072}
WRONG_THETA = 10000.0


def init_like_training(name: str, shape: tuple[int, ...], g):
    """Values of a freshly initialized model (N(0,1) embeddings, N(0, 1/fan_in) linears, norms near 1):
    convert.py's random bit patterns are fine for timing but give NaN logits."""
    import torch

    if name.endswith("norm.weight"):
        x = 1 + 0.1 * torch.randn(shape, generator=g)
    elif name == "tok_embeddings.weight":
        x = torch.randn(shape, generator=g)
    else:
        x = torch.randn(shape, generator=g) * shape[1] ** -0.5
    return x.to(torch.bfloat16)


def _heads(w, n: int, to_hf: bool):
    """HF's rotate-half permute of a Q/K weight with `n` heads (`to_hf`), or its inverse."""
    o, d = w.shape
    if to_hf:
        return w.view(n, o // n // 2, 2, d).transpose(1, 2).reshape(o, d)
    return w.view(n, 2, o // n // 2, d).transpose(1, 2).reshape(o, d)


def _qk_control(model, wrong_k_heads: bool) -> Callable[[], None]:
    """Replace every converted Q/K by its native layout (no permute) or K permuted with n_heads."""
    cfg = model.config
    saved = []
    for layer in model.model.layers:
        att = layer.self_attn
        for proj, n in ((att.q_proj, cfg.num_attention_heads), (att.k_proj, cfg.num_key_value_heads)):
            saved.append((proj, proj.weight.data))
            native = _heads(proj.weight.data, n, to_hf=False)
            if wrong_k_heads:
                proj.weight.data = _heads(native, cfg.num_attention_heads, to_hf=True).contiguous()
            else:
                proj.weight.data = native.contiguous()

    def undo() -> None:
        for proj, w in saved:
            proj.weight.data = w

    return undo


def _rope_control(model, rope: dict) -> Callable[[], None]:
    """Rebuild the rotary embedding from a config.json whose rope_parameters are `rope`."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = rope
    original = model.model.rotary_emb
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)

    def undo() -> None:
        model.model.rotary_emb = original

    return undo


def controls(model) -> dict[str, Callable[[], Callable[[], None]]]:
    rope = dict(model.config.rope_parameters)
    return {
        "correct": lambda: lambda: None,
        "(a) Q/K permute skipped": lambda: _qk_control(model, wrong_k_heads=False),
        "(b) K permuted with n_heads": lambda: _qk_control(model, wrong_k_heads=True),
        "(c) rope_theta 1e4 for 5e5": lambda: _rope_control(model, {**rope, "rope_theta": WRONG_THETA}),
        "(d) Llama 3.1 scaling dropped": lambda: _rope_control(
            model, {"rope_type": "default", "rope_theta": rope["rope_theta"]}
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gigabytes", type=float, default=4.0)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--layouts", default="spread", help="spread (the smoke's positions) and/or contiguous")
    ap.add_argument("--positions", type=int, default=96)
    ap.add_argument("--workdir", default="/tmp/hubconv-parity")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the converted folder")
    ap.add_argument("--make", nargs=2, metavar=("PATH", "GB"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:  # child mode: build the checkpoint, so the parent's memory stays small
        print(make_checkpoint(a.make[0], float(a.make[1]), SHAPE, init_like_training))
        return 0

    import torch

    from hubconv.adapters.registry import get
    from hubconv.io.checkpoint import open_checkpoint
    from hubconv.smoke import _parity_tokens, compare_logits, parity_positions

    os.makedirs(a.workdir, exist_ok=True)
    ckpt = os.path.join(a.workdir, f"ckpt-{a.gigabytes:g}GB", "step-1")
    hf = os.path.join(a.workdir, f"hf-{a.gigabytes:g}GB")
    t0 = time.perf_counter()
    made = subprocess.run([sys.executable, __file__, "--make", ckpt, str(a.gigabytes)], check=True, capture_output=True)
    n_layers = int(made.stdout.split()[-1])
    print(f"checkpoint: {n_layers} layers ({time.perf_counter() - t0:.0f}s)", flush=True)
    if not os.path.exists(os.path.join(hf, "hubconv.json")):
        args_file = os.path.join(a.workdir, "model_args.json")
        json.dump({"n_heads": SHAPE.n_heads, **MODEL_ARGS}, open(args_file, "w"))
        hubconv = [sys.executable, "-m", "hubconv", "convert", "--adapter", "torchtitan", "--checkpoint", ckpt]
        subprocess.run([*hubconv, "--output", hf, "--model-args", args_file, "--quiet", "--overwrite"], check=True)
    native_args = json.load(open(os.path.join(hf, "hubconv.json")))["native_args"]
    tokens = _parity_tokens(SHAPE.vocab, a.positions)
    layouts = {
        "spread": parity_positions(a.positions, native_args["max_seq_len"]),
        "contiguous": torch.arange(a.positions),
    }
    layouts = {k: v for k, v in layouts.items() if k in a.layouts.split(",")}
    adapter, _ = get("torchtitan")
    refs = {}
    for name, pos in layouts.items():
        t0 = time.perf_counter()
        with open_checkpoint(ckpt) as ck:
            refs[name] = adapter.reference_logits(ck, native_args, tokens, pos)
        print(f"reference logits ({name}): {time.perf_counter() - t0:.0f}s", flush=True)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rows = []
    for dtype in a.dtypes.split(","):
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=getattr(torch, dtype), local_files_only=True).eval()
        print(f"load {dtype}: {time.perf_counter() - t0:.0f}s", flush=True)
        for control, apply in controls(model).items():
            undo = apply()
            for layout, pos in layouts.items():
                t0 = time.perf_counter()
                with torch.no_grad():
                    got = model(tokens, position_ids=pos[None]).logits
                p = compare_logits(refs[layout], got, dtype, n_layers, int(pos[-1]))
                t = p.thresholds
                rows.append(
                    {
                        "dtype": dtype,
                        "layout": layout,
                        "case": control,
                        "max_abs_diff": p.max_abs_diff,
                        "bound": t["max_abs_diff"],
                        "ratio": p.margin,
                        "kl": p.kl_divergence,
                        "kl_bound": t["kl_divergence"],
                        "top1": p.top1_agreement,
                        "near_ties": p.near_ties,
                        "passed": p.passed,
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
                r = rows[-1]
                print(
                    f"| {dtype} | {layout} | {control} | {r['max_abs_diff']:.3g} | {r['bound']:.3g} | "
                    f"{r['ratio']:.3g} | {r['kl']:.3g} | {r['kl_bound']:.3g} | {r['top1']:.3f} | "
                    f"{'pass' if r['passed'] else 'FAIL'} |",
                    flush=True,
                )
            undo()
        del model
    print("\n| smoke dtype | positions | case | max abs dlogit | bound | ratio | KL | KL bound | top-1 | verdict |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['layout']} | {r['case']} | {r['max_abs_diff']:.3g} | {r['bound']:.3g} | "
            f"{r['ratio']:.3g} | {r['kl']:.3g} | {r['kl_bound']:.3g} | {r['top1']:.3f} | "
            f"{'pass' if r['passed'] else 'FAIL'} |"
        )
    wrong = [r for r in rows if (r["case"] == "correct") != r["passed"] and r["layout"] == "spread"]
    json.dump({"n_layers": n_layers, "shape": SHAPE.__dict__, "rows": rows}, sys.stdout, indent=1)
    print()
    if not a.keep:
        shutil.rmtree(os.path.dirname(ckpt), ignore_errors=True)
        shutil.rmtree(hf, ignore_errors=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
