"""Adapter plugins: a file, a module on the Python path, an installed entry point; refusals and one-line errors."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hubconv.adapters import registry
from hubconv.convert import convert
from hubconv.errors import HubconvError, MappingError
from tests.helpers import hubconv

# A plugin as a user would write it: a RuleAdapter for a small hand-written Llama whose checkpoint is a
# plain safetensors state dict (`emb`, `blocks.N.q.weight`, ..., `norm`, `head`, and a `step` counter).
PLUGIN = '''
from hubconv.adapters.generic import RuleAdapter
from hubconv.adapters.rules import Drop, Rule, RuleTable


class MyAdapter(RuleAdapter):
    name = "mytoy"
    description = "toy Llama plugin (tests)"
    families = ("toy",)
    model_types = ("llama",)
    model_type = "llama"
    layer_count_arg = "n_layers"

    def detect_family(self, ckpt):
        return "toy"

    def resolve_args(self, ckpt, tensors, user):
        vocab, dim = tensors["emb"].shape
        layers = {int(k.split(".")[1]) for k in tensors if k.startswith("blocks.")}
        return {"vocab": vocab, "dim": dim, "n_layers": len(layers), "n_heads": 2, "n_kv_heads": 1,
                "ffn": tensors["blocks.0.up.weight"].shape[0]}

    def rules(self):
        B, H = "blocks.{i}.", "model.layers.{i}."
        return [
            Rule("emb", "model.embed_tokens.weight"),
            Rule(B + "ln1", H + "input_layernorm.weight"),
            Rule(B + "q.weight", H + "self_attn.q_proj.weight", ops=[("rope_permute", {"heads": "n_heads"})]),
            Rule(B + "k.weight", H + "self_attn.k_proj.weight", ops=[("rope_permute", {"heads": "n_kv_heads"})]),
            Rule(B + "v.weight", H + "self_attn.v_proj.weight"),
            Rule(B + "o.weight", H + "self_attn.o_proj.weight"),
            Rule(B + "ln2", H + "post_attention_layernorm.weight"),
            Rule(B + "gate.weight", H + "mlp.gate_proj.weight"),
            Rule(B + "up.weight", H + "mlp.up_proj.weight"),
            Rule(B + "down.weight", H + "mlp.down_proj.weight"),
            Rule("norm", "model.norm.weight"),
            Rule("head", "lm_head.weight"),
        ]

    def table(self, args):
        return RuleTable(self.rules(), [Drop(r"^step$", "training step counter")])

    def hf_config(self, a):
        return {
            "vocab_size": a["vocab"], "hidden_size": a["dim"], "intermediate_size": a["ffn"],
            "num_hidden_layers": a["n_layers"], "num_attention_heads": a["n_heads"],
            "num_key_value_heads": a["n_kv_heads"], "head_dim": a["dim"] // a["n_heads"],
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False,
        }


class NoOutputProjection(MyAdapter):
    """Forgets the attention output projection: only transformers' own architecture check can notice."""

    def rules(self):
        return [r for r in super().rules() if "self_attn.o_proj" not in r.dst]


class NotAnAdapter:
    name = "fake"
    families = ("toy",)


def make_adapter():
    return MyAdapter()
'''

DIM, FFN, VOCAB, LAYERS = 16, 32, 40, 2


def toy_state(seed: int = 0, **extra: np.ndarray) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    w = lambda *s: g.standard_normal(s).astype(np.float32)  # noqa: E731
    sd = {"emb": w(VOCAB, DIM), "norm": w(DIM), "head": w(VOCAB, DIM), "step": np.array(7, np.int64)}
    for i in range(LAYERS):
        b = f"blocks.{i}."
        sd |= {b + "ln1": w(DIM), b + "ln2": w(DIM), b + "q.weight": w(DIM, DIM), b + "k.weight": w(8, DIM)}
        sd |= {b + "v.weight": w(8, DIM), b + "o.weight": w(DIM, DIM), b + "gate.weight": w(FFN, DIM)}
        sd |= {b + "up.weight": w(FFN, DIM), b + "down.weight": w(DIM, FFN)}
    return {**sd, **extra}


@pytest.fixture
def plugin(tmp_path) -> tuple[str, str]:
    """(plugin file, checkpoint file) in tmp_path."""
    path = tmp_path / "plugin.py"
    path.write_text(PLUGIN)
    ckpt = tmp_path / "toy.safetensors"
    save_file(toy_state(), str(ckpt))
    return str(path), str(ckpt)


def rope_half(w: np.ndarray, heads: int) -> np.ndarray:
    """Interleaved -> rotate-half rows per head, written independently of hubconv's views."""
    return np.concatenate([np.concatenate([h[0::2], h[1::2]]) for h in np.split(w, heads)])


def test_plugin_file_converts_end_to_end_through_the_cli(tmp_path, plugin) -> None:
    path, ckpt = plugin
    out = tmp_path / "out"
    r = hubconv("convert", "--adapter", f"{path}:MyAdapter", "--checkpoint", ckpt, "--output", str(out))
    assert r.returncode == 0, r.stderr
    sd, got = toy_state(), load_file(str(out / "model.safetensors"))
    assert len(got) == 3 + 9 * LAYERS
    assert np.array_equal(got["model.embed_tokens.weight"], sd["emb"])
    assert np.array_equal(got["model.layers.1.mlp.down_proj.weight"], sd["blocks.1.down.weight"])
    q, k = got["model.layers.0.self_attn.q_proj.weight"], got["model.layers.0.self_attn.k_proj.weight"]
    assert np.array_equal(q, rope_half(sd["blocks.0.q.weight"], 2)) and not np.array_equal(q, sd["blocks.0.q.weight"])
    assert np.array_equal(k, rope_half(sd["blocks.0.k.weight"], 1))
    record = json.loads((out / "hubconv.json").read_text())
    assert record["adapter"] == "mytoy" and record["family"] == "toy"
    assert record["dropped"] == {"step": "training step counter"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 1


def test_plugin_family_in_the_spec(plugin) -> None:
    path, _ = plugin
    adapter, family = registry.get(f"{path}:MyAdapter:toy")
    assert family == "toy" and adapter.name == "mytoy"
    assert registry.get(f"{path}:MyAdapter")[0] is adapter  # loaded (executed) once per process
    assert registry.get("mytoy")[0] is adapter  # and found by name afterwards (release -> smoke parity)
    with pytest.raises(HubconvError, match=r"adapter 'mytoy' has no model family 'llama3'; families: toy"):
        registry.get(f"{path}:MyAdapter:llama3")


def test_plugin_gets_the_same_exactness_checks_as_builtins(tmp_path, plugin) -> None:
    path, _ = plugin
    extra = tmp_path / "extra.safetensors"
    save_file(toy_state(**{"blocks.0.lora": np.zeros(2, np.float32)}), str(extra))
    with pytest.raises(MappingError, match=r"1 tensor\(s\) match no mapping rule: blocks\.0\.lora"):
        convert(f"{path}:MyAdapter", str(extra), str(tmp_path / "a"), progress=False)
    # A table that forgets a parameter, on a checkpoint that lacks it: the plugin's own accounting is
    # satisfied, but transformers' architecture is checked before anything is written.
    sd = {k: v for k, v in toy_state().items() if not k.endswith(".o.weight")}
    lacking = tmp_path / "lacking.safetensors"
    save_file(sd, str(lacking))
    with pytest.raises(MappingError, match=r"output does not match LlamaForCausalLM.*o_proj"):
        convert(f"{path}:NoOutputProjection", str(lacking), str(tmp_path / "b"), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # Negative control: the complete checkpoint converts with the same plugin file.
    convert(f"{path}:MyAdapter", plugin[1], str(tmp_path / "c"), progress=False)
    assert (tmp_path / "c" / "model.safetensors").exists()


def write_package(root, module_source: str = PLUGIN) -> None:
    pkg = root / "toyplug"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "adapter.py").write_text(module_source)


def test_module_plugin_on_the_python_path(tmp_path, plugin, monkeypatch) -> None:
    write_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    result = convert("toyplug.adapter:MyAdapter", plugin[1], str(tmp_path / "out"), progress=False)
    assert result.adapter == "mytoy" and result.family == "toy"
    listed = {row.name: row for row in registry.listing()}
    assert listed["mytoy"].origin.startswith("plugin module toyplug.adapter (")
    with pytest.raises(HubconvError, match=r"^adapter plugin toyplug\.nothere:X: no module named 'toyplug\.nothere'"):
        registry.get("toyplug.nothere:X")
    with pytest.raises(HubconvError, match=r"^adapter plugin toyplug\.adapter:make_adapter: is a function, not"):
        registry.get("toyplug.adapter:make_adapter")


def make_dist(site, entry_points: str, marker: str | None = None) -> None:
    """A tiny installed distribution: the package plus a dist-info with entry_points.txt."""
    source = PLUGIN
    if marker:  # importing the plugin leaves a trace, to show when its code runs
        source = f"open({marker!r}, 'a').write('imported\\n')\n" + source
    write_package(site, source)
    info = site / "toyplug_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug-dist\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_entry_point_plugin_listed_and_used(tmp_path, plugin) -> None:
    site, marker = tmp_path / "site", tmp_path / "imported.txt"
    make_dist(
        site,
        """
        [hubconv.adapters]
        toy = toyplug.adapter:MyAdapter
        broken = toyplug.gone:Adapter
        fake = toyplug.adapter:NotAnAdapter
        torchtitan = toyplug.adapter:MyAdapter
        """,
        marker=str(marker),
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    # Naming a built-in imports no plugin: loading user code is explicit.
    r = hubconv("convert", "--adapter", "torchtitan", "--checkpoint", plugin[1], "--output", f"{tmp_path}/x", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr and not marker.exists(), r.stderr
    r = hubconv("adapters", env=env)
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = r.stdout.splitlines()
    toy = lines.index(next(line for line in lines if line.startswith("toy ")))
    assert "toy Llama plugin (tests) [families: toy]" in lines[toy]
    assert "from entry point toy = toyplug.adapter:MyAdapter (distribution toyplug-dist 1.0)" in lines[toy + 1]
    broken = next(line for line in lines if line.startswith("broken "))
    assert "plugin failed to load" in broken and "ModuleNotFoundError" in broken and "toyplug.gone" in broken
    fake = next(line for line in lines if line.startswith("fake "))
    assert "NotAnAdapter is not a subclass of hubconv.adapters.base.Adapter" in fake
    assert any(line.startswith("torchtitan ") and "belongs to a built-in adapter" in line for line in lines)
    assert any(line.startswith("torchtitan ") and "Llama 3" in line for line in lines)  # the built-in stays
    out = tmp_path / "out"
    r = hubconv("convert", "--adapter", "toy:toy", "--checkpoint", plugin[1], "--output", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "hubconv.json").read_text())["adapter"] == "toy"  # the entry point's name
    r = hubconv("convert", "--adapter", "broken", "--checkpoint", plugin[1], "--output", str(tmp_path / "y"), env=env)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("hubconv: error: adapter plugin 'broken' (entry point broken = toyplug.gone:Adapter")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{dir}/missing.py:MyAdapter", r"adapter plugin .*/missing\.py:MyAdapter: no such file"),
        ("{dir}/plugin.py:Nope", r"plugin\.py:Nope: no class 'Nope' in it \(classes defined there: MyAdapter, "),
        ("{dir}/plugin.py:NotAnAdapter", r"class NotAnAdapter is not a subclass of hubconv\.adapters\.base\.Adapter"),
        ("{dir}/plugin.py:make_adapter", r"plugin\.py:make_adapter: is a function, not a class"),
        ("{dir}/boom.py:X", r"boom\.py:X: importing it failed: ZeroDivisionError: division by zero"),
        ("{dir}/named_torchtitan.py:T", r"its name 'torchtitan' belongs to a built-in adapter"),
        ("{dir}/plugin.py", r"is not NAME\[:FAMILY\], PATH\.py:CLASS.*file is named with its class"),
        ("{dir}/folder:MyAdapter", r"is not NAME\[:FAMILY\], PATH\.py:CLASS\[:FAMILY\] or PACKAGE\.MODULE"),
        ("torchtitan:llama9", r"adapter 'torchtitan' has no model family 'llama9'"),
        ("megatrom", r"unknown adapter 'megatrom'; available: .*torchtitan.* \(a plugin is named PATH\.py:CLASS"),
    ],
)
def test_bad_plugin_specs_are_one_line_errors(tmp_path, plugin, spec, message) -> None:
    (tmp_path / "boom.py").write_text("1 / 0\n")
    (tmp_path / "named_torchtitan.py").write_text(
        PLUGIN.replace('name = "mytoy"', 'name = "torchtitan"') + "\nT = MyAdapter\n"
    )
    spec = spec.format(dir=tmp_path)
    with pytest.raises(HubconvError, match=message) as e:
        registry.get(spec)
    assert "\n" not in str(e.value)


def test_bad_plugin_through_the_cli_exits_1_with_one_line(tmp_path, plugin) -> None:
    path, ckpt = plugin
    out = tmp_path / "out"
    r = hubconv("convert", "--adapter", f"{path}:NotAnAdapter", "--checkpoint", ckpt, "--output", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr and not out.exists()
    assert r.stderr.strip().splitlines() == [
        f"hubconv: error: adapter plugin {path}:NotAnAdapter: class NotAnAdapter is not a subclass of "
        "hubconv.adapters.base.Adapter (subclass hubconv.adapters.generic.RuleAdapter)"
    ]


@pytest.mark.usefixtures("plugin")  # writes plugin.py and toy.safetensors into tmp_path
def test_plugin_named_in_a_config_is_found_from_the_config_folder_and_by_smoke(tmp_path) -> None:
    """`adapter: plugin.py:MyAdapter` in .hubconv.yml is relative to the config's folder; the spec is recorded in
    hubconv.json (relative there too, since it is published), so `hubconv smoke DIR` loads the plugin again."""
    (tmp_path / ".hubconv.yml").write_text(
        "adapter: plugin.py:MyAdapter\ncheckpoint: toy.safetensors\noutput: release\nsmoke:\n  parity: false\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = hubconv("release", "--dry-run", "--config", str(tmp_path / ".hubconv.yml"), "--quiet", cwd=str(elsewhere))
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "release" / "hubconv.json").read_text())
    assert record["adapter_spec"] == "plugin.py:MyAdapter" and record["checkpoint"] == "toy.safetensors"
    r = hubconv("smoke", str(tmp_path / "release"), "--no-parity", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
