"""`.hubconv.yml`: everything a release needs, validated with errors that name the field path and line.

Every field can be overridden from the command line (`hubconv release --help`); a release can also
run from flags alone. YAML is parsed with `hubconv.safe_yaml` (a bounded `yaml.SafeLoader`, through
`compose`, which keeps line numbers for error messages).
"""

from __future__ import annotations

import os
import re
import types
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from hubconv import safe_yaml
from hubconv.errors import HubconvError

CONFIG_NAME = ".hubconv.yml"


class ConfigError(HubconvError):
    """A config problem; `file`/`line` point at it (for `::error file=,line=::` annotations)."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None):
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(where + message)
        self.file, self.line, self.detail = file, line, message


@dataclass
class TokenizerConfig:
    path: str | None = None
    kind: str | None = None  # hf | tiktoken | sentencepiece | char (detected when unset)
    bos_token: str | None = None
    eos_token: str | None = None
    pat_str: str | None = None
    special_tokens: dict[str, int] = field(default_factory=dict)
    chat_template: str | None = None


@dataclass
class Prompt:
    prompt: str
    expect: str | None = None  # regex the generated text must match


@dataclass
class SmokeConfig:
    prompts: list[Prompt] = field(default_factory=lambda: [Prompt("The")])
    max_new_tokens: int = 32
    parity: bool = True
    positions: int = 96
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32


@dataclass
class HubConfig:
    repo_id: str | None = None
    private: bool = False
    create_pr: bool = False
    revision: str = "main"
    endpoint: str | None = None


@dataclass
class CardConfig:
    title: str | None = None
    description: str | None = None
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    language: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    base_model: str | None = None
    tags: list[str] = field(default_factory=list)
    template: str | None = None
    extra_sections: dict[str, str] = field(default_factory=dict)


@dataclass
class ReleaseConfig:
    adapter: str | None = None
    checkpoint: str | None = None
    model_args: str | dict[str, Any] | None = None
    mapping: str | None = None  # YAML mapping file of `adapter: mapping`
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    output: str = "hubconv-release"
    hub: HubConfig = field(default_factory=HubConfig)
    card: CardConfig = field(default_factory=CardConfig)
    smoke: SmokeConfig = field(default_factory=SmokeConfig)
    source: str | None = None  # the file it came from, for messages

    def require(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) in (None, ""):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"`{name}` is required: set it in {CONFIG_NAME} or pass {flag}", self.source)

    def require_hub(self) -> None:
        if not self.hub.repo_id:
            raise ConfigError(
                f"`hub.repo_id` is required to publish: set it in {CONFIG_NAME} or pass --repo-id", self.source
            )


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", bool: "true or false", float: "a number"}.get(tp, str(tp))


def _convert(node: yaml.Node, tp: Any, path: str, file: str) -> Any:
    """Build a value of type `tp` from a YAML node, or raise ConfigError naming `path` and the line."""
    line = node.start_mark.line + 1

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{path or '(top level)'}: {msg}", file, line)

    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        is_null = isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"
        if is_null and len(options) < len(get_args(tp)):
            return None
        if len(options) == 1:  # `X | None`: X's own message (it may be about the value, not the type)
            return _convert(node, options[0], path, file)
        for option in options:
            try:
                return _convert(node, option, path, file)
            except ConfigError:
                continue
        raise fail(f"expected {' or '.join(_type_name(o) for o in options)}")
    if is_dataclass(tp):
        if tp is Prompt and isinstance(node, yaml.ScalarNode):
            return Prompt(str(safe_yaml.construct(node, file)))
        if not isinstance(node, yaml.MappingNode):
            raise fail("expected a mapping")
        hints = get_type_hints(tp)
        known = {f.name for f in fields(tp) if f.name != "source"}
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in known or key in values:
                problem = "given twice" if key in values else f"unknown field (known: {', '.join(sorted(known))})"
                raise ConfigError(
                    f"{path + '.' if path else ''}{key or '(non-text key)'}: {problem}",
                    file,
                    key_node.start_mark.line + 1,
                )
            values[key] = _convert(value_node, hints[key], f"{path + '.' if path else ''}{key}", file)
        try:
            return tp(**values)
        except TypeError as e:
            raise fail(str(e)) from None
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(node, yaml.SequenceNode):
            raise fail("expected a list")
        return [_convert(v, item, f"{path}[{i}]", file) for i, v in enumerate(node.value)]
    if origin is dict:
        _, value_tp = get_args(tp)
        if not isinstance(node, yaml.MappingNode):
            raise fail("expected a mapping")
        if value_tp is Any:
            return safe_yaml.construct(node, file)
        if not all(isinstance(k, yaml.ScalarNode) for k, _ in node.value):
            raise fail("keys must be plain text")
        return {str(k.value): _convert(v, value_tp, f"{path}.{k.value}", file) for k, v in node.value}
    if not isinstance(node, yaml.ScalarNode):
        raise fail(f"expected {_type_name(tp)}")
    value = safe_yaml.construct(node, file)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # e.g. `max_shard_size: 500` or `revision: 1.0`
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise fail(f"expected {_type_name(tp)}, got {value!r}")
    check = _VALUE_CHECKS.get(re.sub(r"\[\d+\]", "[]", path))
    problem = check(value) if check else None
    if problem:
        raise fail(problem)
    return value


def _size_problem(value: str) -> str | None:
    from hubconv.io.writer import parse_size

    try:
        parse_size(value, option="max_shard_size")
    except HubconvError as e:
        return str(e).removeprefix("max_shard_size: ")
    return None


def regex_problem(value: str) -> str | None:
    """Why `value` is not a valid regular expression, or None."""
    try:
        re.compile(value)
    except re.error as e:
        return f"invalid regular expression {value!r}: {e}"
    return None


# Values whose type alone does not make them valid: field path -> problem or None.
_VALUE_CHECKS = {
    "max_shard_size": _size_problem,
    "smoke.max_new_tokens": lambda v: None if v >= 1 else f"must be at least 1, got {v}",
    "smoke.prompts[].expect": regex_problem,
    "smoke.positions": lambda v: None if v >= 64 else f"must be at least 64 (parity needs long contexts), got {v}",
}


def load_config(path: str) -> ReleaseConfig:
    """Parse and validate a `.hubconv.yml`; relative paths are resolved against its folder."""
    try:
        node = safe_yaml.compose(safe_yaml.read_text(path, "config"), path)
        cfg = ReleaseConfig() if node is None else _convert(node, ReleaseConfig, "", path)
    except safe_yaml.YamlFileError as e:
        raise ConfigError(e.detail, e.file, e.line) from None
    cfg.source = path
    base = os.path.dirname(os.path.abspath(path))
    _resolve_paths(cfg, base)
    return cfg


def _resolve_paths(cfg: ReleaseConfig, base: str) -> None:
    def rel(p: str | None) -> str | None:
        if p is None or "://" in p or p.startswith("release-assets:") or os.path.isabs(p):
            return p
        return os.path.normpath(os.path.join(base, p))

    cfg.checkpoint = rel(cfg.checkpoint)
    if cfg.adapter and ".py:" in cfg.adapter and not os.path.isabs(cfg.adapter):  # a plugin file in the repository
        cfg.adapter = rel(cfg.adapter)
    cfg.output = rel(cfg.output) or cfg.output
    cfg.tokenizer.path = rel(cfg.tokenizer.path)
    cfg.mapping = rel(cfg.mapping)
    cfg.card.template = rel(cfg.card.template)
    if isinstance(cfg.model_args, str) and os.path.exists(os.path.join(base, cfg.model_args)):
        cfg.model_args = rel(cfg.model_args)
    cfg.card.extra_sections = {k: (rel(v) if v.endswith(".md") else v) or v for k, v in cfg.card.extra_sections.items()}


STARTER = """\
# hubconv release configuration: `hubconv release --dry-run` converts, tests and documents the model;
# `hubconv release` also publishes it. Every field can be overridden with a command-line flag.

adapter: torchtitan                 # source framework (`hubconv adapters`), optionally :family
checkpoint: outputs/checkpoint/step-1000
model_args: model_args.yaml         # native hyperparameters: a file, a job TOML or a flavor name (8B)
# mapping: hubconv-mapping.yml      # with `adapter: mapping`: your model's YAML mapping (examples/tutorial-gpt)
tokenizer:
  path: assets/tokenizer/tokenizer.model   # HF folder, tiktoken BPE, SentencePiece .model or meta.pkl
  # bos_token: "<|begin_of_text|>"
  # eos_token: "<|end_of_text|>"
dtype: bfloat16                     # auto keeps the checkpoint's dtype
max_shard_size: 5GB
output: dist/hf-model               # the release folder

hub:
  repo_id: your-org/your-model
  private: false
  create_pr: false                  # true: open (or update) a Hub pull request instead of pushing to main

card:
  license: apache-2.0
  language: [en]
  datasets: []
  tags: []
  # description: What the model is, what it was trained on and for.
  # template: docs/modelcard.md.j2  # your own Jinja template
  # extra_sections: {Evaluation: docs/eval.md}

smoke:
  prompts:
    - prompt: "The capital of France is"
      # expect: "Paris"             # regex the greedy continuation must match
  max_new_tokens: 32
  parity: true                      # compare logits with the native model on 96 positions
"""
