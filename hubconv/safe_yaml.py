"""The one YAML loader for user files (`.hubconv.yml`, model-args YAML): bounded in size, nesting and expansion.

`yaml.safe_load` constructs no Python objects, but it happily composes an alias bomb ("billion
laughs": nine aliases of nine aliases of ...) whose *expanded* size is exponential; anything that
walks the result (validation, JSON dumps) then runs out of memory. `BoundedLoader` counts, while
composing, how many nodes each node stands for once its aliases are expanded, and refuses a
document beyond `MAX_NODES` (a real config has a few hundred), nesting beyond `MAX_DEPTH`, a
recursive alias, or a tag outside the safe YAML schema (`!!python/...`). Files are read as
strict UTF-8 and capped at `MAX_BYTES`. Every problem is a `YamlFileError` naming file and line.
"""

from __future__ import annotations

from typing import Any

import yaml

from hubconv.errors import HubconvError

MAX_BYTES = 1 << 20  # 1 MiB
MAX_NODES = 100_000  # nodes after alias expansion
MAX_DEPTH = 100

# Tags with a safe constructor, plus `<<` merge keys (expanded by the constructor, counted here).
_SAFE_TAGS = frozenset(k for k in yaml.SafeLoader.yaml_constructors if k is not None) | {"tag:yaml.org,2002:merge"}


class YamlFileError(HubconvError):
    """A YAML file that cannot be read safely; `file`, `line` (1-based or None) and `detail` locate it."""

    def __init__(self, detail: str, file: str | None = None, line: int | None = None):
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(where + detail)
        self.file, self.line, self.detail = file, line, detail


class _Refused(yaml.YAMLError):
    def __init__(self, detail: str, mark: yaml.Mark | None):
        super().__init__(detail)
        self.detail, self.mark = detail, mark


class BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses expansion beyond `MAX_NODES`, depth beyond `MAX_DEPTH`,
    recursive aliases and tags without a safe constructor."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._expanded: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self._expanded:
                raise _Refused("recursive alias (an anchor used inside itself)", mark)
            return node
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if node.tag not in _SAFE_TAGS:
            raise _Refused(f"tag {_short_tag(node.tag)} is not allowed (plain YAML values only)", mark)
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._expanded[id(c)] for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._expanded[id(k)] + self._expanded[id(v)] for k, v in node.value)
        if size > MAX_NODES:
            raise _Refused(f"expands to more than {MAX_NODES:,} values (an alias bomb?)", mark)
        self._expanded[id(node)] = size
        return node


def _short_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_text(path: str, what: str = "file") -> str:
    """The file as UTF-8 text, at most `MAX_BYTES`; YamlFileError otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise YamlFileError(f"cannot read {what} ({e.strerror or e})", path) from None
    if len(raw) > MAX_BYTES:
        raise YamlFileError(f"{what} is larger than {MAX_BYTES // 1024} KiB", path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise YamlFileError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})", path, line) from None


def compose(text: str, path: str | None = None) -> yaml.Node | None:
    """The document's node graph (line numbers kept), bounded as described in the module docstring."""
    loader: BoundedLoader | None = None
    try:
        loader = BoundedLoader(text)  # checks for non-printable characters
        return loader.get_single_node()
    except _Refused as e:
        raise YamlFileError(e.detail, path, e.mark.line + 1 if e.mark else None) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        detail = _one_line(e.problem or e.context or "")
        raise YamlFileError(f"invalid YAML: {detail}", path, mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as e:  # a control character
        line = text[: e.position].count("\n") + 1
        raise YamlFileError(f"invalid YAML: character #x{e.character:04x} is not allowed", path, line) from None
    except RecursionError:
        raise YamlFileError("invalid YAML: nested too deeply", path) from None
    finally:
        if loader is not None:
            loader.dispose()


def construct(node: yaml.Node | None, path: str | None = None) -> Any:
    """Python values (dicts, lists, scalars) of a node that `compose` returned (or a part of it)."""
    if node is None:
        return None
    loader = BoundedLoader("")
    try:
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        detail = _one_line(e.problem or e.context or "")
        raise YamlFileError(f"invalid YAML: {detail}", path, mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()


def load_text(text: str, path: str | None = None) -> Any:
    """`yaml.safe_load` with the bounds above."""
    return construct(compose(text, path), path)


def load_file(path: str, what: str = "file") -> Any:
    """Read and parse a YAML file with the bounds above."""
    return load_text(read_text(path, what), path)
