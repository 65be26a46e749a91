"""Benchmark `hubconv convert --adapter nanogpt` against `cp` of the same nanoGPT `ckpt.pt`.

    .venv/bin/python benchmarks/convert_nanogpt.py [--sizes 0.5,2] [--repeats 3] [--workdir /tmp/hubconv-nanogpt]

For each size (GB of float32 weights, as nanoGPT's train.py keeps them; GPT-2-large width 1280,
the padded 50304-row vocabulary, block_size 1024, biases; more layers for more GB) it writes a
`ckpt.pt` in train.py's layout with `torch.save` ({model, optimizer, model_args, iter_num,
best_val_loss, config}, `_orig_mod.` keys of a compiled model, `lm_head` sharing `wte`'s storage),
warms the page cache, then alternates `cp CKPT DST` and `hubconv convert` (each preceded by `sync`,
outputs deleted between runs), with benchmarks/convert.py's timing and RSS sampling. Every layer's
four Conv1D weights are transposed (column-box reads of the file) and the vocabulary is trimmed to
50257 rows; everything else is copied inside the kernel. The work folder is deleted at the end.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert import file_checkpoint_main

N_EMBD, N_HEAD, VOCAB, BLOCK = 1280, 20, 50304, 1024


def layer_bytes(c: int = N_EMBD) -> int:
    return 4 * (12 * c * c + 13 * c)  # c_attn 3c^2, attn.c_proj c^2, c_fc 4c^2, mlp.c_proj 4c^2, biases, norms


def make_checkpoint(path: str, gigabytes: float) -> int:
    """Write a float32 nanoGPT ckpt.pt of about `gigabytes` GB; returns the layer count."""
    import torch

    fixed = 4 * (VOCAB * N_EMBD + BLOCK * N_EMBD + 2 * N_EMBD)
    n_layer = max(1, round((gigabytes * 1e9 - fixed) / layer_bytes()))
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:  # random bit patterns: only bytes matter for timing
        return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=g).view(torch.float32)

    c = N_EMBD
    sd = {"transformer.wte.weight": t(VOCAB, c), "transformer.wpe.weight": t(BLOCK, c)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        for name, rows, cols in (("attn.c_attn", 3 * c, c), ("attn.c_proj", c, c), ("mlp.c_fc", 4 * c, c)):
            sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = t(rows, cols), t(rows)
        sd[f"{p}mlp.c_proj.weight"], sd[f"{p}mlp.c_proj.bias"] = t(c, 4 * c), t(c)
        for ln in ("ln_1", "ln_2"):
            sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"] = t(c), t(c)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = t(c), t(c)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied: one storage, as nanoGPT saves it
    model_args = dict(n_layer=n_layer, n_head=N_HEAD, n_embd=c, block_size=BLOCK, bias=True, vocab_size=VOCAB)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(
        {
            "model": {f"_orig_mod.{k}": v for k, v in sd.items()},
            "optimizer": {"state": {}, "param_groups": []},
            "model_args": {**model_args, "dropout": 0.0},
            "iter_num": 600000,
            "best_val_loss": torch.tensor(2.85),
            "config": {"dataset": "openwebtext", "compile": True, "block_size": BLOCK},
        },
        path,
    )
    return n_layer


def main() -> int:
    return file_checkpoint_main(
        __doc__, __file__, make_checkpoint, ["--adapter", "nanogpt"], "/tmp/hubconv-nanogpt-bench"
    )


if __name__ == "__main__":
    sys.exit(main())
