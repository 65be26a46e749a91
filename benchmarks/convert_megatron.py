"""Benchmark `hubconv convert --adapter megatron` of a TP=2 x PP=2 Megatron-LM legacy checkpoint against `cp -r`.

    .venv/bin/python benchmarks/convert_megatron.py [--sizes 1,4] [--repeats 3] [--workdir /tmp/hubconv-megatron]

For each size (GB of bf16 weights) it writes a Megatron-LM save folder as `save_checkpoint` lays it out
(`latest_checkpointed_iteration.txt`, `iter_0000100/mp_rank_TT_PPP/model_optim_rng.pt`, each holding
`{args, checkpoint_version, iteration, model, rng_state}` with the megatron-core Transformer-Engine key
names and `_extra_state` entries): a Llama-style model of width 2048, 16 heads in 8 query groups, SwiGLU
(ffn 5632), untied output layer, GPT-2 BPE vocabulary padded from 50257 to 50432 rows, more layers for more
GB. One rank file is built at a time (in a child process) from random bits; replicated norms are identical
across the tensor-parallel ranks. Conversion then merges the ranks as lazy views: fused QKV split per query
group and rank, `[gate; up]` split per rank, row-parallel weights joined by columns, the padded vocabulary
trimmed, pipeline stages renumbered; memory must not grow with the model (target: peak RSS <= 1 GiB).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert import file_checkpoint_main

HIDDEN, HEADS, GROUPS, FFN, VOCAB, TP, PP = 2048, 16, 8, 5632, 50257, 2, 2
HEAD_DIM = HIDDEN // HEADS
PADDED = -(-VOCAB // (128 * TP)) * 128 * TP
QKV_ROWS = (HEADS + 2 * GROUPS) * HEAD_DIM


def layer_bytes() -> int:
    return 2 * (QKV_ROWS * HIDDEN + HIDDEN * HEADS * HEAD_DIM + 3 * FFN * HIDDEN + 2 * HIDDEN)


def make_checkpoint(path: str, gigabytes: float) -> int:
    """Write the save folder `path` of about `gigabytes` GB; returns the layer count."""
    import torch

    fixed = 2 * 2 * PADDED * HIDDEN
    n_layers = max(PP, round((gigabytes * 1e9 - fixed) / layer_bytes() / PP) * PP)
    per_stage = n_layers // PP

    def bits(*shape: int, seed: int) -> torch.Tensor:  # random bit patterns: only bytes matter for timing
        g = torch.Generator().manual_seed(seed)
        return torch.randint(-(2**15), 2**15 - 1, shape, dtype=torch.int16, generator=g).view(torch.bfloat16)

    args = argparse.Namespace(
        num_layers=n_layers,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        group_query_attention=True,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
        max_position_embeddings=4096,
        seq_length=4096,
        position_embedding_type="rope",
        rotary_base=500000,
        rotary_percent=1.0,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        swiglu=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        make_vocab_size_divisible_by=128,
        padded_vocab_size=PADDED,
        tokenizer_type="GPT2BPETokenizer",
        tensor_model_parallel_size=TP,
        pipeline_model_parallel_size=PP,
        bf16=True,
        params_dtype=torch.bfloat16,
    )
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("100")
    for pp in range(PP):
        for tp in range(TP):
            seed = 1000 * pp + 10 * tp
            model: dict[str, object] = {}
            if pp == 0:
                model["embedding.word_embeddings.weight"] = bits(PADDED // TP, HIDDEN, seed=seed)
            for i in range(per_stage):
                p = f"decoder.layers.{i}."
                s = seed + 100 * i
                model[p + "self_attention.linear_qkv.layer_norm_weight"] = bits(HIDDEN, seed=pp * 7 + i)  # replicated
                model[p + "self_attention.linear_qkv.weight"] = bits(QKV_ROWS // TP, HIDDEN, seed=s + 1)
                model[p + "self_attention.linear_proj.weight"] = bits(HIDDEN, HEADS * HEAD_DIM // TP, seed=s + 2)
                model[p + "mlp.linear_fc1.layer_norm_weight"] = bits(HIDDEN, seed=pp * 7 + i + 3)  # replicated
                model[p + "mlp.linear_fc1.weight"] = bits(2 * FFN // TP, HIDDEN, seed=s + 4)
                model[p + "mlp.linear_fc2.weight"] = bits(HIDDEN, FFN // TP, seed=s + 5)
                for module in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1"):
                    model[f"{p}{module}._extra_state"] = torch.empty(0, dtype=torch.uint8)
            if pp == PP - 1:
                model["decoder.final_layernorm.weight"] = bits(HIDDEN, seed=99)
                model["output_layer.weight"] = bits(PADDED // TP, HIDDEN, seed=seed + 7)
            folder = os.path.join(path, "iter_0000100", f"mp_rank_{tp:02d}_{pp:03d}")
            os.makedirs(folder, exist_ok=True)
            state = {"args": args, "checkpoint_version": 3.0, "iteration": 100, "model": model}
            torch.save(state, os.path.join(folder, "model_optim_rng.pt"))
            del model, state
    return n_layers


def main() -> int:
    return file_checkpoint_main(
        __doc__,
        __file__,
        make_checkpoint,
        ["--adapter", "megatron"],
        "/tmp/hubconv-megatron-bench",
        name="megatron",
        sizes="1,4",
    )


if __name__ == "__main__":
    sys.exit(main())
