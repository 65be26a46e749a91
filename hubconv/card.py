"""Model card (`README.md`) for a converted model folder: `hubconv card DIR`.

The card is a YAML metadata block built with huggingface_hub's `ModelCardData`, followed by a Markdown
body rendered from a Jinja template (`hubconv/templates/modelcard.md.j2`, or the user's `card.template`).
Everything is computed locally and deterministically from the folder: `config.json`, `hubconv.json`
(provenance written by the converter), `smoke.json` (smoke/parity results), the safetensors headers
(parameter count) and the weight files themselves (size, sha256). Nothing contacts the Hub: this module
never calls `ModelCard.validate()` or `push_to_hub()`; `validate_metadata` does the checks locally.

Template variables (the default template uses them; a user template gets the same ones):

- `card_data` (str): the YAML metadata, without the `---` lines. A template should start with
  `---`, `{{ card_data }}`, `---` (the huggingface_hub convention); if its output has no YAML block,
  hubconv prepends one. A YAML block that differs from the metadata is an error.
- `metadata` (dict): the same metadata as a dict (`ModelCardData.to_dict()`).
- `title` (str), `description` (str | None: the user's Markdown, inserted as is),
  `repo_id` (str | None), `revision` (str | None: the release tag, used in the usage snippet).
- `config` (dict): `config.json` as read.
- `arch` (dict): architecture facts: `architecture`, `model_type`, `parameters` (int, from the
  safetensors headers), `layers`, `hidden_size`, `intermediate_size`, `heads`, `kv_heads`, `head_dim`,
  `vocab_size`, `context_length`, `dtype`, `tied_embeddings`, `rope_type`, `rope_theta`; None when unknown.
- `provenance` (dict): the `Provenance` fields, completed from `hubconv.json`.
- `dropped` (list of dict): source entries the converter dropped, grouped by reason:
  `{"reason", "count", "keys"}`, largest group first.
- `lossy` (list of dict): target parameters that are not an exact image of the source (vocabulary
  trims, synthesized zeros, narrowing casts), grouped the same way.
- `smoke` (dict | None): `smoke.json` as read.
- `files` (list of dict): weight files `{"name", "size", "sha256"}`, sorted by name.
- `extra_sections` (list of dict): `{"title", "body"}` from `card.extra_sections` (files already read).
- `sections` (dict of str): ready-made, safely escaped Markdown for `usage`, `architecture`,
  `provenance`, `dropped`, `lossy`, `smoke`, `files` and `extra` (the extra sections as `## title` blocks).

Filters: `md` escapes text for inline Markdown (also HTML), `code` makes an inline code span,
`codeblock(lang)` makes a fenced code block that its content cannot close. Values from `smoke`,
`provenance`, `config` and `dropped` are untrusted (model output, file names): a custom template must
pass them through one of these filters. Templates run in Jinja's sandbox with undefined variables
being errors.
"""

from __future__ import annotations

import html
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.repocard_data import CardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hubconv import safe_yaml
from hubconv.dtypes import BY_NAME
from hubconv.errors import HubconvError
from hubconv.hashing import sha256_file
from hubconv.io.safetensors_reader import read_header

CARD_NAME = "README.md"
TEMPLATE_NAME = "modelcard.md.j2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")

# License identifiers accepted by the Hub in a card's `license:` field. Source: the table in
# huggingface/hub-docs docs/hub/repositories-licenses.md ("License identifier (to use in repo card)",
# https://huggingface.co/docs/hub/repositories-licenses, read at commit 008d54d08fd9d5d05ed2840bebb0b61111326a15)
# plus llama3, llama3.1, llama3.2 and llama3.3 (added to that table by huggingface/hub-docs PRs up to #1619).
# A license missing here can still be published as `license: other` with `license_name` and `license_link`.
HUB_LICENSES: frozenset[str] = frozenset(
    """
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda
    cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
    cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0
    eupl-1.1 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by
    odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
    llama2 llama3 llama3.1 llama3.2 llama3.3 gemma unknown other
    """.split()
)

# Pipeline tags (tasks) known to the Hub. Source: the keys of PIPELINE_DATA in huggingface/huggingface.js
# packages/tasks/src/pipelines.ts (commit 0057f4042b57b833d296ed4cf1c76cfd6619d00d).
PIPELINE_TAGS: frozenset[str] = frozenset(
    """
    biology text-classification token-classification table-question-answering question-answering
    zero-shot-classification translation summarization feature-extraction text-generation
    text2text-generation fill-mask sentence-similarity text-to-speech text-to-audio
    automatic-speech-recognition audio-to-audio audio-classification audio-text-to-text
    voice-activity-detection depth-estimation image-classification object-detection image-segmentation
    text-to-image image-to-text image-to-image image-to-video unconditional-image-generation
    video-classification reinforcement-learning robotics tabular-classification tabular-regression
    tabular-to-text table-to-text multiple-choice text-ranking text-retrieval time-series-forecasting
    text-to-video image-text-to-text visual-question-answering document-question-answering
    zero-shot-image-classification graph-ml mask-generation zero-shot-object-detection text-to-3d
    image-to-3d image-feature-extraction video-text-to-text keypoint-detection visual-document-retrieval
    any-to-any other
    """.split()
)

# ISO 639-1 (2 letters) / 639-2 and 639-3 (3 letters) codes, plus the Hub's special values.
_LANGUAGE_RE = re.compile(r"[a-z]{2,3}")
_SPECIAL_LANGUAGES = frozenset({"code", "multilingual"})
_URL_RE = re.compile(r"https?://[^\s<>()\[\]\"'`\\]+")
_GITHUB_SLUG_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?/[A-Za-z0-9_.-]+")
_SHA_RE = re.compile(r"[0-9a-f]{7,40}")


@dataclass
class CardFields:
    """The `card:` section of the user's `.hubconv.yml`."""

    repo_id: str | None = None
    title: str | None = None
    description: str | None = None
    license: str | None = None  # Hub license id, e.g. apache-2.0, mit, llama3.1, other
    license_name: str | None = None  # required by the Hub when license == "other"
    license_link: str | None = None
    language: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    base_model: str | None = None
    tags: list[str] = field(default_factory=list)
    template: str | None = None  # path to a user Jinja template
    extra_sections: dict[str, str] = field(default_factory=dict)  # title -> Markdown, or a path to a .md file


@dataclass
class Provenance:
    """Where the weights came from; fields left None are completed from `hubconv.json` when it has them."""

    source_framework: str | None = None  # e.g. "torchtitan"
    adapter: str | None = None  # e.g. "torchtitan:llama3"
    checkpoint: str | None = None
    git_repository: str | None = None  # "org/repo" (GitHub) or a URL
    git_commit: str | None = None
    release_tag: str | None = None
    hubconv_version: str | None = None
    converted_at: str | None = None  # ISO 8601 UTC


# --------------------------------------------------------------------------------------------- metadata


# How frameworks spell their own names, for the card's prose (tags keep the adapter's lowercase name).
FRAMEWORK_NAMES = {
    "nanogpt": "nanoGPT",
    "litgpt": "LitGPT",
    "mindformers": "MindSpore Transformers",
    "megatron": "Megatron-LM",
    "nemo": "NVIDIA NeMo",
}


def _framework(provenance: Provenance) -> str | None:
    if provenance.source_framework:
        return provenance.source_framework
    if provenance.adapter:
        return provenance.adapter.split(":", 1)[0] or None
    return None


def _listed(value: Any) -> list[Any]:
    """A config value given as one item or a list, as a list (a bare string is one item, not its characters)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def build_metadata(fields: CardFields, provenance: Provenance, config: dict) -> ModelCardData:
    """The card's YAML metadata: transformers text-generation model, license, languages, datasets, tags."""
    tags: list[str] = ["hubconv"]
    framework = _framework(provenance)
    if framework:
        tags.append(framework)
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type:
        tags.append(model_type)
    tags.extend(_listed(fields.tags))
    return ModelCardData(
        base_model=fields.base_model or None,
        datasets=_listed(fields.datasets) or None,
        language=_listed(fields.language) or None,
        library_name="transformers",
        license=fields.license or None,
        license_name=fields.license_name or None,
        license_link=fields.license_link or None,
        pipeline_tag="text-generation",
        tags=tags,
    )


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _yaml_round_trip_problems(card_data: ModelCardData) -> list[str]:
    expected = card_data.to_dict()
    try:
        parsed = ModelCard(f"---\n{card_data.to_yaml()}\n---\n").data.to_dict()
    except (yaml.YAMLError, ValueError, TypeError) as e:
        return [f"metadata: cannot be written as YAML and read back ({e})"]
    keys = sorted(k for k in expected.keys() | parsed.keys() if expected.get(k) != parsed.get(k))
    return [f"{k}: value changes when written as YAML and read back ({expected.get(k)!r})" for k in keys]


def _check_strings(name: str, value: Any) -> list[str]:
    return [
        f"{name}: {item!r} is not a non-empty string"
        for item in _as_list(value)
        if not isinstance(item, str) or not item
    ]


def _repo_id_problems(name: str, value: Any, need_namespace: bool) -> list[str]:
    problems = []
    for item in _as_list(value):
        if not isinstance(item, str):
            problems.append(f"{name}: {item!r} is not a string")
            continue
        try:
            validate_repo_id(item)
        except HFValidationError as e:
            problems.append(f"{name}: {item!r} is not a Hub repo id ({e})")
            continue
        if need_namespace and "/" not in item:
            problems.append(f"{name}: {item!r} should be a full Hub model id like 'org/name'")
    return problems


def validate_metadata(data: ModelCardData | dict) -> list[str]:
    """Local checks of card metadata, one human-readable problem per entry, each starting with the field name.

    Checks: the YAML round-trips through `ModelCard`/`ModelCardData`; `license` is a Hub license id (or
    `other` with `license_name`); `pipeline_tag` is a Hub task; languages are ISO 639-1/2/3 codes; tags
    and datasets are strings; `base_model` is an `org/name` Hub id.
    """
    try:
        if isinstance(data, ModelCardData):
            card_data = data
        else:
            card_data = ModelCardData(**(data.to_dict() if isinstance(data, CardData) else dict(data)))
    except (ValueError, TypeError) as e:
        return [f"metadata: not valid model card metadata ({e})"]
    d = card_data.to_dict()
    problems = _yaml_round_trip_problems(card_data)

    license_id = d.get("license")
    if license_id is not None:
        if not isinstance(license_id, str) or license_id not in HUB_LICENSES:
            problems.append(
                f"license: {license_id!r} is not a Hub license id (see https://huggingface.co/docs/hub/"
                "repositories-licenses); for another license use 'other' with license_name and license_link"
            )
        elif license_id == "other" and not d.get("license_name"):
            problems.append(
                "license_name: required when license is 'other' (a short id for the license, e.g. 'acme-1.0')"
            )
    for key in ("license_name", "license_link"):
        if key in d and (not isinstance(d[key], str) or not d[key].strip()):
            problems.append(f"{key}: {d[key]!r} is not a non-empty string")
    link = d.get("license_link")
    if isinstance(link, str) and link.strip():
        is_url = bool(re.fullmatch(r"https?://\S+", link))
        if not is_url and (re.search(r"\s", link) or "://" in link or link.startswith("/")):
            problems.append(
                f"license_link: {link!r} is neither an http(s) URL nor a file path in the repo (e.g. LICENSE)"
            )

    tag = d.get("pipeline_tag")
    if tag is not None and tag not in PIPELINE_TAGS:
        problems.append(f"pipeline_tag: {tag!r} is not a Hub pipeline tag (e.g. 'text-generation')")
    if "library_name" in d:
        problems += _check_strings("library_name", d["library_name"])
    if "language" in d:
        for lang in _as_list(d["language"]):
            if not isinstance(lang, str) or not (_LANGUAGE_RE.fullmatch(lang) or lang in _SPECIAL_LANGUAGES):
                problems.append(
                    f"language: {lang!r} is not an ISO 639-1/639-2/639-3 code (two or three lowercase letters, e.g. "
                    "'en', 'fra') or 'code'/'multilingual'"
                )
    if "tags" in d:
        problems += _check_strings("tags", d["tags"])
    if "datasets" in d:
        problems += _repo_id_problems("datasets", d["datasets"], need_namespace=False)
    if "base_model" in d:
        problems += _repo_id_problems("base_model", d["base_model"], need_namespace=True)
    return problems


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise HubconvError("invalid model card metadata:\n" + "\n".join(f"  - {p}" for p in problems))


# ------------------------------------------------------------------------------------------ folder facts


def _read_json(path: str, required: bool = False) -> Any:
    if not os.path.isfile(path):
        if required:
            raise HubconvError(f"{path}: not found (is this a converted model folder?)")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise HubconvError(f"{path}: cannot read JSON ({e})") from None


def _read_object(path: str, required: bool = False) -> dict | None:
    value = _read_json(path, required)
    if value is not None and not isinstance(value, dict):
        raise HubconvError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def streamed_shards(model_dir: str) -> dict[str, dict[str, Any]]:
    """Shards already uploaded by a streaming release and removed locally (`.hubconv/streamed.json`)."""
    path = os.path.join(model_dir, ".hubconv", "streamed.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def weight_files(model_dir: str) -> list[dict[str, Any]]:
    """`{"name", "size", "sha256"}` for every weight file in the folder (top level), sorted by name."""
    names = sorted(
        n for n in os.listdir(model_dir) if n.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(model_dir, n))
    )
    files = [
        {
            "name": n,
            "size": os.path.getsize(os.path.join(model_dir, n)),
            "sha256": sha256_file(os.path.join(model_dir, n)),
        }
        for n in names
    ]
    files += [{"name": n, "size": r["size"], "sha256": r["sha256"]} for n, r in streamed_shards(model_dir).items()]
    return sorted(files, key=lambda f: f["name"])


def count_parameters(model_dir: str) -> tuple[int, dict[str, int]]:
    """(total elements, elements per torch dtype name) over the folder's safetensors files, from headers only."""
    seen: set[str] = set()
    total = 0
    by_dtype: Counter[str] = Counter()
    headers = {n: r["header"] for n, r in streamed_shards(model_dir).items()}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            headers[name] = read_header(os.path.join(model_dir, name))[0]
    for name, header in sorted(headers.items()):
        for key, info in header.items():
            if key == "__metadata__" or key in seen:
                continue
            seen.add(key)
            try:
                shape = [int(s) for s in info["shape"]]
                dtype = str(info["dtype"])
            except (KeyError, TypeError, ValueError):
                raise HubconvError(f"{name}: tensor {key!r} has a malformed safetensors header entry") from None
            n = 1
            for s in shape:
                n *= s
            total += n
            known = BY_NAME.get(dtype)
            by_dtype[known.torch_name if known else dtype] += n
    return total, dict(sorted(by_dtype.items()))


def _text_config(config: dict) -> dict:
    """The language-model part of a config (nested `text_config` for multimodal wrappers)."""
    inner = config.get("text_config")
    if "num_hidden_layers" not in config and isinstance(inner, dict):
        return inner
    return config


def architecture(config: dict, parameters: int | None, param_dtypes: dict[str, int] | None = None) -> dict[str, Any]:
    """Architecture facts for the card, from config.json (transformers 4 or 5 spellings) and the weights."""
    c = _text_config(config)
    heads = c.get("num_attention_heads")
    hidden = c.get("hidden_size")
    head_dim = c.get("head_dim")
    if head_dim is None and isinstance(heads, int) and isinstance(hidden, int) and heads:
        head_dim = hidden // heads
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        rope = {}
    if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type (e.g. sliding / full attention)
        rope_type = ", ".join(f"{k}: {v.get('rope_type') or v.get('type') or 'default'}" for k, v in rope.items())
        rope_theta = ", ".join(f"{k}: {v.get('rope_theta')}" for k, v in rope.items())
    else:
        rope_type = rope.get("rope_type") or rope.get("type")
        rope_theta = rope.get("rope_theta", c.get("rope_theta"))
        if rope_type is None and rope_theta is not None:
            rope_type = "default"
    dtype = c.get("dtype") or c.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
    if dtype is None and param_dtypes:
        dtype = max(param_dtypes.items(), key=lambda kv: (kv[1], kv[0]))[0]
    architectures = config.get("architectures")
    return {
        "architecture": architectures[0] if isinstance(architectures, list) and architectures else None,
        "model_type": config.get("model_type"),
        "parameters": parameters,
        "layers": c.get("num_hidden_layers"),
        "hidden_size": hidden,
        "intermediate_size": c.get("intermediate_size"),
        "heads": heads,
        "kv_heads": c.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "vocab_size": c.get("vocab_size"),
        "context_length": c.get("max_position_embeddings"),
        "dtype": dtype,
        "tied_embeddings": c.get("tie_word_embeddings", config.get("tie_word_embeddings")),
        "rope_type": rope_type,
        "rope_theta": rope_theta,
    }


def complete_provenance(provenance: Provenance, record: dict | None) -> Provenance:
    """`provenance` with its empty fields filled from the converter's `hubconv.json` record."""
    if not record:
        return provenance
    adapter = record.get("adapter")
    family = record.get("family")
    if isinstance(adapter, str) and isinstance(family, str) and family and ":" not in adapter:
        adapter = f"{adapter}:{family}"
    filled = {
        "adapter": adapter,
        "checkpoint": record.get("checkpoint"),
        "hubconv_version": record.get("hubconv_version"),
    }
    updates = {k: str(v) for k, v in filled.items() if getattr(provenance, k) is None and v is not None}
    out = replace(provenance, **updates)
    if out.source_framework is None:
        out.source_framework = _framework(out)
    return out


def dropped_groups(record: dict | None, key: str = "dropped") -> list[dict[str, Any]]:
    """Dropped source entries (or, with key="lossy", inexact targets) from `hubconv.json`, grouped by
    reason, largest group first."""
    dropped = (record or {}).get(key) or {}
    if not isinstance(dropped, dict):
        return []
    by_reason: dict[str, list[str]] = {}
    for key, reason in dropped.items():
        by_reason.setdefault(str(reason), []).append(str(key))
    groups = [{"reason": r, "count": len(keys), "keys": sorted(keys)} for r, keys in by_reason.items()]
    return sorted(groups, key=lambda g: (-g["count"], g["reason"]))


# --------------------------------------------------------------------------------------- Markdown escaping

_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_MD_INLINE = re.compile(r"([\\`*_\[\]|~])")


def _visible(text: str, keep: str = "") -> str:
    """Control, line/paragraph separator and bidi characters as `\\uXXXX` (so they cannot restructure or hide text)."""
    out = []
    for ch in text:
        if ch in keep:
            out.append(ch)
        elif ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def md(value: Any) -> str:
    """Text for inline Markdown (also table cells): one line, Markdown punctuation and HTML escaped."""
    if value is None:
        return "—"
    text = str(value).replace("\r\n", "\n").replace("\r", "\n").replace("\n", " ").replace("\t", " ")
    text = _MD_INLINE.sub(r"\\\1", _visible(text))
    return html.escape(text, quote=False)


def code(value: Any) -> str:
    """An inline code span (safe in table cells); text with backticks or pipes falls back to `md`."""
    text = _visible(str(value).replace("\n", " "))
    if "`" in text or "|" in text or not text.strip():
        return md(text)
    return f"`{text}`"


def codeblock(value: Any, lang: str = "") -> str:
    """A fenced code block whose content cannot end it early (fence longer than any backtick run inside)."""
    text = "" if value is None else str(value)
    text = _visible(text.replace("\r\n", "\n").replace("\r", "\n"), keep="\n\t")
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    lang = re.sub(r"[^A-Za-z0-9_+-]", "", lang)
    return f"{fence}{lang}\n{text.rstrip(chr(10))}\n{fence}"


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return md(value)


def _fraction(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:
        return f"{value:.2%}"
    return _num(value)


def _human_count(n: int) -> str:
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _human_bytes(n: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- sections


def _usage_md(repo_id: str | None, revision: str | None, has_tokenizer: bool, base_model: str | None) -> str:
    model_id = repo_id or "<org>/<model>"
    rev = ", revision=revision" if revision else ""
    lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "", f"model_id = {json.dumps(model_id)}"]
    if revision:
        lines.append(f"revision = {json.dumps(revision)}  # release tag")
    if has_tokenizer or not base_model:
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained(model_id{rev})")
    else:
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(base_model)})")
    lines += [
        f'model = AutoModelForCausalLM.from_pretrained(model_id{rev}, dtype="auto")',
        "",
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "outputs = model.generate(**inputs, max_new_tokens=32)",
        "print(tokenizer.decode(outputs[0], skip_special_tokens=True))",
    ]
    notes = []
    if repo_id is None:
        notes.append("Replace `<org>/<model>` with the repository id.")
    if revision:
        notes.append(
            f"{code(f'revision={json.dumps(revision)}')} pins this release; leave it out for the latest upload."
        )
    if not has_tokenizer:
        notes.append(
            "This repository has no tokenizer files; the snippet loads the base model's tokenizer."
            if base_model
            else "This repository has no tokenizer files; load the tokenizer the model was trained with."
        )
    return codeblock("\n".join(lines), "python") + ("\n\n" + " ".join(notes) if notes else "")


def _architecture_md(arch: dict[str, Any]) -> str:
    params = arch["parameters"]
    rows = [
        ("Architecture", code(arch["architecture"]) if arch["architecture"] else md(arch["model_type"])),
        ("Parameters", f"{params:,} ({_human_count(params)})" if isinstance(params, int) else "—"),
        ("Layers", _num(arch["layers"])),
        ("Hidden size", _num(arch["hidden_size"])),
        ("Intermediate (MLP) size", _num(arch["intermediate_size"])),
        ("Attention heads", _num(arch["heads"])),
        ("Key/value heads", _num(arch["kv_heads"])),
        ("Head dimension", _num(arch["head_dim"])),
        ("Vocabulary size", _num(arch["vocab_size"])),
        ("Context length", _num(arch["context_length"])),
        ("Dtype", code(arch["dtype"]) if arch["dtype"] else "—"),
        ("Tied input/output embeddings", _num(arch["tied_embeddings"])),
        ("RoPE type", md(arch["rope_type"])),
        ("RoPE theta", _num(arch["rope_theta"], digits=10)),
    ]
    return _table(["Property", "Value"], ([k, v] for k, v in rows))


def _link(url: str, text: str) -> str:
    return f"[{md(text)}]({url})" if _URL_RE.fullmatch(url) else code(text)


def _repo_url(repo: str | None) -> str | None:
    if not repo:
        return None
    if _URL_RE.fullmatch(repo):
        return repo.removesuffix(".git").rstrip("/")
    if _GITHUB_SLUG_RE.fullmatch(repo):
        return f"https://github.com/{repo.removesuffix('.git')}"
    return None


def _provenance_md(p: Provenance) -> str:
    url = _repo_url(p.git_repository)
    rows = []
    if p.source_framework:
        rows.append(("Source framework", md(FRAMEWORK_NAMES.get(p.source_framework, p.source_framework))))
    if p.adapter:
        rows.append(("hubconv adapter", code(p.adapter)))
    if p.checkpoint:
        rows.append(("Checkpoint", code(p.checkpoint)))
    if p.git_repository:
        rows.append(("Git repository", _link(url, p.git_repository) if url else code(p.git_repository)))
    if p.git_commit:
        sha = p.git_commit
        commit = _link(f"{url}/commit/{sha}", sha) if url and _SHA_RE.fullmatch(sha) else code(sha)
        rows.append(("Git commit", commit))
    if p.release_tag:
        rows.append(("Release tag", code(p.release_tag)))
    if p.hubconv_version:
        rows.append(("hubconv version", code(p.hubconv_version)))
    if p.converted_at:
        rows.append(("Converted at (UTC)", md(p.converted_at)))
    if not rows:
        return "No provenance was recorded."
    return _table(["Property", "Value"], ([k, v] for k, v in rows))


def _groups_table(groups: list[dict[str, Any]], intro: str, headers: list[str]) -> str:
    rows = []
    for g in groups:
        examples = ", ".join(code(k) for k in g["keys"][:3]) + (", …" if g["count"] > 3 else "")
        rows.append([md(g["reason"]), f"{g['count']:,}", examples])
    return intro + "\n\n" + _table(headers, rows)


def _dropped_md(groups: list[dict[str, Any]]) -> str:
    if not groups:
        return ""
    total = sum(g["count"] for g in groups)
    intro = f"{total:,} source checkpoint entr{'y was' if total == 1 else 'ies were'} not converted:"
    return _groups_table(groups, intro, ["Reason", "Entries", "Examples"])


def _lossy_md(groups: list[dict[str, Any]]) -> str:
    if not groups:
        return ""
    total = sum(g["count"] for g in groups)
    intro = (
        f"{total:,} parameter{' is' if total == 1 else 's are'} not an exact copy of the source checkpoint "
        "(recorded in `hubconv.json`):"
    )
    return _groups_table(groups, intro, ["Step", "Parameters", "Examples"])


_STATUS = {"pass": "✅ pass", "warn": "⚠️ warn", "fail": "❌ fail"}


def _status(value: Any) -> str:
    if isinstance(value, bool):
        value = "pass" if value else "fail"
    return _STATUS.get(value, md(value)) if isinstance(value, str) else md(value)


_VERIFIED_BY = {
    "full": "full load with `from_pretrained`",
    "files": "streamed forward: transformers' own modules run one decoder layer at a time from the safetensors files",
    "plan": "streamed forward on the uploaded bytes: transformers' own modules run one decoder layer at a time, "
    "reading the conversion's output with each tensor's SHA-256 checked against the uploaded shards",
}


def _smoke_md(smoke: dict | None) -> str:
    if not smoke:
        return "No smoke test results (`smoke.json`) were found next to the weights."
    parts = []
    where = []
    if smoke.get("device"):
        where.append(f"on {code(smoke['device'])}")
    if smoke.get("dtype"):
        where.append(f"in {code(smoke['dtype'])}")
    if isinstance(smoke.get("load_seconds"), int | float) and not isinstance(smoke.get("load_seconds"), bool):
        where.append(f"loaded in {smoke['load_seconds']:.2f} s")
    parts.append(f"**Smoke test:** {_status(smoke.get('status'))}" + (f" ({', '.join(where)})" if where else ""))
    mode = smoke.get("mode", "full")  # reports from before streamed verification were all full loads
    costs = smoke.get("costs") if isinstance(smoke.get("costs"), dict) else {}
    spent = [
        f"{label} {costs[key]:.2f} s"
        for key, label in (("parity_seconds", "parity forward"), ("generation_seconds", "generation"))
        if isinstance(costs.get(key), int | float) and not isinstance(costs.get(key), bool)
    ]
    parts.append(
        f"**Verified by:** {_VERIFIED_BY[mode] if mode in _VERIFIED_BY else md(mode)}"
        + (f" ({', '.join(spent)})" if spent else "")
    )

    info = smoke.get("loading_info")
    if isinstance(info, dict):
        items = []
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            keys = info.get(key) or []
            keys = keys if isinstance(keys, list) else [keys]
            shown = ", ".join(code(k) for k in keys[:5]) + (", …" if len(keys) > 5 else "")
            items.append(f"- {key.replace('_', ' ')}: {len(keys)}" + (f" ({shown})" if keys else ""))
        parts.append(
            ("Loading with `from_pretrained`" if mode == "full" else "Load checks (transformers' loading routine)")
            + ":\n\n"
            + "\n".join(items)
        )

    checks = smoke.get("checks")
    if isinstance(checks, list) and checks:
        rows = [
            [md(c.get("name")), _status(c.get("status")), md(c.get("detail") or "")]
            if isinstance(c, dict)
            else [md(c)] * 3
            for c in checks
        ]
        parts.append(_table(["Check", "Status", "Detail"], rows))

    parity = smoke.get("parity")
    if isinstance(parity, dict):
        row = [
            _num(parity.get("positions")),
            _num(parity.get("max_abs_diff"), 3),
            _num(parity.get("kl_divergence"), 3),
            _fraction(parity.get("top1_agreement")),
            _status(parity.get("passed")),
        ]
        parts.append(
            "Logits parity with the source checkpoint:\n\n"
            + _table(["Positions", "Max abs diff", "KL divergence", "Top-1 agreement", "Passed"], [row])
        )

    generations = smoke.get("generations")
    if isinstance(generations, list):
        for i, g in enumerate(g for g in generations if isinstance(g, dict)):
            facts = []
            if isinstance(g.get("new_tokens"), int):
                facts.append(f"{g['new_tokens']} new tokens")
            tps = g.get("tokens_per_second")
            if isinstance(tps, int | float) and not isinstance(tps, bool):
                facts.append(f"{tps:.1f} tokens/s")
            if "passed" in g and g["passed"] is not None:
                facts.append(_status(g["passed"]))
            head = f"Sample generation {i + 1}" + (f" ({', '.join(facts)})" if facts else "") + ":"
            block = [
                head,
                "",
                "Prompt:",
                "",
                codeblock(g.get("prompt"), "text"),
                "",
                "Output:",
                "",
                codeblock(g.get("output"), "text"),
            ]
            if g.get("expect") is not None:
                block += ["", "Expected:", "", codeblock(g.get("expect"), "text")]
            parts.append("\n".join(block))
    return "\n\n".join(parts)


def _files_md(files: list[dict[str, Any]]) -> str:
    if not files:
        return "No weight files found."
    rows = [[code(f["name"]), f"{_human_bytes(f['size'])} ({f['size']:,} bytes)", code(f["sha256"])] for f in files]
    total = sum(f["size"] for f in files)
    return (
        _table(["File", "Size", "SHA-256"], rows)
        + f"\n\nTotal: {_human_bytes(total)} in {len(files)} file{'s' if len(files) != 1 else ''}. "
        + "The SHA-256 digests are the ones the Hub shows for these files (LFS pointers)."
    )


def _extra_sections(extra: dict[str, str]) -> list[dict[str, str]]:
    out = []
    for title, value in extra.items():
        body = "" if value is None else str(value)
        if body.endswith(".md") and "\n" not in body:
            if os.path.isfile(body):
                with open(body, encoding="utf-8") as f:
                    body = f.read()
            elif not re.search(r"\s", body):
                raise HubconvError(f"card.extra_sections[{title!r}]: file {body!r} not found")
        out.append({"title": str(title), "body": body.strip("\n")})
    return out


def _extra_md(sections: list[dict[str, str]]) -> str:
    return "\n\n".join(f"## {md(s['title'])}\n\n{s['body']}" for s in sections)


# -------------------------------------------------------------------------------------------- rendering


def _environment() -> Any:
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(md=md, code=code, codeblock=codeblock)
    return env


def _template_source(fields: CardFields) -> tuple[str, str]:
    if fields.template:
        try:
            with open(fields.template, encoding="utf-8") as f:
                return f.read(), fields.template
        except OSError as e:
            raise HubconvError(f"card.template: cannot read {fields.template}: {e.strerror or e}") from None
    source = resources.files("hubconv").joinpath("templates", TEMPLATE_NAME).read_text(encoding="utf-8")
    return source, TEMPLATE_NAME


def _render(source: str, name: str, context: dict[str, Any]) -> str:
    import jinja2

    try:
        return _environment().from_string(source).render(**context)
    except jinja2.TemplateSyntaxError as e:
        raise HubconvError(f"{name}: line {e.lineno}: template syntax error: {e.message}") from None
    except jinja2.TemplateError as e:
        raise HubconvError(f"{name}: cannot render the template: {e}") from None


def _has_tokenizer(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, n)) for n in TOKENIZER_FILES)


def card_context(model_dir: str, fields: CardFields, provenance: Provenance) -> dict[str, Any]:
    """Metadata (validated) and every template variable for `model_dir` (see the module docstring)."""
    if not os.path.isdir(model_dir):
        raise HubconvError(f"{model_dir}: not a folder")
    config = _read_object(os.path.join(model_dir, "config.json"), required=True)
    assert config is not None
    record = _read_object(os.path.join(model_dir, "hubconv.json"))
    smoke = _read_object(os.path.join(model_dir, "smoke.json"))
    prov = complete_provenance(provenance, record)

    metadata = build_metadata(fields, prov, config)
    problems = validate_metadata(metadata)
    if fields.repo_id is not None:
        problems += _repo_id_problems("repo_id", fields.repo_id, need_namespace=True)
    _raise_problems(problems)

    params, param_dtypes = count_parameters(model_dir)
    has_weights = any(n.endswith(".safetensors") for n in os.listdir(model_dir))
    arch = architecture(config, params if has_weights else None, param_dtypes)
    files = weight_files(model_dir)
    groups = dropped_groups(record)
    lossy = dropped_groups(record, "lossy")
    extra = _extra_sections(fields.extra_sections)
    title = fields.title or (fields.repo_id.split("/")[-1] if fields.repo_id else None)
    title = title or os.path.basename(os.path.abspath(model_dir))
    framework = FRAMEWORK_NAMES.get(prov.source_framework or "", prov.source_framework)
    description = fields.description
    if description is None:
        source = f"a native {md(framework)} training checkpoint" if framework else "a native training checkpoint"
        description = f"A Hugging Face `transformers` conversion of {source}, made with hubconv."
    return {
        "card_data": metadata.to_yaml(),
        "metadata": metadata.to_dict(),
        "_card_data": metadata,
        "title": title,
        "description": description,
        "repo_id": fields.repo_id,
        "revision": prov.release_tag,
        "config": config,
        "arch": arch,
        "provenance": asdict(prov),
        "dropped": groups,
        "lossy": lossy,
        "smoke": smoke,
        "files": files,
        "extra_sections": extra,
        "sections": {
            "usage": _usage_md(fields.repo_id, prov.release_tag, _has_tokenizer(model_dir), fields.base_model),
            "architecture": _architecture_md(arch),
            "provenance": _provenance_md(prov),
            "dropped": _dropped_md(groups),
            "lossy": _lossy_md(lossy),
            "smoke": _smoke_md(smoke),
            "files": _files_md(files),
            "extra": _extra_md(extra),
        },
    }


def render_card(model_dir: str, fields: CardFields, provenance: Provenance) -> str:
    """The full README.md text for `model_dir`; HubconvError when metadata or template are invalid."""
    context = card_context(model_dir, fields, provenance)
    metadata: ModelCardData = context.pop("_card_data")
    source, name = _template_source(fields)
    text = _render(source, name, context)
    block = REGEX_YAML_BLOCK.search(text)
    if not block:
        text = f"---\n{context['card_data']}\n---\n\n{text.lstrip(chr(10))}"
    else:
        safe_yaml.load_text(block.group(2), f"{name} (YAML block)")  # bounded before ModelCard's own parse
    try:
        parsed = ModelCard(text).data.to_dict()
    except (yaml.YAMLError, ValueError, TypeError) as e:
        raise HubconvError(f"{name}: the rendered card's YAML block cannot be parsed ({e})") from None
    expected = metadata.to_dict()
    differ = sorted(k for k in expected.keys() | parsed.keys() if expected.get(k) != parsed.get(k))
    if differ:
        raise HubconvError(
            f"{name}: the rendered card's YAML block differs from the card metadata in: {', '.join(differ)} "
            "(render `{{ card_data }}` between the `---` lines, or leave the block out and hubconv adds it)"
        )
    return text if text.endswith("\n") else text + "\n"


def write_card(model_dir: str, fields: CardFields, provenance: Provenance) -> str:
    """Render the card and write it to `model_dir/README.md` (atomically); returns the path."""
    text = render_card(model_dir, fields, provenance)
    path = os.path.join(model_dir, CARD_NAME)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise HubconvError(f"{path}: cannot write the model card: {e.strerror or e}") from None
    return path
