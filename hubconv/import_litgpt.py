"""`hubconv import --adapter litgpt`: an HF Llama / Qwen2 / Mistral model -> a LitGPT checkpoint folder.

Written as LitGPT's `convert_hf_checkpoint` leaves a folder: `lit_model.pth` (the plain state dict, streamed by
`hubconv.io.torch_zip_writer`; fused `attn.qkv` in the current layout `[Q; K; V]`; a tied head saved as
`lm_head.weight` sharing the embedding's storage), `model_config.yaml` (LitGPT `Config` fields: `LLaMAMLP`,
`RMSNorm`, `rope_adjustments` for Llama 3.1 scaling, `rope_condense_ratio` for linear scaling) and the HF
tokenizer and generation files beside them. The native arguments are resolved by the litgpt adapter itself from
that `model_config.yaml`, so the written config is exactly what conversion reads back. The vocabulary keeps the
HF size (`padded_vocab_size` = `vocab_size`) unless `--model-args padded_vocab_size: N` asks for zero rows more.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from hubconv import views as V
from hubconv.adapters.rules import Mapped
from hubconv.errors import MappingError, ModelArgsError
from hubconv.import_formats import (
    ImportFormat,
    NativeModel,
    Progress,
    _need,
    _refuse,
    copy_tokenizer,
    pad_rows,
    register_format,
)
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import LazyTensor

MODEL_FILE, CONFIG_FILE = "lit_model.pth", "model_config.yaml"


def litgpt_config(config: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    """LitGPT `Config` fields for an HF Llama / Qwen2 / Mistral config; HF features LitGPT lacks are refused."""
    mt = config.get("model_type")
    _refuse(config, "hidden_act", ("silu",), "LitGPT's LLaMAMLP is SwiGLU (silu)")
    heads, hidden = int(_need(config, "num_attention_heads")), int(_need(config, "hidden_size"))
    vocab = int(_need(config, "vocab_size"))
    padded = int(user.get("padded_vocab_size") or vocab)
    if padded < vocab:
        raise ModelArgsError(f"--model-args padded_vocab_size={padded} is smaller than the HF vocabulary ({vocab})")
    c: dict[str, Any] = {
        "name": str(user.get("name") or "hubconv-import"),
        "block_size": int(_need(config, "max_position_embeddings")),
        "n_layer": int(_need(config, "num_hidden_layers")),
        "n_embd": hidden,
        "vocab_size": vocab,
        "padding_multiple": 512,
        "padded_vocab_size": padded,
        "norm_class_name": "RMSNorm",
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "parallel_residual": False,
        "n_head": heads,
        "head_size": int(config.get("head_dim") or hidden // heads),
        "n_query_groups": int(config.get("num_key_value_heads") or heads),
        "mlp_class_name": "LLaMAMLP",
        "intermediate_size": int(_need(config, "intermediate_size")),
        "rotary_percentage": 1.0,
        "bias": False,
        "attn_bias": False,
    }
    if mt == "qwen2":
        _refuse(config, "use_sliding_window", (False, None), "LitGPT's Qwen2 attends to the whole context")
        c["attn_bias"] = True
    elif mt == "mistral":
        if config.get("sliding_window") is not None:
            c["sliding_window_size"] = int(config["sliding_window"])
    else:
        qkv_bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
        if qkv_bias != mlp_bias:
            raise MappingError(
                f"config.json: attention_bias={qkv_bias} with mlp_bias={mlp_bias} cannot be represented: LitGPT's "
                "`bias` puts biases on every linear layer"
            )
        c["bias"] = qkv_bias
    rope = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    s = {**legacy, **rope}
    c["rope_base"] = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if kind == "llama3":
        c["rope_adjustments"] = {
            "factor": float(s["factor"]),
            "low_freq_factor": float(s["low_freq_factor"]),
            "high_freq_factor": float(s["high_freq_factor"]),
            "original_max_seq_len": int(s["original_max_position_embeddings"]),
        }
    elif kind == "linear":
        c["rope_condense_ratio"] = float(s["factor"])
    elif kind != "default":
        raise MappingError(f"config.json: rope_type={kind!r} cannot be represented: LitGPT's RoPE is plain, linear "
                           "(rope_condense_ratio) or Llama 3.1 (rope_adjustments)")  # fmt: skip
    return c


def _yaml(d: Mapping[str, Any]) -> str:
    """A YAML mapping in the given key order (PyYAML's safe dumper: floats such as 1e-05 stay floats)."""
    import yaml

    return yaml.safe_dump(dict(d), sort_keys=False)


class LitGPTImport(ImportFormat):
    adapter = "litgpt"
    model_types = ("llama", "qwen2", "mistral")
    fields = ("padded_vocab_size", "name")

    def args_from_hf(
        self, config: Mapping[str, Any], hf: Mapping[str, LazyTensor], user: Mapping[str, Any], tp: int, pp: int
    ) -> dict[str, Any]:
        from hubconv.adapters import registry

        if tp != 1 or pp != 1:
            raise ModelArgsError("--tp/--pp: LitGPT checkpoints are one lit_model.pth (no tensor/pipeline split)")
        c = litgpt_config(config, user)
        emb = hf.get("model.embed_tokens.weight")
        if emb is None:
            raise MappingError("HF model: model.embed_tokens.weight is missing")
        tied = bool(config.get("tie_word_embeddings", False))
        adapter, _ = registry.get("litgpt")
        with tempfile.TemporaryDirectory(prefix="hubconv-litgpt-") as d:  # the adapter resolves from the yaml file
            with open(os.path.join(d, CONFIG_FILE), "w") as f:
                f.write(_yaml(c))
            qkv = (c["n_head"] + 2 * c["n_query_groups"]) * c["head_size"]
            shapes = {
                "transformer.wte.weight": (c["padded_vocab_size"], c["n_embd"]),
                "transformer.h.0.attn.qkv.weight": (qkv, c["n_embd"]),
                "transformer.h.0.mlp.fc_1.weight": (c["intermediate_size"], c["n_embd"]),
                **({} if tied else {"lm_head.weight": (c["padded_vocab_size"], c["n_embd"])}),
            }
            tensors = {k: V.Zeros(k, emb.dtype, s) for k, s in shapes.items()}
            ckpt = Checkpoint(path=os.path.join(d, MODEL_FILE), format="torch", tensors={})
            user_args = {"tie_word_embeddings": tied, "qkv_layout": "current"}
            user_args |= {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
            a = adapter.resolve_args(ckpt, tensors, user_args)
        a["litgpt_config"] = c
        return a

    def defaults_from_record(self, native: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: native[k] for k in ("padded_vocab_size", "name") if native.get(k)}
        return out

    def lossy_inverse(self, record: Mapped, hf: Mapping[str, LazyTensor], args: Mapping[str, Any]) -> list[LazyTensor]:
        if record.sources in (["transformer.wte.weight"], ["lm_head.weight"]):
            return [pad_rows(hf[record.targets[0]], args["padded_vocab_size"], record.sources[0])]
        return super().lossy_inverse(record, hf, args)

    def write(self, staging: str, model: NativeModel, hf_dir: str, progress: Progress) -> list[str]:
        from hubconv.io.torch_zip_writer import TensorRef, write_torch_file

        refs = {t.name: TensorRef(t, model.dtype) for t in model.tensors}
        if model.args["tie_word_embeddings"]:
            refs["lm_head.weight"] = refs["transformer.wte.weight"]  # one storage, as a tied state dict saves it
        write_torch_file(os.path.join(staging, MODEL_FILE), refs, progress=progress)
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            f.write(_yaml(model.args["litgpt_config"]))
        files = [MODEL_FILE, CONFIG_FILE, *copy_tokenizer(hf_dir, staging)]
        if os.path.isfile(os.path.join(hf_dir, "generation_config.json")):
            shutil.copyfile(
                os.path.join(hf_dir, "generation_config.json"), os.path.join(staging, "generation_config.json")
            )
            files.append("generation_config.json")
        return files

    def reopen_path(self, staging: str) -> str:
        return staging

    def reopen_args(self, model: NativeModel, config: Mapping[str, Any]) -> dict[str, Any]:
        return {}


register_format(LitGPTImport())
