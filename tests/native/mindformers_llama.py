"""MindFormers' Llama (`mindformers/models/llama`), as a small torch model: the reference forward for parity tests.

Written from MindFormers' own modules, independently of hubconv: `LlamaRMSNorm` (float32, `x * rsqrt(mean(x²) + eps)
* w`), `LLamaAttention` with `wq/wk/wv/wo` (biases on q/k/v with `qkv_has_bias`, as MindFormers' Qwen2), grouped KV
heads repeated per query group, MindFormers' `RotaryEmbedding` (rotate-half over [freqs, freqs], theta `theta`, linear
position interpolation with `extend_method: PI`), `LlamaFeedForward` `w2(silu(w1 x) * w3 x)`, `norm_out`, `lm_head`.
`meta_rope=True` applies RoPE to interleaved pairs instead (Meta's original layout, before MindFormers' import permute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaArgs:
    vocab_size: int = 96
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    n_kv_heads: int = 2
    intermediate_size: int = 96
    rms_norm_eps: float = 1e-5
    theta: float = 10000.0
    qkv_has_bias: bool = False
    tie_word_embeddings: bool = False
    scaling_factor: float = 1.0  # extend_method PI
    meta_rope: bool = False
    seq_length: int = 4096

    @property
    def n_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor, pos: torch.Tensor, a: LlamaArgs) -> torch.Tensor:
    """x [b, s, h, d] rotated at positions `pos` [s]."""
    d = x.shape[-1]
    inv = 1.0 / (a.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(pos.float() / a.scaling_factor, inv)  # [s, d/2]
    if a.meta_rope:  # (real, imaginary) pairs
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[None, :, None]).flatten(3)
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        hd, b = a.head_dim, a.qkv_has_bias
        self.a = a
        self.wq = nn.Linear(a.hidden_size, a.num_heads * hd, bias=b)
        self.wk = nn.Linear(a.hidden_size, a.n_kv_heads * hd, bias=b)
        self.wv = nn.Linear(a.hidden_size, a.n_kv_heads * hd, bias=b)
        self.wo = nn.Linear(a.num_heads * hd, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        a, (bsz, seq, _) = self.a, x.shape
        hd = a.head_dim
        q = rotary(self.wq(x).view(bsz, seq, a.num_heads, hd), pos, a)
        k = rotary(self.wk(x).view(bsz, seq, a.n_kv_heads, hd), pos, a)
        v = self.wv(x).view(bsz, seq, a.n_kv_heads, hd)
        rep = a.num_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.w1 = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.w2 = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.w3 = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.feed_forward = FeedForward(a)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.config = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_layers))
        self.norm_out = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1]) if pos is None else pos.reshape(-1)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, pos)
        return self.lm_head(self.norm_out(h))


def build(seed: int = 0, **kw) -> Llama:
    """A small MindFormers Llama with random weights (norm weights too, so a swapped norm shows)."""
    torch.manual_seed(seed)
    model = Llama(LlamaArgs(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm_out" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.08)
    return model.eval()
