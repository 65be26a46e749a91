"""Benchmark `hubconv convert --adapter mindformers` against `cp` of the same MindSpore `.ckpt`.

    .venv/bin/python benchmarks/convert_mindformers.py [--sizes 4] [--repeats 3] [--workdir /tmp/hubconv-mindformers]

For each size (GB of bfloat16 weights; width 2048, 16 heads, 4 KV heads, FFN 5632, vocabulary 32000, untied
head; more layers for more GB) it writes a `.ckpt` as MindSpore's `save_checkpoint` does (one serialized
`Checkpoint` message per parameter, protobuf written by hand, random bytes) in MindFormers' fused layout
(`attention.w_qkv` per KV group, `feed_forward.w_gate_hidden` interleaved row by row), plus an AdamW state for
the final norm and the training counters, warms the page cache, then alternates `cp CKPT DST` and
`hubconv convert` (each preceded by `sync`, outputs deleted between runs), with benchmarks/convert.py's timing
and RSS sampling. Every fused weight is split by row views (q/k/v gathered per group as file segments, gate/up
read in blocks of row pairs), everything else is copied inside the kernel. The work folder is deleted at the end.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from convert import file_checkpoint_main

DIM, HEADS, KV_HEADS, FFN, VOCAB = 2048, 16, 4, 5632, 32000
HD = DIM // HEADS


def layer_bytes() -> int:
    return 2 * (DIM * (DIM + 2 * KV_HEADS * HD) + DIM * DIM + 3 * FFN * DIM + 2 * DIM)


def make_checkpoint(path: str, gigabytes: float) -> int:
    """Write a bf16 MindFormers Llama `.ckpt` of about `gigabytes` GB; returns the layer count."""
    from tests.native.mindformers_ckpt import value_message

    n_layers = max(1, round((gigabytes * 1e9 - 2 * 2 * VOCAB * DIM) / layer_bytes()))
    rng = np.random.default_rng(0)

    def bf16(*shape: int) -> bytes:
        return rng.integers(0, 2**16, size=int(np.prod(shape)), dtype=np.uint16).tobytes()

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:

        def put(name: str, dims: list[int], data: bytes, ttype: str = "BFloat16") -> None:
            f.write(value_message(name, dims, ttype, data))

        put("model.tok_embeddings.embedding_weight", [VOCAB, DIM], bf16(VOCAB, DIM))
        for i in range(n_layers):
            p = f"model.layers.{i}."
            put(p + "attention_norm.weight", [DIM], bf16(DIM))
            put(p + "attention.w_qkv.weight", [DIM + 2 * KV_HEADS * HD, DIM], bf16(DIM + 2 * KV_HEADS * HD, DIM))
            put(p + "attention.wo.weight", [DIM, DIM], bf16(DIM, DIM))
            put(p + "ffn_norm.weight", [DIM], bf16(DIM))
            put(p + "feed_forward.w_gate_hidden.weight", [2 * FFN, DIM], bf16(2 * FFN, DIM))
            put(p + "feed_forward.w2.weight", [DIM, FFN], bf16(DIM, FFN))
        put("model.norm_out.weight", [DIM], bf16(DIM))
        put("lm_head.weight", [VOCAB, DIM], bf16(VOCAB, DIM))
        put("adam_m.model.norm_out.weight", [DIM], bytes(4 * DIM), "Float32")
        put("adam_v.model.norm_out.weight", [DIM], bytes(4 * DIM), "Float32")
        put("global_step", [1], np.array([1000], np.int32).tobytes(), "Int32")
        put("epoch_num", [], np.array(1, np.int64).tobytes(), "Int64")
    return n_layers


def main() -> int:
    config = {"num_heads": HEADS, "n_kv_heads": KV_HEADS, "hidden_size": DIM, "qkv_concat": True, "seq_length": 4096}
    fd, args_file = tempfile.mkstemp(prefix="hubconv-mindformers-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"model": {"model_config": config}}, f)
    try:
        return file_checkpoint_main(
            __doc__,
            __file__,
            make_checkpoint,
            ["--adapter", "mindformers", "--model-args", args_file],
            "/tmp/hubconv-mindformers-bench",
        )
    finally:
        os.remove(args_file)


if __name__ == "__main__":
    sys.exit(main())
