"""Tensor dtypes as safetensors names them, with numpy storage types and torch-free casts.

The conversion path never imports torch: tensors travel as numpy arrays of their raw storage
(bfloat16 as uint16 bit patterns, float8 as uint8), so renames, row permutations and copies are
exact byte operations for every dtype. Casts between float formats are implemented here with the
same rounding torch uses (round to nearest even), so `--dtype` works without torch too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hubconv.errors import HubconvError


@dataclass(frozen=True)
class DType:
    """A tensor element type: safetensors name, width, numpy storage type and torch name."""

    name: str
    itemsize: int
    storage: str
    torch_name: str
    is_float: bool

    @property
    def np(self) -> np.dtype:
        return np.dtype(self.storage)

    def __str__(self) -> str:
        return self.torch_name


_ALL = [
    DType("F64", 8, "float64", "float64", True),
    DType("F32", 4, "float32", "float32", True),
    DType("F16", 2, "float16", "float16", True),
    DType("BF16", 2, "uint16", "bfloat16", True),
    DType("F8_E4M3", 1, "uint8", "float8_e4m3fn", True),
    DType("F8_E5M2", 1, "uint8", "float8_e5m2", True),
    DType("I64", 8, "int64", "int64", False),
    DType("I32", 4, "int32", "int32", False),
    DType("I16", 2, "int16", "int16", False),
    DType("I8", 1, "int8", "int8", False),
    DType("U8", 1, "uint8", "uint8", False),
    DType("BOOL", 1, "bool", "bool", False),
    DType("C64", 8, "complex64", "complex64", False),
]
BY_NAME: dict[str, DType] = {d.name: d for d in _ALL}
BY_TORCH_NAME: dict[str, DType] = {d.torch_name: d for d in _ALL}
F32, F16, BF16 = BY_NAME["F32"], BY_NAME["F16"], BY_NAME["BF16"]

# Names accepted on the command line and in config files.
_USER_NAMES = {
    "float32": F32,
    "fp32": F32,
    "f32": F32,
    "float16": F16,
    "fp16": F16,
    "f16": F16,
    "half": F16,
    "bfloat16": BF16,
    "bf16": BF16,
}


def parse_user_dtype(value: str) -> DType | None:
    """`auto` -> None (keep the source dtype); otherwise one of the float output dtypes."""
    if value == "auto":
        return None
    try:
        return _USER_NAMES[value.lower()]
    except KeyError:
        raise HubconvError(f"unknown dtype {value!r}: use auto, bfloat16, float16 or float32") from None


def from_torch_name(name: str) -> DType:
    """`torch.bfloat16` or `bfloat16` -> DType."""
    short = name.removeprefix("torch.")
    try:
        return BY_TORCH_NAME[short]
    except KeyError:
        raise HubconvError(f"unsupported tensor dtype {name}") from None


def to_float32(raw: np.ndarray, src: DType) -> np.ndarray:
    """Decode raw storage of a float dtype to float32 values (exact for bf16/f16)."""
    if src is F32:
        return raw
    if src is BF16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if src in (F16, BY_NAME["F64"]):
        return raw.astype(np.float32)
    raise HubconvError(f"cannot cast from {src}")


def from_float32(values: np.ndarray, dst: DType) -> np.ndarray:
    """Encode float32 values as raw storage of `dst`, rounding to nearest even like torch."""
    if dst is F32:
        return values
    if dst is F16:
        with np.errstate(over="ignore"):  # overflow is detected and reported by cast()
            return values.astype(np.float16)
    if dst is BF16:
        bits = values.view(np.uint32)
        rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
        nan = np.isnan(values)
        if nan.any():
            rounded[nan] = 0x7FC0
        return rounded
    raise HubconvError(f"cannot cast to {dst}")


def cast(raw: np.ndarray, src: DType, dst: DType, *, what: str) -> np.ndarray:
    """Cast raw storage from `src` to `dst`; refuse float16 when finite values would overflow."""
    if src is dst:
        return raw
    if not (src.is_float and dst.is_float):
        raise HubconvError(f"{what}: cannot cast {src} to {dst}")
    values = to_float32(raw, src)
    out = from_float32(values, dst)
    if dst is F16:
        overflow = np.isinf(out) & np.isfinite(values)
        if overflow.any():
            worst = float(np.abs(values[overflow]).max())
            raise HubconvError(
                f"{what}: value {worst:g} overflows float16 (max 65504); use --dtype bfloat16 or float32"
            )
    return out
