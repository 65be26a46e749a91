"""Pure-PyTorch reference of TorchTitan's *native* Llama 3 model and checkpoints.

Tests use this module to check that a converter from TorchTitan to HF
``LlamaForCausalLM`` preserves the logits. It has no dependency on torchtitan or on
hubconv.

Where each piece comes from (read through the public-code index, repository
``pytorch/torchtitan``). Nothing here is copied; it is re-implemented from these files:

* Math: ``torchtitan/models/llama3/model/model.py``, the ``TransformerModelArgs``
  generation (``apply_scaling``, ``precompute_freqs_cis``, ``apply_rotary_emb``,
  ``repeat_kv``, ``Attention``, ``FeedForward``, ``TransformerBlock``,
  ``Transformer``). The newest ``torchtitan/models/common/rope.py``
  (``ComplexRoPE``, ``scaling="llama"``) computes the same thing.
* Hyper-parameters: ``torchtitan/models/llama3/model/args.py`` (``TransformerModelArgs``,
  ``RoPEScalingArgs``).
* Parameter names (FQNs), by ``key_style``:

  ``"legacy"`` -- ``TransformerModelArgs`` era, and also the first ``Llama3Model.Config``
  era. The names match ``model/state_dict_adapter.py``::

      tok_embeddings.weight
      layers.{i}.attention.{wq,wk,wv,wo}.weight
      layers.{i}.feed_forward.{w1,w2,w3}.weight
      layers.{i}.attention_norm.weight
      layers.{i}.ffn_norm.weight
      norm.weight
      output.weight

  ``"qkv_linear"`` -- later Config-era trees, where ``GQAttention`` owns a
  ``qkv_linear`` submodule. The source is the llama3 debugmodel state-dict
  key-contract test, whose anchors are ``layers.0.attention.qkv_linear.{wq,wk,wv}.weight``,
  ``layers.0.attention.wo.weight``, ``feed_forward.w1/w2/w3``, and
  ``tok_embeddings.weight``, ``norm.weight``, ``lm_head.weight``. In that tree the
  output projection is called **lm_head**, not output. The shapes are the same as
  in legacy.

  ``"fused"`` -- the newest tree (``torchtitan/models/common/attention/attention.py``,
  ``QKVLinear``). It has one ``layers.{i}.attention.qkv_linear.wqkv.weight`` of
  shape ``[(n_heads + 2*n_kv_heads) * head_dim, dim]``, in KV-group order: viewed as
  ``[n_kv_heads, n_heads//n_kv_heads + 2, head_dim, dim]``, each group holds its q
  heads, then its k head, then its v head. It also has
  ``layers.{i}.feed_forward.w13.weight``, which is ``stack([w1, w3])`` of shape
  ``[2, hidden, dim]``, and ``lm_head.weight``.

  The ``wq``/``wk`` rows use TorchTitan's *interleaved* (complex-pair) RoPE layout.
  HF needs the usual permutation to its rotate-half layout.
* Checkpoint layout: ``torchtitan/components/checkpoint.py`` (``CheckpointManager``,
  ``ModelWrapper``, ``_flattened_model_states_sd``), ``components/optimizer.py``
  (``OptimizersContainer.state_dict``), ``components/lr_scheduler.py``,
  ``components/dataloader.py`` and ``train.py`` (``Trainer.state_dict``). See
  :func:`save_dcp`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = [
    "KEY_STYLES",
    "ROPE_SCALING_DEFAULTS",
    "TitanArgs",
    "forward",
    "model_keys",
    "precompute_freqs_cis",
    "random_state_dict",
    "read_dcp",
    "save_dcp",
    "sharded_save_dcp",
]

KeyStyle = Literal["legacy", "qkv_linear", "fused"]
KEY_STYLES: tuple[str, ...] = ("legacy", "qkv_linear", "fused")

#: ``RoPEScalingArgs`` defaults in TorchTitan (these are also what every TorchTitan
#: llama3 flavor uses, because ``TransformerModelArgs`` enables them by default).
ROPE_SCALING_DEFAULTS: dict[str, float] = {
    "scaling_factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


# --------------------------------------------------------------------------- args


@dataclass
class TitanArgs:
    """Subset of TorchTitan's ``TransformerModelArgs`` that the Llama 3 math needs.

    ``rope_scaling=None`` means plain RoPE (TorchTitan's ``rope_scaling_args=None``).
    A dict means llama3-style scaling. It takes the ``RoPEScalingArgs`` field names,
    and any field left out gets TorchTitan's default. (TorchTitan *itself* defaults
    to scaling on; this class defaults to off so tiny tests stay simple.)
    ``tie_word_embeddings`` has no ``TransformerModelArgs`` field; the newest
    TorchTitan calls it ``enable_weight_tying``.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    vocab_size: int = 2048
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    rope_scaling: dict[str, float] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} not divisible by n_kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            unknown = set(self.rope_scaling) - set(ROPE_SCALING_DEFAULTS)
            if unknown:
                raise ValueError(
                    f"unknown rope_scaling keys {sorted(unknown)}; TorchTitan names are {sorted(ROPE_SCALING_DEFAULTS)}"
                )
            self.rope_scaling = {**ROPE_SCALING_DEFAULTS, **self.rope_scaling}

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier:
            hidden = int(self.ffn_dim_multiplier * hidden)
        m = self.multiple_of
        return m * ((hidden + m - 1) // m)


# ------------------------------------------------------------------ key handling


def _output_key(key_style: str) -> str:
    return "output.weight" if key_style == "legacy" else "lm_head.weight"


def model_keys(args: TitanArgs, key_style: KeyStyle = "legacy") -> list[str]:
    """Return the native FQNs :func:`random_state_dict` emits, in order (without a tied output)."""
    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style must be one of {KEY_STYLES}, got {key_style!r}")
    keys = ["tok_embeddings.weight"]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        if key_style == "legacy":
            keys += [p + f"attention.{n}.weight" for n in ("wq", "wk", "wv")]
        elif key_style == "qkv_linear":
            keys += [p + f"attention.qkv_linear.{n}.weight" for n in ("wq", "wk", "wv")]
        else:
            keys.append(p + "attention.qkv_linear.wqkv.weight")
        keys.append(p + "attention.wo.weight")
        if key_style == "fused":
            keys += [p + "feed_forward.w13.weight", p + "feed_forward.w2.weight"]
        else:
            keys += [p + f"feed_forward.{n}.weight" for n in ("w1", "w2", "w3")]
        keys += [p + "attention_norm.weight", p + "ffn_norm.weight"]
    keys.append("norm.weight")
    if not args.tie_word_embeddings:
        keys.append(_output_key(key_style))
    return keys


def _pack_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, args: TitanArgs):
    kv, hd = args.kv_heads, args.head_dim
    per_group = args.n_heads // kv
    d_in = wq.shape[1]
    groups = torch.cat(
        [
            wq.reshape(kv, per_group, hd, d_in),
            wk.reshape(kv, 1, hd, d_in),
            wv.reshape(kv, 1, hd, d_in),
        ],
        dim=1,
    )
    return groups.reshape(-1, d_in)


def _unpack_qkv(wqkv: torch.Tensor, args: TitanArgs):
    kv, hd = args.kv_heads, args.head_dim
    per_group = args.n_heads // kv
    d_in = wqkv.shape[1]
    groups = wqkv.reshape(kv, per_group + 2, hd, d_in)
    wq = groups[:, :per_group].reshape(args.n_heads * hd, d_in)
    wk = groups[:, per_group].reshape(kv * hd, d_in)
    wv = groups[:, per_group + 1].reshape(kv * hd, d_in)
    return wq, wk, wv


def _canonical_params(state_dict: dict[str, Any], args: TitanArgs) -> dict[str, torch.Tensor]:
    """Map any supported key style to legacy names, as float32 tensors."""
    sd = dict(state_dict)
    if "tok_embeddings.weight" not in sd and "model.tok_embeddings.weight" in sd:
        # Pre-flattening TorchTitan full checkpoints nest the model under "model.".
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}

    def get(key: str) -> torch.Tensor:
        try:
            value = sd[key]
        except KeyError:
            raise KeyError(f"state dict lacks {key!r}") from None
        return value.detach().to(torch.float32)

    out = {"tok_embeddings.weight": get("tok_embeddings.weight")}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        if p + "attention.qkv_linear.wqkv.weight" in sd:
            wq, wk, wv = _unpack_qkv(get(p + "attention.qkv_linear.wqkv.weight"), args)
        elif p + "attention.qkv_linear.wq.weight" in sd:
            wq, wk, wv = (get(p + f"attention.qkv_linear.{n}.weight") for n in ("wq", "wk", "wv"))
        else:
            wq, wk, wv = (get(p + f"attention.{n}.weight") for n in ("wq", "wk", "wv"))
        out[p + "attention.wq.weight"] = wq
        out[p + "attention.wk.weight"] = wk
        out[p + "attention.wv.weight"] = wv
        out[p + "attention.wo.weight"] = get(p + "attention.wo.weight")
        if p + "feed_forward.w13.weight" in sd:
            w13 = get(p + "feed_forward.w13.weight")
            out[p + "feed_forward.w1.weight"], out[p + "feed_forward.w3.weight"] = w13[0], w13[1]
        else:
            out[p + "feed_forward.w1.weight"] = get(p + "feed_forward.w1.weight")
            out[p + "feed_forward.w3.weight"] = get(p + "feed_forward.w3.weight")
        out[p + "feed_forward.w2.weight"] = get(p + "feed_forward.w2.weight")
        out[p + "attention_norm.weight"] = get(p + "attention_norm.weight")
        out[p + "ffn_norm.weight"] = get(p + "ffn_norm.weight")
    out["norm.weight"] = get("norm.weight")
    if args.tie_word_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    elif "output.weight" in sd:
        out["output.weight"] = get("output.weight")
    else:
        out["output.weight"] = get("lm_head.weight")
    return out


# ------------------------------------------------------------------ state dicts


def random_state_dict(
    args: TitanArgs,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    key_style: KeyStyle = "legacy",
    include_tied_output: bool = False,
    include_freqs_cis: bool = False,
) -> dict[str, torch.Tensor]:
    """Build a random native TorchTitan Llama 3 state dict.

    Weights are drawn in float32 from a fixed generator, in the same order for every
    ``key_style``. So one ``seed`` gives the *same model* in each naming; only the
    packing differs. Then they are cast to ``dtype``. Embeddings are N(0, 1) (as
    TorchTitan initializes them). Linears are N(0, 1/fan_in), so attention patterns
    are not trivial. Norm weights are ``1 + 0.1*randn``, so a mis-mapped norm
    changes the logits.

    ``key_style`` is ``"legacy"`` (attention.wq..., output.weight),
    ``"qkv_linear"`` (attention.qkv_linear.wq..., lm_head.weight) or ``"fused"``
    (attention.qkv_linear.wqkv, feed_forward.w13, lm_head.weight); see the module
    docstring. With ``tie_word_embeddings`` the output key is left out, unless
    ``include_tied_output`` is set. Then it is emitted as *the same tensor* as
    ``tok_embeddings.weight``, which is what ``model.state_dict()`` returns for a tied
    TorchTitan model. ``include_freqs_cis`` adds the complex64 ``freqs_cis``
    RoPE buffer that some TorchTitan versions persisted (``checkpoint.py`` mentions
    ``excluded_parameters_for_model_only = {"freqs_cis"}``).
    """
    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style must be one of {KEY_STYLES}, got {key_style!r}")
    gen = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    def norm_weight() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn((args.dim,), generator=gen, dtype=torch.float32)

    d, hd, hidden = args.dim, args.head_dim, args.ffn_hidden
    q_out, kv_out = args.n_heads * hd, args.kv_heads * hd

    sd: dict[str, torch.Tensor] = {"tok_embeddings.weight": normal((args.vocab_size, d), 1.0)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        wq = normal((q_out, d), d**-0.5)
        wk = normal((kv_out, d), d**-0.5)
        wv = normal((kv_out, d), d**-0.5)
        wo = normal((d, q_out), q_out**-0.5)
        w1 = normal((hidden, d), d**-0.5)
        w2 = normal((d, hidden), hidden**-0.5)
        w3 = normal((hidden, d), d**-0.5)
        attn_norm, ffn_norm = norm_weight(), norm_weight()
        if key_style == "legacy":
            sd[p + "attention.wq.weight"] = wq
            sd[p + "attention.wk.weight"] = wk
            sd[p + "attention.wv.weight"] = wv
        elif key_style == "qkv_linear":
            sd[p + "attention.qkv_linear.wq.weight"] = wq
            sd[p + "attention.qkv_linear.wk.weight"] = wk
            sd[p + "attention.qkv_linear.wv.weight"] = wv
        else:
            sd[p + "attention.qkv_linear.wqkv.weight"] = _pack_qkv(wq, wk, wv, args)
        sd[p + "attention.wo.weight"] = wo
        if key_style == "fused":
            sd[p + "feed_forward.w13.weight"] = torch.stack([w1, w3])
            sd[p + "feed_forward.w2.weight"] = w2
        else:
            sd[p + "feed_forward.w1.weight"] = w1
            sd[p + "feed_forward.w2.weight"] = w2
            sd[p + "feed_forward.w3.weight"] = w3
        sd[p + "attention_norm.weight"] = attn_norm
        sd[p + "ffn_norm.weight"] = ffn_norm
    sd["norm.weight"] = norm_weight()
    if not args.tie_word_embeddings:
        sd[_output_key(key_style)] = normal((args.vocab_size, d), d**-0.5)

    out = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    if args.tie_word_embeddings and include_tied_output:
        out[_output_key(key_style)] = out["tok_embeddings.weight"]
    if include_freqs_cis:
        out["freqs_cis"] = precompute_freqs_cis(hd, args.max_seq_len, args.rope_theta, args.rope_scaling)
    return out


# ------------------------------------------------------------------------- math


def _llama3_scale_freqs(freqs: torch.Tensor, scaling: dict[str, float]) -> torch.Tensor:
    factor = scaling["scaling_factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    orig = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = orig / low  # longer wavelengths than this: fully scaled
    high_freq_wavelen = orig / high  # shorter wavelengths than this: untouched
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def precompute_freqs_cis(
    head_dim: int,
    end: int,
    theta: float = 10000.0,
    rope_scaling: dict[str, float] | None = None,
) -> torch.Tensor:
    """Return TorchTitan's complex64 RoPE table of shape ``[end, head_dim // 2]``.

    The table is built in float32, with llama3 scaling applied to the base frequencies
    when ``rope_scaling`` is given. Missing scaling keys take TorchTitan's defaults.
    """
    exponents = torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim
    freqs = 1.0 / (theta**exponents)
    if rope_scaling is not None:
        freqs = _llama3_scale_freqs(freqs, {**ROPE_SCALING_DEFAULTS, **rope_scaling})
    t = torch.arange(end, device=freqs.device)
    angles = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(angles), angles)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # x: [B, T, H, hd]; adjacent dims (2j, 2j+1) form complex pair j.
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = pairs * freqs_cis.view(1, x.shape[1], 1, pairs.shape[-1])
    return torch.view_as_real(rotated).flatten(3).type_as(x)


def _attention(x: torch.Tensor, p: dict[str, torch.Tensor], prefix: str, args: TitanArgs, freqs_cis) -> torch.Tensor:
    bsz, seqlen, _ = x.shape
    hd = args.head_dim
    xq = F.linear(x, p[prefix + "wq.weight"]).view(bsz, seqlen, -1, hd)
    xk = F.linear(x, p[prefix + "wk.weight"]).view(bsz, seqlen, -1, hd)
    xv = F.linear(x, p[prefix + "wv.weight"]).view(bsz, seqlen, -1, hd)
    xq, xk = _rotate(xq, freqs_cis), _rotate(xk, freqs_cis)
    n_rep = args.n_heads // args.kv_heads
    if n_rep > 1:  # kv head j serves query heads j*n_rep ... j*n_rep + n_rep - 1
        xk = torch.repeat_interleave(xk, n_rep, dim=2)
        xv = torch.repeat_interleave(xv, n_rep, dim=2)
    out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), is_causal=True)
    out = out.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
    return F.linear(out, p[prefix + "wo.weight"])


@torch.no_grad()
def forward(state_dict: dict[str, torch.Tensor], args: TitanArgs, tokens: torch.Tensor) -> torch.Tensor:
    """Run TorchTitan's Llama 3 forward. Returns float32 logits ``[B, T, vocab]``.

    Parameters of any dtype and any supported ``key_style`` (a ``model.`` prefix too)
    are cast to float32. The math is TorchTitan's: RMSNorm, interleaved complex RoPE
    (with llama3 scaling when ``args.rope_scaling`` is set), GQA via repeat_kv, causal
    SDPA, SwiGLU, final norm, output projection (``tok_embeddings`` when tied).
    """
    p = _canonical_params(state_dict, args)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    seqlen = tokens.shape[1]
    if seqlen > args.max_seq_len:
        raise ValueError(f"sequence length {seqlen} exceeds max_seq_len {args.max_seq_len}")
    # Rows of the table do not depend on ``end``, so building only ``seqlen`` rows
    # gives TorchTitan's ``freqs_cis[:seqlen]`` exactly.
    freqs_cis = precompute_freqs_cis(args.head_dim, seqlen, args.rope_theta, args.rope_scaling)

    h = F.embedding(tokens, p["tok_embeddings.weight"])
    for i in range(args.n_layers):
        lp = f"layers.{i}."
        x = _rms_norm(h, p[lp + "attention_norm.weight"], args.norm_eps)
        h = h + _attention(x, p, lp + "attention.", args, freqs_cis)
        x = _rms_norm(h, p[lp + "ffn_norm.weight"], args.norm_eps)
        gate = F.silu(F.linear(x, p[lp + "feed_forward.w1.weight"]))
        up = F.linear(x, p[lp + "feed_forward.w3.weight"])
        h = h + F.linear(gate * up, p[lp + "feed_forward.w2.weight"])
    h = _rms_norm(h, p["norm.weight"], args.norm_eps)
    return F.linear(h, p["output.weight"]).float()


# ------------------------------------------------------------------ checkpoints


@contextlib.contextmanager
def _quiet_single_process():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to (save|load) in a single process.*")
        yield


def _module_with_params(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Build an ``nn.Module`` tree whose ``named_parameters()`` FQNs are the given keys."""
    root = torch.nn.Module()
    seen: dict[int, torch.nn.Parameter] = {}
    for fqn, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue  # e.g. the complex freqs_cis buffer is not trained
        *path, leaf = fqn.split(".")
        mod = root
        for name in path:
            if not hasattr(mod, name):
                mod.add_module(name, torch.nn.Module())
            mod = getattr(mod, name)
        # Tied weights: reuse one Parameter, as nn.Module weight tying does.
        param = seen.get(id(tensor))
        if param is None:
            param = torch.nn.Parameter(tensor.detach().clone())
            seen[id(tensor)] = param
        mod.register_parameter(leaf, param)
    return root


def _warmup_stable_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return float((step + 1) / (warmup_steps + 1))
    progress = (step + 1 - warmup_steps) / (total_steps - warmup_steps + 1)
    return max(0.0, 1.0 - progress)


def _training_states(state_dict: dict[str, torch.Tensor], style: str, steps: int = 2) -> dict[str, Any]:
    """Build real optimizer / scheduler / dataloader / train-state entries, as TorchTitan does."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    module = _module_with_params(state_dict)
    params = list(module.parameters())
    # TorchTitan defaults: AdamW, lr 8e-4, betas (0.9, 0.95), eps 1e-8, wd 0.1,
    # implementation "fused" (fused=True, foreach=False).
    kwargs = dict(lr=8e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    try:
        optimizer = torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        optimizer = torch.optim.AdamW(params, fused=False, **kwargs)
    lr_lambda = functools.partial(_warmup_stable_decay, warmup_steps=2, total_steps=10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    gen = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        for prm in params:
            prm.grad = torch.randn(prm.shape, generator=gen).to(prm.dtype) * 1e-2
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    optim_sd = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    loader_state = {
        "_num_yielded": steps,
        "_sampler_iter_yielded": steps,
        "_IterableDataset_len_called": None,
        "_shared_seed": None,
        "fetcher_state": {"dataset_iter_state": None, "fetcher_ended": False},
        "dataset_state": {"sample_idx": 8 * steps, "token_buffer": [1, 2, 3]},
        "_iterator_finished": False,
    }
    states: dict[str, Any] = {
        "optimizer": optim_sd,
        "lr_scheduler": scheduler.state_dict(),
        "dataloader": {"dp_rank_0": pickle.dumps(loader_state), "world_size": 1},
    }
    if style == "legacy":

        def as_bytes(obj: Any) -> io.BytesIO:
            buf = io.BytesIO()
            torch.save(obj, buf)
            return buf

        states["train_state"] = {
            "step": torch.tensor(steps, dtype=torch.int32),
            "global_avg_losses": as_bytes([2.5, 2.25][:steps]),
            "global_max_losses": as_bytes([3.0, 2.75][:steps]),
            "log_steps": as_bytes(list(range(1, steps + 1))),
        }
    else:
        states["train_state"] = {"step": steps, "ntokens_seen": 4096 * steps}
    return states


def save_dcp(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    *,
    training_state: bool | Literal["trainer", "legacy"] = False,
    model_prefix: str = "",
) -> None:
    """Write ``state_dict`` as a single-process DCP checkpoint at ``path``, like TorchTitan.

    ``training_state=False`` writes a model-only checkpoint. TorchTitan writes this
    for ``last_save_model_only`` and for seed checkpoints: ``ModelWrapper.state_dict()``
    saved directly, so every model FQN is a top-level DCP key.

    ``training_state=True`` (same as ``"trainer"``) copies what the current
    ``CheckpointManager`` saves every interval (``torchtitan/components/checkpoint.py``,
    ``_flattened_model_states_sd``): the model keys *flattened to the top level*,
    plus the other stateful objects under their names. DCP's nested-dict flattening
    then gives::

        tok_embeddings.weight, layers.0.attention.wq.weight, ...     (model, top level)
        optimizer.state.<fqn>.exp_avg / .exp_avg_sq / .step          (tensors)
        optimizer.param_groups.<fqn>.lr / .betas / .eps / .weight_decay / .initial_lr / ...
        lr_scheduler.base_lrs / .last_epoch / ._step_count / ._last_lr / ...
        dataloader.dp_rank_0   (pickle.dumps of the StatefulDataLoader state), dataloader.world_size
        train_state.step, train_state.ntokens_seen

    The optimizer entries come from a real ``torch.optim.AdamW`` (TorchTitan's
    default hyper-parameters) that has taken two steps on a module with exactly these
    FQNs. They are read with ``get_optimizer_state_dict(...,
    StateDictOptions(flatten_optimizer_state_dict=True))``, which is what
    ``OptimizersContainer.state_dict`` does (``components/optimizer.py``). The
    scheduler is a real ``LambdaLR`` with a ``functools.partial`` lambda, as
    ``LRSchedulersContainer`` uses (``components/lr_scheduler.py``); its
    ``state_dict()`` of the first scheduler is saved. The dataloader entry follows
    ``ParallelAwareDataloader.state_dict`` (``components/dataloader.py``). The train
    state follows ``Trainer.state_dict`` (``train.py``). DCP saves tensors as tensor
    chunks and every non-tensor leaf (ints, floats, tuples, lists, bytes) as a bytes
    item.

    ``training_state="legacy"`` copies the early-2025 ``TrainState`` dataclass that
    lived in ``checkpoint.py``: ``train_state.step`` as an int32 tensor and
    ``train_state.global_avg_losses`` / ``global_max_losses`` / ``log_steps`` as
    ``BytesIO`` blobs (``torch.save`` of lists). That older ``CheckpointManager``
    did not flatten the model, so its full checkpoints keyed the model under
    ``model.``; pass ``model_prefix="model."`` to reproduce that.

    ``model_prefix`` is put in front of every model key (never the optimizer FQNs,
    which are module FQNs in TorchTitan too).
    """
    import torch.distributed.checkpoint as dcp

    model_part = {model_prefix + k: v for k, v in state_dict.items()}
    to_save: dict[str, Any] = {}
    if training_state:
        style = "legacy" if training_state == "legacy" else "trainer"
        to_save.update(_training_states(state_dict, style))
    overlap = set(to_save) & set(model_part)
    if overlap:
        raise ValueError(f"model keys collide with training-state keys: {sorted(overlap)}")
    to_save.update(model_part)
    os.makedirs(path, exist_ok=True)
    with _quiet_single_process():
        dcp.save(to_save, checkpoint_id=os.fspath(path))


def read_dcp(path: str | os.PathLike) -> dict[str, Any]:
    """Load *everything* in a DCP checkpoint as a flat ``{dcp_key: value}`` dict.

    Use it to check round-trips: tensors come back as tensors, bytes items as
    whatever was saved (ints, lists, ``BytesIO`` ...).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    reader = dcp.FileSystemReader(os.fspath(path))
    metadata = reader.read_metadata()
    template: dict[str, Any] = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            template[key] = torch.empty(md.size, dtype=md.properties.dtype)
        elif isinstance(md, BytesStorageMetadata):
            template[key] = None
    with _quiet_single_process():
        dcp.load(template, storage_reader=reader)
    return template


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_save_worker(rank: int, world_size: int, port: int, src_file: str, path: str, model_prefix: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))
        full = torch.load(src_file, weights_only=True)
        sharded = {model_prefix + k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
        dcp.save(sharded, checkpoint_id=path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def sharded_save_dcp(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    world_size: int = 2,
    *,
    model_prefix: str = "",
    timeout: float = 300.0,
) -> None:
    """Write a DCP checkpoint from ``world_size`` CPU ranks, each holding a ``Shard(0)`` slice.

    This is what an FSDP2 TorchTitan run produces. Every tensor is a DTensor on a
    1-D ``"cpu"`` DeviceMesh, sharded along dim 0 (unevenly when dim 0 does not
    divide, with DTensor's ``torch.chunk`` rule). Each rank writes its own
    ``__<rank>_0.distcp``, and ``.metadata`` lists each tensor's chunks with their
    offsets.

    Each rank is a fresh ``python -c`` subprocess (gloo, MASTER_ADDR=127.0.0.1, a
    free port). This module is loaded into it by file path. The ranks are not started
    with ``torch.multiprocessing.spawn``, because spawn re-imports the caller's
    ``__main__``, and that breaks any script without an ``if __name__ == "__main__"``
    guard.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src_file = os.path.join(tmp, "full_state_dict.pt")
        # Tied entries share storage; clone so torch.load gives independent tensors.
        torch.save({k: v.detach().clone() for k, v in state_dict.items()}, src_file)
        port = _free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER_BOOTSTRAP,
                    os.path.abspath(__file__),
                    str(rank),
                    str(world_size),
                    str(port),
                    src_file,
                    path,
                    model_prefix,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
            )
            for rank in range(world_size)
        ]
        failures = []
        for rank, proc in enumerate(procs):
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                out, _ = proc.communicate()
                failures.append(f"rank {rank} timed out after {timeout}s:\n{out.decode(errors='replace')}")
                continue
            if proc.returncode != 0:
                failures.append(f"rank {rank} exited {proc.returncode}:\n{out.decode(errors='replace')[-4000:]}")
        if failures:
            raise RuntimeError("sharded_save_dcp failed\n" + "\n".join(failures))


_WORKER_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_torchtitan_llama3_ref', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "mod._sharded_save_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),"
    " sys.argv[5], sys.argv[6], sys.argv[7])\n"
)
