"""MindFormers' Llama / Qwen2 forward pass, streamed from the *native* checkpoint, for parity checks.

The model as MindFormers computes it (`mindformers/models/llama`): RMSNorm in float32, q/k/v projections
(with biases for Qwen2), RoPE rotating halves (`RotaryEmbedding`; `extend_method` PI divides positions by
`scaling_factor`, LLAMA3 scales frequencies), grouped KV heads repeated per query group, SwiGLU
`w2(silu(w1 x) * w3 x)`, `norm_out` and `lm_head`. Fused weights are used as MindFormers uses them: the
`w_qkv` product is split per KV group ([q heads of g; k_g; v_g], or [Q; K; V] for `qkv_layout: concat`) and
the `w_gate_hidden` product is read as (hidden_dim, 2) pairs (or [gate; up] for `ffn_layout: concat`).
With `rope_permute` the weights are in Meta's layout, so RoPE turns interleaved pairs, as Meta's model does.
Weights are read one layer at a time and every matrix product streams its weight in row blocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from hubconv.io.tensor import LazyTensor
from hubconv.native.streaming import linear as _linear
from hubconv.native.streaming import load as _load
from hubconv.native.streaming import rows as _rows


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling and scaling.get("rope_type") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        smooth = (old / wavelen - low) / (high - low)
        scaled = (1 - smooth) * freqs / factor + smooth * freqs
        freqs = torch.where(wavelen > old / low, freqs / factor, torch.where(wavelen < old / high, freqs, scaled))
    return freqs


def _rope(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [b, s, h, d] rotated by `angles` [s, d/2]."""
    if interleaved:
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(3)
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _qkv(x: torch.Tensor, tensors: Mapping[str, LazyTensor], p: str, a: Mapping[str, Any]) -> tuple:
    nh, nkv, hd = a["num_heads"], a["n_kv_heads"], a["head_dim"]
    bsz, seq, _ = x.shape
    if not a["qkv_concat"]:
        return tuple(
            _linear(x, tensors[f"{p}attention.{w}.weight"], _load(tensors, f"{p}attention.{w}.bias"))
            for w in ("wq", "wk", "wv")
        )
    qkv = _linear(x, tensors[f"{p}attention.w_qkv.weight"], _load(tensors, f"{p}attention.w_qkv.bias"))
    if a["qkv_layout"] == "concat":
        return tuple(qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1))
    per = nh // nkv
    q, k, v = qkv.view(bsz, seq, nkv, (per + 2) * hd).split([per * hd, hd, hd], dim=-1)
    return q.reshape(bsz, seq, -1), k.reshape(bsz, seq, -1), v.reshape(bsz, seq, -1)


def _ffn(x: torch.Tensor, tensors: Mapping[str, LazyTensor], p: str, a: Mapping[str, Any]) -> torch.Tensor:
    if a["qkv_concat"]:
        gh = _linear(x, tensors[f"{p}feed_forward.w_gate_hidden.weight"])
        if a["ffn_layout"] == "concat":
            gate, up = gh.chunk(2, dim=-1)
        else:
            gate, up = gh.view(*gh.shape[:-1], -1, 2).unbind(-1)
    else:
        gate = _linear(x, tensors[f"{p}feed_forward.w1.weight"])
        up = _linear(x, tensors[f"{p}feed_forward.w3.weight"])
    return _linear(F.silu(gate) * up, tensors[f"{p}feed_forward.w2.weight"])


def reference_logits(
    tensors: Mapping[str, LazyTensor], a: Mapping[str, Any], tokens: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 logits [batch, seq, hf_vocab_size] of MindFormers' Llama/Qwen2 for `tokens` at `positions` [seq].

    `tensors` uses MindFormers' names; `a` are the resolved native args as in hubconv.json."""
    bsz, seq = tokens.shape
    nh, nkv, hd, eps = a["num_heads"], a["n_kv_heads"], a["head_dim"], a["rms_norm_eps"]
    emb = tensors["model.tok_embeddings.embedding_weight"]
    ids = tokens.reshape(-1).tolist()
    h = _rows(emb, ids).reshape(bsz, seq, -1)
    pos = (torch.arange(seq) if positions is None else positions.reshape(-1)).to(torch.float32)
    scaling = a.get("rope_scaling")
    if scaling and scaling.get("rope_type") == "linear":
        pos = pos / scaling["factor"]
    angles = torch.outer(pos, _inv_freq(hd, a["theta"], scaling))
    interleaved = bool(a.get("rope_permute"))
    with torch.no_grad():
        for i in range(a["num_layers"]):
            p = f"model.layers.{i}."
            x = _rms(h, _load(tensors, p + "attention_norm.weight"), eps)
            q, k, v = _qkv(x, tensors, p, a)
            q = _rope(q.view(bsz, seq, nh, hd), angles, interleaved)
            k = _rope(k.view(bsz, seq, nkv, hd), angles, interleaved)
            v = v.view(bsz, seq, nkv, hd)
            k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            h = h + _linear(att.transpose(1, 2).reshape(bsz, seq, nh * hd), tensors[p + "attention.wo.weight"])
            h = h + _ffn(_rms(h, _load(tensors, p + "ffn_norm.weight"), eps), tensors, p, a)
        h = _rms(h, _load(tensors, "model.norm_out.weight"), eps)
        head = emb if a["tie_word_embeddings"] else tensors["lm_head.weight"]
        return _linear(h, head)[..., : a.get("hf_vocab_size", head.shape[0])]
