"""--model-args forms (JSON, YAML, TorchTitan job TOML, flavor names) and the CLI surface."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hubconv.adapters.registry import available, get
from hubconv.adapters.torchtitan_flavors import LLAMA3_FLAVORS, llama3_ffn_hidden_dim
from hubconv.cli import build_parser
from hubconv.dtypes import F32
from hubconv.errors import ModelArgsError
from hubconv.io.tensor import ArrayTensor


def shapes_of_flavor(name: str, **override) -> dict[str, ArrayTensor]:
    """Zero tensors with a flavor's shapes (only shapes matter for argument resolution)."""
    f = {"n_kv_heads": None, "multiple_of": 256, "ffn_dim_multiplier": None, **LLAMA3_FLAVORS[name], **override}
    dim, hd = f["dim"], f["dim"] // f["n_heads"]
    kv = (f["n_kv_heads"] or f["n_heads"]) * hd
    ffn = llama3_ffn_hidden_dim(dim, f["multiple_of"], f["ffn_dim_multiplier"])
    shapes = {
        "tok_embeddings.weight": (f["vocab_size"], dim),
        "norm.weight": (dim,),
        "output.weight": (f["vocab_size"], dim),
    }
    for i in range(f["n_layers"]):
        p = f"layers.{i}."
        shapes |= {
            p + "attention.wq.weight": (dim, dim),
            p + "attention.wk.weight": (kv, dim),
            p + "attention.wv.weight": (kv, dim),
            p + "attention.wo.weight": (dim, dim),
            p + "feed_forward.w1.weight": (ffn, dim),
            p + "feed_forward.w3.weight": (ffn, dim),
            p + "feed_forward.w2.weight": (dim, ffn),
            p + "attention_norm.weight": (dim,),
            p + "ffn_norm.weight": (dim,),
        }
    out = {k: ArrayTensor(k, F32, np.zeros(s, np.float32)) for k, s in shapes.items()}
    out["output.weight"].array[0, 0] = 1.0  # untied
    return out


def resolve(value, tensors):
    adapter, _ = get("torchtitan")
    return adapter.resolve_args("test", tensors, adapter.load_args(value))


def test_flavor_name_resolves_everything() -> None:
    a = resolve("debugmodel", shapes_of_flavor("debugmodel"))
    assert (a["n_heads"], a["n_kv_heads"], a["head_dim"], a["rope_theta"]) == (16, 16, 16, 500000.0)
    assert a["rope_scaling_args"]["scaling_factor"] == 8.0  # current TorchTitan scales RoPE by default
    cfg = get("torchtitan")[0].hf_config(a)
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["intermediate_size"] == 768


def test_job_toml_uses_flavor_and_seq_len(tmp_path) -> None:
    job = tmp_path / "debug.toml"
    job.write_text(
        '[job]\ndump_folder = "./outputs"\n\n[model]\nname = "llama3"\nflavor = "debugmodel"\n'
        'hf_assets_path = "./assets/hf/Llama-3.1-8B"\n\n[training]\nseq_len = 2048\nsteps = 10\n'
    )
    a = resolve(str(job), shapes_of_flavor("debugmodel"))
    assert a["max_seq_len"] == 2048 and a["n_heads"] == 16 and a["flavor"] == "debugmodel"


def test_yaml_and_json_files(tmp_path) -> None:
    tensors = shapes_of_flavor("debugmodel", n_kv_heads=4)
    (tmp_path / "a.yaml").write_text("n_heads: 16\nrope_theta: 10000\nrope_scaling_args: null\n# comment\n")
    (tmp_path / "a.json").write_text(json.dumps({"n_heads": 16, "rope_theta": 10000, "rope_scaling_args": None}))
    for name in ("a.yaml", "a.json"):
        a = resolve(str(tmp_path / name), tensors)
        assert a["n_kv_heads"] == 4 and a["rope_scaling_args"] is None


def test_flavor_that_contradicts_the_checkpoint(tmp_path) -> None:
    with pytest.raises(
        ModelArgsError, match=r"dim=4096 contradicts the checkpoint: tok_embeddings\.weight \[2048, 256\]"
    ):
        resolve("8B", shapes_of_flavor("debugmodel", n_heads=32, n_kv_heads=2))


def test_bad_model_args_value(tmp_path) -> None:
    with pytest.raises(ModelArgsError, match="no such file, and not a TorchTitan llama3 flavor"):
        resolve("9B", {})
    (tmp_path / "bad.yaml").write_text("n_heads: [1, 2\n")
    with pytest.raises(ModelArgsError, match=r"bad\.yaml: cannot parse model args"):
        resolve(str(tmp_path / "bad.yaml"), {})
    (tmp_path / "evil.yaml").write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(ModelArgsError, match="cannot parse"):
        resolve(str(tmp_path / "evil.yaml"), {})


def test_every_command_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"convert", "adapters", "smoke", "card", "release", "init", "devhub"} <= set(sub.choices)
    for name in sub.choices:
        r = subprocess.run([sys.executable, "-m", "hubconv", name, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: hubconv" in r.stdout, name


def test_adapters_command_lists_every_registered_adapter() -> None:
    r = subprocess.run([sys.executable, "-m", "hubconv", "adapters"], capture_output=True, text=True, check=True)
    listed = {line.split()[0]: line for line in r.stdout.splitlines() if line and not line[0].isspace()}
    registered = available()
    assert "torchtitan" in registered and set(registered) <= set(listed)
    assert "Llama 3" in listed["torchtitan"]
