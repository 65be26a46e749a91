"""`hubconv import --adapter megatron`: an HF GPT-2 / Llama / Qwen2 model -> Megatron-LM's legacy torch checkpoint.

The megatron adapter's rule table, run backwards, gives the global tensors in megatron-core's local-spec naming
(`decoder.layers.N.self_attention.linear_q/k/v`, `mlp.linear_fc1[_gate/_up]`, `input_layernorm`,
`pre_mlp_layernorm`, `decoder.final_layernorm`, `embedding.word_embeddings`, `output_layer`); the vocabulary is
padded again to a multiple of `make_vocab_size_divisible_by` x TP (zero rows, reported). `megatron_layouts.
shard_model` — the exact inverse of the merge the converter reads with — splits them per rank: q/k/v fused per
query group (`checkpoint_version` 3.0), SwiGLU `[gate_r; up_r]` per rank, column/row/vocab-parallel splits,
layers to pipeline stages (a tied output layer is also saved on the last stage when PP > 1).

Written: `release/mp_rank_TT[_PPP]/model_optim_rng.pt` (`{args, checkpoint_version, iteration, model}`, each
streamed by `hubconv.io.torch_zip_writer`), `latest_checkpointed_iteration.txt` = `release`, and the HF tokenizer
in `tokenizer/` (`args.tokenizer_type = HuggingFaceTokenizer`). Load it with Megatron-LM's `--load DIR
--use-checkpoint-args --no-load-optim --no-load-rng` (or `--finetune`); with `torch.load(weights_only=True)`
after `torch.serialization.add_safe_globals([argparse.Namespace])` (the saved `args`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from hubconv import views as V
from hubconv.adapters.megatron_layouts import CORE_TABLE, Attention, Layout, padded_vocab_size, rank_file, shard_model
from hubconv.adapters.rules import Mapped
from hubconv.errors import MappingError, ModelArgsError
from hubconv.import_formats import (
    ImportFormat,
    NativeModel,
    Progress,
    _need,
    _refuse,
    all_zero,
    copy_tokenizer,
    pad_rows,
    register_format,
)
from hubconv.io.tensor import LazyTensor
from hubconv.io.torch_zip_writer import TensorRef, torch_dtype, write_torch_file

EMB, HEAD = "embedding.word_embeddings.weight", "output_layer.weight"
TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    rope = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    s = {**legacy, **rope}
    out: dict[str, Any] = {"rotary_base": theta, "use_rope_scaling": False, "rotary_seq_len_interpolation_factor": None}
    if kind == "linear":
        out["rotary_seq_len_interpolation_factor"] = float(_need(s, "factor", "config.json rope_parameters"))
    elif kind == "llama3":
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for k, v in fixed.items():
            if float(s.get(k, v)) != v:
                raise MappingError(
                    f"config.json: rope_parameters.{k}={s.get(k)!r} cannot be represented: megatron-core's Llama 3.1 "
                    f"RoPE scaling fixes it at {v:g}"
                )
        out["use_rope_scaling"], out["rope_scaling_factor"] = True, float(_need(s, "factor", "rope_parameters"))
    elif kind != "default":
        raise MappingError(
            f"config.json: rope_type={kind!r} cannot be represented: Megatron's RoPE is plain, linear or Llama 3.1"
        )
    return out


class MegatronImport(ImportFormat):
    adapter = "megatron"
    model_types = ("gpt2", "llama", "qwen2")
    fields = ("make_vocab_size_divisible_by",)

    def args_from_hf(
        self, config: Mapping[str, Any], hf: Mapping[str, LazyTensor], user: Mapping[str, Any], tp: int, pp: int
    ) -> dict[str, Any]:
        mt = config.get("model_type")
        a: dict[str, Any] = {"target": mt, "rotary_percent": 1.0, "rotary_interleaved": False}
        if mt == "gpt2":
            a.update(self._gpt2(config, hf))
        else:
            a.update(self._llama(config, mt))
        divisible = int(user.get("make_vocab_size_divisible_by", 128))
        if divisible <= 0:
            raise ModelArgsError(f"--model-args make_vocab_size_divisible_by={divisible}: must be positive")
        vocab = int(_need(config, "vocab_size"))
        padded = padded_vocab_size(vocab, divisible, tp)
        first = hf.get("transformer.wte.weight" if mt == "gpt2" else "model.embed_tokens.weight")
        if first is None:
            raise MappingError("HF model: the token embeddings are missing")
        a.update(
            make_vocab_size_divisible_by=divisible,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            checkpoint_version=CHECKPOINT_VERSION,
            vocab_size=vocab,
            hf_vocab_size=vocab,
            padded_vocab_size=padded,
            keep_padded_vocab=False,
            dtype=first.dtype.name,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", mt == "gpt2")),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
        )
        return a

    @staticmethod
    def _gpt2(config: Mapping[str, Any], hf: Mapping[str, LazyTensor]) -> dict[str, Any]:
        why = "Megatron's GPT"
        _refuse(config, "scale_attn_by_inverse_layer_idx", (False, None), f"{why} has no per-layer attention scale")
        _refuse(config, "reorder_and_upcast_attn", (False, None), f"{why} attention is not reordered")
        _refuse(config, "scale_attn_weights", (True, None), f"{why} scales attention by 1/sqrt(head size)")
        act = config.get("activation_function", "gelu_new")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise MappingError(
                f"config.json: activation_function={act!r} cannot be represented: {why} MLP is GELU (exact or tanh)"
            )
        hidden = int(_need(config, "n_embd"))

        def zero(suffix: str) -> bool:
            return all(all_zero(t) for k, t in hf.items() if k.endswith(suffix))

        bias = not all(zero(s) for s in ("attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"))
        qkv_bias = bias or not zero("attn.c_attn.bias")
        return {
            "num_layers": int(_need(config, "n_layer")),
            "hidden_size": hidden,
            "ffn_hidden_size": int(config.get("n_inner") or 4 * hidden),
            "num_attention_heads": int(_need(config, "n_head")),
            "num_query_groups": int(_need(config, "n_head")),
            "kv_channels": hidden // int(_need(config, "n_head")),
            "max_position_embeddings": int(_need(config, "n_positions")),
            "position_embedding_type": "learned_absolute",
            "rotary_base": 10000,
            "use_rope_scaling": False,
            "rotary_seq_len_interpolation_factor": None,
            "normalization": "LayerNorm",
            "norm_epsilon": float(config.get("layer_norm_epsilon", 1e-5)),
            "activation": "gelu" if act == "gelu" else "gelu_tanh",
            "add_bias_linear": bias,
            "add_qkv_bias": qkv_bias,
        }

    @staticmethod
    def _llama(config: Mapping[str, Any], mt: str) -> dict[str, Any]:
        _refuse(config, "hidden_act", ("silu",), "Megatron's Llama MLP is SwiGLU (silu)")
        if mt == "qwen2":
            _refuse(config, "use_sliding_window", (False, None), "Megatron's attention has no sliding window")
            qkv_bias, bias = True, False
        else:
            qkv_bias = bool(config.get("attention_bias", False))
            bias = bool(config.get("mlp_bias", False))
            if qkv_bias != bias:
                raise MappingError(
                    f"config.json: attention_bias={qkv_bias} with mlp_bias={bias} cannot be represented: Megatron's "
                    "add_bias_linear puts biases on every linear layer (the output projection too)"
                )
        heads = int(_need(config, "num_attention_heads"))
        hidden = int(_need(config, "hidden_size"))
        return {
            "num_layers": int(_need(config, "num_hidden_layers")),
            "hidden_size": hidden,
            "ffn_hidden_size": int(_need(config, "intermediate_size")),
            "num_attention_heads": heads,
            "num_query_groups": int(config.get("num_key_value_heads") or heads),
            "kv_channels": int(config.get("head_dim") or hidden // heads),
            "max_position_embeddings": int(_need(config, "max_position_embeddings")),
            "position_embedding_type": "rope",
            **_rope(config),
            "normalization": "RMSNorm",
            "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
            "activation": "swiglu",
            "add_bias_linear": bias,
            "add_qkv_bias": qkv_bias,
        }

    def defaults_from_record(self, native: Mapping[str, Any]) -> dict[str, Any]:
        divisible = native.get("make_vocab_size_divisible_by")
        return {"make_vocab_size_divisible_by": divisible} if isinstance(divisible, int) and divisible > 0 else {}

    def lossy_inverse(self, record: Mapped, hf: Mapping[str, LazyTensor], args: Mapping[str, Any]) -> list[LazyTensor]:
        if not record.sources:  # a synthesized zero bias of a bias-free model: Megatron has no tensor for it
            return []
        if record.sources in ([EMB], [HEAD]):
            return [pad_rows(hf[record.targets[0]], args["padded_vocab_size"], record.sources[0])]
        return super().lossy_inverse(record, hf, args)

    def finish(self, tensors: list[LazyTensor], args: Mapping[str, Any]) -> list[LazyTensor]:
        """A tied output layer is saved on the last pipeline stage too (Megatron's shared embedding copy)."""
        if args["tie_word_embeddings"] and args["pipeline_model_parallel_size"] > 1:
            emb = next(t for t in tensors if t.name == EMB)
            tensors = [*tensors, V.rename(emb, HEAD)]
        return tensors

    def write(self, staging: str, model: NativeModel, hf_dir: str, progress: Progress) -> list[str]:
        a = model.args
        tp, pp = a["tensor_model_parallel_size"], a["pipeline_model_parallel_size"]
        att = Attention(a["num_attention_heads"], a["num_query_groups"], a["kv_channels"], CHECKPOINT_VERSION)
        layout = Layout(CORE_TABLE, att, gated=a["activation"] == "swiglu")
        ranks = shard_model({t.name: t for t in model.tensors}, layout, tp, pp)
        root = os.path.join(staging, "megatron")
        files = []
        tokenizer = copy_tokenizer(hf_dir, os.path.join(root, "tokenizer"))
        args = megatron_namespace(a, model, bool(tokenizer))
        for (t, p), shard in sorted(ranks.items()):
            folder = os.path.join(root, "release", rank_file(t, p, pp))
            os.makedirs(folder)
            state = {k: TensorRef(v, model.dtype) for k, v in shard.items()}
            obj = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0, "model": state}
            write_torch_file(os.path.join(folder, "model_optim_rng.pt"), obj, progress=progress)
            files.append(f"megatron/release/{rank_file(t, p, pp)}/model_optim_rng.pt")
        with open(os.path.join(root, TRACKER), "w") as f:
            f.write("release")
        return [*files, f"megatron/{TRACKER}", *(f"megatron/tokenizer/{n}" for n in tokenizer)]

    def reopen_path(self, staging: str) -> str:
        return os.path.join(staging, "megatron")

    def reopen_args(self, model: NativeModel, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"vocab_size": model.args["hf_vocab_size"]}


def megatron_namespace(a: Mapping[str, Any], model: NativeModel, tokenizer: bool) -> argparse.Namespace:
    """Megatron-LM's saved `args`: the architecture fields its `--use-checkpoint-args` reads back."""
    dtype = (model.dtype.name if model.dtype else a["dtype"]).upper()
    swiglu = a["activation"] == "swiglu"
    rope = a["position_embedding_type"] == "rope"
    fields: dict[str, Any] = {
        "num_layers": a["num_layers"],
        "hidden_size": a["hidden_size"],
        "ffn_hidden_size": a["ffn_hidden_size"],
        "num_attention_heads": a["num_attention_heads"],
        "group_query_attention": a["num_query_groups"] != a["num_attention_heads"],
        "num_query_groups": a["num_query_groups"],
        "kv_channels": a["kv_channels"],
        "max_position_embeddings": a["max_position_embeddings"],
        "seq_length": a["max_position_embeddings"],
        "position_embedding_type": a["position_embedding_type"],
        "use_rotary_position_embeddings": rope,
        "rotary_base": a["rotary_base"],
        "rotary_percent": 1.0,
        "rotary_interleaved": False,
        "rotary_seq_len_interpolation_factor": a.get("rotary_seq_len_interpolation_factor"),
        "use_rope_scaling": bool(a.get("use_rope_scaling")),
        "rope_scaling_factor": a.get("rope_scaling_factor", 8.0),
        "normalization": a["normalization"],
        "norm_epsilon": a["norm_epsilon"],
        "apply_layernorm_1p": False,
        "swiglu": swiglu,
        "squared_relu": False,
        "openai_gelu": a["activation"] == "gelu_tanh" and not a["add_bias_linear"],
        "bias_gelu_fusion": a["activation"] == "gelu_tanh" and a["add_bias_linear"],
        "bias_swiglu_fusion": swiglu,
        "add_bias_linear": a["add_bias_linear"],
        "add_qkv_bias": a["add_qkv_bias"],
        "untie_embeddings_and_output_weights": not a["tie_word_embeddings"],
        "apply_residual_connection_post_layernorm": False,
        "apply_query_key_layer_scaling": False,
        "attention_softmax_in_fp32": True,
        "padded_vocab_size": a["padded_vocab_size"],
        "vocab_size": a["hf_vocab_size"],
        "make_vocab_size_divisible_by": a["make_vocab_size_divisible_by"],
        "tensor_model_parallel_size": a["tensor_model_parallel_size"],
        "pipeline_model_parallel_size": a["pipeline_model_parallel_size"],
        "virtual_pipeline_model_parallel_size": None,
        "params_dtype": torch_dtype({"BF16": "bfloat16", "F16": "float16"}.get(dtype, "float32")),
        "bf16": dtype == "BF16",
        "fp16": dtype == "F16",
        "tokenizer_type": "HuggingFaceTokenizer" if tokenizer else None,
        "tokenizer_model": "tokenizer" if tokenizer else None,
        "transformer_impl": "local",
        "use_mcore_models": True,
        "ckpt_format": "torch",
        "iteration": 0,
    }
    return argparse.Namespace(**fields)


register_format(MegatronImport())
