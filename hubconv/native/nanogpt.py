"""nanoGPT's GPT forward pass, streamed from the *native* checkpoint, for parity checks.

The model as nanoGPT computes it — learned token and position embeddings, pre-LayerNorm blocks
(eps 1e-5, biases optional), fused `c_attn` [q; k; v] with causal attention, exact (erf) GELU MLP,
final LayerNorm and the head tied to the token embeddings — evaluated straight from the lazy
checkpoint: weights are read one layer at a time, and every matrix product streams its weight
(nanoGPT's `nn.Linear` layout, [out, in]) in row blocks, so memory holds activations plus one block.
"""

from __future__ import annotations

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


def reference_logits(
    tensors: Mapping[str, LazyTensor], a: Mapping[str, Any], tokens: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 logits [batch, seq, hf_vocab_size] of nanoGPT's GPT for `tokens` at `positions` [seq]
    (default 0..seq-1; position embeddings are looked up at these ids, as HF's `position_ids`).

    `tensors` uses nanoGPT's names without wrapper prefixes; `a` are the resolved native args as in
    hubconv.json (n_layer, n_head, n_embd, block_size, bias, hf_vocab_size). Logits cover the rows the
    converted model keeps (the padded vocabulary's extra rows are left out when it was trimmed)."""
    c, n_head, eps = a["n_embd"], a["n_head"], 1e-5
    bsz, seq = tokens.shape
    pos = torch.arange(seq) if positions is None else positions.reshape(-1)
    if int(pos.max()) >= a["block_size"]:
        raise MappingError(f"position {int(pos.max())} is beyond nanoGPT's block_size {a['block_size']}")
    wte = tensors["transformer.wte.weight"]
    h = _rows(wte, tokens.reshape(-1).tolist()).reshape(bsz, seq, c)
    h = h + _rows(tensors["transformer.wpe.weight"], pos.tolist())[None]

    def norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, (c,), _load(tensors, prefix + ".weight"), _load(tensors, prefix + ".bias"), eps)

    def lin(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return _linear(x, tensors[prefix + ".weight"], _load(tensors, prefix + ".bias"))

    with torch.no_grad():
        for i in range(a["n_layer"]):
            p = f"transformer.h.{i}."
            q, k, v = lin(norm(h, p + "ln_1"), p + "attn.c_attn").split(c, dim=2)
            q, k, v = (z.view(bsz, seq, n_head, c // n_head).transpose(1, 2) for z in (q, k, v))
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + lin(att.transpose(1, 2).reshape(bsz, seq, c), p + "attn.c_proj")
            h = h + lin(F.gelu(lin(norm(h, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
        h = norm(h, "transformer.ln_f")
        return _linear(h, V.slice_rows(wte, 0, a.get("hf_vocab_size", wte.shape[0])))
