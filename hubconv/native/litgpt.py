"""LitGPT's GPT forward pass, streamed from the *native* checkpoint, for parity checks.

What LitGPT's `litgpt/model.py` computes for the configurations the adapter converts: token embeddings;
blocks of `norm_1` (RMSNorm or LayerNorm), the fused `attn.qkv` cut into Q, K, V by the resolved QKV
layout (current `[all Q; all K; all V]` or legacy per query group), rotate-half RoPE on the first
`rope_n_elem` dims of each head (LitGPT's cache: base `rope_base`, positions over `rope_condense_ratio`,
Llama 3 or linear `rope_adjustments`), causal (optionally sliding-window) attention with K/V heads repeated
per group, `attn.proj`, then `norm_2` (or `norm_1`'s output with a shared attention norm) and the MLP (`LLaMAMLP`
silu(fc_1) * fc_2, `GemmaMLP` gelu(fc_1) * fc_2 or `GptNeoxMLP` GELU) with a sequential or parallel residual;
`ln_f`; `lm_head` (with its bias when there is one). Gemma configs scale the embeddings by sqrt(n_embd) and their
RMSNorm by 1 + weight. Weights are read one layer at a time and every matrix
product streams its weight ([out, in]) in row blocks, so memory holds activations plus one block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from hubconv import views as V
from hubconv.errors import MappingError
from hubconv.io.tensor import LazyTensor
from hubconv.native.streaming import linear as _linear
from hubconv.native.streaming import load as _load
from hubconv.native.streaming import rows as _rows


def rope_cache(a: Mapping[str, Any], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_n_elem] at `positions` as LitGPT's `build_rope_cache` computes them."""
    n = a["rope_n_elem"]
    theta = 1.0 / (a["rope_base"] ** (torch.arange(0, n, 2).float() / n))
    adj = a.get("rope_adjustments") or {}
    if "original_max_seq_len" in adj:  # Llama 3.1 scaling, smoothed between the two wavelength bounds
        wavelen = 2 * torch.pi / theta
        ratio = adj["original_max_seq_len"] / wavelen
        smooth = ((ratio - adj["low_freq_factor"]) / (adj["high_freq_factor"] - adj["low_freq_factor"])).clamp(0, 1)
        theta = (1 - smooth) * (theta / adj["factor"]) + smooth * theta
    elif "factor" in adj:
        theta = theta / adj["factor"]
    idx_theta = torch.outer(positions.float() / a.get("rope_condense_ratio", 1), theta).repeat(1, 2)
    if idx_theta.shape[-1] > n > 1:
        idx_theta = idx_theta[..., :n]
    return torch.cos(idx_theta), torch.sin(idx_theta)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _split_qkv(qkv: torch.Tensor, a: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V [B, T, heads, hs] from the fused projection output, per the resolved layout."""
    hs, nh, ng = a["head_size"], a["n_head"], a["n_query_groups"]
    B, T, _ = qkv.shape
    if a["qkv_layout"] == "legacy":  # per group: q_per_kv query heads, then one key and one value head
        per = nh // ng
        g = qkv.view(B, T, ng, per + 2, hs)
        return g[:, :, :, :per].reshape(B, T, nh, hs), g[:, :, :, per], g[:, :, :, per + 1]
    q, k, v = qkv.split((nh * hs, ng * hs, ng * hs), dim=-1)
    return q.view(B, T, nh, hs), k.view(B, T, ng, hs), v.view(B, T, ng, hs)


def reference_logits(
    tensors: Mapping[str, LazyTensor], a: Mapping[str, Any], tokens: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 logits [batch, seq, hf_vocab_size] of LitGPT's GPT for `tokens` at `positions` [seq]
    (default 0..seq-1; RoPE is evaluated at these positions, as HF's `position_ids`).

    `tensors` uses LitGPT's names (prefixes removed); `a` are the resolved native args as in hubconv.json."""
    c, hs, nh, ng, n = a["n_embd"], a["head_size"], a["n_head"], a["n_query_groups"], a["rope_n_elem"]
    bsz, seq = tokens.shape
    pos = torch.arange(seq) if positions is None else positions.reshape(-1)
    if int(pos.max()) >= a["block_size"]:
        raise MappingError(f"position {int(pos.max())} is beyond LitGPT's block_size {a['block_size']}")
    cos, sin = rope_cache(a, pos)
    wte = tensors["transformer.wte.weight"]
    h = _rows(wte, tokens.reshape(-1).tolist()).reshape(bsz, seq, c)
    if a.get("scale_embeddings"):  # Gemma: times sqrt(n_embd), rounded to the activations' dtype first
        h = h * torch.tensor(c**0.5, dtype=h.dtype)
    window = a.get("sliding_window_size")
    mask = None
    if window is not None:
        i = torch.arange(seq)
        allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        mask = torch.zeros(seq, seq).masked_fill(~allowed, float("-inf"))

    def norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = _load(tensors, prefix + ".weight")
        if a["norm_class_name"] == "RMSNorm":
            scale = 1 + w if a.get("rms_unit_offset") else w  # LitGPT adds 1 for configs named Gemma*
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a["norm_eps"]) * scale
        return F.layer_norm(x, (c,), w, _load(tensors, prefix + ".bias"), a["norm_eps"])

    def lin(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return _linear(x, tensors[prefix + ".weight"], _load(tensors, prefix + ".bias"))

    def mlp(x: torch.Tensor, p: str) -> torch.Tensor:
        if a["mlp_class_name"] == "LLaMAMLP":
            return lin(F.silu(lin(x, p + "mlp.fc_1")) * lin(x, p + "mlp.fc_2"), p + "mlp.proj")
        if a["mlp_class_name"] == "GemmaMLP":
            gate = F.gelu(lin(x, p + "mlp.fc_1"), approximate=a["gelu_approximate"])
            return lin(gate * lin(x, p + "mlp.fc_2"), p + "mlp.proj")
        return lin(F.gelu(lin(x, p + "mlp.fc"), approximate=a["gelu_approximate"]), p + "mlp.proj")

    with torch.no_grad():
        for i in range(a["n_layer"]):
            p = f"transformer.h.{i}."
            x_normed = norm(h, p + "norm_1")
            q, k, v = (z.transpose(1, 2) for z in _split_qkv(lin(x_normed, f"{p}attn.{a['qkv_key']}"), a))
            q = torch.cat((_rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
            k = torch.cat((_rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
            if ng != nh:
                k, v = k.repeat_interleave(nh // ng, dim=1), v.repeat_interleave(nh // ng, dim=1)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0 / math.sqrt(hs)
            )
            attn = lin(y.transpose(1, 2).reshape(bsz, seq, nh * hs), p + "attn.proj")
            if a["parallel_residual"]:  # with a shared attention norm (Phi) the MLP reads norm_1's output
                h = mlp(x_normed if a.get("shared_attention_norm") else norm(h, p + "norm_2"), p) + (attn + h)
            else:
                h = h + attn
                h = h + mlp(norm(h, p + "norm_2"), p)
        h = norm(h, "transformer.ln_f")
        head = tensors["transformer.wte.weight"] if a["tie_word_embeddings"] else tensors["lm_head.weight"]
        bias = _load(tensors, "lm_head.bias")
        return _linear(
            h, V.slice_rows(head, 0, a["hf_vocab_size"]), None if bias is None else bias[: a["hf_vocab_size"]]
        )
