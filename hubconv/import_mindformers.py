"""`hubconv import --adapter mindformers`: an HF Llama / Qwen2 model -> a MindSpore Transformers checkpoint.

Written as MindFormers' `convert_weight.py` (HF -> MindSpore) leaves it: `model.ckpt` (MindSpore protobuf,
streamed by `hubconv.io.mindspore_ckpt_writer`) with MindFormers' names (`model.tok_embeddings.embedding_weight`,
`model.layers.N.attention.wq/wk/wv/wo`, `feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`, `model.norm_out`,
`lm_head`), Q/K not permuted (MindFormers rotates halves, as transformers does); unfused by default, or fused as
MindFormers' `qkv_concat: true` (`w_qkv` per KV group, row-interleaved `w_gate_hidden`) with `--model-args
qkv_concat: true`. Beside it `model_config.yaml` (a run-config `model: {model_config: ...}` section in
MindFormers' names, which `hubconv convert --adapter mindformers --model-args` reads back) and the HF tokenizer
files. The native arguments are resolved by the mindformers adapter itself from that model_config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hubconv import views as V
from hubconv.errors import MappingError, ModelArgsError
from hubconv.import_formats import (
    ImportFormat,
    NativeModel,
    Progress,
    _need,
    _refuse,
    _yaml,
    copy_tokenizer,
    register_format,
)
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import LazyTensor

MODEL_FILE, CONFIG_FILE = "model.ckpt", "model_config.yaml"
EMB = "model.tok_embeddings.embedding_weight"


def mindformers_model_config(config: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    """MindFormers `model_config` fields for an HF Llama / Qwen2 config; features it lacks are refused by name."""
    mt = config.get("model_type")
    _refuse(config, "hidden_act", ("silu",), "MindFormers' Llama MLP is SwiGLU (silu)")
    heads, hidden = int(_need(config, "num_attention_heads")), int(_need(config, "hidden_size"))
    if int(config.get("head_dim") or hidden // heads) * heads != hidden:
        raise MappingError("config.json: head_dim cannot be represented: MindFormers' head size is hidden_size/heads")
    if mt == "qwen2":
        _refuse(config, "use_sliding_window", (False, None), "MindFormers' attention has no sliding window")
        bias = True
    else:
        _refuse(config, "attention_bias", (False, None), "MindFormers' Llama has no attention biases")
        _refuse(config, "mlp_bias", (False, None), "MindFormers' Llama MLP has no biases")
        bias = False
    c: dict[str, Any] = {
        "type": "LlamaConfig",
        "hidden_size": hidden,
        "num_layers": int(_need(config, "num_hidden_layers")),
        "num_heads": heads,
        "n_kv_heads": int(config.get("num_key_value_heads") or heads),
        "vocab_size": int(_need(config, "vocab_size")),
        "intermediate_size": int(_need(config, "intermediate_size")),
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "seq_length": int(_need(config, "max_position_embeddings")),
        "qkv_has_bias": bias,
        "qkv_concat": bool(user.get("qkv_concat", False)),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    rope = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    s = {**legacy, **rope}
    c["theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if kind == "linear":
        c["extend_method"], c["scaling_factor"] = "PI", float(s["factor"])
    elif kind == "llama3":
        c["extend_method"] = "LLAMA3"
        c["scaling_factor"] = {
            "factor": float(s["factor"]),
            "low_freq_factor": float(s["low_freq_factor"]),
            "high_freq_factor": float(s["high_freq_factor"]),
            "original_max_position_embedding": int(s["original_max_position_embeddings"]),
        }
    elif kind != "default":
        raise MappingError(f"config.json: rope_type={kind!r} cannot be represented: MindFormers' RoPE extend methods "
                           "are PI (linear) and LLAMA3")  # fmt: skip
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(config.get(k), int):
            c[k] = config[k]
    return c


class MindFormersImport(ImportFormat):
    adapter = "mindformers"
    model_types = ("llama", "qwen2")
    fields = ("qkv_concat",)

    def args_from_hf(
        self, config: Mapping[str, Any], hf: Mapping[str, LazyTensor], user: Mapping[str, Any], tp: int, pp: int
    ) -> dict[str, Any]:
        from hubconv.adapters import registry

        if tp != 1 or pp != 1:
            raise ModelArgsError("--tp/--pp: hubconv writes one MindSpore .ckpt (MindSpore reshards it by strategy)")
        c = mindformers_model_config(config, user)
        emb = hf.get("model.embed_tokens.weight")
        if emb is None:
            raise MappingError("HF model: model.embed_tokens.weight is missing")
        dim, kv = c["hidden_size"], c["n_kv_heads"] * (c["hidden_size"] // c["num_heads"])
        ffn = c["intermediate_size"]
        shapes: dict[str, tuple[int, ...]] = {EMB: (c["vocab_size"], dim)}
        p = "model.layers.0."
        if c["qkv_concat"]:
            shapes[p + "attention.w_qkv.weight"] = (dim + 2 * kv, dim)
            shapes[p + "feed_forward.w_gate_hidden.weight"] = (2 * ffn, dim)
            if c["qkv_has_bias"]:
                shapes[p + "attention.w_qkv.bias"] = (dim + 2 * kv,)
        else:
            shapes |= {p + "attention.wq.weight": (dim, dim), p + "attention.wk.weight": (kv, dim)}
            shapes[p + "feed_forward.w1.weight"] = (ffn, dim)
            if c["qkv_has_bias"]:
                shapes[p + "attention.wq.bias"] = (dim,)
        shapes |= {f"model.layers.{i}.attention_norm.weight": (dim,) for i in range(c["num_layers"])}
        if not c["tie_word_embeddings"]:
            shapes["lm_head.weight"] = (c["vocab_size"], dim)
        tensors = {k: V.Zeros(k, emb.dtype, s) for k, s in shapes.items()}
        adapter, _ = registry.get("mindformers")
        ckpt = Checkpoint(path="config.json", format="mindspore-ckpt", tensors={})
        a = adapter.resolve_args(ckpt, tensors, adapter.load_args(c))
        a["model_config"] = c
        return a

    def defaults_from_record(self, native: Mapping[str, Any]) -> dict[str, Any]:
        return {"qkv_concat": bool(native["qkv_concat"])} if "qkv_concat" in native else {}

    def write(self, staging: str, model: NativeModel, hf_dir: str, progress: Progress) -> list[str]:
        from hubconv.io.mindspore_ckpt_writer import write_mindspore_ckpt

        write_mindspore_ckpt(os.path.join(staging, MODEL_FILE), model.tensors, dtype=model.dtype, progress=progress)
        c = {**model.args["model_config"]}
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            f.write("# MindFormers run-config section written by `hubconv import` (merge into your run config)\n")
            f.write(_yaml({"model": {"model_config": c}}))
        return [MODEL_FILE, CONFIG_FILE, *(f"tokenizer/{n}" for n in copy_tokenizer(hf_dir, staging + "/tokenizer"))]

    def reopen_path(self, staging: str) -> str:
        return os.path.join(staging, MODEL_FILE)

    def reopen_args(self, model: NativeModel, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"model": {"model_config": model.args["model_config"]}}


register_format(MindFormersImport())
