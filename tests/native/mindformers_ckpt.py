"""MindSpore `.ckpt` files written as `mindspore.save_checkpoint` writes them, without MindSpore or protobuf.

Protobuf encoding by hand from MindSpore's `checkpoint.proto` (proto2): one serialized
`Checkpoint { repeated Value value = 1; }` per value, appended to the file; `Value { tag = 1;
tensor = 2 }`, `TensorProto { repeated int64 dims = 1 (unpacked, proto2's default); tensor_type = 2;
tensor_content = 3 }`. Like `_write_parameter_bytes_data`, a tensor whose bytes exceed `slice_bytes`
(512 MiB in MindSpore) is written as consecutive Values under the same tag and dims, each with the
next chunk of bytes; scalars from `append_dict` have no dims (`Tensor(3)`), strings are tensor_type
`str` with dims [0] and numpy UTF-32 content; `crc=True` appends `b"crc_num"` and the big-endian
10-byte CRC32 of every message before it (`crc_check=True`).

Also MindFormers' layouts: `model_state_dict` (Llama names from MindFormers' `convert_weight.py`:
`model.tok_embeddings.embedding_weight`, `model.layers.N.attention.wq.weight`, ..., `model.norm_out.weight`,
`lm_head.weight`), fused `attention.w_qkv` (per KV group, `qkv_concat_hf2mg`) and
`feed_forward.w_gate_hidden` (row-interleaved, `ffn_concat_hf2mg`), and the entries a training run adds.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

SLICE_BYTES = 512 * 1024 * 1024  # MindSpore's SLICE_SIZE (KiB) * 1024

TYPE_NAMES = {
    torch.float32: "Float32",
    torch.float16: "Float16",
    torch.bfloat16: "BFloat16",
    torch.float64: "Float64",
    torch.int8: "Int8",
    torch.int16: "Int16",
    torch.int32: "Int32",
    torch.int64: "Int64",
    torch.uint8: "UInt8",
    torch.bool: "Bool",
}


def varint(value: int) -> bytes:
    """Protobuf base-128 varint (negative int64 as its 10-byte two's complement)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def value_message(tag: str, dims: Iterable[int], tensor_type: str, content: bytes) -> bytes:
    """One serialized `Checkpoint` holding one `Value` (what save_checkpoint writes per chunk)."""
    tensor = b"".join(varint(1 << 3 | 0) + varint(d) for d in dims)
    tensor += field(2, tensor_type.encode()) + field(3, content)
    return field(1, field(1, tag.encode()) + field(2, tensor))


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def messages(items: Mapping[str, Any], *, slice_bytes: int = SLICE_BYTES) -> Iterable[bytes]:
    """The serialized Checkpoint messages for `items` (tensors, Python scalars, strings), in order."""
    for name, value in items.items():
        if isinstance(value, str):
            yield value_message(name, [0], "str", np.array(value).tobytes())
            continue
        if isinstance(value, bool):  # Tensor(value) of a Python scalar: Bool, Int64 or Float32, shape ()
            value = torch.tensor(value, dtype=torch.bool)
        elif isinstance(value, int):
            value = torch.tensor(value, dtype=torch.int64)
        elif isinstance(value, float):
            value = torch.tensor(value, dtype=torch.float32)
        data = raw_bytes(value)
        dims = list(value.shape)
        ttype = TYPE_NAMES[value.dtype]
        for i in range(0, max(len(data), 1), slice_bytes):
            yield value_message(name, dims, ttype, data[i : i + slice_bytes])


def save_checkpoint(items: Mapping[str, Any], path: str, *, crc: bool = False, slice_bytes: int = SLICE_BYTES) -> str:
    """Write `items` as MindSpore's save_checkpoint does (optionally with the crc_num trailer)."""
    crc_num = 0
    with open(path, "wb") as f:
        for msg in messages(items, slice_bytes=slice_bytes):
            crc_num = binascii.crc32(msg, crc_num)
            f.write(msg)
        if crc:
            f.write(b"crc_num" + crc_num.to_bytes(10, "big"))
    return path


def write_sparse_split(
    path: str,
    tag: str,
    dims: list[int],
    tensor_type: str,
    itemsize: int,
    slice_bytes: int = SLICE_BYTES,
    marks: Mapping[int, bytes] | None = None,
) -> int:
    """A checkpoint with one large tensor of zeros split into `slice_bytes` chunks, written sparsely
    (only the protobuf headers and `marks` {byte offset in the tensor: bytes} are written; the rest are
    holes). Returns the file size."""
    total = int(np.prod(dims)) * itemsize
    marks = dict(marks or {})
    with open(path, "wb") as f:
        pos = 0
        for start in range(0, total, slice_bytes):
            n = min(slice_bytes, total - start)
            tensor_head = b"".join(varint(8) + varint(d) for d in dims) + field(2, tensor_type.encode())
            tensor_head += varint(3 << 3 | 2) + varint(n)
            tensor_len = len(tensor_head) + n
            value_head = field(1, tag.encode()) + varint(2 << 3 | 2) + varint(tensor_len)
            value_len = len(value_head) + tensor_len
            head = varint(1 << 3 | 2) + varint(value_len) + value_head + tensor_head
            f.seek(pos)
            f.write(head)
            content_at = pos + len(head)
            for off, data in marks.items():  # the part of each mark inside this chunk
                lo, hi = max(off, start), min(off + len(data), start + n)
                if lo < hi:
                    f.seek(content_at + lo - start)
                    f.write(data[lo - off : hi - off])
            pos = content_at + n
        f.truncate(pos)
    return pos


# ---------------------------------------------------------------------------------------------- MindFormers


def llama_state_dict(
    ref: Any, *, qkv_concat: bool = False, qkv_layout: str = "grouped", ffn_layout: str = "interleaved"
) -> dict[str, torch.Tensor]:
    """MindFormers' Llama parameter names for the reference model's weights (HF-style, rotate-half RoPE).

    `qkv_concat=True` fuses q/k/v (and their biases) into `attention.w_qkv` per KV group
    ([q heads of group g; k_g; v_g], `qkv_concat_hf2mg`), or as [Q; K; V] with `qkv_layout="concat"`,
    and w1/w3 into `feed_forward.w_gate_hidden` row by row ([gate_0; up_0; gate_1; ...], `ffn_concat_hf2mg`),
    or [W1; W3] with `ffn_layout="concat"`."""
    cfg = ref.config
    out: dict[str, torch.Tensor] = {"model.tok_embeddings.embedding_weight": ref.tok_embeddings.weight}
    groups = cfg.n_kv_heads
    per = cfg.n_heads // groups
    for i, layer in enumerate(ref.layers):
        p = f"model.layers.{i}."
        att, ffn = layer.attention, layer.feed_forward
        out[p + "attention_norm.weight"] = layer.attention_norm.weight
        names = ("weight", "bias") if att.wq.bias is not None else ("weight",)
        for kind in names:
            q, k, v = (getattr(getattr(att, w), kind) for w in ("wq", "wk", "wv"))
            if not qkv_concat:
                out[p + f"attention.wq.{kind}"], out[p + f"attention.wk.{kind}"], out[p + f"attention.wv.{kind}"] = (
                    q,
                    k,
                    v,
                )
            elif qkv_layout == "concat":
                out[p + f"attention.w_qkv.{kind}"] = torch.cat([q, k, v])
            else:
                hd = cfg.head_dim
                qg = q.reshape(groups, per * hd, *q.shape[1:])
                kg = k.reshape(groups, hd, *k.shape[1:])
                vg = v.reshape(groups, hd, *v.shape[1:])
                out[p + f"attention.w_qkv.{kind}"] = torch.cat([qg, kg, vg], dim=1).reshape(-1, *q.shape[1:])
        out[p + "attention.wo.weight"] = att.wo.weight
        out[p + "ffn_norm.weight"] = layer.ffn_norm.weight
        if not qkv_concat:
            out[p + "feed_forward.w1.weight"] = ffn.w1.weight
            out[p + "feed_forward.w3.weight"] = ffn.w3.weight
        elif ffn_layout == "concat":
            out[p + "feed_forward.w_gate_hidden.weight"] = torch.cat([ffn.w1.weight, ffn.w3.weight])
        else:
            out[p + "feed_forward.w_gate_hidden.weight"] = torch.stack([ffn.w1.weight, ffn.w3.weight], 1).reshape(
                -1, ffn.w1.weight.shape[1]
            )
        out[p + "feed_forward.w2.weight"] = ffn.w2.weight
    out["model.norm_out.weight"] = ref.norm_out.weight
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ref.lm_head.weight
    return {k: v.detach().clone() for k, v in out.items()}


def training_entries(model: Mapping[str, torch.Tensor], step: int = 100) -> dict[str, Any]:
    """What a MindFormers training checkpoint holds beside the weights (AdamW moments, counters, loss scale)."""
    out: dict[str, Any] = {}
    for k, v in model.items():
        out[f"adam_m.{k}"] = torch.zeros_like(v, dtype=torch.float32) + 0.01
        out[f"adam_v.{k}"] = torch.zeros_like(v, dtype=torch.float32) + 0.02
    out["accu_grads.model.norm_out.weight"] = torch.zeros_like(model["model.norm_out.weight"], dtype=torch.float32)
    out["global_step"] = torch.tensor([step], dtype=torch.int32)
    out["learning_rate"] = torch.tensor(3e-4, dtype=torch.float32)
    out["beta1_power"] = torch.tensor(0.9**step, dtype=torch.float32)
    out["beta2_power"] = torch.tensor(0.95**step, dtype=torch.float32)
    out["scale_sense"] = torch.tensor(1024.0, dtype=torch.float32)
    out["current_iterator_step"] = torch.tensor(step, dtype=torch.int32)
    out["last_overflow_iterator_step"] = torch.tensor(0, dtype=torch.int32)
    out["epoch_num"] = 1  # append_info (MindFormers' CheckpointMonitor): Python ints -> Int64 scalars
    out["step_num"] = step
    out["loss_scale"] = 1024.0
    out["model_name"] = "llama_tiny"  # a string from append_dict
    return out


def save_rank_folder(folder: str, items: Mapping[str, Any], ranks: int = 1, **kw: Any) -> list[str]:
    """MindFormers' output layout: `rank_N/checkpoint_N.ckpt` with the same content on every rank."""
    paths = []
    for r in range(ranks):
        os.makedirs(os.path.join(folder, f"rank_{r}"), exist_ok=True)
        paths.append(save_checkpoint(items, os.path.join(folder, f"rank_{r}", f"llama_rank_{r}-10_2.ckpt"), **kw))
    return paths
