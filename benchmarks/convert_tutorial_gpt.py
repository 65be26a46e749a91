"""Benchmark `hubconv convert --adapter mapping --mapping examples/tutorial-gpt/mapping.yml` against `cp`.

    .venv/bin/python benchmarks/convert_tutorial_gpt.py [--sizes 0.5,2] [--repeats 3] [--workdir /tmp/hubconv-tgpt]

For each size (GB of float32 weights) it writes a plain state dict with `torch.save`, shaped like the classic
tutorial GPT (examples/tutorial-gpt/model.py) at width 1280 with 20 heads of 64, a 16384-token vocabulary,
block_size 256 and its per-head causal-mask buffers; more layers for more GB. Each layer costs the conversion
the most it can: 60 per-head q/k/v weights fused into one c_attn (gathered rows), the q rows multiplied by
20**-0.5 (not a power of two: every value is rounded, in blocks), then Conv1D-transposed (column-box reads of
the file), three more transposes, and 20 dropped mask buffers. The page cache is warmed, then `cp CKPT DST` and
`hubconv convert` alternate (each after `sync`, outputs deleted between runs), timed and RSS-sampled with
benchmarks/convert.py's helpers. The work folder is deleted at the end.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert import ROOT, file_checkpoint_main

N_EMBD, N_HEAD, VOCAB, BLOCK = 1280, 20, 16384, 256
MAPPING = os.path.join(ROOT, "examples", "tutorial-gpt", "mapping.yml")


def layer_bytes(c: int = N_EMBD) -> int:
    weights = 4 * (3 * c * c + c * c + c + 8 * c * c + 5 * c + 4 * c)  # q/k/v heads, proj, MLP, biases, norms
    return weights + 4 * N_HEAD * BLOCK * BLOCK  # the heads' tril buffers


def make_checkpoint(path: str, gigabytes: float) -> int:
    """Write a float32 tutorial-GPT state dict of about `gigabytes` GB; returns the layer count."""
    import torch

    c, hs = N_EMBD, N_EMBD // N_HEAD
    fixed = 4 * (2 * VOCAB * c + BLOCK * c + 2 * c)
    n_layer = max(1, round((gigabytes * 1e9 - fixed) / layer_bytes()))
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:  # random finite floats: the q rows are really multiplied
        return torch.randn(shape, generator=g)

    sd = {"token_embedding_table.weight": t(VOCAB, c), "position_embedding_table.weight": t(BLOCK, c)}
    tril = torch.tril(torch.ones(BLOCK, BLOCK))
    for i in range(n_layer):
        p = f"blocks.{i}."
        for h in range(N_HEAD):
            for w in ("key", "query", "value"):
                sd[f"{p}sa.heads.{h}.{w}.weight"] = t(hs, c)
            sd[f"{p}sa.heads.{h}.tril"] = tril.clone()
        sd[f"{p}sa.proj.weight"], sd[f"{p}sa.proj.bias"] = t(c, c), t(c)
        sd[f"{p}ffwd.net.0.weight"], sd[f"{p}ffwd.net.0.bias"] = t(4 * c, c), t(4 * c)
        sd[f"{p}ffwd.net.2.weight"], sd[f"{p}ffwd.net.2.bias"] = t(c, 4 * c), t(c)
        for ln in ("ln1", "ln2"):
            sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"] = t(c), t(c)
    sd["ln_f.weight"], sd["ln_f.bias"] = t(c), t(c)
    sd["lm_head.weight"] = t(VOCAB, c)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(sd, path)
    return n_layer


def main() -> int:
    return file_checkpoint_main(
        __doc__,
        __file__,
        make_checkpoint,
        ["--adapter", "mapping", "--mapping", MAPPING],
        "/tmp/hubconv-tutorial-gpt-bench",
    )


if __name__ == "__main__":
    raise SystemExit(main())
