"""Every bad input through the real command line (issue 9, "Bad input"): exit code 1 (2 for usage errors), one
`hubconv: error:` line on stderr naming the offending file / field / tensor, no traceback, nothing half-written
(no output folder, no `.*.hubconv-*` staging folder) and every input left intact. One table, one subprocess per
row; the converted folder the push rows need is built once."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from hubconv import safe_yaml
from hubconv.config import ConfigError, load_config
from hubconv.errors import ModelArgsError
from hubconv.model_args import load_args_file
from tests.helpers import EXAMPLE, EXAMPLE_SOURCE, hubconv

EXAMPLE_ARGS = yaml.safe_load(Path(EXAMPLE, "model_args.yaml").read_text())
CLOSED_PORT = "http://127.0.0.1:9"  # discard: nothing listens there


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs" document: `width`**`levels` strings from a few hundred bytes."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Ctx:
    """Paths one row works with; `ex` is a private copy of the bundled example (rows may try to destroy it)."""

    tmp: Path
    converted: str
    made: set[str] = dataclasses.field(default_factory=set)  # top-level names the row created as inputs

    @property
    def out(self) -> str:
        return str(self.tmp / "out")

    @property
    def ex(self) -> Path:
        copy = self.tmp / "example"
        self.made.add("example")
        if not copy.exists():
            shutil.copytree(EXAMPLE, copy)
        return copy

    @property
    def ckpt(self) -> str:
        return str(self.ex / "step-800")

    @property
    def args(self) -> str:
        return str(self.ex / "model_args.yaml")

    @property
    def config(self) -> str:
        return str(self.ex / ".hubconv.yml")

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        self.made.add(Path(name).parts[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)  # type: ignore[operator]
        return str(path)

    def convert(self, *extra: str, ckpt: str | None = None, args: str | None = None, out: str | None = None) -> list:
        return [
            "convert", "--adapter", "torchtitan", "--checkpoint", ckpt or self.ckpt, "--model-args", args or self.args,
            "--output", out or self.out, "--quiet", *extra,
        ]  # fmt: skip

    def release(self, *extra: str, config: str | None = None, out: str | None = None) -> list:
        return ["release", "--config", config or self.config, "--output", out or self.out, "--quiet", *extra]

    def model_args(self, **changes: object) -> str:
        """The example's model args with `changes`."""
        args = {**EXAMPLE_ARGS, **changes}
        return self.write("bad_args.yaml", yaml.safe_dump(args))

    def push(self, *extra: str, folder: str | None = None) -> list:
        return ["push", folder or self.converted, *extra]


def dcp_redirected(c: Ctx, fqn: str, relative_path: str) -> str:
    """A copy of the example checkpoint whose `.metadata` stores `fqn` at `relative_path`."""
    md_path = Path(c.ckpt, ".metadata")
    with open(md_path, "rb") as f:
        md = pickle.load(f)  # our own copy of the bundled example: plain pickle is fine here
    for index, info in list(md.storage_data.items()):
        if index.fqn == fqn:
            md.storage_data[index] = dataclasses.replace(info, relative_path=relative_path, offset=0, length=64)
    with open(md_path, "wb") as f:
        pickle.dump(md, f)
    return c.ckpt


def safetensors_file(c: Ctx, entries: dict, data: bytes) -> str:
    header = json.dumps(entries).encode()
    return c.write("hostile.safetensors", struct.pack("<Q", len(header)) + header + data)


@dataclasses.dataclass
class Row:
    id: str
    argv: Callable[[Ctx], list]
    names: tuple[str, ...]  # every one must appear in the error line
    code: int = 1
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: str | None = None  # regex of extra stderr lines allowed before the error (retry notes)


HUB_ENV = {"HF_TOKEN": "hf_dummy_token_for_tests", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": ""}
RETRY_NOTES = r"hubconv: \w+ failed \(\w+\); retrying in [\d.]+s"
BAD_REPO_IDS = [("dotdot", "../../etc"), ("three_parts", "a/b/c"), ("no_name", "org/"), ("no_namespace", "noname")]

ROWS = [
    # --- --overwrite never deletes an input, and no output lies inside one (realpaths)
    Row("overwrite_checkpoint", lambda c: c.convert("--overwrite", out=c.ckpt), ("step-800", "checkpoint")),
    Row("overwrite_parent_of_checkpoint", lambda c: c.convert("--overwrite", out=str(c.ex)),
        ("contains", "checkpoint")),
    Row("output_inside_checkpoint", lambda c: c.convert(out=c.ckpt + "/hf"), ("inside", "checkpoint")),
    Row("overwrite_model_args_file", lambda c: c.convert("--overwrite", out=c.args), ("model args", "model_args.yaml")),
    Row("overwrite_tokenizer", lambda c: c.convert(
        "--overwrite", "--tokenizer", str(c.ex / "tokenizer" / "tokenizer.model"), out=str(c.ex / "tokenizer")),
        ("contains", "tokenizer")),
    Row("overwrite_symlink_to_checkpoint", lambda c: c.convert("--overwrite", out=symlink(c, c.ckpt)),
        ("checkpoint", "step-800")),
    Row("overwrite_dotdot_path", lambda c: c.convert("--overwrite", out=str(c.ex / "step-800" / "..")),
        ("contains", "checkpoint")),
    Row("release_overwrite_checkpoint", lambda c: c.release("--dry-run", "--overwrite", out=c.ckpt),
        ("step-800", "checkpoint")),
    Row("release_overwrite_config_folder", lambda c: c.release("--dry-run", "--overwrite", out=str(c.ex)),
        ("contains",)),
    Row("release_output_inside_checkpoint", lambda c: c.release("--dry-run", out=c.ckpt + "/hf"),
        ("inside", "checkpoint")),
    Row("release_overwrite_config_file", lambda c: c.release("--dry-run", "--overwrite", out=c.config),
        ("config file", ".hubconv.yml")),
    # --- output location
    Row("output_parent_is_a_file", lambda c: c.convert(out=c.write("afile", "x") + "/out"), ("afile", "is a file")),
    Row("output_exists_without_overwrite", lambda c: c.convert(out=c.write("existing", "x")),
        ("existing", "already exists")),
    Row("overwrite_a_file", lambda c: c.convert("--overwrite", out=c.write("existing", "x")),
        ("existing", "not a folder")),
    # --- YAML: bounded, strict UTF-8, no Python tags (config and model args)
    Row("config_alias_bomb", lambda c: c.release("--dry-run", config=c.write("bomb.yml", alias_bomb())),
        ("bomb.yml:", "alias bomb")),
    Row("config_recursive_alias", lambda c: c.release("--dry-run", config=c.write("rec.yml", "card: &a {x: *a}\n")),
        ("rec.yml:1", "recursive alias")),
    Row("config_python_tag", lambda c: c.release("--dry-run", config=c.write(
        "py.yml", "adapter: torchtitan\ncheckpoint: !!python/object/apply:os.system ['touch pwned']\n")),
        ("py.yml:2", "!!python/object/apply:os.system")),
    Row("config_not_utf8", lambda c: c.release(
        "--dry-run", config=c.write("latin1.yml", "adapter: t\ncard: {title: caf\xe9}\n".encode("latin-1"))),
        ("latin1.yml:2", "not UTF-8")),
    Row("config_too_large", lambda c: c.release(
        "--dry-run", config=c.write("big.yml", "#" * (safe_yaml.MAX_BYTES + 1))),
        ("big.yml", "larger than")),
    Row("config_deep_nesting", lambda c: c.release(
        "--dry-run", config=c.write("deep.yml", "a: " + "[" * 5000 + "]" * 5000)),
        ("deep.yml", "nested")),
    Row("config_control_character", lambda c: c.release("--dry-run", config=c.write("ctl.yml", "adapter: a\x07b\n")),
        ("ctl.yml:1", "#x0007")),
    Row("model_args_alias_bomb", lambda c: c.convert(args=c.write("bomb.yaml", alias_bomb())),
        ("bomb.yaml", "alias bomb")),
    Row("model_args_python_tag", lambda c: c.convert(args=c.write("py.yaml", "dim: !!python/name:os.system\n")),
        ("py.yaml", "line 1", "!!python/name:os.system")),
    Row("model_args_not_utf8", lambda c: c.convert(args=c.write("bin.yaml", b"dim: 128\nn_heads: \xff\xfe\n")),
        ("bin.yaml:2", "not UTF-8")),
    Row("model_args_json_nan", lambda c: c.convert(args=c.write("nan.json", '{"dim": NaN}')), ("nan.json", "NaN")),
    # --- --max-shard-size and config fields of the wrong type or value
    *[Row(f"max_shard_size_{name}", lambda c, v=value: c.convert(f"--max-shard-size={v}"), ("--max-shard-size",))
      for name, value in [("zero", "0"), ("negative", "-5GB"), ("inf", "inf"), ("nan", "nan"), ("huge", "1e400GB"),
                          ("words", "five gigs"), ("tiny", "0.1B")]],
    Row("release_max_shard_size_flag", lambda c: c.release("--dry-run", "--max-shard-size", "inf"),
        ("--max-shard-size",)),
    *[Row(f"config_{name}", lambda c, t=text: c.release("--dry-run", config=c.write("cfg.yml", t)), ("cfg.yml:", field))
      for name, text, field in [
          ("shard_size_negative", "max_shard_size: -1\n", "max_shard_size"),
          ("shard_size_nan", "max_shard_size: .nan\n", "max_shard_size"),
          ("hub_not_mapping", "hub: [1, 2]\n", "hub"),
          ("private_not_bool", "hub: {private: maybe}\n", "hub.private"),
          ("new_tokens_string", "smoke: {max_new_tokens: many}\n", "smoke.max_new_tokens"),
          ("new_tokens_zero", "smoke: {max_new_tokens: 0}\n", "smoke.max_new_tokens"),
          ("positions_small", "smoke: {positions: 8}\n", "smoke.positions"),
          ("expect_bad_regex", "smoke: {prompts: [{prompt: a, expect: '(('}]}\n", "smoke.prompts[0].expect"),
          ("language_not_list", "card: {language: {en: 1}}\n", "card.language"),
          ("special_token_id_string", "tokenizer: {special_tokens: {'<s>': one}}\n", "tokenizer.special_tokens.<s>"),
          ("unknown_field", "adaptor: torchtitan\n", "adaptor"),
          ("duplicate_field", "adapter: a\nadapter: b\n", "adapter"),
          ("top_level_list", "- adapter\n", "top level"),
      ]],
    Row("usage_error_is_exit_2", lambda c: ["convert", "--checkpoint", c.ckpt, "--output", c.out], ("--adapter",), 2),
    # --- nonsense model args, named by field
    *[Row(f"model_args_{name}", lambda c, ch=changes: c.convert(args=c.model_args(**ch)), ("bad_args.yaml", field))
      for name, changes, field in [
          ("n_heads_zero", {"n_heads": 0}, "n_heads"),
          ("n_heads_negative", {"n_heads": -1}, "n_heads"),
          ("n_heads_string", {"n_heads": "x"}, "n_heads"),
          ("n_heads_float", {"n_heads": 3.5}, "n_heads"),
          ("n_heads_not_dividing", {"n_heads": 3}, "n_heads"),
          ("n_kv_heads_zero", {"n_kv_heads": 0}, "n_kv_heads"),
          ("norm_eps_zero", {"norm_eps": 0.0}, "norm_eps"),
          ("norm_eps_negative", {"norm_eps": -1e-5}, "norm_eps"),
          ("max_seq_len_zero", {"max_seq_len": 0}, "max_seq_len"),
          ("max_seq_len_negative", {"max_seq_len": -256}, "max_seq_len"),
          ("dim_string", {"dim": "wide"}, "dim"),
          ("n_layers_list", {"n_layers": [2]}, "n_layers"),
          ("rope_theta_string", {"rope_theta": "high"}, "rope_theta"),
          ("weight_tying_string", {"enable_weight_tying": "no"}, "enable_weight_tying"),
      ]],
    # --- hostile checkpoints (reads stay inside the folder; safetensors headers validated)
    Row("dcp_storage_path_etc_passwd", lambda c: c.convert(ckpt=dcp_redirected(c, "norm.weight", "../../etc/passwd")),
        ("norm.weight", "../../etc/passwd")),
    Row("dcp_storage_path_absolute", lambda c: c.convert(ckpt=dcp_redirected(c, "norm.weight", "/etc/passwd")),
        ("norm.weight", "/etc/passwd")),
    Row("safetensors_negative_offset", lambda c: c.convert(ckpt=safetensors_file(
        c, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8)), ("hostile.safetensors", "'a'")),
    Row("safetensors_overlapping", lambda c: c.convert(ckpt=safetensors_file(c, {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)), ("hostile.safetensors", "'b'")),
    Row("safetensors_duplicated_offsets", lambda c: c.convert(ckpt=safetensors_file(c, {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)), ("hostile.safetensors",)),
    Row("safetensors_out_of_bounds", lambda c: c.convert(ckpt=safetensors_file(
        c, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4)), ("hostile.safetensors", "'a'")),
    Row("checkpoint_missing", lambda c: c.convert(ckpt=str(c.tmp / "nope")), ("nope",)),
    # --- Hub inputs: checked before any request (push) or before the conversion (release)
    Row("push_missing_dir", lambda c: c.push(
        "--repo-id", "org/m", "--endpoint", CLOSED_PORT, folder=str(c.tmp / "gone")),
        ("gone", "no such folder"), env=HUB_ENV),
    Row("push_a_file", lambda c: c.push("--repo-id", "org/m", "--endpoint", CLOSED_PORT, folder=c.write("f.txt", "x")),
        ("f.txt", "not a folder"), env=HUB_ENV),
    *[Row(f"push_repo_id_{name}", lambda c, r=repo: c.push("--repo-id", r, "--endpoint", CLOSED_PORT),
          ("--repo-id", repo), env=HUB_ENV) for name, repo in BAD_REPO_IDS],
    *[Row(f"push_endpoint_{name}", lambda c, u=url: c.push("--repo-id", "org/m", "--endpoint", u), ("--endpoint",),
          env=HUB_ENV) for name, url in [("file", "file:///x"), ("ftp", "ftp://x"), ("no_host", "http://")]],
    Row("push_endpoint_closed_port", lambda c: c.push("--repo-id", "org/m", "--endpoint", CLOSED_PORT),
        ("127.0.0.1:9",), env=HUB_ENV, notes=RETRY_NOTES),
    *[Row(f"release_repo_id_{name}", lambda c, r=repo: c.release("--repo-id", r, "--endpoint", CLOSED_PORT),
          ("--repo-id", repo), env=HUB_ENV) for name, repo in BAD_REPO_IDS],
    *[Row(f"release_endpoint_{name}", lambda c, u=url: c.release("--endpoint", u), ("--endpoint",), env=HUB_ENV)
      for name, url in [("file", "file:///x"), ("ftp", "ftp://x")]],
    # --- an unforeseen exception is still one line (the catch-all in cli.main)
    Row("smoke_broken_record", lambda c: ["smoke", broken_record(c)], ("JSONDecodeError", "HUBCONV_DEBUG=1")),
]  # fmt: skip


def symlink(c: Ctx, target: str) -> str:
    link = c.tmp / "link"
    c.made.add("link")
    link.symlink_to(target)
    return str(link)


def broken_record(c: Ctx) -> str:
    folder = c.tmp / "model"
    c.made.add("model")
    folder.mkdir()
    (folder / "hubconv.json").write_text("{not json")
    return str(folder)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("bad-inputs") / "converted")
    cache = str(tmp_path_factory.getbasetemp() / "hubconv-cache")  # conftest's per-session cache (not set up yet)
    r = hubconv("convert", *EXAMPLE_SOURCE, "--output", out, "--quiet", env={**os.environ, "HUBCONV_CACHE_DIR": cache})
    assert r.returncode == 0, r.stderr
    return out


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


EXAMPLE_FILES = _snapshot(Path(EXAMPLE))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_line_error(row: Row, tmp_path, converted) -> None:
    c = Ctx(tmp_path, converted)
    argv = row.argv(c)
    before = set(os.listdir(tmp_path))
    converted_before = _snapshot(Path(converted))
    env = {**os.environ, **row.env}
    r = hubconv(*argv, cwd=str(tmp_path), env={k: v for k, v in env.items() if v != ""})
    assert r.returncode == row.code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    if row.code == 2:  # argparse: usage, then the error
        assert lines[-1].startswith(f"hubconv {argv[0]}: error:"), r.stderr
    else:
        assert lines and lines[-1].startswith("hubconv: error: "), r.stderr
        notes = [ln for ln in lines[:-1] if not (row.notes and re.fullmatch(row.notes, ln))]
        assert not notes, r.stderr
    for name in row.names:
        assert name in lines[-1], (name, lines[-1])
    # nothing half-written: no output, no staging folder anywhere under the row's folder, inputs intact
    assert not os.path.exists(c.out)
    created = set(os.listdir(tmp_path)) - before - c.made
    assert not created, created
    stray = [str(p) for p in tmp_path.rglob("*hubconv-*")]
    assert not stray, stray
    if (tmp_path / "example").exists():
        assert _snapshot(tmp_path / "example") == EXAMPLE_FILES or row.id.startswith("dcp_")
    assert _snapshot(Path(converted)) == converted_before
    assert not (tmp_path / "pwned").exists()


def test_table_controls_pass(tmp_path, converted) -> None:
    """Negative controls: the same commands with good inputs succeed, so each row fails for its own reason."""
    c = Ctx(tmp_path, converted)
    assert hubconv(*c.convert("--max-shard-size", "1MB")).returncode == 0
    shutil.rmtree(c.out)
    assert hubconv(*c.convert(args=c.model_args())).returncode == 0  # the rewritten model args themselves are fine
    shutil.rmtree(c.out)
    ok = c.write("ok.yml", "adapter: torchtitan\nhub: {private: false}\nsmoke: {max_new_tokens: 4, positions: 64}\n")
    cfg = load_config(ok)
    assert cfg.smoke.positions == 64 and cfg.hub.private is False
    out = str(tmp_path / "sibling-of-checkpoint")  # next to the checkpoint, inside the example folder: allowed
    r = hubconv(*c.convert(out=out))
    assert r.returncode == 0, r.stderr


def test_alias_bomb_is_refused_fast_with_bounded_memory(tmp_path) -> None:
    """The bomb expands to 9**9 strings; refused in well under a second, tracing a few MB at most."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    tracemalloc.start()
    try:
        start = time.monotonic()
        with pytest.raises(ModelArgsError, match="alias bomb"):
            load_args_file(str(bomb))
        with pytest.raises(ConfigError, match="alias bomb"):
            load_config(str(bomb))
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, elapsed
    assert peak < 16 * 2**20, peak
    # control: a document just under the budget (and with aliases) loads, so the limit is about size, not aliases
    ok = alias_bomb(levels=5, width=9)  # 9**5 = 59k strings < MAX_NODES
    assert len(safe_yaml.load_text(ok)["a4"]) == 9


def test_whole_bomb_through_the_cli_is_quick(tmp_path) -> None:
    bomb = tmp_path / "bomb.yml"
    bomb.write_text(alias_bomb(levels=12))
    start = time.monotonic()
    r = hubconv("release", "--dry-run", "--config", str(bomb), "--output", str(tmp_path / "o"))
    assert r.returncode == 1 and "alias bomb" in r.stderr
    assert time.monotonic() - start < 30  # the process start dominates; the unbounded version never finished


def test_debug_shows_the_traceback(tmp_path) -> None:
    c = Ctx(tmp_path, "")
    r = hubconv("smoke", broken_record(c), env={**os.environ, "HUBCONV_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("hubconv: error: JSONDecodeError")


def test_multi_line_messages_are_collapsed(capsys, monkeypatch) -> None:
    from hubconv import cli
    from hubconv.errors import HubconvError

    def boom(args):
        raise HubconvError("first\n  second\nthird")

    monkeypatch.setattr(cli, "_cmd_adapters", boom)
    assert cli.main(["adapters"]) == 1
    assert capsys.readouterr().err == "hubconv: error: first second third\n"


def test_yaml_bounds_unit() -> None:
    with pytest.raises(safe_yaml.YamlFileError, match=r"f\.yml:2: tag !!python/tuple"):
        safe_yaml.load_text("a: 1\nb: !!python/tuple [1]\n", "f.yml")
    with pytest.raises(safe_yaml.YamlFileError, match="recursive alias"):
        safe_yaml.load_text("a: &x [1, *x]\n")
    assert safe_yaml.load_text("base: &b {x: 1}\nder:\n  <<: *b\n  y: 2\n") == {
        "base": {"x": 1},
        "der": {"x": 1, "y": 2},
    }
    assert safe_yaml.load_text("t: !!str 5\nn: !!int '7'\n") == {"t": "5", "n": 7}


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("symlink and /proc based rows assume Linux")
