"""The torch-free torch.save reader (hubconv.io.torch_file): bit-exact against torch.load, tensors as file
segments, inert non-tensor values, and hostile archives refused with one-line errors."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from hubconv.errors import CheckpointError
from hubconv.io.tensor import read_all
from hubconv.io.torch_file import open_torch_zip
from tests.helpers import single_segment_bytes
from tests.native import nanogpt as ng


def _raw(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def test_matches_torch_load_bit_exact(tmp_path) -> None:
    base = torch.randn(6, 10)
    obj = {
        "model": {
            "w": torch.randn(5, 7),
            "bf16": torch.randn(4, 3).bfloat16(),
            "f16": torch.randn(9).half(),
            "i64": torch.arange(12).reshape(3, 4),
            "flag": torch.tensor([True, False]),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4),
            "transposed": base.t(),  # non-contiguous: no segments, strided reads
            "row_slice": base[2:5],  # storage offset into a shared storage
            "col_slice": base[:, 3:8],
            "param": torch.nn.Parameter(torch.randn(2, 2)),
        },
        "tied": None,
        "args": argparse.Namespace(lr=0.1, name="run", dims=[1, 2]),
        "rng": np.random.get_state(),
        "steps": [torch.tensor(1), torch.tensor(2)],
        "note": "plain",
    }
    obj["tied"] = obj["model"]["w"]  # a second name for the same storage
    path = str(tmp_path / "x.pt")
    torch.save(obj, path)
    with open_torch_zip(path) as ck:
        for name, ref in [*(("model." + k, v) for k, v in obj["model"].items()), ("tied", obj["tied"])]:
            t = ck.tensors[name]
            assert t.shape == tuple(ref.shape), name
            expect = _raw(ref.detach())
            assert np.array_equal(read_all(t).reshape(-1).view(np.uint8), expect.reshape(-1).view(np.uint8)), name
            if ref.is_contiguous():
                assert single_segment_bytes(t) == expect.tobytes(), name
            else:
                assert t.segments() is None, name
                assert np.array_equal(t.read_rows(1, 3), expect[1:3]), name
        assert ck.tensors["steps.1"].shape == ()
        assert ck.values["args"] == {"lr": 0.1, "name": "run", "dims": [1, 2]}
        assert ck.values["note"] == "plain" and ck.values["rng"][0] == "MT19937"
        assert set(ck.entries) == {"args", "rng", "note"}


def test_nanogpt_checkpoint_reads_as_model_tensors_and_values(tmp_path) -> None:
    model = ng.build(bias=False)
    path = str(tmp_path / "ckpt.pt")
    ng.save_ckpt(model, path, compiled=True)
    with open_torch_zip(path) as ck:
        assert ck.values["model_args"]["n_layer"] == 2 and ck.values["config"]["dataset"] == "shakespeare_char"
        assert ck.values["iter_num"] == 5000
        model_keys = {k for k in ck.tensors if k.startswith("model.")}
        assert model_keys == {f"model._orig_mod.{k}" for k in model.state_dict()}
        assert "best_val_loss" in ck.tensors and ck.tensors["best_val_loss"].shape == ()
        assert any(k.startswith("optimizer.state.") for k in ck.tensors)
        assert ck.values["optimizer.param_groups"][0]["betas"] == (0.9, 0.95)
        wte = ck.tensors["model._orig_mod.transformer.wte.weight"]
        assert np.array_equal(read_all(wte), model.transformer.wte.weight.detach().numpy())
        assert wte.segments() == ck.tensors["model._orig_mod.lm_head.weight"].segments()  # tied: one storage


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _rewrite(path: str, member: str, data: bytes, compress: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path) as src:
        items = [(i, src.read(i.filename)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for info, content in items:
            if info.filename.endswith(member):
                dst.writestr(info.filename, data, compress_type=compress)
            else:
                dst.writestr(info, content)


def _pickle_name(path: str) -> str:
    with zipfile.ZipFile(path) as z:
        return next(n for n in z.namelist() if n.endswith("data.pkl"))


@pytest.fixture
def saved(tmp_path) -> str:
    path = str(tmp_path / "m.pt")
    torch.save({"w": torch.randn(4, 4), "b": torch.randn(4)}, path)
    return path


def test_code_in_the_pickle_is_refused(saved) -> None:
    _rewrite(saved, "data.pkl", pickle.dumps({"w": _Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refusing to load posix\.system"):
        open_torch_zip(saved)


def test_hostile_archives(saved, tmp_path) -> None:
    with zipfile.ZipFile(saved) as z:
        pkl = z.read(_pickle_name(saved))
    cases = {
        "missing storage": (lambda p: _rewrite(p, "data/0", b""), r"storage '0' holds 0 bytes"),
        "compressed storage": (lambda p: _rewrite(p, "data/1", b"\0" * 16, zipfile.ZIP_DEFLATED), "compressed"),
        "deflated pickle bomb": (
            lambda p: _rewrite(p, "data.pkl", pkl + b"\0" * (1 << 20), zipfile.ZIP_DEFLATED),
            "compressed and declares",
        ),
        "big endian": (lambda p: _rewrite(p, "byteorder", b"big"), "big-endian"),
        "not a torch archive": (
            lambda p: _rewrite(p, "data.pkl", pkl) or _rename_pickle(p),
            "not a torch.save archive",
        ),
    }
    for what, (mutate, message) in cases.items():
        path = str(tmp_path / f"{what}.pt")
        with open(saved, "rb") as f, open(path, "wb") as g:
            g.write(f.read())
        mutate(path)
        with pytest.raises(CheckpointError, match=message) as e:
            open_torch_zip(path)
        assert "\n" not in str(e.value) and path in str(e.value), what


def _rename_pickle(path: str) -> None:
    with zipfile.ZipFile(path) as src:
        items = [(i.filename, src.read(i.filename)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for name, content in items:
            dst.writestr(name.replace("data.pkl", "other.pkl"), content)


def test_storage_bounds_are_checked(saved) -> None:
    """A tensor claiming more elements than its storage holds is refused before any read."""
    with zipfile.ZipFile(saved) as z:
        data = z.read(_pickle_name(saved))
    # The pickled size tuple of 'w' is (4, 4): make it (4, 40), i.e. past the 16-element storage.
    patched = data.replace(b"K\x04K\x04\x86", b"K\x04K(\x86", 1)
    assert patched != data
    _rewrite(saved, "data.pkl", patched)
    with pytest.raises(CheckpointError, match=r"tensor 'w': elements .* run past its storage"):
        open_torch_zip(saved)


def test_truncated_file(saved) -> None:
    size = os.path.getsize(saved)
    with open(saved, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=r"corrupt torch file|not a torch\.save archive"):
        open_torch_zip(saved)


def test_legacy_pickle_is_not_a_zip(tmp_path) -> None:
    path = str(tmp_path / "legacy.pt")
    buf = io.BytesIO()
    torch.save({"w": torch.randn(2)}, buf, _use_new_zipfile_serialization=False)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    with pytest.raises(CheckpointError):
        open_torch_zip(path)
