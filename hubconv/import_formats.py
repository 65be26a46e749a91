"""Per-framework halves of `hubconv import`: native hyperparameters from an HF `config.json`, the lossy inverses
(re-padded vocabularies), and the native files each framework loads.

An `ImportFormat` belongs to one adapter. `args_from_hf` turns the HF config into the adapter's *resolved* native
arguments (what `RuleAdapter.resolve_args` returns) and refuses HF features the native architecture lacks, naming
the config field; an adapter may instead implement `native_args_from_hf(config, tensors, user)` itself (the
importer asks the adapter first). The inverse mapping is the adapter's rule table run backwards
(`RuleAdapter.from_hf`); `lossy_inverse` supplies the few native tensors whose forward rule was lossy (vocabulary
rows trimmed by the conversion come back as zero rows). `write` lays out the framework's files in the staging
folder; `reopen_args` is what the adapter's own `convert` path needs to read the result back for verification.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hubconv import views as V
from hubconv.adapters.rules import Mapped
from hubconv.dtypes import BY_NAME, DType
from hubconv.errors import MappingError, ModelArgsError
from hubconv.io.tensor import LazyTensor, row_blocks

Progress = Callable[[int], None]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


@dataclass
class NativeModel:
    """What the importer hands a format's `write`: native tensors in order plus everything it reports."""

    tensors: list[LazyTensor]
    args: dict[str, Any]
    lossy: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    dtype: DType | None = None  # --dtype: cast on the way out (None keeps the HF dtype)


def _need(config: Mapping[str, Any], key: str, where: str = "config.json") -> Any:
    if config.get(key) is None:
        raise ModelArgsError(f"{where}: {key} is missing")
    return config[key]


def _refuse(config: Mapping[str, Any], key: str, allowed: tuple[Any, ...], why: str) -> None:
    value = config.get(key)
    if value not in allowed:
        raise MappingError(f"config.json: {key}={value!r} cannot be represented: {why}")


def all_zero(t: LazyTensor) -> bool:
    """Every element of `t` is (+/-) zero (bytes compared block by block)."""
    for lo, hi in row_blocks(t.shape, t.dtype.itemsize):
        raw = np.ascontiguousarray(t.read_rows(lo, hi))
        if t.dtype.is_float:
            bits = raw.view(np.uint8).reshape(-1, t.dtype.itemsize).copy()
            bits[:, -1] &= 0x7F  # little-endian: the sign bit is in the last byte
            if bits.any():
                return False
        elif raw.any():
            return False
    return True


def pad_rows(t: LazyTensor, rows: int, name: str) -> LazyTensor:
    """`t` with zero rows appended up to `rows` (a re-padded vocabulary)."""
    extra = rows - t.shape[0]
    if extra < 0:
        raise ModelArgsError(f"{name}: {t.shape[0]} rows do not fit a padded size of {rows}")
    if extra == 0:
        return V.rename(t, name)
    return V.concat_rows([t, V.Zeros(f"{name} (padding)", t.dtype, (extra, *t.shape[1:]))], name)


def copy_tokenizer(hf_dir: str, folder: str) -> list[str]:
    """The HF tokenizer files of `hf_dir`, copied into `folder` (created when there is one)."""
    import shutil

    found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, f))]
    if found:
        os.makedirs(folder, exist_ok=True)
        for f in found:
            shutil.copyfile(os.path.join(hf_dir, f), os.path.join(folder, f))
    return found


class ImportFormat:
    """Base class: one adapter's import side."""

    adapter: str = ""
    model_types: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()  # the --model-args fields this format accepts

    def check_user(self, user: Mapping[str, Any]) -> None:
        unknown = sorted(set(user) - set(self.fields))
        if unknown:
            raise ModelArgsError(
                f"--model-args: unknown field(s) {', '.join(unknown)} for import into {self.adapter} "
                f"(known: {', '.join(self.fields)})"
            )

    def args_from_hf(
        self, config: Mapping[str, Any], hf: Mapping[str, LazyTensor], user: Mapping[str, Any], tp: int, pp: int
    ) -> dict[str, Any]:
        raise NotImplementedError

    def defaults_from_record(self, native: Mapping[str, Any]) -> dict[str, Any]:
        """--model-args defaults from the `native_args` of a `hubconv.json` that `hubconv convert` wrote from this
        framework (so the model goes back to the layout it came from); explicit --model-args win."""
        return {}

    def lossy_inverse(self, record: Mapped, hf: Mapping[str, LazyTensor], args: Mapping[str, Any]) -> list[LazyTensor]:
        """Native tensors for a rule whose forward step was lossy; refuse when there is no sensible inverse."""
        raise MappingError(f"{record.rule.describe()} is lossy ({'; '.join(record.lossy)}): no inverse for import")

    def finish(self, tensors: list[LazyTensor], args: Mapping[str, Any]) -> list[LazyTensor]:
        """Reorder or complete the native tensors before writing (default: as they are)."""
        return tensors

    def write(self, staging: str, model: NativeModel, hf_dir: str, progress: Progress) -> list[str]:
        raise NotImplementedError

    def reopen_path(self, staging: str) -> str:
        return staging

    def reopen_args(self, model: NativeModel, config: Mapping[str, Any]) -> dict[str, Any]:
        """--model-args the adapter's convert path needs to read the written checkpoint back."""
        return {}


# ----------------------------------------------------------------------------------------------- TorchTitan


def _rope_scaling(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, TorchTitan rope_scaling_args) from transformers 5 `rope_parameters` or the older fields."""
    rope = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ModelArgsError("config.json: rope_parameters.rope_theta is missing")
    kind = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise MappingError(
            f"config.json: rope_type={kind!r} cannot be represented: TorchTitan's Llama 3 RoPE is unscaled or "
            "Llama-3.1-scaled (rope_type llama3)"
        )
    s = {**legacy, **rope}
    return float(theta), {
        "scaling_factor": float(_need(s, "factor", "config.json rope_parameters")),
        "low_freq_factor": float(_need(s, "low_freq_factor", "config.json rope_parameters")),
        "high_freq_factor": float(_need(s, "high_freq_factor", "config.json rope_parameters")),
        "original_max_position_embeddings": int(
            _need(s, "original_max_position_embeddings", "config.json rope_parameters")
        ),
    }


def llama_common(config: Mapping[str, Any], native: str) -> dict[str, Any]:
    """Llama hyperparameters every Llama-shaped native format shares; HF features it lacks are refused."""
    _refuse(config, "model_type", ("llama",), f"{native} imports LlamaForCausalLM models")
    _refuse(config, "hidden_act", ("silu",), f"{native}'s Llama MLP is SwiGLU (silu)")
    _refuse(config, "attention_bias", (False, None), f"{native}'s Llama attention has no biases")
    _refuse(config, "mlp_bias", (False, None), f"{native}'s Llama MLP has no biases")
    heads = int(_need(config, "num_attention_heads"))
    dim = int(_need(config, "hidden_size"))
    theta, scaling = _rope_scaling(config)
    return {
        "dim": dim,
        "n_layers": int(_need(config, "num_hidden_layers")),
        "n_heads": heads,
        "n_kv_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or dim // heads),
        "vocab_size": int(_need(config, "vocab_size")),
        "ffn_hidden_dim": int(_need(config, "intermediate_size")),
        "norm_eps": float(config.get("rms_norm_eps", 1e-5)),
        "rope_theta": theta,
        "rope_scaling_args": scaling,
        "max_seq_len": int(config.get("max_position_embeddings") or 2048),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
    }


class TorchTitanImport(ImportFormat):
    """Llama -> TorchTitan DCP (model only), 0.3 key names by default (`key_style: legacy` for the older ones)."""

    adapter = "torchtitan"
    model_types = ("llama",)
    fields = ("key_style",)

    def args_from_hf(
        self, config: Mapping[str, Any], hf: Mapping[str, LazyTensor], user: Mapping[str, Any], tp: int, pp: int
    ) -> dict[str, Any]:
        if tp != 1 or pp != 1:
            raise ModelArgsError("--tp/--pp: TorchTitan DCP checkpoints are not split by rank (resharding is DCP's)")
        style = user.get("key_style", "qkv_linear")
        if style not in ("qkv_linear", "legacy"):
            raise ModelArgsError(f"--model-args key_style={style!r}: expected qkv_linear (TorchTitan 0.3) or legacy")
        a = llama_common(config, "TorchTitan")
        a["key_style"] = style
        a["head_key"] = "lm_head" if style == "qkv_linear" else "output"
        return a

    def defaults_from_record(self, native: Mapping[str, Any]) -> dict[str, Any]:
        style = native.get("key_style")
        return {"key_style": style} if style in ("qkv_linear", "legacy") else {}

    def finish(self, tensors: list[LazyTensor], args: Mapping[str, Any]) -> list[LazyTensor]:
        """A tied model's state dict holds the head under its own key too (same data): write it, so that
        `dcp.load` into the model's state dict finds every key."""
        if args["tie_word_embeddings"]:
            emb = next(t for t in tensors if t.name == "tok_embeddings.weight")
            tensors = [*tensors, V.rename(emb, f"{args['head_key']}.weight")]
        return tensors

    def write(self, staging: str, model: NativeModel, hf_dir: str, progress: Progress) -> list[str]:
        from hubconv.io.dcp_writer import write_dcp
        from hubconv.io.torch_zip_writer import TensorRef

        folder = os.path.join(staging, "checkpoint")
        os.makedirs(folder)
        write_dcp(folder, [TensorRef(t, model.dtype) for t in model.tensors], progress=progress)
        args_file = os.path.join(staging, "model_args.yaml")
        with open(args_file, "w") as f:
            f.write(_yaml(torchtitan_model_args(model.args)))
        with open(os.path.join(staging, "torchtitan.toml"), "w") as f:
            f.write(torchtitan_toml(model.args))
        files = ["checkpoint/.metadata", "checkpoint/__0_0.distcp", "model_args.yaml", "torchtitan.toml"]
        files += [f"tokenizer/{f}" for f in copy_tokenizer(hf_dir, os.path.join(staging, "tokenizer"))]
        return files

    def reopen_path(self, staging: str) -> str:
        return os.path.join(staging, "checkpoint")

    def reopen_args(self, model: NativeModel, config: Mapping[str, Any]) -> dict[str, Any]:
        return torchtitan_model_args(model.args)


def torchtitan_model_args(a: Mapping[str, Any]) -> dict[str, Any]:
    """TorchTitan 0.2 `TransformerModelArgs` fields plus the FFN width (hubconv's --model-args spelling)."""
    out = {
        k: a[k]
        for k in (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "vocab_size",
            "ffn_hidden_dim",
            "norm_eps",
            "rope_theta",
            "rope_scaling_args",
            "max_seq_len",
        )
    }
    out["tie_word_embeddings"] = a["tie_word_embeddings"]
    for k in ("bos_token_id", "eos_token_id"):
        if a.get(k) is not None:
            out[k] = a[k]
    return out


def torchtitan_toml(a: Mapping[str, Any]) -> str:
    """A job-TOML snippet (TorchTitan 0.2) and the 0.3 config call, as comments where they are code."""
    s = a.get("rope_scaling_args")
    scaling = (
        f'scaling="llama", scaling_factor={s["scaling_factor"]}, low_freq_factor={s["low_freq_factor"]}, '
        f"high_freq_factor={s['high_freq_factor']}, original_max_position_embeddings="
        f"{s['original_max_position_embeddings']}"
        if s
        else 'scaling="none"'
    )
    return (
        "# Written by `hubconv import`: load this model-only DCP checkpoint as TorchTitan's initial weights.\n"
        "# TorchTitan 0.3 model config (Python):\n"
        f"#   Llama3Model.Config(dim={a['dim']}, vocab_size={a['vocab_size']}, n_layers={a['n_layers']},\n"
        f"#     n_heads={a['n_heads']}, n_kv_heads={a['n_kv_heads']}, head_dim={a['head_dim']}, "
        f"hidden_dim={a['ffn_hidden_dim']}, norm_eps={a['norm_eps']},\n"
        f"#     rope=ComplexRoPE.Config(dim={a['head_dim']}, max_seq_len={a['max_seq_len']}, theta={a['rope_theta']}, "
        f"{scaling}),\n"
        f"#     enable_weight_tying={a['tie_word_embeddings']})\n"
        f"# Key names: {'0.3 (attention.qkv_linear.wq, lm_head)' if a['key_style'] == 'qkv_linear' else 'legacy (attention.wq, output)'}\n"  # noqa: E501
        "# TorchTitan 0.2 TransformerModelArgs: see model_args.yaml (ffn_hidden_dim is the FFN width).\n\n"
        "[model]\n"
        'name = "llama3"\n'
        'hf_assets_path = "./tokenizer"\n\n'
        "[checkpoint]\n"
        "enable = true\n"
        'initial_load_path = "./checkpoint"\n'
        "initial_load_model_only = true\n"
        "initial_load_in_hf = false\n"
    )


def _yaml(d: Mapping[str, Any]) -> str:
    """A YAML mapping in the given key order (PyYAML's safe dumper: floats such as 1e-05 stay floats)."""
    import yaml

    return yaml.safe_dump(dict(d), sort_keys=False)


# ---------------------------------------------------------------------------------------------------- nanoGPT

GPT2_BPE_VOCAB = 50257


class NanoGPTImport(ImportFormat):
    """GPT-2 -> nanoGPT `ckpt.pt` ({model, model_args, iter_num, best_val_loss, config}), loadable by its
    `sample.py` / `train.py` (`init_from='resume'`) and by `torch.load(weights_only=True)`."""

    adapter = "nanogpt"
    model_types = ("gpt2",)
    fields = ("vocab_size", "bias", "dropout")

    def args_from_hf(
        self, config: Mapping[str, Any], hf: Mapping[str, LazyTensor], user: Mapping[str, Any], tp: int, pp: int
    ) -> dict[str, Any]:
        if tp != 1 or pp != 1:
            raise ModelArgsError("--tp/--pp: nanoGPT checkpoints are single files (no tensor/pipeline split)")
        why = "nanoGPT's GPT"
        _refuse(config, "model_type", ("gpt2",), f"{why} imports GPT2LMHeadModel models")
        _refuse(config, "activation_function", ("gelu",), f"{why} MLP uses exact (erf) GELU")
        _refuse(config, "n_inner", (None, 4 * int(_need(config, "n_embd"))), f"{why} MLP is 4 * n_embd wide")
        _refuse(config, "layer_norm_epsilon", (1e-5,), f"{why} LayerNorm eps is 1e-5")
        _refuse(config, "scale_attn_by_inverse_layer_idx", (False, None), f"{why} attention has no per-layer scale")
        _refuse(config, "reorder_and_upcast_attn", (False, None), f"{why} attention is not reordered")
        _refuse(config, "scale_attn_weights", (True, None), f"{why} attention is scaled by 1/sqrt(head size)")
        _refuse(config, "tie_word_embeddings", (True, None), f"{why} ties lm_head to wte")
        vocab = int(_need(config, "vocab_size"))
        # nanoGPT's train.py pads GPT-2's 50257 tokens to 50304 (a multiple of 64); other vocabularies as they are.
        padded = int(user.get("vocab_size") or (50304 if vocab == GPT2_BPE_VOCAB else vocab))
        if padded < vocab:
            raise ModelArgsError(f"--model-args vocab_size={padded} is smaller than the HF vocabulary ({vocab})")
        biases = [t for k, t in hf.items() if k.endswith(".bias") and not k.endswith(("attn.bias", "masked_bias"))]
        bias = user.get("bias")
        if bias is None:  # a bias=False nanoGPT model converts to all-zero biases: import it back without them
            bias = not all(all_zero(t) for t in biases)
        elif not bias and not all(all_zero(t) for t in biases):
            raise ModelArgsError("--model-args bias=false, but the HF model has non-zero biases")
        wte = hf.get("transformer.wte.weight")
        if wte is None:
            raise MappingError("HF model: transformer.wte.weight is missing")
        return {
            "n_layer": int(_need(config, "n_layer")),
            "n_head": int(_need(config, "n_head")),
            "n_embd": int(_need(config, "n_embd")),
            "block_size": int(_need(config, "n_positions")),
            "bias": bool(bias),
            "vocab_size": padded,
            "dropout": float(user.get("dropout", 0.0)),
            "dtype": wte.dtype.name,
            "tie_word_embeddings": True,
            "hf_vocab_size": vocab,
            "keep_padded_vocab": False,
            "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": config.get("eos_token_id"),
        }

    def defaults_from_record(self, native: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: native[k] for k in ("vocab_size", "bias") if k in native}
        if isinstance(native.get("dropout"), int | float):
            out["dropout"] = float(native["dropout"])
        return out

    def lossy_inverse(self, record: Mapped, hf: Mapping[str, LazyTensor], args: Mapping[str, Any]) -> list[LazyTensor]:
        (name,) = record.targets
        if not record.sources:  # a synthesized zero bias of a bias=False model: nanoGPT has no tensor for it
            return []
        if record.sources == ["transformer.wte.weight"]:
            return [pad_rows(hf[name], args["vocab_size"], "transformer.wte.weight")]
        return super().lossy_inverse(record, hf, args)

    def write(self, staging: str, model: NativeModel, hf_dir: str, progress: Progress) -> list[str]:
        from hubconv.io.torch_zip_writer import TensorRef, write_torch_file

        a = model.args
        refs = {t.name: TensorRef(t, model.dtype) for t in model.tensors}
        order = ["transformer.wte.weight", "transformer.wpe.weight"]
        order += [k for k in refs if k.startswith("transformer.h.")] + [
            k for k in refs if k.startswith("transformer.ln_f")
        ]
        state = {k: refs[k] for k in order}
        state["lm_head.weight"] = refs["transformer.wte.weight"]  # tied: the same storage, as nanoGPT saves it
        model_args = {k: a[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")}
        config = {
            **model_args,
            "init_from": "hubconv import",
            "dtype": _torch_dtype_name(model.dtype or BY_NAME[a["dtype"]]),
        }
        obj = {"model": state, "model_args": model_args, "iter_num": 0, "best_val_loss": 1e9, "config": config}
        write_torch_file(os.path.join(staging, "ckpt.pt"), obj, archive="ckpt", progress=progress)
        return ["ckpt.pt"]

    def reopen_path(self, staging: str) -> str:
        return os.path.join(staging, "ckpt.pt")

    def reopen_args(self, model: NativeModel, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"tokenizer_vocab_size": model.args["hf_vocab_size"], "meta_pkl": False}


def _torch_dtype_name(d: DType) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(d.name, d.torch_name)


FORMATS: dict[str, ImportFormat] = {f.adapter: f for f in (TorchTitanImport(), NanoGPTImport())}


def register_format(fmt: ImportFormat) -> None:
    """Add an adapter's import side (Megatron, LitGPT, MindFormers modules call this)."""
    FORMATS[fmt.adapter] = fmt


def megatron_args_namespace(values: Mapping[str, Any]) -> argparse.Namespace:
    """Megatron's saved `args` (loads with `torch.serialization.add_safe_globals([argparse.Namespace])`)."""
    return argparse.Namespace(**values)
