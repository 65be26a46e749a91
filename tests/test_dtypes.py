import numpy as np
import pytest
import torch

from hubconv.dtypes import BF16, F16, F32, cast, parse_user_dtype
from hubconv.errors import HubconvError


def _raw(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def test_float32_to_bfloat16_rounds_like_torch() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(100_000, generator=g) * 10 ** torch.randint(-30, 30, (100_000,), generator=g).float(),
            torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4e38, 1e-45, 1.00390625, 1.01171875]),
        ]
    )
    ours = cast(x.numpy(), F32, BF16, what="x")
    theirs = _raw(x.to(torch.bfloat16))
    nan = np.isnan(x.numpy())
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(cast(ours[nan], BF16, F32, what="x")).all()  # NaN payloads may differ


def test_bfloat16_roundtrip_through_float32_is_exact() -> None:
    bits = np.arange(0, 2**16, dtype=np.uint16)
    bits = bits[~np.isnan(cast(bits, BF16, F32, what="x"))]
    assert np.array_equal(cast(cast(bits, BF16, F32, what="x"), F32, BF16, what="x"), bits)
    as_torch = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    assert np.array_equal(cast(bits, BF16, F32, what="x"), as_torch)


def test_bfloat16_to_float16_matches_torch_and_refuses_overflow() -> None:
    x = torch.randn(10_000).to(torch.bfloat16)
    assert np.array_equal(cast(_raw(x), BF16, F16, what="x"), x.to(torch.float16).numpy())
    big = _raw(torch.tensor([1.0, 70000.0]).to(torch.bfloat16))
    with pytest.raises(HubconvError, match="overflows float16"):
        cast(big, BF16, F16, what="tensor 'w'")


def test_parse_user_dtype() -> None:
    assert parse_user_dtype("auto") is None
    assert parse_user_dtype("bf16") is BF16
    with pytest.raises(HubconvError, match="unknown dtype"):
        parse_user_dtype("int4")
