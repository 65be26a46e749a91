"""TorchTitan Llama 3 model flavors, as plain data (this module must not import torch).

Source (read through the public-code index, repository ``pytorch/torchtitan``):

* ``torchtitan/models/llama3/model/args.py`` at commit
  ``08039091eef2abb1219fdd3105aad87b33bda545`` -- the ``TransformerModelArgs`` and
  ``RoPEScalingArgs`` dataclasses, which give :data:`LLAMA3_DEFAULTS`.
* ``torchtitan/models/llama3/__init__.py`` -- the ``llama3_args`` / ``llama3_configs``
  table. The ``TransformerModelArgs``-era table (the one that goes with the args.py
  above) and the later ``Llama3Model.Config`` table at commit
  ``00f555e1114a8286eb1d4e379cae67d56156b61d`` name the same flavors with the same
  numbers: debugmodel, debugmodel_flex_attn, debugmodel_varlen_attn, 8B, 8B_flex,
  8B_varlen, 70B, 405B.
* ``torchtitan/models/llama3/flavors.py`` at commit
  ``10503c1c3c113e0715f203b11a505e0b817289c3`` (newest layout, where the table moved
  out of ``__init__.py``) adds 1B, 3B and debugmodel_mxfp8. Those three are listed in
  :data:`LLAMA3_NEWER_FLAVORS` and also merged into :data:`LLAMA3_FLAVORS`.

Each flavor holds only the arguments the TorchTitan table sets explicitly, under
TorchTitan's own names. Use :func:`resolve_llama3_flavor` to get every field, with
:data:`LLAMA3_DEFAULTS` filling the rest.

Things to keep in mind:

* Every Llama 3 flavor uses ``rope_theta=500000``. The RoPE scaling arguments are
  *not* set per flavor. ``TransformerModelArgs.rope_scaling_args`` defaults to
  ``RoPEScalingArgs()`` (factor 8, low 1, high 4, original 8192), and
  ``precompute_freqs_cis`` applies it whenever it is not ``None``. So TorchTitan
  runs llama3-style scaled RoPE for *every* flavor, debugmodel included. The
  Config-era tables spell the same thing as ``scaling="llama"`` with the same
  default numbers. Older TorchTitan (mid-2025 args.py, for example commit
  ``183f6fce1a586ce66027deee2c4fdb823616cd75``, ``max_seq_len=2048``,
  ``vocab_size=-1``) had no RoPE scaling at all. Checkpoints from those versions
  need ``rope_type="default"`` on the HF side.
* 1B and 3B keep the default scaling factor of 8, whereas Meta's Llama-3.2 1B/3B
  HF configs use ``factor=32``.
* TorchTitan 0.3 (branch ``release/0.3``, 0.3.0rc1, commit
  ``4f9e9a47d49dfbcac960857dd67748c67aecd2e5``) keeps the flavors debugmodel, 1B, 3B, 8B,
  70B and 405B in ``llama3/__init__.py`` (``llama3_configs``, same numbers, ``ComplexRoPE.Config(
  dim=dim // n_heads, max_seq_len=131072, theta=500000, scaling="llama")``) and selects a
  training job by ``--module llama3 --config llama3_debugmodel``: functions of
  ``llama3/config_registry.py``, listed in :data:`LLAMA3_CONFIG_REGISTRY` with the flavor each
  uses and its ``training.seq_len`` (to which the trainer resizes ``rope.max_seq_len``).
  Main after 0.3 spells that ``max_context_length``.
* ``ffn_hidden`` follows TorchTitan's ``FeedForward`` / ``compute_ffn_hidden_dim``:
  ``h = int(2 * 4 * dim / 3)``, then ``h = int(ffn_dim_multiplier * h)`` when a
  multiplier is set, then round ``h`` up to a multiple of ``multiple_of``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LLAMA3_CONFIG_REGISTRY",
    "LLAMA3_DEFAULTS",
    "LLAMA3_FLAVORS",
    "LLAMA3_NEWER_FLAVORS",
    "LLAMA3_ROPE_SCALING_DEFAULTS",
    "llama3_ffn_hidden_dim",
    "llama3_registry_name",
    "resolve_llama3_flavor",
]

#: Defaults of ``RoPEScalingArgs`` (TorchTitan names).
LLAMA3_ROPE_SCALING_DEFAULTS: dict[str, Any] = {
    "scaling_factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

#: Defaults of ``TransformerModelArgs`` (TorchTitan names), for fields a flavor leaves unset.
LLAMA3_DEFAULTS: dict[str, Any] = {
    "dim": 4096,
    "n_layers": 32,
    "n_heads": 32,
    "n_kv_heads": None,  # None means n_heads (plain MHA)
    "vocab_size": 128256,
    "multiple_of": 256,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "rope_theta": 10000,
    "rope_scaling_args": dict(LLAMA3_ROPE_SCALING_DEFAULTS),
    "max_seq_len": 131072,
    "depth_init": True,
    "attn_type": "sdpa",
    "attn_mask_type": "causal",
    "eos_id": 0,
    # Not a TransformerModelArgs field. It is the Config-era name
    # (Llama3Model.Config.enable_weight_tying), set only by the newer 1B/3B flavors.
    "enable_weight_tying": False,
}

LLAMA3_FLAVORS: dict[str, dict[str, Any]] = {
    "debugmodel": {
        "dim": 256,
        "n_layers": 6,
        "n_heads": 16,
        "vocab_size": 2048,
        "rope_theta": 500000,
    },
    "debugmodel_flex_attn": {
        "dim": 256,
        "n_layers": 6,
        "n_heads": 16,
        "vocab_size": 2048,
        "rope_theta": 500000,
        "attn_type": "flex",
        "attn_mask_type": "block_causal",
    },
    "debugmodel_varlen_attn": {
        "dim": 256,
        "n_layers": 6,
        "n_heads": 16,
        "vocab_size": 2048,
        "rope_theta": 500000,
        "attn_type": "varlen",
        "attn_mask_type": "block_causal",
    },
    "8B": {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "ffn_dim_multiplier": 1.3,
        "multiple_of": 1024,
        "rope_theta": 500000,
    },
    "8B_flex": {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "ffn_dim_multiplier": 1.3,
        "multiple_of": 1024,
        "rope_theta": 500000,
        "attn_type": "flex",
        "attn_mask_type": "block_causal",
    },
    "8B_varlen": {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "ffn_dim_multiplier": 1.3,
        "multiple_of": 1024,
        "rope_theta": 500000,
        "attn_type": "varlen",
        "attn_mask_type": "block_causal",
    },
    "70B": {
        "dim": 8192,
        "n_layers": 80,
        "n_heads": 64,
        "n_kv_heads": 8,
        "ffn_dim_multiplier": 1.3,
        "multiple_of": 4096,
        "rope_theta": 500000,
    },
    "405B": {
        "dim": 16384,
        "n_layers": 126,
        "n_heads": 128,
        "n_kv_heads": 8,
        "ffn_dim_multiplier": 1.2,
        "multiple_of": 4096,
        "rope_theta": 500000,
    },
}

#: Flavors that exist only in the newest layout (``torchtitan/models/llama3/flavors.py``).
LLAMA3_NEWER_FLAVORS: dict[str, dict[str, Any]] = {
    # Same as debugmodel but with 32-wide heads (MXFP8 scale tiles align with heads).
    "debugmodel_mxfp8": {
        "dim": 256,
        "n_layers": 6,
        "n_heads": 8,
        "vocab_size": 2048,
        "rope_theta": 500000,
    },
    "1B": {
        "dim": 2048,
        "n_layers": 16,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "ffn_dim_multiplier": 1.5,
        "multiple_of": 1024,
        "rope_theta": 500000,
        "enable_weight_tying": True,
    },
    "3B": {
        "dim": 3072,
        "n_layers": 28,
        "n_heads": 24,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "ffn_dim_multiplier": 1.0,
        "multiple_of": 1024,
        "rope_theta": 500000,
        "enable_weight_tying": True,
    },
}

LLAMA3_FLAVORS.update(LLAMA3_NEWER_FLAVORS)

#: TorchTitan 0.3 ``config_registry`` functions -> (model flavor, ``training.seq_len``).
LLAMA3_CONFIG_REGISTRY: dict[str, tuple[str, int]] = {
    **{
        f"llama3_debugmodel{variant}": ("debugmodel", 2048)
        for variant in (
            "",
            "_varlen_attn",
            "_dist_gemm",
            "_float8",
            "_nvfp4",
            "_first_85_pct_layers_nvfp4",
            "_float8_emulate_lora",
            "_ce_loss",
        )
    },
    "sft_debugmodel": ("debugmodel", 2048),
    **{f"llama3_8b{variant}": ("8B", 8192) for variant in ("", "_first_85_pct_layers_nvfp4", "_mxfp8")},
    "llama3_70b": ("70B", 8192),
    "llama3_405b": ("405B", 8192),
}


def llama3_registry_name(name: str) -> tuple[str, int | None] | None:
    """A flavor (``8B``), a 0.3 config name (``llama3_8b``) or ``llama3_<flavor>`` (``llama3_1b``)
    -> (flavor, training seq_len or None); None when the name is unknown."""
    if name in LLAMA3_FLAVORS:
        return name, None
    if name in LLAMA3_CONFIG_REGISTRY:
        return LLAMA3_CONFIG_REGISTRY[name]
    by_lower = {f"llama3_{f.lower()}": f for f in LLAMA3_FLAVORS}
    return (by_lower[name], None) if name in by_lower else None


def llama3_ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU hidden size computed the way TorchTitan's ``FeedForward`` computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def resolve_llama3_flavor(name: str) -> dict[str, Any]:
    """Return every field of flavor ``name`` (defaults filled in) plus derived sizes.

    The derived keys ``head_dim``, ``ffn_hidden_dim`` and a resolved ``n_kv_heads``
    are added for convenience and are not TorchTitan argument names.
    """
    try:
        explicit = LLAMA3_FLAVORS[name]
    except KeyError:
        raise KeyError(f"unknown TorchTitan llama3 flavor {name!r}; known: {sorted(LLAMA3_FLAVORS)}") from None
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in LLAMA3_DEFAULTS.items()}
    out.update(explicit)
    if out["n_kv_heads"] is None:
        out["n_kv_heads"] = out["n_heads"]
    out["head_dim"] = out["dim"] // out["n_heads"]
    out["ffn_hidden_dim"] = llama3_ffn_hidden_dim(out["dim"], out["multiple_of"], out["ffn_dim_multiplier"])
    return out
