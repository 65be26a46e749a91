"""Bad input: a clear error naming the file/tensor/field, and no output folder left behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from hubconv import convert as convert_module
from hubconv.adapters.registry import available
from hubconv.convert import convert
from hubconv.errors import CheckpointError, HubconvError, MappingError, ModelArgsError, OutputError
from tests.native import torchtitan_llama3 as tt
from tests.test_torchtitan import tiny, user_args


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[tt.TitanArgs, dict]:
    a = tiny()
    return a, tt.random_state_dict(a, seed=0)


def write(tmp_path, sd: dict) -> str:
    path = str(tmp_path / "ckpt")
    tt.save_dcp(path, sd)
    return path


def assert_nothing_written(out: str) -> None:
    assert not os.path.exists(out)
    parent = os.path.dirname(out)
    assert not [n for n in os.listdir(parent) if "hubconv-tmp" in n], os.listdir(parent)


def test_not_a_torchtitan_checkpoint(tmp_path) -> None:
    ckpt = write(tmp_path, {"transformer.wte.weight": torch.zeros(4, 4)})
    out = str(tmp_path / "out")
    with pytest.raises(MappingError, match=r"not a TorchTitan Llama checkpoint .*transformer\.wte\.weight"):
        convert("torchtitan", ckpt, out, model_args={"n_heads": 2})
    assert_nothing_written(out)


def test_unknown_tensor_is_an_error_naming_it(tmp_path, model) -> None:
    a, sd = model
    ckpt = write(tmp_path, {**sd, "layers.0.attention.lora_a.weight": torch.zeros(2, 2)})
    out = str(tmp_path / "out")
    with pytest.raises(MappingError, match=r"match no mapping rule: layers\.0\.attention\.lora_a\.weight"):
        convert("torchtitan", ckpt, out, model_args=user_args(a))
    assert_nothing_written(out)


def test_missing_tensor_is_an_error_naming_it(tmp_path, model) -> None:
    a, sd = model
    ckpt = write(tmp_path, {k: v for k, v in sd.items() if k != "layers.1.attention.wv.weight"})
    out = str(tmp_path / "out")
    with pytest.raises(MappingError, match=r"lacks tensors needed by the model: layers\.1\.attention\.wv\.weight"):
        convert("torchtitan", ckpt, out, model_args=user_args(a))
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"n_kv_heads": 4}, r"n_kv_heads=4 contradicts the checkpoint: layers\.0\.attention\.wk\.weight"),
        ({"dim": 128}, r"dim=128 contradicts the checkpoint: tok_embeddings\.weight"),
        ({"n_layers": 3}, r"n_layers=3 contradicts the checkpoint"),
        ({"vocab_size": 1000}, r"vocab_size=1000 contradicts"),
        ({"multiple_of": 256}, r"FFN width of 256, but layers\.0\.feed_forward\.w1\.weight has 192 rows"),
        ({"n_heads": 5}, r"n_heads=5 contradicts the checkpoint"),
        ({"n_heads": None}, r"n_heads cannot be determined from the checkpoint's tensor shapes; provide it"),
        ({"rope_theta": None}, r"rope_theta cannot be determined"),
        ({"n_head": 4}, r"unknown field\(s\) n_head"),
    ],
)
def test_model_args_that_contradict_shapes(tmp_path, model, override, message) -> None:
    a, sd = model
    ckpt = write(tmp_path, sd)
    args = {k: v for k, v in {**user_args(a), **override}.items() if v is not None}
    out = str(tmp_path / "out")
    with pytest.raises(ModelArgsError, match=message):
        convert("torchtitan", ckpt, out, model_args=args)
    assert_nothing_written(out)


def test_rope_scaling_must_be_stated(tmp_path, model) -> None:
    a, sd = model
    args = {k: v for k, v in user_args(a).items() if k != "rope_scaling_args"}
    with pytest.raises(ModelArgsError, match="rope_scaling_args cannot be determined"):
        convert("torchtitan", write(tmp_path, sd), str(tmp_path / "out"), model_args=args)


def test_existing_output_needs_overwrite(tmp_path, model) -> None:
    a, sd = model
    ckpt = write(tmp_path, sd)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match=r"already exists .*--overwrite"):
        convert("torchtitan", ckpt, str(out), model_args=user_args(a))
    assert (out / "keep.txt").exists()
    convert("torchtitan", ckpt, str(out), model_args=user_args(a), overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_corrupt_metadata_leaves_nothing(tmp_path, model) -> None:
    a, sd = model
    ckpt = write(tmp_path, sd)
    with open(os.path.join(ckpt, ".metadata"), "r+b") as f:
        f.truncate(100)
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"\.metadata: corrupt"):
        convert("torchtitan", ckpt, out, model_args=user_args(a))
    assert_nothing_written(out)


def test_truncated_distcp_leaves_nothing(tmp_path, model) -> None:
    a, sd = model
    ckpt = write(tmp_path, sd)
    distcp = os.path.join(ckpt, "__0_0.distcp")
    os.truncate(distcp, os.path.getsize(distcp) - 1000)
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: truncated: tensor '.*' needs bytes"):
        convert("torchtitan", ckpt, out, model_args=user_args(a))
    assert_nothing_written(out)


def test_float16_overflow_is_refused(tmp_path, model) -> None:
    a, sd = model
    big = dict(sd)
    big["layers.0.feed_forward.w2.weight"] = sd["layers.0.feed_forward.w2.weight"].clone()
    big["layers.0.feed_forward.w2.weight"][3, 5] = 1e6
    out = str(tmp_path / "out")
    with pytest.raises(Exception, match=r"'model\.layers\.0\.mlp\.down_proj\.weight': value 1e\+06 overflows float16"):
        convert("torchtitan", write(tmp_path, big), out, model_args=user_args(a), dtype="float16", progress=False)
    assert_nothing_written(out)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs, so the disk really fills up."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_detected_before_writing(tmp_path, small_disk) -> None:
    a = tiny(vocab_size=2048)  # ~1.3 MB of weights: more than the disk holds
    ckpt = write(tmp_path, tt.random_state_dict(a, seed=0))
    out = str(small_disk / "out")
    with pytest.raises(OutputError, match="not enough free disk space"):
        convert("torchtitan", ckpt, out, model_args=user_args(a))
    assert_nothing_written(out)


def test_disk_filling_up_while_writing_leaves_nothing(tmp_path, small_disk, monkeypatch) -> None:
    a = tiny(vocab_size=2048)
    ckpt = write(tmp_path, tt.random_state_dict(a, seed=0))
    # Pretend the free-space check passed, so the real tmpfs runs out mid-write (ENOSPC).
    monkeypatch.setattr(convert_module, "_check_free_space", lambda *a, **k: None)
    out = str(small_disk / "out")
    with pytest.raises(OutputError, match="no space left on the device"):
        convert("torchtitan", ckpt, out, model_args=user_args(a), progress=False)
    assert_nothing_written(out)
    assert shutil.disk_usage(small_disk).used < 64 * 1024  # the partial shard was removed


def test_cli_reports_errors_without_traceback(tmp_path) -> None:
    out = str(tmp_path / "out")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hubconv",
            "convert",
            "--adapter",
            "torchtitan",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--output",
            out,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("hubconv: error: ") and "no such file" in r.stderr and "Traceback" not in r.stderr
    assert_nothing_written(out)


def test_unknown_adapter(tmp_path, model) -> None:
    names = list(available())
    assert "torchtitan" in names and "megatrom" not in names
    with pytest.raises(HubconvError, match=re.escape(f"unknown adapter 'megatrom'; available: {', '.join(names)}")):
        convert("megatrom", write(tmp_path, model[1]), str(tmp_path / "out"))
