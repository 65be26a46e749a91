"""Readers for Megatron / NeMo checkpoint containers: torch zips inside byte windows, `.nemo` tar archives read in
place, and their corrupt forms refused with one-line errors naming the file and member."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch

from hubconv.errors import CheckpointError
from hubconv.io.checkpoint import open_checkpoint
from hubconv.io.tensor import read_all
from hubconv.io.torch_file import open_torch_zip
from tests.helpers import ROOT, single_segment_bytes


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


# --- torch zip inside a byte window -------------------------------------------------------------------------------


def test_torch_zip_in_window_gives_outer_file_segments(tmp_path) -> None:
    state = {"w": torch.randn(4, 6), "b": torch.arange(5, dtype=torch.int64), "t": torch.randn(3, 4).t()}
    blob = _saved({"model": state, "step": 7})
    head, tail = b"\xaa" * 1000, b"\xbb" * 333
    outer = tmp_path / "outer.bin"
    outer.write_bytes(head + blob + tail)
    with open_torch_zip(str(outer), len(head), len(blob), name="outer.bin: inner") as ckpt:
        assert ckpt.values["step"] == 7
        for name in ("w", "b", "t"):
            got = read_all(ckpt.tensors[f"model.{name}"])
            np.testing.assert_array_equal(got, state[name].numpy())
        seg = ckpt.tensors["model.w"].segments()[0]
        assert seg.path == str(outer) and len(head) <= seg.offset < len(head) + len(blob)
        assert single_segment_bytes(ckpt.tensors["model.w"]) == state["w"].numpy().tobytes()
        assert ckpt.tensors["model.t"].segments() is None  # a saved transpose is read strided


def test_torch_zip_window_negative_controls(tmp_path) -> None:
    blob = _saved({"w": torch.randn(64, 64)})
    outer = tmp_path / "outer.bin"
    outer.write_bytes(b"\0" * 512 + blob)
    with pytest.raises(CheckpointError) as e:  # the window misses the archive's start: not a zip at all
        open_torch_zip(str(outer), 0, 512, name="outer.bin: m")
    assert _one_line(e).startswith("outer.bin: m: ")
    with pytest.raises(CheckpointError, match="run past the end"):
        open_torch_zip(str(outer), 512, len(blob) + 1)
    # a window cut short keeps the central directory out of reach: refused, never read beyond the window
    with pytest.raises(CheckpointError) as e:
        open_torch_zip(str(outer), 512, len(blob) - 100, name="outer.bin: m")
    assert "outer.bin: m" in _one_line(e)


# --- .nemo archives -------------------------------------------------------------------------------------------------

CONFIG = (
    b"precision: 16\ntensor_model_parallel_size: 2\nencoder_seq_length: 128\ntokenizer:\n  library: sentencepiece\n"
)


def _nemo(path, members: dict[str, bytes], *, mode: str = "w", dot: bool = False, extra=()) -> str:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(("./" if dot else "") + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return str(path)


def _rank_states(tp: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "model.embedding.word_embeddings.weight": torch.randn(8, 4, generator=g),
            "model.decoder.final_layernorm.weight": torch.ones(4),
            "model.decoder.layers.0.self_attention.linear_qkv._extra_state": None,
        }
        for _ in range(tp)
    ]


@pytest.mark.parametrize("dot", [False, True])
def test_nemo_single_rank(tmp_path, dot: bool) -> None:
    (state,) = _rank_states(1)
    path = _nemo(
        tmp_path / "m.nemo",
        {"model_config.yaml": CONFIG, "model_weights.ckpt": _saved(state), "tok.model": b"sp"},
        dot=dot,
    )
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "nemo"
        assert ckpt.values["model_config"]["tokenizer"] == {"library": "sentencepiece"}
        assert ckpt.values["members"] == ["tok.model"]
        assert ckpt.values["ranks"] == [{"prefix": "", "tp": 0, "pp": 0}]
        assert (ckpt.values["tensor_parallel"], ckpt.values["pipeline_parallel"]) == (1, 1)
        w = ckpt.tensors["model.embedding.word_embeddings.weight"]
        np.testing.assert_array_equal(read_all(w), state["model.embedding.word_embeddings.weight"].numpy())
        assert w.segments()[0].path == path  # read in place, from the .nemo file itself
        assert "model.decoder.layers.0.self_attention.linear_qkv._extra_state" in ckpt.entries


@pytest.mark.parametrize("layout", ["mp_rank_{tp:02d}", "tp_rank_{tp:02d}_pp_rank_{pp:03d}"])
def test_nemo_per_rank_weights(tmp_path, layout: str) -> None:
    pp_size = 2 if "pp" in layout else 1
    states = {(tp, pp): s for pp in range(pp_size) for tp, s in enumerate(_rank_states(2))}
    members = {"model_config.yaml": CONFIG}
    for (tp, pp), s in reversed(states.items()):  # archive order must not matter
        members[f"{layout.format(tp=tp, pp=pp)}/model_weights.ckpt"] = _saved(s)
    path = _nemo(tmp_path / "m.nemo", members)
    with open_checkpoint(path) as ckpt:
        assert (ckpt.values["tensor_parallel"], ckpt.values["pipeline_parallel"]) == (2, pp_size)
        assert [(r["tp"], r["pp"]) for r in ckpt.values["ranks"]] == [
            (tp, pp) for pp in range(pp_size) for tp in (0, 1)
        ]
        for r in ckpt.values["ranks"]:
            want = states[(r["tp"], r["pp"])]["model.embedding.word_embeddings.weight"].numpy()
            got = read_all(ckpt.tensors[r["prefix"] + "model.embedding.word_embeddings.weight"])
            np.testing.assert_array_equal(got, want)
            assert r["prefix"] == layout.format(tp=r["tp"], pp=r["pp"]) + "/"


def test_nemo_corrupt_inputs(tmp_path) -> None:
    s0, s1 = (_saved(s) for s in _rank_states(2))
    cases = {
        "no_config": ({"model_weights.ckpt": s0}, "has no model_config.yaml member"),
        "no_weights": ({"model_config.yaml": CONFIG}, "has no model_weights.ckpt member"),
        "missing_rank": (
            {"model_config.yaml": CONFIG, "mp_rank_00/model_weights.ckpt": s0, "mp_rank_02/model_weights.ckpt": s1},
            "rank mp_rank_01/model_weights.ckpt is missing",
        ),
        "escape": ({"model_config.yaml": CONFIG, "../model_weights.ckpt": s0}, "leaves the archive"),
        "bad_yaml": ({"model_config.yaml": b"a: [1\n", "model_weights.ckpt": s0}, "model_config.yaml"),
        "dist_weights": (
            {"model_config.yaml": CONFIG, "model_weights/metadata.json": b"{}", "model_weights/common.pt": s0},
            "distributed (torch_dist) checkpoint in model_weights/",
        ),
        "not_torch": ({"model_config.yaml": CONFIG, "model_weights.ckpt": b"PK\x03\x04junk"}, "model_weights.ckpt"),
    }
    for name, (members, needle) in cases.items():
        path = _nemo(tmp_path / f"{name}.nemo", members)
        with pytest.raises(CheckpointError) as e:
            open_checkpoint(path)
        assert needle in _one_line(e) and path in str(e.value), name


def test_nemo_links_compression_and_truncation_refused(tmp_path) -> None:
    s0 = _saved(_rank_states(1)[0])
    link = tarfile.TarInfo("model_weights.ckpt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    path = _nemo(tmp_path / "link.nemo", {"model_config.yaml": CONFIG}, extra=[link])
    with pytest.raises(CheckpointError, match="is a link"):
        open_checkpoint(path)
    path = _nemo(tmp_path / "gz.nemo", {"model_config.yaml": CONFIG, "model_weights.ckpt": s0}, mode="w:gz")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert "gzip-compressed tar; decompress it first" in _one_line(e)
    good = _nemo(tmp_path / "good.nemo", {"model_config.yaml": CONFIG, "model_weights.ckpt": s0})
    data = open(good, "rb").read()
    cut = tmp_path / "cut.nemo"
    cut.write_bytes(data[: 1024 + len(s0) // 2])  # the weights member's data ends past the file
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(cut))
    assert "model_weights.ckpt" in _one_line(e) and "cut.nemo" in str(e.value)


# --- NeMo Lightning .ckpt: hyper_parameters.cfg is a pickled OmegaConf DictConfig ------------------------------------

NEMO_CFG = {
    "precision": "bf16",
    "encoder_seq_length": 128,
    "max_position_embeddings": "${.encoder_seq_length}",
    "num_layers": 2,
    "hidden_dropout": 0.0,
    "bias": True,
    "kv_channels": None,
    "optim": {"name": "fused_adam", "lr": 2e-4, "betas": [0.9, 0.95], "sched": {"name": "CosineAnnealing"}},
    "tokenizer": {"library": "sentencepiece", "model": "nemo:abc_tokenizer.model", "vocab_file": None},
    "data": {"data_prefix": [0.5, "/data/a", 0.5, "/data/b"], "splits_string": "98,1,1"},
}


def _lightning_ckpt(cfg: object) -> dict:
    """What PL 2.x `Trainer.save_checkpoint` writes for a NeMo model (hparams are a DictConfig holding `cfg`)."""
    from omegaconf import DictConfig, OmegaConf

    hparams = OmegaConf.create({"cfg": cfg})
    OmegaConf.set_struct(hparams, True)  # flags travel in the pickle's metadata
    w = torch.randn(8, 4)
    return {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {
            "model.embedding.word_embeddings.weight": w,
            "model.decoder.final_layernorm.bias": torch.zeros(4),
        },
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                "best_model_score": torch.tensor(1.25),
                "best_k_models": {"/ckpts/a.ckpt": torch.tensor(1.25)},
                "dirpath": "/ckpts",
            }
        },
        "optimizer_states": [
            {"state": {0: {"exp_avg": torch.zeros(8, 4)}}, "param_groups": [{"lr": 2e-4, "params": [0]}]}
        ],
        "lr_schedulers": [{"last_epoch": 1200, "_last_lr": [2e-4]}],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "hparams_type": DictConfig,
    }


def test_nemo_lightning_ckpt_dictconfig_read_as_plain_data(tmp_path) -> None:
    pytest.importorskip("omegaconf")
    obj = _lightning_ckpt(NEMO_CFG)
    path = str(tmp_path / "megatron_gpt--step=1200.ckpt")
    torch.save(obj, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.values["hyper_parameters"] == {"cfg": NEMO_CFG}  # interpolations stay unresolved strings
        assert ckpt.values["hparams_type"] == "omegaconf.DictConfig"
        assert (ckpt.values["epoch"], ckpt.values["global_step"]) == (3, 1200)
        assert ckpt.values["lr_schedulers"] == [{"last_epoch": 1200, "_last_lr": [2e-4]}]
        w = ckpt.tensors["state_dict.model.embedding.word_embeddings.weight"]
        np.testing.assert_array_equal(read_all(w), obj["state_dict"]["model.embedding.word_embeddings.weight"].numpy())
        assert "optimizer_states.0.state.0.exp_avg" in ckpt.tensors
        assert "callbacks.ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}.best_model_score" in ckpt.tensors
    probe = (  # stand-ins only: reading the config never imports omegaconf
        "import sys; from hubconv.io.checkpoint import open_checkpoint; "
        f"c = open_checkpoint({path!r}); assert c.values['hyper_parameters']['cfg']['num_layers'] == 2; "
        "assert 'omegaconf' not in sys.modules, 'omegaconf imported'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_nemo_lightning_ckpt_with_foreign_global_refused(tmp_path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"hidden_size": 4, "hook": _Evil()}, flags={"allow_objects": True})
    path = str(tmp_path / "evil.ckpt")
    torch.save(_lightning_ckpt(cfg), path)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert _one_line(e) == f"{path}: data.pkl: refusing to load posix.system"
    # negative control: the same checkpoint without the hook opens
    torch.save(_lightning_ckpt({"hidden_size": 4}), path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.values["hyper_parameters"] == {"cfg": {"hidden_size": 4}}


# --- Megatron-LM legacy folders -------------------------------------------------------------------------------------


def _megatron_rank(tp: int, pp: int, tp_size: int, pp_size: int, version: float = 3.0) -> dict:
    g = torch.Generator().manual_seed(100 * pp + tp)
    args = argparse.Namespace(
        num_layers=2 * pp_size,
        hidden_size=8,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        make_vocab_size_divisible_by=128,
        tokenizer_type="GPT2BPETokenizer",
    )
    lm = {
        "encoder": {
            "layers.0.self_attention.query_key_value.weight": torch.randn(24 // tp_size, 8, generator=g),
            "layers.0.self_attention.core_attention._extra_state": io.BytesIO(b"\x80\x04N."),  # TE's pickled None
        }
    }
    if pp == 0:
        lm["embedding"] = {"word_embeddings": {"weight": torch.randn(16 // tp_size, 8, generator=g)}}
    return {
        "args": args,
        "checkpoint_version": version,
        "iteration": 500,
        "model": {"language_model": lm},
        "optimizer": {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}},
        "rng_state": [{"random_rng_state": (3, (1, 2), None), "np_rng_state": np.random.get_state()}],
    }


def _megatron_save(root, tp_size: int, pp_size: int, *, tracker: str | None = "500", sub: str = "iter_0000500"):
    states = {}
    for pp in range(pp_size):
        for tp in range(tp_size):
            name = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if pp_size > 1 else "")
            folder = root / sub / name
            folder.mkdir(parents=True)
            states[name] = _megatron_rank(tp, pp, tp_size, pp_size)
            torch.save(states[name], folder / "model_optim_rng.pt")
    if tracker is not None:
        (root / "latest_checkpointed_iteration.txt").write_text(tracker + "\n")
    return states


@pytest.mark.parametrize(("tp_size", "pp_size"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_megatron_folder_ranks(tmp_path, tp_size: int, pp_size: int) -> None:
    states = _megatron_save(tmp_path, tp_size, pp_size)
    with open_checkpoint(str(tmp_path)) as ckpt:
        assert ckpt.format == "megatron"
        assert (ckpt.values["tensor_parallel"], ckpt.values["pipeline_parallel"]) == (tp_size, pp_size)
        assert ckpt.values["args"]["hidden_size"] == 8 and ckpt.values["iteration"] == 500
        assert ckpt.values["checkpoint_version"] == 3.0
        assert len(ckpt.values["ranks"]) == tp_size * pp_size
        qkv = "model.language_model.encoder.layers.0.self_attention.query_key_value.weight"
        for r in ckpt.values["ranks"]:
            folder = r["prefix"].rstrip("/") or "mp_rank_00"
            assert folder == f"mp_rank_{r['tp']:02d}" + (f"_{r['pp']:03d}" if pp_size > 1 else "")
            got = read_all(ckpt.tensors[r["prefix"] + qkv])
            np.testing.assert_array_equal(
                got, states[folder]["model"]["language_model"]["encoder"][qkv.split("encoder.")[1]].numpy()
            )
            assert "np_rng_state" in str(ckpt.values[r["prefix"] + "rng_state"])
            extra = r["prefix"] + "model.language_model.encoder.layers.0.self_attention.core_attention._extra_state"
            assert extra in ckpt.entries and ckpt.values[extra] == "<opaque BytesIO>"
        if tp_size * pp_size == 1:
            assert qkv in ckpt.tensors  # one rank: names unprefixed


def test_megatron_folder_entry_points(tmp_path) -> None:
    _megatron_save(tmp_path / "a", 1, 1, tracker="release", sub="release")
    _megatron_save(tmp_path / "b", 2, 1, tracker=None)  # no tracker: the single iteration folder
    with open_checkpoint(str(tmp_path / "a")) as ckpt:
        assert ckpt.values["iteration_folder"].endswith("release")
    with open_checkpoint(str(tmp_path / "b")) as ckpt:
        assert ckpt.values["tensor_parallel"] == 2
    with open_checkpoint(str(tmp_path / "b" / "iter_0000500")) as ckpt:  # the iteration folder itself
        assert ckpt.values["tensor_parallel"] == 2


def test_megatron_folder_corrupt_inputs(tmp_path) -> None:
    def fails(root, needle: str) -> None:
        with pytest.raises(CheckpointError) as e:
            open_checkpoint(str(root))
        assert needle in _one_line(e), (needle, str(e.value))

    _megatron_save(tmp_path / "hole", 2, 2)
    shutil.rmtree(tmp_path / "hole" / "iter_0000500" / "mp_rank_01_000")
    fails(tmp_path / "hole", "mp_rank_01_000 is missing")
    _megatron_save(tmp_path / "last", 2, 2)  # the last stage missing: caught by the saved parallel sizes
    for name in ("mp_rank_00_001", "mp_rank_01_001"):
        shutil.rmtree(tmp_path / "last" / "iter_0000500" / name)
    fails(tmp_path / "last", "args.pipeline_model_parallel_size is 2")
    _megatron_save(tmp_path / "extra", 2, 1)
    (tmp_path / "extra" / "iter_0000500" / "optimizer_shards").mkdir()
    fails(tmp_path / "extra", "optimizer_shards: unexpected folder")
    _megatron_save(tmp_path / "trunc", 2, 1)
    rank_file = tmp_path / "trunc" / "iter_0000500" / "mp_rank_01" / "model_optim_rng.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:-200])
    fails(tmp_path / "trunc", str(rank_file))
    _megatron_save(tmp_path / "legacy", 1, 1)
    legacy = tmp_path / "legacy" / "iter_0000500" / "mp_rank_00" / "model_optim_rng.pt"
    torch.save(_megatron_rank(0, 0, 1, 1), legacy, _use_new_zipfile_serialization=False)
    fails(tmp_path / "legacy", f"{legacy}: a legacy (pre-zip) torch pickle")
    _megatron_save(tmp_path / "tracker", 1, 1, tracker="700")
    fails(tmp_path / "tracker", "names iteration 700")
    _megatron_save(tmp_path / "escape", 1, 1, tracker="release", sub="release")
    os.symlink(tmp_path / "hole", tmp_path / "escape" / "release" / "mp_rank_01")
    fails(tmp_path / "escape", "leaves the checkpoint folder")
    _megatron_save(tmp_path / "evil", 1, 1)
    evil = {**_megatron_rank(0, 0, 1, 1), "args": _Evil()}
    torch.save(evil, tmp_path / "evil" / "iter_0000500" / "mp_rank_00" / "model_optim_rng.pt")
    fails(tmp_path / "evil", "data.pkl: refusing to load posix.system")


# --- Megatron-core torch_dist ---------------------------------------------------------------------------------------


def _torch_dist_save(root, backend: str = "torch_dist") -> dict:
    import torch.distributed.checkpoint as dcp

    folder = root / "iter_0000010"
    state = {
        "decoder.layers.self_attention.linear_qkv.weight": torch.randn(2, 12, 4),
        "embedding.word_embeddings.weight": torch.randn(16, 4),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder))
    (folder / "metadata.json").write_text(
        json.dumps(
            {
                "sharded_backend": backend,
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
        )
    )
    common = {"args": argparse.Namespace(num_layers=2, hidden_size=4), "checkpoint_version": 3.0, "iteration": 10}
    torch.save(common, folder / "common.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    return state


def test_megatron_torch_dist(tmp_path) -> None:
    state = _torch_dist_save(tmp_path)
    for path in (tmp_path, tmp_path / "iter_0000010"):
        with open_checkpoint(str(path)) as ckpt:
            assert ckpt.format == "megatron-torch-dist"
            assert ckpt.values["args"] == {"num_layers": 2, "hidden_size": 4}
            assert (ckpt.values["checkpoint_version"], ckpt.values["iteration"]) == (3.0, 10)
            assert ckpt.values["dist_metadata"]["sharded_backend"] == "torch_dist"
            for name, t in state.items():
                np.testing.assert_array_equal(read_all(ckpt.tensors[name]), t.numpy())


def test_megatron_torch_dist_refusals(tmp_path) -> None:
    _torch_dist_save(tmp_path / "zarr", backend="zarr")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(tmp_path / "zarr"))
    assert "metadata.json: sharded_backend 'zarr' is not supported" in _one_line(e)
    _torch_dist_save(tmp_path / "nocommon")
    os.remove(tmp_path / "nocommon" / "iter_0000010" / "common.pt")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(tmp_path / "nocommon"))
    assert "common.pt: missing" in _one_line(e)


def test_dcp_folder_with_unrelated_metadata_json_stays_dcp(tmp_path) -> None:
    """Negative control for the torch_dist sniffer: a metadata.json without `sharded_backend` is not Megatron's."""
    _torch_dist_save(tmp_path)
    folder = tmp_path / "iter_0000010"
    (folder / "metadata.json").write_text(json.dumps({"note": "written by another tool"}))
    with open_checkpoint(str(folder)) as ckpt:
        assert ckpt.format == "dcp" and "args" not in ckpt.values
