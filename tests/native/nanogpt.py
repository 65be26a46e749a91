"""nanoGPT's model and checkpoint layout, re-implemented for tests (karpathy/nanoGPT `model.py` and
`train.py`, read through the public-code index; nothing copied).

- `GPT` is the native architecture: learned token and position embeddings, pre-LayerNorm blocks
  (LayerNorm with an optional bias, eps 1e-5), fused `c_attn` Linear [q; k; v] with causal
  attention, exact GELU MLP of width 4 * n_embd, final LayerNorm, `lm_head` tied to `wte`.
- `save_ckpt` writes what `train.py` writes: `{model, optimizer, model_args, iter_num,
  best_val_loss, config}` with `torch.save`. `compiled=True` reproduces the `_orig_mod.` key prefix
  of a `torch.compile`d model, `ddp=True` the `module.` prefix of a DDP-wrapped one, `mask_buffers=True`
  the `attn.bias` causal-mask buffers nanoGPT registers when flash attention is unavailable.
- `save_meta` writes a char-level dataset's `meta.pkl` ({vocab_size, itos, stoi}).
"""

from __future__ import annotations

import math
import pickle
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 96
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's own: PyTorch's lacked bias=False)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head, self.n_embd = c.n_head, c.n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU()  # exact erf GELU, not GPT-2's tanh approximation
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c.n_embd, c.bias), CausalSelfAttention(c)
        self.ln_2, self.mlp = LayerNorm(c.n_embd, c.bias), MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(c.vocab_size, c.n_embd),
                wpe=nn.Embedding(c.block_size, c.n_embd),
                h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]),
                ln_f=LayerNorm(c.n_embd, c.bias),
            )
        )
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does
        for name, p in self.named_parameters():  # random but non-trivial values everywhere
            if name.endswith("bias") or "ln_" in name:
                nn.init.normal_(p, mean=1.0 if name.endswith("weight") else 0.0, std=0.1)
            else:
                nn.init.normal_(p, std=0.15 if "wpe" in name or "wte" in name else 0.2 / math.sqrt(c.n_embd / 8))

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every position (nanoGPT's inference shortcut returns only the last one); `positions`
        index the position embeddings (default 0..t-1), as HF's `position_ids`."""
        pos = torch.arange(idx.shape[1]) if positions is None else positions
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def build(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**overrides)).eval()


def save_ckpt(
    model: GPT,
    path: str,
    *,
    compiled: bool = False,
    ddp: bool = False,
    optimizer: bool = True,
    dtype: torch.dtype | None = None,
    extra_config: dict | None = None,
    mask_buffers: bool = False,
    drop_keys: tuple[str, ...] = (),
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `ckpt.pt` the way nanoGPT's train.py does (optionally through compile / DDP prefixes).

    With `optimizer`, one AdamW step is taken first (the model's weights change), so the file holds
    real optimizer state; compare against the model after this call. `drop_keys` / `extra_tensors` edit
    the model state dict (native names, before prefixes) to make broken checkpoints."""
    opt_state = {}
    if optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95))
        model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        opt_state = opt.state_dict()
    sd = model.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
        # keep tying visible as shared storage, as a real save of a tied model does
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    if mask_buffers:
        n = model.config.block_size
        for i in range(model.config.n_layer):
            sd[f"transformer.h.{i}.attn.bias"] = torch.ones(n, n).tril().view(1, 1, n, n)
    sd = {k: v for k, v in sd.items() if k not in drop_keys}
    sd.update(extra_tensors or {})
    prefix = ("module." if ddp else "") + ("_orig_mod." if compiled else "")
    sd = {prefix + k: v for k, v in sd.items()}
    model_args = {k: v for k, v in asdict(model.config).items() if k != "dropout"}
    model_args["dropout"] = model.config.dropout
    config = {
        "out_dir": "out",
        "eval_interval": 2000,
        "dataset": "shakespeare_char",
        "batch_size": 12,
        "block_size": model.config.block_size,
        "learning_rate": 6e-4,
        "compile": compiled,
        "backend": "nccl",
        "dtype": "bfloat16",
        **(extra_config or {}),
    }
    torch.save(
        {
            "model": sd,
            "optimizer": opt_state,
            "model_args": model_args,
            "iter_num": 5000,
            "best_val_loss": torch.tensor(1.4697),
            "config": config,
        },
        path,
    )


def save_meta(path: str, chars: str) -> None:
    """A char-level dataset's meta.pkl, as nanoGPT's data/shakespeare_char/prepare.py writes it."""
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = dict(enumerate(chars))
    with open(path, "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
