"""Megatron-LM `args` and NeMo model configs -> one canonical set of GPT hyperparameters.

Megatron-LM saves its `argparse.Namespace` in every rank file (and in `common.pt` for `torch_dist`);
NeMo saves its model config as `model_config.yaml` in a `.nemo` archive and as a pickled OmegaConf
`DictConfig` in `hyper_parameters.cfg` of a Lightning `.ckpt` (read as plain data). Both vocabularies
are mapped here onto Megatron's own argument names (the canonical fields below), with Megatron's and
NeMo's defaults for fields a config leaves out. `--model-args` uses the canonical names too and
overrides (or supplies) any of them.

Activation: an exact (erf) GELU unless bias-GELU fusion was on (Megatron `bias_gelu_fusion`, on by
default; NeMo `bias_activation_fusion`, on by default) with biases, or `openai_gelu`: those compute the
tanh approximation (`bias_gelu_impl`), which the converted model must use too.

Features with no transformers counterpart hubconv maps are refused by name (see `REFUSED`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hubconv.adapters.naming import did_you_mean
from hubconv.errors import ModelArgsError

ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "max_position_embeddings",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "rotary_interleaved",
    "rotary_seq_len_interpolation_factor",
    "use_rope_scaling",
    "rope_scaling_factor",
    "normalization",
    "norm_epsilon",
    "activation",
    "add_bias_linear",
    "add_qkv_bias",
    "tie_word_embeddings",
    "make_vocab_size_divisible_by",
    "checkpoint_version",
    "tensor_model_parallel_size",
    # features that are refused when on
    "apply_layernorm_1p",
    "qk_layernorm",
    "num_experts",
    "post_layernorm",
    "attention_scale",
)
OPTION_FIELDS = ("vocab_size", "tokenizer_model", "keep_padded_vocab", "bos_token_id", "eos_token_id")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")
REFUSED = {
    "apply_layernorm_1p": "LayerNorm with a 1 + weight parameterization (apply_layernorm_1p / layernorm1p)",
    "qk_layernorm": "query/key layer norms (qk_layernorm)",
    "num_experts": "mixture-of-experts layers (num_experts)",
    "post_layernorm": "post-LayerNorm residuals (apply_residual_connection_post_layernorm / post_ln blocks)",
    "rotary_interleaved": "interleaved rotary embeddings (rotary_interleaved)",
    "attention_scale": "attention without 1/sqrt(head size) scaling (normalize_attention_scores: false)",
}


def _get(d: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def from_megatron(a: Mapping[str, Any]) -> dict[str, Any]:
    """Megatron-LM's saved `args` (as a dict) in canonical fields; None where the args do not say."""
    heads = a.get("num_attention_heads")
    swiglu = bool(a.get("swiglu"))
    bias = bool(_get(a, "add_bias_linear", default=True))
    if swiglu:
        activation = "swiglu"
    elif a.get("squared_relu"):
        activation = "squared_relu"
    elif a.get("openai_gelu") or (_get(a, "bias_gelu_fusion", default=True) and bias):
        activation = "gelu_tanh"
    else:
        activation = "gelu"
    pos = a.get("position_embedding_type")
    if not isinstance(pos, str):  # absent, or an enum of an older Megatron (read inertly): decided below
        pos = None
    if pos is None and a.get("use_rotary_position_embeddings"):
        pos = "rope"
    out = {
        "num_layers": a.get("num_layers"),
        "hidden_size": a.get("hidden_size"),
        "ffn_hidden_size": a.get("ffn_hidden_size"),
        "num_attention_heads": heads,
        "num_query_groups": a.get("num_query_groups") if a.get("group_query_attention") else heads,
        "kv_channels": a.get("kv_channels"),
        "max_position_embeddings": _get(a, "max_position_embeddings", "seq_length"),
        "position_embedding_type": pos,  # None: learned_absolute when the checkpoint has position embeddings
        "rotary_base": _get(a, "rotary_base", default=10000),
        "rotary_percent": _get(a, "rotary_percent", default=1.0),
        "rotary_interleaved": bool(a.get("rotary_interleaved")),
        "rotary_seq_len_interpolation_factor": a.get("rotary_seq_len_interpolation_factor"),
        "use_rope_scaling": bool(a.get("use_rope_scaling")),
        "rope_scaling_factor": _get(a, "rope_scaling_factor", default=8.0),
        "normalization": _get(a, "normalization", default="LayerNorm"),
        "norm_epsilon": _get(a, "norm_epsilon", "layernorm_epsilon", default=1e-5),
        "activation": activation,
        "add_bias_linear": bias,
        "add_qkv_bias": bool(a.get("add_qkv_bias")) or bias,
        "tie_word_embeddings": not a.get("untie_embeddings_and_output_weights", False),
        "make_vocab_size_divisible_by": _get(a, "make_vocab_size_divisible_by", default=128),
        "tensor_model_parallel_size": _get(a, "tensor_model_parallel_size", default=1),
        "apply_layernorm_1p": bool(a.get("apply_layernorm_1p")),
        "qk_layernorm": bool(a.get("qk_layernorm")),
        "num_experts": a.get("num_experts") or None,
        "post_layernorm": bool(a.get("apply_residual_connection_post_layernorm")),
        "attention_scale": False,
        # what the tokenizer was, for the vocabulary size
        "padded_vocab_size": a.get("padded_vocab_size"),
        "saved_vocab_size": a.get("vocab_size"),
        "tokenizer_type": a.get("tokenizer_type"),
    }
    return out


def from_nemo(c: Mapping[str, Any]) -> dict[str, Any]:
    """A NeMo GPT model config (model_config.yaml / hyper_parameters.cfg) in canonical fields."""
    heads = c.get("num_attention_heads")
    bias = bool(_get(c, "bias", default=True))
    act = str(_get(c, "activation", default="gelu")).lower()
    if act in ("swiglu", "fast-swiglu"):
        activation = "swiglu"
    elif act == "gelu":
        fused = _get(c, "bias_activation_fusion", default=True)
        activation = "gelu_tanh" if c.get("openai_gelu") or (fused and bias) else "gelu"
    else:
        activation = act  # geglu, reglu, squared-relu, ...: refused below
    norm = str(_get(c, "normalization", default="layernorm")).lower()
    block = str(_get(c, "transformer_block_type", default="pre_ln")).lower()
    tok = c.get("tokenizer") if isinstance(c.get("tokenizer"), Mapping) else {}
    experts = c.get("num_moe_experts")
    return {
        "num_layers": c.get("num_layers"),
        "hidden_size": c.get("hidden_size"),
        "ffn_hidden_size": c.get("ffn_hidden_size"),
        "num_attention_heads": heads,
        "num_query_groups": _get(c, "num_query_groups", default=heads),
        "kv_channels": c.get("kv_channels"),
        "max_position_embeddings": _get(c, "max_position_embeddings", "encoder_seq_length"),
        "position_embedding_type": _get(c, "position_embedding_type", default="learned_absolute"),
        "rotary_base": _get(c, "rotary_base", default=10000),
        "rotary_percent": _get(c, "rotary_percentage", default=1.0),
        "rotary_interleaved": bool(c.get("rotary_interleaved")),
        "rotary_seq_len_interpolation_factor": c.get("seq_len_interpolation_factor"),
        "use_rope_scaling": bool(c.get("scale_positional_embedding")),
        "rope_scaling_factor": _get(c, "scale_factor", default=8.0),
        "normalization": {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm", "low_precision_layernorm": "LayerNorm"}.get(
            norm, norm
        ),
        "norm_epsilon": _get(c, "layernorm_epsilon", default=1e-5),
        "activation": activation,
        "add_bias_linear": bias,
        "add_qkv_bias": bool(c.get("qkv_bias")) or bias,
        "tie_word_embeddings": bool(_get(c, "share_embeddings_and_output_weights", default=True)),
        "make_vocab_size_divisible_by": _get(c, "make_vocab_size_divisible_by", default=128),
        "tensor_model_parallel_size": _get(c, "tensor_model_parallel_size", default=1),
        "apply_layernorm_1p": norm == "layernorm1p",
        "qk_layernorm": bool(c.get("qk_layernorm")),
        "num_experts": experts if isinstance(experts, int) and experts > 1 else None,
        "post_layernorm": block != "pre_ln",
        "attention_scale": not _get(c, "normalize_attention_scores", default=True),
        "checkpoint_version": 3.0,  # NeMo saves fused QKV in Megatron's current order
        "padded_vocab_size": None,
        "saved_vocab_size": None,
        "tokenizer_type": _get(tok, "type", "library"),
        "tokenizer_library": tok.get("library"),
        "tokenizer_member": tok.get("model"),
    }


def check_user_fields(user: Mapping[str, Any]) -> None:
    """--model-args may name only canonical fields and options."""
    known = ARCH_FIELDS + OPTION_FIELDS
    for k in user:
        if k not in known:
            hint = did_you_mean(k, known)
            raise ModelArgsError(f"--model-args: unknown field {k!r}{hint}; known: {', '.join(known)}")


def refuse_unsupported(a: Mapping[str, Any], where: str) -> None:
    """One-line errors for features no mapped transformers architecture has."""
    for field_name, what in REFUSED.items():
        if a.get(field_name):
            raise ModelArgsError(f"{where}: {what} is not supported: no transformers architecture hubconv maps has it")
    if a.get("activation") not in ACTIVATIONS:
        raise ModelArgsError(
            f"{where}: activation {a.get('activation')!r} is not supported (supported: GELU, tanh-GELU, SwiGLU)"
        )
    if a.get("position_embedding_type") not in ("learned_absolute", "rope", None):
        raise ModelArgsError(
            f"{where}: position_embedding_type {a.get('position_embedding_type')!r} is not supported "
            "(supported: learned_absolute, rope)"
        )
    if a.get("normalization") not in ("LayerNorm", "RMSNorm"):
        raise ModelArgsError(f"{where}: normalization {a.get('normalization')!r} is not supported (LayerNorm, RMSNorm)")


def choose_target(a: Mapping[str, Any], where: str) -> str:
    """gpt2 (learned positions, LayerNorm, GELU, multi-head), llama (rope, RMSNorm, SwiGLU; biases on all linear
    layers or none) or qwen2 (the same with biases on q/k/v only); anything else is refused with the reason."""
    pos, norm, act = a["position_embedding_type"], a["normalization"], a["activation"]
    if pos == "learned_absolute" and norm == "LayerNorm" and act in ("gelu", "gelu_tanh"):
        if a["num_query_groups"] != a["num_attention_heads"]:
            raise ModelArgsError(f"{where}: GPT-2 has no grouped-query attention ({a['num_query_groups']} groups)")
        if a["kv_channels"] * a["num_attention_heads"] != a["hidden_size"]:
            raise ModelArgsError(
                f"{where}: GPT-2 needs kv_channels x heads = hidden_size "
                f"({a['kv_channels']} x {a['num_attention_heads']} != {a['hidden_size']})"
            )
        return "gpt2"
    if pos == "rope" and norm == "RMSNorm" and act == "swiglu":
        if float(a["rotary_percent"]) != 1.0:
            raise ModelArgsError(f"{where}: partial rotary embeddings (rotary_percent {a['rotary_percent']}) in Llama")
        if a["add_qkv_bias"] and not a["add_bias_linear"]:
            return "qwen2"
        if a["add_qkv_bias"] != a["add_bias_linear"]:
            raise ModelArgsError(f"{where}: biases on the output/MLP projections but not on q/k/v have no target")
        return "llama"
    raise ModelArgsError(
        f"{where}: {pos} positions with {norm} and {act} have no transformers target hubconv maps "
        "(learned_absolute + LayerNorm + GELU -> GPT-2; rope + RMSNorm + SwiGLU -> Llama or Qwen2)"
    )


def rope_parameters(a: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' `rope_parameters` for Megatron's rotary settings."""
    theta = float(a["rotary_base"])
    if a.get("use_rope_scaling"):  # megatron-core / NeMo Llama 3.1 scaling (RotaryEmbedding._apply_scaling)
        return {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": float(a["rope_scaling_factor"]),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    factor = a.get("rotary_seq_len_interpolation_factor")
    if factor not in (None, 1, 1.0):  # positions divided by the factor = linear scaling
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(factor)}
    return {"rope_type": "default", "rope_theta": theta}
