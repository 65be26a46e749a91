"""LitGPT's GPT (litgpt/model.py), written for the tests, and writers of LitGPT checkpoint folders.

The model follows LitGPT's own forward: token embeddings, blocks with `norm_1` -> fused `attn.qkv`
([all Q; all K; all V], grouped-query heads repeated per group) with RoPE on the first `rope_n_elem` dims
(rotate-half, base `rope_base`, positions divided by `rope_condense_ratio`, optional Llama 3 / linear
`rope_adjustments`) and optional sliding-window attention, `attn.proj`, then `norm_2` -> MLP (`GptNeoxMLP`
fc/GELU/proj or `LLaMAMLP` silu(fc_1) * fc_2 -> proj) with a sequential or parallel residual, `ln_f`, `lm_head`
over the padded vocabulary. Independent of hubconv's reference forward (hubconv/native/litgpt.py).

Writers produce what LitGPT writes: `lit_model.pth` (a plain state dict, or a pretrain checkpoint
`{model, optimizer, train_dataloader, iter_num, step_count}`), `model_config.yaml` (every Config field, as
`save_config` dumps `asdict(config)`), and optionally the pre-0.5.5 `attn.attn` key with the QKV rows
interleaved per query group.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml


@dataclass
class Config:
    name: str = ""
    hf_config: dict = field(default_factory=dict)
    block_size: int = 4096
    n_layer: int = 16
    n_embd: int = 4096
    vocab_size: int = 50254
    padding_multiple: int = 512
    padded_vocab_size: int | None = None
    norm_class_name: str = "LayerNorm"
    norm_eps: float = 1e-5
    norm_qk: bool = False
    norm_qk_type: str = "default"
    post_attention_norm: bool = False
    post_mlp_norm: bool = False
    parallel_residual: bool = True
    shared_attention_norm: bool = False
    n_head: int = 32
    head_size: int | None = None
    n_query_groups: int | None = None
    attn_bias: bool = False
    attention_scores_scalar: int | None = None
    sliding_window_size: int | None = None
    sliding_window_indices: list[int] | None = None
    attention_logit_softcapping: float | None = None
    rope_base: int = 10000
    rotary_percentage: float = 0.25
    rope_condense_ratio: int = 1
    rope_adjustments: dict | None = None
    rope_interleave: bool = False
    intermediate_size: int | None = None
    moe_intermediate_size: int | None = None
    bias: bool = True
    mlp_class_name: str = "GptNeoxMLP"
    gelu_approximate: str = "none"
    n_expert: int = 0
    n_shared_expert: int | None = None
    n_expert_groups: int | None = None
    n_topk_groups: int | None = None
    n_topk_scores_per_group: int | None = None
    n_expert_per_token: int = 0
    first_k_dense_replace: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    scale_embeddings: bool = False
    lm_head_bias: bool = False
    final_logit_softcapping: float | None = None
    norm_1: bool = True
    norm_2: bool = True
    latent_attention: dict | None = None
    rope_local_base_freq: float | None = None
    rope_indices: list[int] | None = None

    def __post_init__(self) -> None:
        if self.head_size is None:
            self.head_size = self.n_embd // self.n_head
        if self.padded_vocab_size is None:
            m = self.padding_multiple
            self.padded_vocab_size = -(-self.vocab_size // m) * m
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.sliding_window_size is not None and self.sliding_window_indices is None:
            self.sliding_window_indices = [1] * self.n_layer

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size)


# Small configurations of the three families the tests cover (LitGPT's own presets, shrunk).
def llama_like(**kw: Any) -> Config:
    """Llama 3 style: RMSNorm, LLaMAMLP, GQA (4 heads, 2 groups), full rotary, untied head, padded vocab."""
    base = dict(name="tiny-llama", block_size=256, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, vocab_size=250,
                padding_multiple=64, norm_class_name="RMSNorm", norm_eps=1e-5, parallel_residual=False, bias=False,
                rotary_percentage=1.0, rope_base=500000, mlp_class_name="LLaMAMLP", intermediate_size=96)  # fmt: skip
    return Config(**{**base, **kw})


def qwen2_like(**kw: Any) -> Config:
    """Qwen2 style: biases on q/k/v only (attn_bias), GQA, RMSNorm eps 1e-6, tied embeddings."""
    base = dict(name="tiny-qwen2", block_size=256, n_layer=2, n_embd=64, n_head=4, n_query_groups=1, vocab_size=300,
                padded_vocab_size=300, norm_class_name="RMSNorm", norm_eps=1e-6, parallel_residual=False, bias=False,
                attn_bias=True, rotary_percentage=1.0, rope_base=1000000, mlp_class_name="LLaMAMLP",
                intermediate_size=128)  # fmt: skip
    return Config(**{**base, **kw})


def pythia_like(**kw: Any) -> Config:
    """Pythia style: LayerNorm, GptNeoxMLP (exact GELU), parallel residual, 25% rotary, biases, padded vocab."""
    base = dict(name="tiny-pythia", block_size=256, n_layer=2, n_embd=64, n_head=4, vocab_size=200,
                padding_multiple=128, norm_class_name="LayerNorm", parallel_residual=True, bias=True,
                rotary_percentage=0.25, rope_base=10000, mlp_class_name="GptNeoxMLP")  # fmt: skip
    return Config(**{**base, **kw})


def gemma_like(**kw: Any) -> Config:
    """Gemma style: RMSNorm with LitGPT's unit offset (the name), embeddings scaled by sqrt(n_embd), GemmaMLP (tanh
    GELU gate), MQA, head_size other than n_embd / n_head, tied embeddings."""
    base = dict(name="Gemma-tiny", block_size=256, n_layer=2, n_embd=64, n_head=4, n_query_groups=1, head_size=32,
                vocab_size=300, padding_multiple=64, norm_class_name="RMSNorm", norm_eps=1e-6,
                parallel_residual=False, bias=False, rotary_percentage=1.0, scale_embeddings=True,
                mlp_class_name="GemmaMLP", gelu_approximate="tanh", intermediate_size=128)  # fmt: skip
    return Config(**{**base, **kw})


def phi_like(**kw: Any) -> Config:
    """Phi-2 style: parallel residual with one shared norm, 40% rotary, tanh GELU, biases including lm_head's."""
    base = dict(name="phi-tiny", block_size=256, n_layer=2, n_embd=64, n_head=4, vocab_size=300,
                padding_multiple=64, norm_class_name="LayerNorm", parallel_residual=True, shared_attention_norm=True,
                bias=True, lm_head_bias=True, rotary_percentage=0.4, gelu_approximate="tanh",
                mlp_class_name="GptNeoxMLP", intermediate_size=256)  # fmt: skip
    return Config(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ the model


class RMSNorm(nn.Module):
    """LitGPT's RMSNorm; `add_unit_offset` (LitGPT sets it for configs named Gemma*) scales by 1 + weight."""

    def __init__(self, size: int, eps: float, add_unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps, self.add_unit_offset = eps, add_unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        w = (1 + self.weight) if self.add_unit_offset else self.weight
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps) * w.float()


def _norm(c: Config) -> nn.Module:
    if c.norm_class_name == "RMSNorm":
        return RMSNorm(c.n_embd, c.norm_eps, add_unit_offset="Gemma" in c.name)
    return nn.LayerNorm(c.n_embd, eps=c.norm_eps)


class Attention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        self.qkv = nn.Linear(c.n_embd, (c.n_head + 2 * c.n_query_groups) * c.head_size, bias=c.bias or c.attn_bias)
        self.proj = nn.Linear(c.n_head * c.head_size, c.n_embd, bias=c.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c, (B, T, _) = self.c, x.shape
        hs, nh, ng, n = c.head_size, c.n_head, c.n_query_groups, c.rope_n_elem
        q, k, v = self.qkv(x).split((nh * hs, ng * hs, ng * hs), dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)
        k = k.view(B, T, ng, hs).transpose(1, 2)
        v = v.view(B, T, ng, hs).transpose(1, 2)
        q = torch.cat((rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
        if ng != nh:
            k = k.repeat_interleave(nh // ng, dim=1)
            v = v.repeat_interleave(nh // ng, dim=1)
        mask = None
        if c.sliding_window_size is not None:
            i = torch.arange(T)
            allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - c.sliding_window_size)
            mask = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0 / math.sqrt(hs))
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hs))


class MLP(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        if c.mlp_class_name in ("LLaMAMLP", "GemmaMLP"):
            self.fc_1 = nn.Linear(c.n_embd, c.intermediate_size, bias=c.bias)
            self.fc_2 = nn.Linear(c.n_embd, c.intermediate_size, bias=c.bias)
        else:
            self.fc = nn.Linear(c.n_embd, c.intermediate_size, bias=c.bias)
        self.proj = nn.Linear(c.intermediate_size, c.n_embd, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.c.mlp_class_name == "LLaMAMLP":
            return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))
        if self.c.mlp_class_name == "GemmaMLP":
            return self.proj(F.gelu(self.fc_1(x), approximate=self.c.gelu_approximate) * self.fc_2(x))
        return self.proj(F.gelu(self.fc(x), approximate=self.c.gelu_approximate))


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        self.norm_1, self.attn, self.mlp = _norm(c), Attention(c), MLP(c)
        self.norm_2 = None if c.shared_attention_norm else _norm(c)  # Phi: the MLP reads norm_1's output too

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x_normed = self.norm_1(x)
        a = self.attn(x_normed, cos, sin)
        if self.c.parallel_residual:
            return self.mlp(x_normed if self.norm_2 is None else self.norm_2(x)) + (a + x)
        x = a + x
        return self.mlp(self.norm_2(x)) + x


class GPT(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.config = c
        self.lm_head = nn.Linear(c.n_embd, c.padded_vocab_size, bias=c.lm_head_bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(c.padded_vocab_size, c.n_embd),
                h=nn.ModuleList(Block(c) for _ in range(c.n_layer)),
                ln_f=_norm(c),
            )
        )

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(idx.shape[1]) if positions is None else positions
        cos, sin = rope_cache(self.config, pos)
        x = self.transformer.wte(idx)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        for block in self.transformer.h:
            x = block(x, cos, sin)
        return self.lm_head(self.transformer.ln_f(x))


def rope_cache(c: Config, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_n_elem] at `positions`, as LitGPT's build_rope_cache computes them."""
    n = c.rope_n_elem
    theta = 1.0 / (c.rope_base ** (torch.arange(0, n, 2).float() / n))
    adj = c.rope_adjustments
    if adj and "original_max_seq_len" in adj:  # Llama 3.1 scaling
        wavelen = 2 * torch.pi / theta
        smooth = ((adj["original_max_seq_len"] / wavelen - adj["low_freq_factor"])
                  / (adj["high_freq_factor"] - adj["low_freq_factor"])).clamp(0.0, 1.0)  # fmt: skip
        theta = (1 - smooth) * (theta / adj["factor"]) + smooth * theta
    elif adj and "factor" in adj:
        theta = theta / adj["factor"]
    idx_theta = torch.outer(positions.float() / c.rope_condense_ratio, theta).repeat(1, 2)
    return torch.cos(idx_theta), torch.sin(idx_theta)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def build(c: Config, seed: int = 0) -> GPT:
    """A model with random (seeded) weights, norms and biases included, so every tensor matters."""
    torch.manual_seed(seed)
    model = GPT(c)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_1.weight") or name.endswith("norm_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p) if p.dim() > 1 else 0.05 * torch.randn_like(p))
    return model.eval()


# ------------------------------------------------------------------------------------------------ writers


def legacy_qkv(t: torch.Tensor, c: Config) -> torch.Tensor:
    """[all Q; all K; all V] -> LitGPT < 0.5.5's per-query-group [q..q; k; v] (rows; weight or bias)."""
    hs, g = c.head_size, c.n_query_groups
    q, k, v = t.split((c.n_head * hs, g * hs, g * hs))
    per = c.n_head // g
    return torch.cat([torch.cat((q[j * per * hs : (j + 1) * per * hs], k[j * hs : (j + 1) * hs],
                                 v[j * hs : (j + 1) * hs])) for j in range(g)])  # fmt: skip


def state_dict(model: GPT, *, legacy: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict as LitGPT saves it (current `attn.qkv`, or the legacy `attn.attn` layout)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if legacy and ".attn.qkv." in k:
            k, v = k.replace(".attn.qkv.", ".attn.attn."), legacy_qkv(v, model.config)
        out[k] = v if dtype is None else v.to(dtype)
    return out


def _optimizer_state(model: GPT) -> tuple[dict[str, Any], dict[str, Any]]:
    """AdamW and LR-scheduler state dicts after one step on a copy of `model` (which stays what was saved)."""
    trained = copy.deepcopy(model)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    trained(torch.zeros(1, 4, dtype=torch.long)).float().pow(2).mean().backward()
    opt.step()
    scheduler.step()
    return opt.state_dict(), scheduler.state_dict()


def save(
    model: GPT,
    folder: str,
    *,
    legacy: bool = False,
    pretrain: bool = False,
    wrapper: str = "",
    compiled: bool = False,
    dtype: torch.dtype | None = None,
    config: bool = True,
    extra: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write a LitGPT checkpoint folder (`lit_model.pth`, `model_config.yaml`); returns the folder.

    `wrapper` (or `pretrain=True`) picks what `fabric.save` wrote around the state dict: "pretrain"
    (litgpt/pretrain.py: model, optimizer, train_dataloader, iter_num, step_count), "finetune" (finetune/full.py's
    step checkpoints: model, optimizer, scheduler, iter_num, step_count) or "model" (finetune/full.py's final
    `{"model": ...}`); none gives the plain state dict. `compiled` adds torch.compile's `_orig_mod.` prefix."""
    os.makedirs(folder, exist_ok=True)
    sd = {**state_dict(model, legacy=legacy, dtype=dtype), **(extra or {})}
    if compiled:
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    wrapper = "pretrain" if pretrain else wrapper
    obj: Any = sd
    if wrapper == "model":
        obj = {"model": sd}
    elif wrapper:
        optimizer, scheduler = _optimizer_state(model)
        obj = {"model": sd, "optimizer": optimizer, "iter_num": 12, "step_count": 3}
        if wrapper == "pretrain":
            obj["train_dataloader"] = {"current_epoch": 0, "num_samples_yielded": 4, "latest_worker_idx": 0}
        else:
            obj["scheduler"] = scheduler
    torch.save(obj, os.path.join(folder, "lit_model.pth"))
    if config:
        with open(os.path.join(folder, "model_config.yaml"), "w", encoding="utf-8") as f:
            yaml.dump(asdict(model.config), f)
    return folder
