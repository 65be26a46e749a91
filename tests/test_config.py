""".hubconv.yml: schema, errors with field path and line, CLI overrides, `hubconv init`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hubconv.cli import build_parser, release_config
from hubconv.config import STARTER, ConfigError, Prompt, load_config


def write(tmp_path, text: str) -> str:
    path = tmp_path / ".hubconv.yml"
    path.write_text(text)
    return str(path)


def test_full_config_parses_and_resolves_paths(tmp_path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            "adapter: torchtitan:llama3\ncheckpoint: ckpt/step-10\nmodel_args: 8B\n"
            "tokenizer: {path: tok/tokenizer.model, eos_token: '<|end_of_text|>'}\n"
            "hub: {repo_id: org/model, private: true}\n"
            "card: {license: apache-2.0, language: [en], extra_sections: {Eval: docs/eval.md}}\n"
            "smoke:\n  prompts:\n    - Hello\n    - {prompt: 'A class', expect: 'is an'}\n  max_new_tokens: 8\n",
        )
    )
    assert cfg.checkpoint == str(tmp_path / "ckpt" / "step-10")
    assert cfg.tokenizer.path == str(tmp_path / "tok" / "tokenizer.model")
    assert cfg.model_args == "8B"  # a flavor name, not a path
    assert cfg.hub.private is True and cfg.hub.repo_id == "org/model"
    assert cfg.card.extra_sections == {"Eval": str(tmp_path / "docs" / "eval.md")}
    assert cfg.smoke.prompts == [Prompt("Hello"), Prompt("A class", "is an")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("adapter: torchtitan\nhub:\n  repo_id: a/b\n  privat: true\n", r":4: hub\.privat: unknown field"),
        ("smoke:\n  max_new_tokens: many\n", r":2: smoke\.max_new_tokens: expected an integer, got 'many'"),
        ("smoke:\n  prompts: {a: 1}\n", r":2: smoke\.prompts: expected a list"),
        ("hub:\n  private: maybe\n", r":2: hub\.private: expected true or false"),
        ("card:\n  language: en\n", r":2: card\.language: expected a list"),
        ("adapter: [torchtitan\n", r":2: invalid YAML"),
        ("- just\n- a list\n", r":1: \(top level\): expected a mapping"),
        ("smoke:\n  prompts:\n    - {text: hi}\n", r":3: smoke\.prompts\[0\]\.text: unknown field"),
    ],
)
def test_errors_name_the_field_and_line(tmp_path, text, message) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert e.value.file == path and e.value.line is not None


def test_yaml_is_loaded_safely(tmp_path) -> None:
    path = write(tmp_path, "adapter: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError):
        load_config(path)
    assert not os.path.exists("pwned")


def test_flags_override_the_file(tmp_path, monkeypatch) -> None:
    path = write(tmp_path, "adapter: torchtitan\ncheckpoint: a\ndtype: float32\nsmoke: {max_new_tokens: 8}\n")
    args = build_parser().parse_args(
        [
            "release",
            "--config",
            path,
            "--dtype",
            "bfloat16",
            "--prompt",
            "Hi",
            "--expect",
            "there",
            "--repo-id",
            "me/x",
            "--no-parity",
            "--tokenizer",
            "t.model",
        ]
    )
    cfg = release_config(args)
    assert cfg.dtype == "bfloat16" and cfg.adapter == "torchtitan" and cfg.smoke.max_new_tokens == 8
    assert cfg.smoke.prompts == [Prompt("Hi", "there")] and cfg.smoke.parity is False
    assert cfg.hub.repo_id == "me/x" and cfg.tokenizer.path == "t.model"


def test_flags_alone_and_missing_required(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = release_config(build_parser().parse_args(["release", "--adapter", "torchtitan"]))
    with pytest.raises(ConfigError, match=r"`checkpoint` is required: set it in \.hubconv\.yml or pass --checkpoint"):
        cfg.require("adapter", "checkpoint")


def test_init_writes_a_valid_starter(tmp_path) -> None:
    path = tmp_path / "sub" / ".hubconv.yml"
    path.parent.mkdir()
    r = subprocess.run([sys.executable, "-m", "hubconv", "init", "--config", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and path.read_text() == STARTER
    cfg = load_config(str(path))
    assert cfg.adapter == "torchtitan" and cfg.hub.repo_id == "your-org/your-model"
    again = subprocess.run(
        [sys.executable, "-m", "hubconv", "init", "--config", str(path)], capture_output=True, text=True
    )
    assert again.returncode == 1 and "already exists" in again.stderr
