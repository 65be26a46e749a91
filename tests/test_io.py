import io
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file

from hubconv.dtypes import BF16, F32
from hubconv.errors import CheckpointError
from hubconv.io.checkpoint import open_checkpoint
from hubconv.io.tensor import ArrayTensor, read_all
from hubconv.io.writer import SINGLE_FILE, plan_shards, write_model


def raw(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def save(sd: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=path)


@pytest.fixture
def state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(8, 16, generator=g)[:, ::2],  # a non-contiguous view
        "c.steps": torch.arange(5, dtype=torch.int64),
        "d.scalar": torch.tensor(3.5),
    }


def test_dcp_reader_reads_every_tensor_exactly(tmp_path, state) -> None:
    save({**state, "train_state": io.BytesIO(b"step=7")}, str(tmp_path / "ck"))
    with open_checkpoint(str(tmp_path / "ck")) as ck:
        assert ck.format == "dcp"
        assert ck.entries == ["train_state"]
        assert set(ck.tensors) == set(state)
        for name, t in state.items():
            lazy = ck.tensors[name]
            assert lazy.shape == tuple(t.shape)
            assert np.array_equal(read_all(lazy), raw(t).reshape(lazy.shape))
            # The located byte segments hold exactly the tensor's data.
            segs = lazy.segments()
            data = b"".join(open(s.path, "rb").read()[s.offset : s.offset + s.nbytes] for s in segs)
            assert data == raw(t).tobytes()
        assert np.array_equal(ck.tensors["a.weight"].read_rows(10, 20), raw(state["a.weight"][10:20]))


def test_dcp_metadata_with_foreign_globals_is_refused(tmp_path, state) -> None:
    save(state, str(tmp_path / "ck"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match=r"refusing to load posix\.system"):
        open_checkpoint(str(tmp_path / "ck"))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_metadata", r"\.metadata: missing"),
        ("corrupt_metadata", "corrupt or unsupported DCP metadata"),
        ("truncated_distcp", "truncated"),
        ("missing_distcp", r"__0_0\.distcp: missing"),
    ],
)
def test_dcp_damage_is_reported(tmp_path, state, damage, message) -> None:
    ck = tmp_path / "ck"
    save(state, str(ck))
    distcp = ck / "__0_0.distcp"
    if damage == "missing_metadata":
        (ck / ".metadata").unlink()
    elif damage == "corrupt_metadata":
        (ck / ".metadata").write_bytes(b"\x80\x04garbage" * 10)
    elif damage == "truncated_distcp":
        os.truncate(distcp, distcp.stat().st_size // 2)
    else:
        distcp.unlink()
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(str(ck))


def test_dcp_corrupt_record_is_reported(tmp_path, state) -> None:
    ck = tmp_path / "ck"
    save(state, str(ck))
    data = bytearray((ck / "__0_0.distcp").read_bytes())
    data[:] = data.replace(b"data.pkl", b"xxxx.pkl")
    (ck / "__0_0.distcp").write_bytes(bytes(data))
    with open_checkpoint(str(ck)) as c, pytest.raises(CheckpointError, match=r"no data\.pkl"):
        c.tensors["a.weight"].segments()


def test_safetensors_and_torch_readers(tmp_path, state) -> None:
    flat = {k: v.contiguous() for k, v in state.items()}
    save_file(flat, str(tmp_path / "m.safetensors"))
    torch.save(flat, str(tmp_path / "m.pt"))
    for path in ("m.safetensors", "m.pt"):
        with open_checkpoint(str(tmp_path / path)) as ck:
            for name, t in flat.items():
                assert np.array_equal(read_all(ck.tensors[name]).reshape(t.shape), raw(t)), (path, name)


def test_torch_reader_refuses_pickled_code(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, str(tmp_path / "bad.pt"))
    with pytest.raises(CheckpointError, match=r"data\.pkl: refusing to load posix\.system"):
        open_checkpoint(str(tmp_path / "bad.pt"))


def test_shard_plan_is_deterministic_and_respects_limit() -> None:
    items = [(f"t{i}", F32, (100, 10)) for i in range(10)]  # 4000 bytes each
    a, b = plan_shards(items, 10_000), plan_shards(items, 10_000)
    assert [[t.name for t in s.tensors] for s in a.shards] == [[t.name for t in s.tensors] for s in b.shards]
    assert len(a.shards) == 5 and all(s.data_bytes <= 10_000 for s in a.shards)
    assert a.shards[0].filename == "model-00001-of-00005.safetensors"
    assert plan_shards(items, 10**9).shards[0].filename == SINGLE_FILE


def test_writer_output_reads_back_with_safetensors(tmp_path) -> None:
    g = np.random.default_rng(0)
    arrays = {f"layer.{i}.w": g.standard_normal((17, 5 + i)).astype(np.float32) for i in range(6)}
    arrays["emb"] = g.integers(0, 2**16, (9, 3), dtype=np.uint16)  # bf16 bits
    targets = {n: ArrayTensor(n, BF16 if n == "emb" else F32, a) for n, a in arrays.items()}
    plan = plan_shards([(n, t.dtype, t.shape) for n, t in targets.items()], 1000)
    write_model(plan, targets, str(tmp_path), show_progress=False)
    index = (tmp_path / "model.safetensors.index.json").read_text()
    assert '"total_size": ' + str(plan.total_bytes) in index
    for shard in plan.shards:
        header_len = int.from_bytes((tmp_path / shard.filename).read_bytes()[:8], "little")
        assert header_len % 8 == 0
        with safe_open(str(tmp_path / shard.filename), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                assert np.array_equal(raw(t), arrays[name])
