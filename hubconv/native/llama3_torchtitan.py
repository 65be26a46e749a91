"""TorchTitan's Llama 3 forward pass, streamed from the *native* checkpoint, for parity checks.

This is the model as TorchTitan computes it — RMSNorm, interleaved (complex-pair) RoPE with
optional Llama 3.1 frequency scaling, grouped-query attention, SwiGLU — evaluated straight from
the lazy checkpoint: weights are read one layer at a time and every matrix product streams the
weight in row blocks, so memory holds activations plus one block, whatever the model size.
Comparing its logits with the converted transformers model catches layout bugs (a wrong Q/K
permute shows only after the first positions) that a short greedy generation misses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from hubconv.io.tensor import LazyTensor
from hubconv.native.streaming import linear as _linear
from hubconv.native.streaming import load_tensor as _load
from hubconv.native.streaming import rows as _rows


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _freqs_cis(head_dim: int, positions: torch.Tensor, theta: float, scaling: Mapping[str, Any] | None) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaling:
        factor = float(scaling["scaling_factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freqs
        smooth = (old / wavelen - low) / (high - low)
        scaled = (1 - smooth) * freqs / factor + smooth * freqs
        freqs = torch.where(wavelen > old / low, freqs / factor, torch.where(wavelen < old / high, freqs, scaled))
    angles = torch.outer(positions.to(torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved (real, imaginary) pairs, as TorchTitan's apply_rotary_emb does."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3)


def reference_logits(
    tensors: Mapping[str, LazyTensor], a: Mapping[str, Any], tokens: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 logits [batch, seq, vocab] of TorchTitan's Llama 3 for `tokens` at `positions` [seq]
    (default 0..seq-1; any increasing positions, as HF's `position_ids`, reach long distances cheaply).

    `tensors` uses native names (without a `model.` prefix); `a` are the resolved native args
    (as in hubconv.json: n_layers, n_heads, n_kv_heads, head_dim, norm_eps, rope_theta,
    rope_scaling_args, key_style, head_key, tie_word_embeddings)."""
    qkv = "qkv_linear." if a.get("key_style") == "qkv_linear" else ""
    emb = tensors["tok_embeddings.weight"]
    bsz, seq = tokens.shape
    hd, nh, nkv, eps = a["head_dim"], a["n_heads"], a["n_kv_heads"], a["norm_eps"]
    ids = tokens.reshape(-1).tolist()
    h = _rows(emb, ids).reshape(bsz, seq, -1)
    pos = torch.arange(seq) if positions is None else positions.reshape(-1)
    freqs = _freqs_cis(hd, pos, a["rope_theta"], a.get("rope_scaling_args"))
    with torch.no_grad():
        for i in range(a["n_layers"]):
            p = f"layers.{i}."
            x = _rms_norm(h, _load(tensors[p + "attention_norm.weight"]), eps)
            q = _rope(_linear(x, tensors[f"{p}attention.{qkv}wq.weight"]).view(bsz, seq, nh, hd), freqs)
            k = _rope(_linear(x, tensors[f"{p}attention.{qkv}wk.weight"]).view(bsz, seq, nkv, hd), freqs)
            v = _linear(x, tensors[f"{p}attention.{qkv}wv.weight"]).view(bsz, seq, nkv, hd)
            k = k.repeat_interleave(nh // nkv, dim=2)
            v = v.repeat_interleave(nh // nkv, dim=2)
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            h = h + _linear(att.transpose(1, 2).reshape(bsz, seq, nh * hd), tensors[p + "attention.wo.weight"])
            x = _rms_norm(h, _load(tensors[p + "ffn_norm.weight"]), eps)
            gate = F.silu(_linear(x, tensors[p + "feed_forward.w1.weight"]))
            h = h + _linear(
                gate * _linear(x, tensors[p + "feed_forward.w3.weight"]), tensors[p + "feed_forward.w2.weight"]
            )
        h = _rms_norm(h, _load(tensors["norm.weight"]), eps)
        head = tensors.get(f"{a.get('head_key', 'output')}.weight") if not a["tie_word_embeddings"] else None
        return _linear(h, head if head is not None else emb)
