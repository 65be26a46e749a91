"""Megatron-LM's GPT model, re-implemented for tests as a reference forward (NVIDIA/Megatron-LM
`megatron/core/models/gpt/gpt_model.py`, `transformer/transformer_layer.py`, `transformer/attention.py`,
`transformer/mlp.py`, `models/common/embeddings/rotary_pos_embedding.py`, read through the public-code
index; nothing copied).

Parameter names and shapes are the *global* (unsharded, TP=1 PP=1) megatron-core names of the
Transformer-Engine layer spec, where the pre-attention and pre-MLP norms are fused into the following
linear layer (`linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`). The local spec's
`input_layernorm` / `pre_mlp_layernorm` names and the legacy `language_model` names are produced by
`tests/native/megatron_save.py` from these.

What the forward reproduces:
- word embeddings with rows padded to a multiple of `make_vocab_size_divisible_by × TP` (the padded
  rows are real, randomly initialised rows whose logits Megatron computes); `forward` returns the
  logits of the true vocabulary, `forward_padded` all of them;
- learned absolute position embeddings added to the word embeddings, or rotary embeddings applied to
  q and k: rotate-half (non-interleaved) over the first `kv_channels × rotary_percent` channels with
  inverse frequencies `base ** (-2i / rot_dim)`. Megatron's training forward takes rotary positions
  0..s-1; here they are the given `positions`, which is what Megatron computes for a token at that position;
- fused QKV laid out per query group `[q × (np/ng), k, v]` (rows of `kv_channels`), GQA by repeating
  each group's k/v over its query heads, scale 1/sqrt(kv_channels), softmax in float32, causal mask;
- activations: `gelu` = exact erf GELU (megatron-core's default `F.gelu`), `gelu_tanh` = the tanh
  approximation Megatron's fused bias-GELU uses (`bias_gelu_fusion`), `swiglu` = silu(gate) * up with
  `linear_fc1` rows `[gate; up]`;
- LayerNorm (weight and bias) or RMSNorm (weight only), `layernorm_epsilon`;
- output layer tied to the word embeddings unless `untie_embeddings_and_output_weights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")


@dataclass
class MegatronGPTConfig:
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: no GQA (one group per head)
    ffn_hidden_size: int | None = None  # None: 4 × hidden_size
    kv_channels: int | None = None  # None: hidden_size // num_attention_heads
    vocab_size: int = 100  # the true (tokenizer) vocabulary
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 128
    position_embedding_type: str = "learned_absolute"  # or "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rotary_seq_len_interpolation_factor: float | None = None  # positions divided by it (linear scaling)
    use_rope_scaling: bool = False  # Llama 3.1 frequency scaling (original context 8192, low 1, high 4)
    rope_scaling_factor: float = 8.0
    normalization: str = "LayerNorm"  # or "RMSNorm"
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # see ACTIVATIONS
    add_bias_linear: bool = True
    add_qkv_bias: bool | None = None  # None: add_bias_linear
    untie_embeddings_and_output_weights: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {ACTIVATIONS}")
        if self.num_attention_heads % self.groups:
            raise ValueError("num_attention_heads must be a multiple of num_query_groups")

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def qkv_bias(self) -> bool:
        return self.add_bias_linear if self.add_qkv_bias is None else self.add_qkv_bias

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Megatron's `_vocab_size_with_padding`: round up to a multiple of divisible_by × TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


def normalize(cfg: MegatronGPTConfig, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm (weight, bias) or RMSNorm (weight) with `layernorm_epsilon`."""
    eps = cfg.layernorm_epsilon
    if cfg.normalization == "LayerNorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Norm(nn.Module):
    """TE's LayerNorm / RMSNorm module: `weight` (and `bias` for LayerNorm)."""

    def __init__(self, cfg: MegatronGPTConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size)) if cfg.normalization == "LayerNorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(self.cfg, x, self.weight, self.bias)


class NormLinear(nn.Module):
    """TE's `LayerNormLinear`: `layer_norm_weight`/`layer_norm_bias` then `weight`/`bias`."""

    def __init__(self, cfg: MegatronGPTConfig, out_features: int, bias: bool):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(out_features, cfg.hidden_size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.layer_norm_weight = nn.Parameter(torch.ones(cfg.hidden_size))
        layer_norm = cfg.normalization == "LayerNorm"
        self.layer_norm_bias = nn.Parameter(torch.zeros(cfg.hidden_size)) if layer_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = normalize(self.cfg, x, self.layer_norm_weight, self.layer_norm_bias)
        return F.linear(h, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: MegatronGPTConfig):
        super().__init__()
        self.cfg = cfg
        rows = (cfg.num_attention_heads + 2 * cfg.groups) * cfg.head_dim
        self.linear_qkv = NormLinear(cfg, rows, cfg.qkv_bias)
        self.linear_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, cfg.add_bias_linear)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        c = self.cfg
        b, s, _ = x.shape
        per_group = c.num_attention_heads // c.groups
        qkv = self.linear_qkv(x).view(b, s, c.groups, (per_group + 2) * c.head_dim)
        q, k, v = qkv.split([per_group * c.head_dim, c.head_dim, c.head_dim], dim=-1)
        q = q.reshape(b, s, c.num_attention_heads, c.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = k.repeat_interleave(per_group, dim=2), v.repeat_interleave(per_group, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, np, s, hn]
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(c.head_dim)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).to(v.dtype)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, c.num_attention_heads * c.head_dim)
        return self.linear_proj(ctx)


class MLP(nn.Module):
    def __init__(self, cfg: MegatronGPTConfig):
        super().__init__()
        self.cfg = cfg
        fc1_rows = 2 * cfg.ffn if cfg.activation == "swiglu" else cfg.ffn
        self.linear_fc1 = NormLinear(cfg, fc1_rows, cfg.add_bias_linear)
        self.linear_fc2 = nn.Linear(cfg.ffn, cfg.hidden_size, cfg.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.cfg.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.cfg.activation == "gelu_tanh" else "none")
        return self.linear_fc2(h)


class Layer(nn.Module):
    def __init__(self, cfg: MegatronGPTConfig):
        super().__init__()
        self.self_attention, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.self_attention(x, rope)
        return x + self.mlp(x)


class Decoder(nn.Module):
    def __init__(self, cfg: MegatronGPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = Norm(cfg)


class Embedding(nn.Module):
    def __init__(self, cfg: MegatronGPTConfig, padded_vocab: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(padded_vocab, cfg.hidden_size)
        if cfg.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)


def llama31_scaled(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """megatron-core RotaryEmbedding's Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept,
    a smooth blend in between (original context 8192, low_freq_factor 1, high_freq_factor 4)."""
    context, low, high = 8192.0, 1.0, 4.0
    wavelength = 2 * math.pi / inv_freq
    out = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, (1 - blend) * out / factor + blend * out, out)


def rope_tables(cfg: MegatronGPTConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [b, s, 1, rot_dim] for rotate-half RoPE at `positions` ([b, s])."""
    rot_dim = int(cfg.head_dim * cfg.rotary_percent)
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    if cfg.use_rope_scaling:
        inv_freq = llama31_scaled(inv_freq, cfg.rope_scaling_factor)
    pos = positions.to(torch.float32)
    if cfg.rotary_seq_len_interpolation_factor:
        pos = pos / cfg.rotary_seq_len_interpolation_factor
    freqs = pos[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot_dim = cos.shape[-1]
    rot, rest = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1)


class MegatronGPT(nn.Module):
    """Megatron's GPTModel with global megatron-core (TE spec) parameter names; `tp` sets the vocab padding."""

    def __init__(self, cfg: MegatronGPTConfig, tp: int = 1):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.padded_vocab = cfg.padded_vocab_size(tp)
        self.embedding = Embedding(cfg, self.padded_vocab)
        self.decoder = Decoder(cfg)
        if cfg.untie_embeddings_and_output_weights:
            self.output_layer = nn.Linear(cfg.hidden_size, self.padded_vocab, bias=False)

    def init_random(self, seed: int = 0, std: float = 0.1) -> MegatronGPT:
        """Random weights, norm weights around 1, non-zero biases: every tensor matters to the logits."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                noise = torch.randn(p.shape, generator=g)
                if "norm" in name and leaf.endswith("weight"):
                    p.copy_(1.0 + 0.1 * noise)
                else:
                    p.copy_(std * noise)
        return self

    def output_weight(self) -> torch.Tensor:
        if self.cfg.untie_embeddings_and_output_weights:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def forward_padded(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the padded vocabulary, float32, for `tokens` [b, s] at `positions` [b, s] (default 0..s-1)."""
        cfg = self.cfg
        if positions is None:
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        x = self.embedding.word_embeddings(tokens)
        rope = None
        if cfg.position_embedding_type == "learned_absolute":
            x = x + self.embedding.position_embeddings(positions)
        else:
            rope = rope_tables(cfg, positions)
        for layer in self.decoder.layers:
            x = layer(x, rope)
        x = self.decoder.final_layernorm(x)
        return F.linear(x, self.output_weight()).float()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the true vocabulary (what a converted model with the trimmed vocabulary returns)."""
        return self.forward_padded(tokens, positions)[..., : self.cfg.vocab_size]


def gpt2_like(**changes: object) -> MegatronGPTConfig:
    """GPT-2-shaped Megatron config (learned positions, LayerNorm, exact GELU, biases, tied head); 100-token
    vocabulary padded to 112 rows at TP=1, 128 at TP=2."""
    return MegatronGPTConfig(**{"vocab_size": 100, "make_vocab_size_divisible_by": 16, **changes})


def llama_like(**changes: object) -> MegatronGPTConfig:
    """Llama-shaped Megatron config: RoPE (base 500000), RMSNorm, SwiGLU, GQA (4 heads, 2 groups), no biases,
    untied output layer."""
    base: dict[str, object] = {
        "num_query_groups": 2,
        "vocab_size": 100,
        "make_vocab_size_divisible_by": 16,
        "ffn_hidden_size": 96,
        "position_embedding_type": "rope",
        "rotary_base": 500000,
        "normalization": "RMSNorm",
        "layernorm_epsilon": 1e-6,
        "activation": "swiglu",
        "add_bias_linear": False,
        "untie_embeddings_and_output_weights": True,
    }
    return MegatronGPTConfig(**{**base, **changes})
