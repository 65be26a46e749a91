"""Megatron's GPT forward pass computed the way Megatron computes it — rank by rank — for parity checks.

The reference does not use the conversion's merged views: it runs the tensor-parallel ranks as Megatron
does, on each rank's own tensors (`megatron_source.RankModels`, canonical fused names, stage-local layer
numbers), so a wrong shard order, QKV ordering or gate/up split in the conversion shows up as a logit
difference instead of being reproduced on both sides:

- vocab-parallel embedding: rank r holds rows [r·V/tp, (r+1)·V/tp); learned absolute positions are added,
  or rotary embeddings (rotate-half over the first `kv_channels × rotary_percent` channels, base
  `rotary_base`, linear interpolation / Llama 3.1 scaling) applied to q and k at the given positions;
- column-parallel fused QKV per rank, its output rows read in Megatron's `checkpoint_version` order
  (0: [3, np, hn]; 1.0: [np, hn, 3]; >= 2.0: per query group [q × np/ng, k, v]), GQA groups repeated over
  their heads, causal softmax attention with 1/sqrt(hn);
- row-parallel `linear_proj` / `linear_fc2`: the ranks' partial products summed, the bias added once;
- MLP: GELU (exact or tanh), or SwiGLU with each rank's fc1 rows [gate_r; up_r];
- LayerNorm or RMSNorm (`norm_epsilon`), pipeline stages (and virtual chunks) in Megatron's layer order;
- logits: each rank's vocab slice of the output layer (or the tied embeddings), concatenated.

Weights stream in row blocks (`nanogpt._linear`), one layer at a time; memory holds activations plus a block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from hubconv.adapters.megatron_source import RankModels
from hubconv.errors import MappingError
from hubconv.io.tensor import LazyTensor
from hubconv.native.streaming import linear as _linear
from hubconv.native.streaming import load as _load
from hubconv.native.streaming import load_tensor
from hubconv.native.streaming import rows as _rows


def _inv_freq(a: Mapping[str, Any]) -> torch.Tensor:
    """Megatron's RotaryEmbedding inverse frequencies (with Llama 3.1 scaling when `use_rope_scaling`)."""
    dim = int(a["kv_channels"] * float(a["rotary_percent"]))
    inv = 1.0 / (float(a["rotary_base"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if a.get("use_rope_scaling"):
        factor, low, high, old = float(a["rope_scaling_factor"]), 1.0, 4.0, 8192
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def check_inv_freq(buffer: LazyTensor, a: Mapping[str, Any], where: str) -> None:
    """The legacy `rotary_pos_emb.inv_freq` buffer must be what the rotary arguments give (else they are wrong)."""
    saved = load_tensor(buffer)
    want = _inv_freq({**a, "use_rope_scaling": False})
    if saved.shape != want.shape or not torch.allclose(saved.float(), want, rtol=1e-3, atol=1e-7):
        raise MappingError(
            f"{where}: the checkpoint's rotary inv_freq buffer ({list(saved.shape)}) disagrees with rotary_base "
            f"{a['rotary_base']} / rotary_percent {a['rotary_percent']} / kv_channels {a['kv_channels']}"
        )


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    head, rest = x[..., :rot], x[..., rot:]
    x1, x2 = head.chunk(2, dim=-1)
    return torch.cat([head * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)


def _qkv_rows(out: torch.Tensor, a: Mapping[str, Any], heads: int, groups: int) -> tuple[torch.Tensor, ...]:
    """q [b, s, heads, hn], k and v [b, s, groups, hn] from one rank's fused QKV output rows."""
    b, s, _ = out.shape
    hn, version = int(a["kv_channels"]), float(a["checkpoint_version"])
    if version == 0:  # [3, np, hn]
        q, k, v = out.view(b, s, 3, heads, hn).unbind(2)
        return q, k, v
    if version == 1.0:  # [np, hn, 3]
        q, k, v = out.view(b, s, heads, hn, 3).unbind(-1)
        return q, k, v
    per = heads // groups  # >= 2.0: [ng, (np/ng + 2), hn]
    grouped = out.view(b, s, groups, per + 2, hn)
    q = grouped[:, :, :, :per].reshape(b, s, heads, hn)
    return q, grouped[:, :, :, per], grouped[:, :, :, per + 1]


def _norm(x: torch.Tensor, a: Mapping[str, Any], w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    eps = float(a["norm_epsilon"])
    if a["normalization"] == "LayerNorm":
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_logits(
    models: RankModels, a: Mapping[str, Any], tokens: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 logits [batch, seq, hf_vocab_size] of Megatron's GPT on the rank tensors of `models`, for
    `tokens` at `positions` [seq] (default 0..seq-1); `a` are the resolved native args (hubconv.json)."""
    tp = 1 if models.stacked else models.tp
    ranks = range(tp)
    shards = models.shards
    chunks = sorted({(p, v) for (_, p, v) in shards}, key=lambda pv: (pv[1], pv[0]))  # Megatron's layer order
    bsz, seq = tokens.shape
    pos = torch.arange(seq) if positions is None else positions.reshape(-1)
    heads, groups = int(a["num_attention_heads"]), int(a["num_query_groups"])
    hn = int(a["kv_channels"])
    if heads % tp or (groups % tp and tp % groups):
        raise MappingError(f"{heads} heads / {groups} query groups cannot run on {tp} tensor-parallel ranks")

    def get(r: int, chunk: tuple[int, int], key: str) -> LazyTensor | None:
        return shards[(r, chunk[0], chunk[1])].get(key)

    first, last = chunks[0], chunks[-1]
    emb = [get(r, first, "embedding.word_embeddings.weight") for r in ranks]
    if any(e is None for e in emb):
        raise MappingError("reference forward: the first pipeline stage holds no word embeddings")
    rows_per = emb[0].shape[0]  # type: ignore[union-attr]
    ids = tokens.reshape(-1).tolist()
    h = torch.zeros(len(ids), int(a["hidden_size"]))
    for r in ranks:  # vocab-parallel lookup: each rank fills the ids in its slice
        mine = [i for i, t in enumerate(ids) if r * rows_per <= t < (r + 1) * rows_per]
        if mine:
            h[mine] = _rows(emb[r], [ids[i] - r * rows_per for i in mine])  # type: ignore[arg-type]
    h = h.reshape(bsz, seq, -1)
    rope = None
    if a["position_embedding_type"] == "learned_absolute":
        wpe = get(0, first, "embedding.position_embeddings.weight")
        if wpe is None:
            raise MappingError("reference forward: learned positions, but no embedding.position_embeddings.weight")
        if int(pos.max()) >= wpe.shape[0]:
            raise MappingError(f"position {int(pos.max())} is beyond the {wpe.shape[0]} learned positions")
        h = h + _rows(wpe, pos.tolist())[None]
    else:
        factor = a.get("rotary_seq_len_interpolation_factor") or 1.0
        freqs = (pos.to(torch.float32) / float(factor))[:, None] * _inv_freq(a)
        emb_f = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]
        rope = (emb_f.cos(), emb_f.sin())
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()

    def lin(x: torch.Tensor, r: int, chunk: tuple[int, int], key: str, bias: bool = True) -> torch.Tensor:
        w = get(r, chunk, key + ".weight")
        if w is None:
            raise MappingError(f"reference forward: rank {r} lacks {key}.weight")
        return _linear(x, w, _load(shards[(r, *chunk)], key + ".bias") if bias else None)

    def norm(x: torch.Tensor, chunk: tuple[int, int], key: str) -> torch.Tensor:
        return _norm(x, a, _load(shards[(0, *chunk)], key + ".weight"), _load(shards[(0, *chunk)], key + ".bias"))

    def row_parallel(parts: list[torch.Tensor], chunk: tuple[int, int], key: str) -> torch.Tensor:
        out = sum(lin(x, r, chunk, key, bias=False) for r, x in zip(ranks, parts, strict=True))
        bias = _load(shards[(0, *chunk)], key + ".bias")
        return out if bias is None else out + bias  # type: ignore[return-value]

    with torch.no_grad():
        for chunk in chunks:
            layers = sorted({int(k.split(".")[2]) for k in shards[(0, *chunk)] if k.startswith("decoder.layers.")})
            for i in layers:
                p = f"decoder.layers.{i}."
                x = norm(h, chunk, p + "input_layernorm")
                contexts = []
                for r in ranks:
                    out = lin(x, r, chunk, p + "self_attention.linear_qkv")
                    if groups % tp == 0:
                        q, k, v = _qkv_rows(out, a, heads // tp, groups // tp)
                    else:  # fewer groups than ranks: ranks hold slices of the global fused rows
                        raise MappingError(  # megatron-core itself requires whole groups per rank
                            "reference forward: fewer query groups than tensor-parallel ranks"
                        )
                    if rope is not None:
                        q, k = _rope(q, *rope), _rope(k, *rope)
                    rep = q.shape[2] // k.shape[2]
                    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
                    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
                    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hn)
                    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
                    contexts.append((probs @ v).transpose(1, 2).reshape(bsz, seq, -1))
                h = h + row_parallel(contexts, chunk, p + "self_attention.linear_proj")
                x = norm(h, chunk, p + "pre_mlp_layernorm")
                acts = []
                for r in ranks:
                    y = lin(x, r, chunk, p + "mlp.linear_fc1")
                    if a["activation"] == "swiglu":
                        gate, up = y.chunk(2, dim=-1)
                        acts.append(F.silu(gate) * up)
                    else:
                        acts.append(F.gelu(y, approximate="tanh" if a["activation"] == "gelu_tanh" else "none"))
                h = h + row_parallel(acts, chunk, p + "mlp.linear_fc2")
        h = norm(h, last, "decoder.final_layernorm")
        heads_w = [get(r, last, "output_layer.weight") for r in ranks]
        if any(w is None for w in heads_w):
            heads_w = emb  # tied
        logits = torch.cat([_linear(h, w) for w in heads_w], dim=-1)  # type: ignore[arg-type]
        return logits[..., : int(a["hf_vocab_size"])]
