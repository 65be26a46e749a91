"""Convert the tokenizer a training run used into Hugging Face tokenizer files, and prove the conversion.

Sources (``detect_kind``):

- ``hf``: a folder with ``tokenizer.json`` / ``tokenizer_config.json``: checked with ``AutoTokenizer`` and copied.
- ``tiktoken``: a BPE rank file as shipped with Llama 3 (``base64(token bytes) rank`` per line), converted with
  transformers' ``TikTokenConverter``. Special tokens come from ``special_tokens``, from the sidecar
  ``special_tokens.json`` (``{token: id}``) next to the file, or Meta's Llama 3 layout for a 128,000-rank file;
  ``pat_str`` from the argument, the sidecar ``tokenizer_meta.json`` or Llama 3's regex.
- ``sentencepiece``: a SentencePiece ``.model``. The model proto is read here (no protobuf needed) and rebuilt with
  ``tokenizers`` primitives following transformers' ``LlamaConverter`` (byte fallback, ``▁`` whitespace, dummy
  prefix), plus what that converter leaves out: the model's own normalizer (``precompiled_charsmap``) and
  ``remove_extra_whitespaces``, so that ids match ``sentencepiece`` for models trained with its defaults too.
- ``char``: nanoGPT's character-level ``meta.pkl`` (``{vocab_size, stoi, itos}``), read with an allow-list unpickler.

``write_tokenizer`` writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``, loads them
back with ``AutoTokenizer`` and checks that they encode a sample corpus to exactly the ids the source tokenizer gives.
``reconcile_special_tokens`` then checks the tokenizer against the model folder (embedding rows, bos/eos ids).

Special-token strings in text are matched as special tokens (the Hugging Face convention); for sentencepiece and
char sources the reference encoding splits the text on them and encodes the pieces in between separately.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubconv.checks import Check
from hubconv.errors import HubconvError
from hubconv.io.protobuf import fields as _proto_fields

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "DEFAULT_SAMPLES",
    "HF_TOKENIZER_FILES",
    "LLAMA3_NUM_BASE_TOKENS",
    "LLAMA3_PAT_STR",
    "Check",
    "TokenizerError",
    "TokenizerResult",
    "detect_kind",
    "llama3_special_tokens",
    "load_char_meta",
    "reconcile_special_tokens",
    "write_tokenizer",
]

#: Meta Llama 3's pre-tokenizer regex (``llama/tokenizer.py``, ``Tokenizer.pat_str``).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Number of BPE ranks in Meta's Llama 3 ``tokenizer.model``; such a file gets Meta's 256 special tokens.
LLAMA3_NUM_BASE_TOKENS = 128_000
LLAMA3_NUM_SPECIAL_TOKENS = 256
_LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
)
_LLAMA3_BOS, _LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"

#: Files of a Hugging Face tokenizer folder that ``write_tokenizer`` copies (nothing else is).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tekken.json",
)

#: Built-in parity corpus: unicode (accents, CJK, emoji), whitespace runs, tabs/newlines, numbers, code.
DEFAULT_SAMPLES: tuple[str, ...] = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "An assignment statement evaluates the expression list and assigns the single resulting object to each of the "
    "target lists, from left to right. It's what they're doing; we'll see, I'd say, you've been warned (I'm sure).",
    "Café, naïve résumé, façade, Ærøskøbing, Straße, ΑΒΓ αβγ, Привет мир, Ωmega, ½ ﬁ ①",
    "日本語のテキストと中文字符，한국어 텍스트。",
    "Emoji: 🙂🚀 👩‍💻 👍🏽 🇫🇷 ❤️",
    "  two leading spaces, trailing spaces   ",
    "runs    of     spaces\tand\ttabs\t\there\nnew\nlines\r\nCRLF\n\n\n\nblank lines\n",
    " ",
    "\n",
    "a",
    "Numbers: 0 7 42 123 1234 12345 3.14159 -1e10 1,234,567.89 2024-01-01 0x1F 1_000_000 007",
    'def f(x: int) -> dict:\n    """Docstring."""\n    return {"a": [x ** 2 for x in range(10)]}  # comment\n',
    "if (a && b || !c) { x += 1; } else { y <<= 2; } // C-like\n\tfor (int i = 0; i < n; ++i) {}\n",
    '<html><body class="main">&amp; &lt;tag&gt; <a href="https://example.com/?q=1&r=2">link</a></body></html>',
    "Mixed: ABCdef GHI jkl MNOP qrst ... !!! ??? --- ___ *** ((( ))) [[]] {{}} ~~ `` '' \"\" @#$%^&",
    "",
)


class TokenizerError(HubconvError):
    """The tokenizer source is missing, unsafe or malformed, or cannot be converted."""


@dataclass
class TokenizerResult:
    """What ``write_tokenizer`` wrote and found."""

    kind: str  # "hf" | "tiktoken" | "sentencepiece" | "char"
    source: str  # path given
    vocab_size: int  # len(tokenizer) including special tokens
    bos_token_id: int | None
    eos_token_id: int | None
    special_tokens: dict[str, int]
    files: list[str]  # files written into out_dir
    checks: list[Check] = field(default_factory=list)


def llama3_special_tokens(num_base_tokens: int = LLAMA3_NUM_BASE_TOKENS) -> dict[str, int]:
    """Llama 3's 256 special tokens, ``<|begin_of_text|>`` ... ``<|reserved_special_token_250|>``, after the ranks."""
    names = list(_LLAMA3_NAMED_SPECIALS) + [
        f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_SPECIAL_TOKENS - 5)
    ]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


# ----------------------------------------------------------------------------------------------------- detection

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+\r?$")


def detect_kind(path: str) -> str:
    """Return ``"hf"``, ``"tiktoken"``, ``"sentencepiece"`` or ``"char"`` for a tokenizer file or folder."""
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"{path}: no such tokenizer file or folder")
    if p.is_dir():
        if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
            return "hf"
        if (p / "meta.pkl").is_file():
            return "char"
        model = _model_file_in(p)
        if model is not None:
            return _sniff_file(model)
        raise TokenizerError(
            f"{path}: no tokenizer found (expected tokenizer.json or tokenizer_config.json, a tiktoken or "
            "SentencePiece tokenizer.model, or a nanoGPT meta.pkl)"
        )
    if p.name in ("tokenizer.json", "tokenizer_config.json"):
        return "hf"
    return _sniff_file(p)


def _model_file_in(folder: Path) -> Path | None:
    if (folder / "tokenizer.model").is_file():
        return folder / "tokenizer.model"
    models = sorted(folder.glob("*.model"))
    return models[0] if len(models) == 1 else None


def _sniff_file(p: Path) -> str:
    try:
        with open(p, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise TokenizerError(f"{p}: cannot read: {e}") from e
    if head[:1] == b"\x80" or p.suffix == ".pkl":
        return "char"
    first_line = head.split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.match(first_line):
        return "tiktoken"
    if head[:1] == b"\x0a":  # field 1 (pieces), length-delimited: a serialized SentencePiece ModelProto
        return "sentencepiece"
    raise TokenizerError(
        f"{p}: unknown tokenizer format (not a tiktoken rank file, a SentencePiece model or a pickle); pass kind="
    )


def _resolve_file(source: Path, kind: str) -> Path:
    """The file to read for ``kind`` when ``source`` may be a folder."""
    if not source.is_dir():
        return source
    if kind == "char":
        target = source / "meta.pkl"
    else:
        target = _model_file_in(source) or source / "tokenizer.model"
    if not target.is_file():
        raise TokenizerError(f"{source}: no {target.name} for a {kind} tokenizer")
    return target


# ------------------------------------------------------------------------------------------------ intermediate


@dataclass
class _Reference:
    """The source tokenizer, as the ground truth of the parity check."""

    name: str
    encode: Callable[[str], list[int]]  # text (special-token strings matched as specials) -> ids, no BOS/EOS
    decode: Callable[[list[int]], str]
    encode_with_specials: Callable[[str], list[int]] | None = None  # what add_special_tokens=True must give
    restrict: Callable[[str], str] | None = None  # drops what the source cannot encode (char tables)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (label, text) checked besides the built-in ones


@dataclass
class _Built:
    """A converted tokenizer, before it is written."""

    tokenizer: Tokenizer
    special_tokens: dict[str, int]
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos: bool = False
    reference: _Reference | None = None
    reference_missing: str | None = None  # why there is no reference (library not installed)
    checks: list[Check] = field(default_factory=list)


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read {what}: {e}") from e


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _special_token_dict(data: Any, path: Path) -> dict[str, int]:
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in data.items()
    ):
        raise TokenizerError(f"{path}: special tokens must be a JSON object {{token: id}} of integer ids")
    return dict(data)


def _add_special_tokens(tokenizer: Tokenizer, specials: dict[str, int], *, source: Path) -> list[str]:
    """Add ``specials`` ({token: id}) to ``tokenizer`` at exactly those ids; return the placeholders that fill gaps.

    Ids inside the base vocabulary must name the token already there (e.g. SentencePiece's ``<s>``); ids past it are
    appended in order, with ``<|reserved_token_N|>`` placeholders (transformers' convention) filling any gap, so
    that ``len(tokenizer)`` is the highest id + 1.
    """
    from tokenizers import AddedToken

    base = tokenizer.get_vocab_size(with_added_tokens=False)
    existing = [(tok, i) for tok, i in specials.items() if i < base]
    for tok, i in existing:
        if i < 0:
            raise TokenizerError(f"{source}: special token {tok!r} has a negative id {i}")
        there = tokenizer.id_to_token(i)
        if there != tok:
            raise TokenizerError(
                f"{source}: special token {tok!r} has id {i}, which is the base vocabulary's token {there!r}"
            )
    ordered: list[str] = []
    fillers: list[str] = []
    by_id = {i: tok for tok, i in specials.items() if i >= base}
    if len(by_id) != len([i for i in specials.values() if i >= base]):
        dupes = sorted({i for i in specials.values() if list(specials.values()).count(i) > 1})
        raise TokenizerError(f"{source}: several special tokens share the id(s) {dupes}")
    if by_id:
        for i in range(base, max(by_id) + 1):
            if i in by_id:
                ordered.append(by_id[i])
            else:
                filler = f"<|reserved_token_{i}|>"
                ordered.append(filler)
                fillers.append(filler)
    to_add = [tok for tok, i in sorted(existing, key=lambda kv: kv[1])] + ordered
    if to_add:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in to_add])
    for tok, i in specials.items():
        got = tokenizer.token_to_id(tok)
        if got != i:
            raise TokenizerError(f"{source}: special token {tok!r} should have id {i} but got {got}")
    return fillers


def _pick_token(
    name: str, given: str | None, default: str | None, vocab_ok: Callable[[str], bool], source: Path
) -> str | None:
    token = given if given is not None else default
    if token is not None and not vocab_ok(token):
        raise TokenizerError(
            f"{source}: {name} {token!r} is not a token of this tokenizer; add it with special_tokens={{token: id}}"
        )
    return token


# --------------------------------------------------------------------------------------------------- tiktoken


def _load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file here: tiktoken's own loader caches local files by path and can serve stale data."""
    ranks: dict[bytes, int] = {}
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read: {e}") from e
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'base64 rank'")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{path}:{n}: not a tiktoken BPE line ({e}): {line[:60]!r}") from e
        if token in ranks:
            raise TokenizerError(f"{path}:{n}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken BPE file")
    ids = sorted(ranks.values())
    if ids != list(range(len(ids))):
        missing = next(i for i, r in enumerate(ids) if i != r)
        raise TokenizerError(f"{path}: ranks must be 0..{len(ids) - 1} without gaps or repeats; rank {missing} is not")
    return ranks


def _build_tiktoken(
    file: Path,
    *,
    bos_token: str | None,
    eos_token: str | None,
    pad_token: str | None,
    special_tokens: dict[str, int] | None,
    pat_str: str | None,
    add_bos_token: bool | None,
) -> _Built:
    from tokenizers import processors

    ranks = _load_tiktoken_ranks(file)
    checks: list[Check] = []
    meta: dict[str, Any] = {}
    meta_path = file.parent / "tokenizer_meta.json"
    if meta_path.is_file():
        meta = _read_json(meta_path, "tokenizer metadata")
        if not isinstance(meta, dict):
            raise TokenizerError(f"{meta_path}: expected a JSON object")
        want = meta.get("tokenizer_model_sha256")
        if want and hashlib.sha256(file.read_bytes()).hexdigest() != want:
            raise TokenizerError(f"{file}: sha256 differs from tokenizer_model_sha256 in {meta_path}: a different file")
        if isinstance(meta.get("num_bpe_tokens"), int) and meta["num_bpe_tokens"] != len(ranks):
            raise TokenizerError(
                f"{file}: {len(ranks)} ranks but {meta_path} says num_bpe_tokens={meta['num_bpe_tokens']}"
            )

    sidecar = file.parent / "special_tokens.json"
    if special_tokens is not None:
        specials, origin = dict(special_tokens), "special_tokens argument"
    elif sidecar.is_file():
        specials, origin = _special_token_dict(_read_json(sidecar, "special tokens"), sidecar), sidecar.name
    elif len(ranks) == LLAMA3_NUM_BASE_TOKENS:
        specials, origin = llama3_special_tokens(len(ranks)), "Meta Llama 3 layout"
    else:
        specials, origin = {}, "none"
    if (
        origin == sidecar.name
        and isinstance(meta.get("vocab_size"), int)
        and meta["vocab_size"] != len(ranks) + len(specials)
    ):
        raise TokenizerError(
            f"{file}: {len(ranks)} ranks + {len(specials)} special tokens != vocab_size {meta['vocab_size']} "
            f"in {meta_path}"
        )

    if pat_str is None:
        pat_str = meta.get("pat_str")
        if pat_str is None:
            pat_str = LLAMA3_PAT_STR
            if len(ranks) != LLAMA3_NUM_BASE_TOKENS:
                checks.append(
                    Check(
                        "pre-tokenizer", "warn", "no pat_str given or in tokenizer_meta.json: assumed Llama 3's regex"
                    )
                )

    tokenizer = _ranks_converter(ranks, pat_str).converted()
    fillers = _add_special_tokens(tokenizer, specials, source=file)
    in_vocab = lambda t: t in specials  # noqa: E731
    bos = _pick_token("bos_token", bos_token, meta.get("bos_token") or _default(_LLAMA3_BOS, specials), in_vocab, file)
    eos = _pick_token("eos_token", eos_token, meta.get("eos_token") or _default(_LLAMA3_EOS, specials), in_vocab, file)
    pad = _pick_token("pad_token", pad_token, meta.get("pad_token"), in_vocab, file)
    add_bos = bos is not None if add_bos_token is None else add_bos_token
    if add_bos and bos is None:
        raise TokenizerError(f"{file}: add_bos_token needs a bos_token")
    if add_bos:
        bos_id = specials[bos]
        # Meta's Llama 3 tokenizer.json: byte-level offsets, then BOS in front of every sequence.
        tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
                ),
            ]
        )
    detail = f"{len(ranks)} BPE ranks + {len(specials)} special tokens ({origin})"
    if fillers:
        detail += f"; {len(fillers)} unused ids filled with placeholders ({fillers[0]} ...)"
    checks.insert(0, Check("tokenizer source", "warn" if fillers else "pass", f"tiktoken {file.name}: {detail}"))

    built = _Built(tokenizer, specials, bos, eos, pad, None, add_bos, checks=checks)
    try:
        import tiktoken
    except ImportError:
        built.reference_missing = "tiktoken is not installed (pip install tiktoken)"
        return built
    enc = tiktoken.Encoding(
        name=f"hubconv-{file.name}", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials
    )
    built.reference = _Reference(
        "tiktoken",
        encode=lambda text: enc.encode(text, allowed_special="all"),
        decode=enc.decode,
    )
    return built


def _default(token: str, specials: dict[str, int]) -> str | None:
    return token if token in specials else None


def _ranks_converter(ranks: dict[bytes, int], pattern: str) -> Any:
    """transformers' ``TikTokenConverter``, fed with the ranks parsed here instead of a path handed to tiktoken."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:  # type: ignore[override]
            return ranks

    return _Converter(vocab_file=None, pattern=pattern)


# ---------------------------------------------------------------------------------------------- sentencepiece

_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED, _SPM_UNUSED, _SPM_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class _SpmModel:
    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: int = 1  # 1 unigram, 2 bpe, 3 word, 4 char
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_spm(path: Path) -> _SpmModel:
    """Read the fields of a SentencePiece ``ModelProto`` that the conversion needs (sentencepiece_model.proto)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read: {e}") from e
    m = _SpmModel(pieces=[])
    try:
        for number, wire, value in _proto_fields(data, str(path)):
            if number == 1 and wire == 2:  # SentencePiece pieces
                piece, score, kind = "", 0.0, _SPM_NORMAL
                for n, w, v in _proto_fields(value):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3 and w == 0:
                        kind = v
                m.pieces.append((piece, score, kind))
            elif number == 2 and wire == 2:  # TrainerSpec
                for n, w, v in _proto_fields(value):
                    if w != 0:
                        continue
                    if n == 3:
                        m.model_type = v
                    elif n == 35:
                        m.byte_fallback = bool(v)
                    elif n == 40:
                        m.unk_id = _int32(v)
                    elif n == 41:
                        m.bos_id = _int32(v)
                    elif n == 42:
                        m.eos_id = _int32(v)
                    elif n == 43:
                        m.pad_id = _int32(v)
                    elif n == 24:
                        m.treat_whitespace_as_suffix = bool(v)
            elif number == 3 and wire == 2:  # NormalizerSpec
                for n, w, v in _proto_fields(value):
                    if n == 1 and w == 2:
                        m.normalizer_name = v.decode("utf-8", "replace")
                    elif n == 2 and w == 2:
                        m.precompiled_charsmap = bytes(v)
                    elif n == 3 and w == 0:
                        m.add_dummy_prefix = bool(v)
                    elif n == 4 and w == 0:
                        m.remove_extra_whitespaces = bool(v)
                    elif n == 5 and w == 0:
                        m.escape_whitespaces = bool(v)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e
    if not m.pieces:
        raise TokenizerError(f"{path}: not a SentencePiece model (no pieces)")
    if m.model_type not in (1, 2):
        kind = {3: "WORD", 4: "CHAR"}.get(m.model_type, str(m.model_type))
        raise TokenizerError(f"{path}: SentencePiece model type {kind} is not supported (only UNIGRAM and BPE)")
    if m.treat_whitespace_as_suffix:
        raise TokenizerError(f"{path}: SentencePiece treat_whitespace_as_suffix=true is not supported")
    if m.unk_id < 0:
        raise TokenizerError(f"{path}: SentencePiece model without an unknown piece (unk_id={m.unk_id})")
    for name in ("unk_id", "bos_id", "eos_id", "pad_id"):
        if getattr(m, name) >= len(m.pieces):
            raise TokenizerError(f"{path}: {name}={getattr(m, name)} is past the {len(m.pieces)} pieces")
    return m


def _build_sentencepiece(
    file: Path,
    *,
    bos_token: str | None,
    eos_token: str | None,
    pad_token: str | None,
    special_tokens: dict[str, int] | None,
    add_bos_token: bool | None,
) -> _Built:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE, Unigram
    from transformers.convert_slow_tokenizer import generate_merges

    m = _parse_spm(file)
    if m.model_type == 1:
        tokenizer = Tokenizer(Unigram([(p, s) for p, s, _ in m.pieces], unk_id=m.unk_id, byte_fallback=m.byte_fallback))
    else:
        vocab = {p: i for i, (p, _, _) in enumerate(m.pieces)}
        skip = [p for p, _, t in m.pieces if t != _SPM_NORMAL]
        merges = generate_merges(vocab, [(p, s) for p, s, _ in m.pieces], skip_tokens=skip)
        tokenizer = Tokenizer(
            BPE(
                vocab,
                merges,
                unk_token=m.pieces[m.unk_id][0],
                fuse_unk=True,
                byte_fallback=m.byte_fallback,
                dropout=None,
            )
        )

    # Normalizer: sentencepiece's own (precompiled charsmap), its whitespace clean-up, dummy prefix, "▁" escape.
    space = "▁" if m.escape_whitespaces else " "
    steps: list[Any] = []
    if m.precompiled_charsmap:
        steps.append(normalizers.Precompiled(m.precompiled_charsmap))
    if m.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if m.add_dummy_prefix:
        steps.append(normalizers.Prepend(space))
    if m.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    # Decoder: transformers' LlamaConverter.decoder.
    dec: list[Any] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if m.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(dec)

    # Control and unknown pieces are special tokens, user-defined symbols plain added tokens (as transformers'
    # SpmConverter does). Both are matched in the text before normalization, so text next to a user-defined
    # symbol gets its own dummy prefix where sentencepiece gives none: checked below ("user-defined symbols").
    specials = {p: i for i, (p, _, t) in enumerate(m.pieces) if t in (_SPM_CONTROL, _SPM_UNKNOWN)}
    user_defined = [p for p, _, t in m.pieces if t == _SPM_USER_DEFINED]
    if user_defined:
        tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p in user_defined])
    for tok, i in (special_tokens or {}).items():
        if tok in specials and specials[tok] != i:
            raise TokenizerError(f"{file}: special token {tok!r} is piece {specials[tok]} in the model, not {i}")
        specials[tok] = i
    fillers = _add_special_tokens(tokenizer, specials, source=file)

    def piece(i: int) -> str | None:
        return m.pieces[i][0] if i >= 0 else None

    in_vocab = lambda t: tokenizer.token_to_id(t) is not None  # noqa: E731
    bos = _pick_token("bos_token", bos_token, piece(m.bos_id), in_vocab, file)
    eos = _pick_token("eos_token", eos_token, piece(m.eos_id), in_vocab, file)
    pad = _pick_token("pad_token", pad_token, piece(m.pad_id), in_vocab, file)
    unk = piece(m.unk_id)
    for tok in (bos, eos, pad):
        if tok is not None and tok not in specials:
            specials[tok] = tokenizer.token_to_id(tok)
            tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False)])
    add_bos = bos is not None if add_bos_token is None else add_bos_token
    if add_bos and bos is None:
        raise TokenizerError(f"{file}: add_bos_token needs a bos_token")
    if add_bos:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )

    model_name = "Unigram" if m.model_type == 1 else "BPE"
    detail = (
        f"SentencePiece {model_name} {file.name}: {len(m.pieces)} pieces, byte_fallback={m.byte_fallback}, "
        f"normalizer {m.normalizer_name or 'none'}, add_dummy_prefix={m.add_dummy_prefix}, "
        f"remove_extra_whitespaces={m.remove_extra_whitespaces}"
    )
    if fillers:
        detail += f"; {len(fillers)} unused ids filled with placeholders"
    built = _Built(
        tokenizer,
        specials,
        bos,
        eos,
        pad,
        unk,
        add_bos,
        checks=[Check("tokenizer source", "warn" if fillers else "pass", detail)],
    )
    try:
        import sentencepiece
    except ImportError:
        built.reference_missing = "sentencepiece is not installed (pip install sentencepiece)"
        return built
    sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
    if user_defined:
        built.checks.append(_check_user_defined(sp, tokenizer, user_defined))
    built.reference = _Reference(
        "sentencepiece",
        encode=lambda text: _encode_around(text, specials, lambda s: sp.encode(s, out_type=int)),
        decode=lambda ids: sp.decode(ids),
    )
    return built


def _check_user_defined(sp: Any, tokenizer: Tokenizer, symbols: list[str]) -> Check:
    """Compare sentencepiece and the converted tokenizer on text around user-defined symbols."""
    probes = [f"a{sym}b {sym} c{sym}" for sym in symbols[:5]]
    for probe in probes:
        want = sp.encode(probe, out_type=int)
        got = tokenizer.encode(probe, add_special_tokens=False).ids
        if got != want:
            return Check(
                "user-defined symbols",
                "warn",
                f"{len(symbols)} user-defined symbols; text next to them is encoded differently from sentencepiece "
                f"(Hugging Face matches them before normalization): {probe!r} -> sentencepiece "
                f"{sp.encode(probe, out_type=str)} vs HF {tokenizer.encode(probe, add_special_tokens=False).tokens}",
            )
    return Check("user-defined symbols", "pass", f"{len(symbols)} user-defined symbols encode as in sentencepiece")


def _split_specials(text: str, specials: Iterable[str]) -> list[str]:
    """Split ``text`` into pieces, special-token strings (leftmost, longest first) at odd indices."""
    names = sorted(specials, key=len, reverse=True)
    if not names:
        return [text]
    return re.split("(" + "|".join(re.escape(t) for t in names) + ")", text)


def _encode_around(text: str, specials: dict[str, int], encode: Callable[[str], list[int]]) -> list[int]:
    """Encode ``text`` matching ``specials`` as their ids and ``encode`` on the (non-empty) text in between."""
    ids: list[int] = []
    for i, part in enumerate(_split_specials(text, specials)):
        if i % 2:
            ids.append(specials[part])
        elif part:
            ids += encode(part)
    return ids


def _map_around(text: str, specials: dict[str, int], fn: Callable[[str], str]) -> str:
    """Apply ``fn`` to the text between special-token strings."""
    return "".join(part if i % 2 else fn(part) for i, part in enumerate(_split_specials(text, specials)))


# ------------------------------------------------------------------------------------------------------- char


class _MetaUnpickler(pickle.Unpickler):
    """Unpickler for nanoGPT's meta.pkl that can build nothing but dicts, strings and ints."""

    _ALLOWED = frozenset({("builtins", "dict"), ("builtins", "str"), ("builtins", "int")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}; only dict, str and int are allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it uses persistent ids; only dict, str and int are allowed")


def load_char_meta(path: str | os.PathLike[str]) -> dict[int, str]:
    """Load nanoGPT's character-level ``meta.pkl`` safely; return ``itos`` ({id: character}) for ids 0..vocab_size-1."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            meta = _MetaUnpickler(f).load()
    except OSError as e:
        raise TokenizerError(f"{p}: cannot read: {e}") from e
    except Exception as e:  # any unpickling failure: refuse, never fall back to pickle.load
        raise TokenizerError(f"{p}: refusing to load this pickle: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("stoi"), dict):
        raise TokenizerError(f"{p}: not a nanoGPT char-level meta.pkl (expected a dict with stoi, itos, vocab_size)")
    stoi = meta["stoi"]
    if not all(isinstance(k, str) and len(k) == 1 and type(v) is int for k, v in stoi.items()):
        raise TokenizerError(f"{p}: stoi must map single characters to integer ids")
    ids = sorted(stoi.values())
    if ids != list(range(len(ids))):
        raise TokenizerError(f"{p}: stoi ids must be 0..{len(ids) - 1}, each once")
    itos = {v: k for k, v in stoi.items()}
    if "itos" in meta:
        given = meta["itos"]
        if not isinstance(given, dict) or any(given.get(i) != ch for i, ch in itos.items()) or len(given) != len(itos):
            raise TokenizerError(f"{p}: itos is not the inverse of stoi")
    if "vocab_size" in meta and meta["vocab_size"] != len(stoi):
        raise TokenizerError(f"{p}: vocab_size {meta['vocab_size']} but stoi has {len(stoi)} characters")
    return itos


def _build_char(
    file: Path,
    *,
    bos_token: str | None,
    eos_token: str | None,
    pad_token: str | None,
    special_tokens: dict[str, int] | None,
    add_bos_token: bool | None,
) -> _Built:
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    itos = load_char_meta(file)
    stoi = {ch: i for i, ch in itos.items()}
    # One "word" per character, looked up in a WordLevel table; unknown characters are an error, as in nanoGPT.
    tokenizer = Tokenizer(WordLevel(dict(stoi), unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    specials = dict(special_tokens or {})
    fillers = _add_special_tokens(tokenizer, specials, source=file)
    in_vocab = lambda t: t in specials or t in stoi  # noqa: E731
    bos = _pick_token("bos_token", bos_token, None, in_vocab, file)
    eos = _pick_token("eos_token", eos_token, None, in_vocab, file)
    pad = _pick_token("pad_token", pad_token, None, in_vocab, file)
    add_bos = bool(add_bos_token)
    if add_bos and bos is None:
        raise TokenizerError(f"{file}: add_bos_token needs a bos_token")
    if add_bos:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    detail = f"nanoGPT char-level {file.name}: {len(stoi)} characters + {len(specials)} special tokens"
    checks = [Check("tokenizer source", "warn" if fillers else "pass", detail)]
    built = _Built(tokenizer, specials, bos, eos, pad, None, add_bos, checks=checks)
    inverse = {**itos, **{i: t for t, i in specials.items()}}
    built.reference = _Reference(
        "the meta.pkl character table",
        encode=lambda text: _encode_around(text, specials, lambda s: [stoi[c] for c in s]),
        decode=lambda ids: "".join(inverse[i] for i in ids),
        restrict=lambda text: _map_around(text, specials, lambda s: "".join(c for c in s if c in stoi)),
        samples=[("the whole character table", "".join(itos[i] for i in range(len(itos))))],
    )
    return built


# --------------------------------------------------------------------------------------------------------- hf


def _load_auto(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise TokenizerError(f"{folder}: AutoTokenizer cannot load this tokenizer: {type(e).__name__}: {e}") from e


def _copy_hf(
    folder: Path,
    out: Path,
    *,
    bos_token: str | None,
    eos_token: str | None,
    pad_token: str | None,
    special_tokens: dict[str, int] | None,
    chat_template: str | None,
    model_max_length: int | None,
) -> tuple[Any, list[str]]:
    """Validate and copy a Hugging Face tokenizer folder; apply overrides to its tokenizer_config.json."""
    src = _load_auto(folder)
    for tok, i in (special_tokens or {}).items():
        got = src.convert_tokens_to_ids(tok)
        if got != i:
            raise TokenizerError(f"{folder}: special token {tok!r} has id {got} in this tokenizer, not {i}")
    for name, tok in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
        if tok is not None and tok not in src.get_vocab():
            raise TokenizerError(f"{folder}: {name} {tok!r} is not a token of this tokenizer")
    files = []
    out.mkdir(parents=True, exist_ok=True)
    for name in HF_TOKENIZER_FILES:
        if (folder / name).is_file():
            if (folder / name).resolve() != (out / name).resolve():
                shutil.copyfile(folder / name, out / name)
            files.append(name)
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.iterdir()):
            if f.is_file() and f.suffix == ".jinja":
                (out / extra.name).mkdir(exist_ok=True)
                shutil.copyfile(f, out / extra.name / f.name)
                files.append(f"{extra.name}/{f.name}")
    overrides: dict[str, Any] = {
        k: v
        for k, v in (
            ("bos_token", bos_token),
            ("eos_token", eos_token),
            ("pad_token", pad_token),
            ("model_max_length", model_max_length),
        )
        if v is not None
    }
    if chat_template is not None:
        if "chat_template.jinja" in files:
            (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        else:
            overrides["chat_template"] = chat_template
    config_path = out / "tokenizer_config.json"
    config = _read_json(config_path, "tokenizer config") if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: expected a JSON object")
    # transformers 5 saves "TokenizersBackend", a name transformers 4 cannot load; in 5 it is the same class as
    # "PreTrainedTokenizerFast", which both load.
    if config.get("tokenizer_class") in (None, "TokenizersBackend") and (out / "tokenizer.json").is_file():
        overrides["tokenizer_class"] = "PreTrainedTokenizerFast"
    if overrides:
        config.update(overrides)
        _write_json(config_path, config)
        if "tokenizer_config.json" not in files:
            files.append("tokenizer_config.json")
    return src, files


# ---------------------------------------------------------------------------------------------------- writing


def _token_entry(token: str) -> dict[str, Any]:
    return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _write_files(built: _Built, out: Path, *, chat_template: str | None, model_max_length: int | None) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    built.tokenizer.save(str(out / "tokenizer.json"))
    named = {
        "bos_token": built.bos_token,
        "eos_token": built.eos_token,
        "pad_token": built.pad_token,
        "unk_token": built.unk_token,
    }
    # PreTrainedTokenizerFast: transformers 5 maps it to TokenizersBackend (tokenizer.json used as is) and
    # transformers 4 loads it too. BOS insertion lives in tokenizer.json's post-processor (as in Meta's Llama 3);
    # no add_bos_token key, which would make transformers 5 rebuild the post-processor.
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in named.items() if v is not None},
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", {k: _token_entry(v) for k, v in named.items() if v is not None})
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def write_tokenizer(
    source: str,
    out_dir: str,
    *,
    kind: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    special_tokens: dict[str, int] | None = None,
    pat_str: str | None = None,
    chat_template: str | None = None,
    model_max_length: int | None = None,
    sample_text: str | None = None,
    pad_token: str | None = None,
    add_bos_token: bool | None = None,
) -> TokenizerResult:
    """Convert the tokenizer at ``source`` into HF tokenizer files in ``out_dir`` and check them.

    ``special_tokens`` ({token: id}) adds or pins special tokens; ``bos_token``/``eos_token``/``pad_token`` name
    tokens that must exist. ``add_bos_token`` (default: on for tiktoken and sentencepiece when a BOS token is known,
    as Llama does; off for char; the HF source's own setting is kept) makes ``tokenizer(text)`` prepend BOS.
    Raises ``TokenizerError`` when the source cannot be read or converted, or the written files do not load; a
    parity mismatch is a "fail" check in the result.
    """
    src = Path(source)
    out = Path(out_dir)
    kind = kind or detect_kind(source)
    if kind not in ("hf", "tiktoken", "sentencepiece", "char"):
        raise TokenizerError(f"unknown tokenizer kind {kind!r} (hf, tiktoken, sentencepiece or char)")
    if not src.exists():
        raise TokenizerError(f"{source}: no such tokenizer file or folder")
    if pat_str is not None and kind != "tiktoken":
        raise TokenizerError(f"pat_str applies to tiktoken tokenizers only, not {kind}")
    if model_max_length is not None and model_max_length <= 0:
        raise TokenizerError(f"model_max_length must be positive, got {model_max_length}")
    if special_tokens is not None:
        special_tokens = _special_token_dict(special_tokens, src)
    if kind == "sentencepiece" and special_tokens is None and add_bos_token is None and chat_template is None:
        from hubconv.tokenizer_gpt_sw3 import wants_gpt_sw3, write_gpt_sw3_tokenizer

        if wants_gpt_sw3(out_dir):  # a GPT-SW3 model (Megatron/NeMo GPT-2 + SentencePiece): GPTSw3Tokenizer files
            return write_gpt_sw3_tokenizer(source, out_dir, model_max_length=model_max_length, sample_text=sample_text)

    if kind == "hf":
        if add_bos_token is not None:
            raise TokenizerError("add_bos_token cannot be changed for a Hugging Face tokenizer source")
        folder = src if src.is_dir() else src.parent
        original, files = _copy_hf(
            folder,
            out,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            special_tokens=special_tokens,
            chat_template=chat_template,
            model_max_length=model_max_length,
        )
        hf = _load_auto(out)
        specials = {str(t.content): i for i, t in original.added_tokens_decoder.items() if t.special}
        expected = {name: getattr(original, name) for name in ("bos_token", "eos_token")}
        expected.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None})
        reference = _Reference(
            "the source tokenizer",
            encode=lambda text: original.encode(text, add_special_tokens=False, verbose=False),
            decode=lambda ids: original.decode(ids, clean_up_tokenization_spaces=False),
            encode_with_specials=lambda text: original.encode(text, verbose=False),
        )
        checks = [
            Check(
                "tokenizer source", "pass", f"Hugging Face tokenizer {type(original).__name__}, {len(original)} tokens"
            ),
            Check("tokenizer load", "pass", f"AutoTokenizer: {type(hf).__name__}, {len(hf)} tokens"),
        ]
        checks += _check_special_tokens(hf, specials, expected)
        checks += _check_parity(hf, reference, specials, sample_text, add_bos=False)
    else:
        file = _resolve_file(src, kind)
        common = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, special_tokens=special_tokens)
        try:
            if kind == "tiktoken":
                built = _build_tiktoken(file, pat_str=pat_str, add_bos_token=add_bos_token, **common)
            elif kind == "sentencepiece":
                built = _build_sentencepiece(file, add_bos_token=add_bos_token, **common)
            else:
                built = _build_char(file, add_bos_token=add_bos_token, **common)
        except HubconvError:
            raise
        except Exception as e:  # tokenizers/transformers errors, e.g. a pat_str the regex engine rejects
            raise TokenizerError(f"{file}: cannot convert this {kind} tokenizer: {type(e).__name__}: {e}") from e
        files = _write_files(built, out, chat_template=chat_template, model_max_length=model_max_length)
        hf = _load_auto(out)
        specials = built.special_tokens
        checks = [
            *built.checks,
            Check("tokenizer load", "pass", f"AutoTokenizer: {type(hf).__name__}, {len(hf)} tokens"),
        ]
        checks += _check_special_tokens(hf, specials, {"bos_token": built.bos_token, "eos_token": built.eos_token})
        if built.reference is None:
            checks.append(Check("encoding parity", "warn", f"not checked: {built.reference_missing}"))
        else:
            checks += _check_parity(hf, built.reference, specials, sample_text, add_bos=built.add_bos)
    if chat_template is not None:
        loaded = getattr(hf, "chat_template", None) == chat_template
        checks.append(
            Check("chat template", "pass" if loaded else "fail", "loads with the tokenizer" if loaded else "not loaded")
        )
    if model_max_length is not None and hf.model_max_length != model_max_length:
        checks.append(Check("model_max_length", "fail", f"loaded as {hf.model_max_length}, not {model_max_length}"))
    return TokenizerResult(
        kind=kind,
        source=source,
        vocab_size=len(hf),
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        special_tokens=dict(sorted(specials.items(), key=lambda kv: kv[1])),
        files=files,
        checks=checks,
    )


# ----------------------------------------------------------------------------------------------------- checks


def _check_special_tokens(hf: Any, specials: dict[str, int], expected: dict[str, str | None]) -> list[Check]:
    """Every special token at its id in the loaded tokenizer, and bos/eos as expected."""
    wrong = [(t, i, hf.convert_tokens_to_ids(t)) for t, i in specials.items() if hf.convert_tokens_to_ids(t) != i]
    checks: list[Check] = []
    if wrong:
        t, i, got = wrong[0]
        checks.append(Check("special tokens", "fail", f"{len(wrong)} special tokens moved, e.g. {t!r}: {i} -> {got}"))
    else:
        names = ", ".join(
            f"{n}={getattr(hf, n)!r} ({getattr(hf, n + '_id')})"
            for n in ("bos_token", "eos_token")
            if getattr(hf, n) is not None
        )
        checks.append(
            Check("special tokens", "pass", f"{len(specials)} special tokens at their ids; {names or 'no bos/eos'}")
        )
    for name, want in expected.items():
        if getattr(hf, name) != want:
            checks.append(Check("special tokens", "fail", f"{name} loads as {getattr(hf, name)!r}, not {want!r}"))
    if hf.eos_token_id is None:
        checks.append(Check("eos token", "warn", "no EOS token: generate() will only stop at max_new_tokens"))
    return checks


def _samples(specials: dict[str, int], hf: Any, ref: _Reference, sample_text: str | None) -> list[tuple[str, str]]:
    """The built-in corpus, special-token strings in text, the reference's own samples and ``sample_text``."""
    samples = [(f"built-in sample {i}", s) for i, s in enumerate(DEFAULT_SAMPLES)]
    names = sorted(specials, key=lambda t: specials[t])
    picked = [t for t in (hf.bos_token, hf.eos_token) if t in specials] + [
        t for t in names if not t.startswith("<|reserved")
    ]
    picked = list(dict.fromkeys(picked))[:8]
    for i, tok in enumerate(picked):
        samples.append((f"special-token sample {i}", f"{tok}Hello world{tok} and {tok} again,\n{tok}"))
    samples += ref.samples
    if sample_text is not None:
        samples.append(("sample_text", sample_text))
    return samples


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _check_parity(
    hf: Any,
    ref: _Reference,
    specials: dict[str, int],
    sample_text: str | None,
    *,
    add_bos: bool,
) -> list[Check]:
    """Encoding parity (ids, with and without special tokens) and decode round trip against the source tokenizer."""
    mismatches: list[str] = []
    restricted: list[str] = []
    n_samples = n_tokens = 0
    lossy = 0
    decode_fail: list[str] = []
    decode_warn: list[str] = []
    bos_id = hf.bos_token_id
    for label, text in _samples(specials, hf, ref, sample_text):
        if ref.restrict is not None:
            kept = ref.restrict(text)
            if kept != text:
                restricted.append(label)
                text = kept
        want = ref.encode(text)
        got = hf.encode(text, add_special_tokens=False, verbose=False)
        n_samples += 1
        n_tokens += len(want)
        if got != want:
            i = _first_diff(want, got)
            mismatches.append(f"{label}: token {i}: {ref.name} {want[i : i + 4]} vs HF {got[i : i + 4]}")
            continue
        want_full = ref.encode_with_specials(text) if ref.encode_with_specials else ([bos_id] if add_bos else []) + want
        got_full = hf.encode(text, verbose=False)
        if got_full != want_full:
            i = _first_diff(want_full, got_full)
            mismatches.append(
                f"{label} (add_special_tokens=True): token {i}: "
                f"expected {want_full[i : i + 4]} got {got_full[i : i + 4]}"
            )
            continue
        if any(tok in text for tok in specials):
            continue  # sources decode special tokens differently (sentencepiece drops control tokens)
        source_text = ref.decode(want)
        hf_text = hf.decode(want, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if source_text != text:
            lossy += 1
            if hf_text != source_text:
                unk = " (unknown pieces decode differently)" if hf.unk_token_id in want else ""
                decode_warn.append(f"{label}: source {source_text[:40]!r} vs HF {hf_text[:40]!r}{unk}")
        elif hf_text != text:
            decode_fail.append(f"{label}: {text[:40]!r} decodes to {hf_text[:40]!r}")
    checks: list[Check] = []
    if mismatches:
        checks.append(
            Check(
                "encoding parity",
                "fail",
                f"{len(mismatches)} of {n_samples} samples encode differently from {ref.name}: "
                + "; ".join(mismatches[:3]),
            )
        )
    else:
        how = f", BOS {bos_id} prepended by default" if (add_bos and ref.encode_with_specials is None) else ""
        note = f" ({len(restricted)} samples without the characters the source cannot encode)" if restricted else ""
        checks.append(
            Check(
                "encoding parity", "pass", f"{n_samples} samples, {n_tokens} tokens: same ids as {ref.name}{how}{note}"
            )
        )
    if "sample_text" in restricted:
        checks.append(
            Check("sample_text", "warn", "sample_text has characters the source cannot encode: checked without them")
        )
    if decode_fail:
        checks.append(Check("decode round trip", "fail", f"{len(decode_fail)} samples: " + "; ".join(decode_fail[:3])))
    elif decode_warn:
        checks.append(Check("decode round trip", "warn", f"differs from {ref.name}: " + "; ".join(decode_warn[:3])))
    else:
        note = f"; {lossy} samples are normalized by the source itself and decode as it does" if lossy else ""
        checks.append(Check("decode round trip", "pass", f"decode(encode(x)) == x{note}"))
    return checks


# -------------------------------------------------------------------------------------------------- reconcile


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def reconcile_special_tokens(model_dir: str, result: TokenizerResult, embedding_rows: int) -> list[Check]:
    """Check the tokenizer against the model folder: vocabulary vs embedding rows, bos/eos ids in every file.

    Null or missing ``bos_token_id``/``eos_token_id`` in config.json / generation_config.json are filled from the
    tokenizer (the files are rewritten); disagreeing ids are a "fail" check naming both values and files.
    """
    folder = Path(model_dir)
    checks: list[Check] = []
    rows_needed = max([result.vocab_size, *[i + 1 for i in result.special_tokens.values()]])
    if rows_needed > embedding_rows:
        checks.append(
            Check(
                "vocab size",
                "fail",
                f"tokenizer has {rows_needed} tokens but the embedding only {embedding_rows} rows: ids "
                f"{embedding_rows}..{rows_needed - 1} would index past it",
            )
        )
    elif rows_needed < embedding_rows:
        checks.append(
            Check(
                "vocab size",
                "warn",
                f"{embedding_rows - rows_needed} padding rows: embedding has {embedding_rows} rows, tokenizer "
                f"{rows_needed} tokens (ids {rows_needed}..{embedding_rows - 1} are never produced)",
            )
        )
    else:
        checks.append(Check("vocab size", "pass", f"tokenizer and embedding both have {embedding_rows} rows"))

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise TokenizerError(f"{config_path}: missing; write the model config before reconciling special tokens")
    docs: dict[str, Any] = {"config.json": _read_json(config_path, "model config")}
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        docs["generation_config.json"] = _read_json(gen_path, "generation config")
    for name, doc in docs.items():
        if not isinstance(doc, dict):
            raise TokenizerError(f"{folder / name}: expected a JSON object")
    tok_config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        tok_config = _read_json(folder / "tokenizer_config.json", "tokenizer config")

    changed: set[str] = set()
    for role, tok_id in (("bos", result.bos_token_id), ("eos", result.eos_token_id)):
        checks.append(_reconcile_id(role, tok_id, result, docs, tok_config, changed))
    for name in sorted(changed):
        _write_json(folder / name, docs[name])
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        checks.append(_check_folder_load(folder, result, docs["config.json"].get("model_type")))
    return checks


def _check_folder_load(folder: Path, result: TokenizerResult, model_type: Any) -> Check:
    """AutoTokenizer picks its class from config.json's model_type too: check the folder loads the tokenizer written.

    For some model types (e.g. ``qwen2``) transformers 5 ignores ``tokenizer_class`` and rebuilds the tokenizer with
    the model family's own class and pre-tokenizer; the ids must still be those of ``tokenizer.json``.
    """
    from tokenizers import Tokenizer

    name = "tokenizer in model folder"
    try:
        hf = _load_auto(folder)
    except TokenizerError as e:
        return Check(name, "fail", str(e))
    how = f"AutoTokenizer loads {type(hf).__name__} (config.json model_type {model_type!r})"
    problems = []
    if len(hf) != result.vocab_size:
        problems.append(f"{len(hf)} tokens instead of {result.vocab_size}")
    for role in ("bos", "eos"):
        got, want = getattr(hf, f"{role}_token_id"), getattr(result, f"{role}_token_id")
        if got != want:
            problems.append(f"{role}_token_id {got} instead of {want}")
    if (folder / "tokenizer.json").is_file():
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
        specials = list(result.special_tokens)[:4]
        for text in [*DEFAULT_SAMPLES, *(f"{t}Hello {t} world" for t in specials)]:
            try:
                want_ids = raw.encode(text).ids
            except Exception:  # a closed vocabulary (nanoGPT's char table has no unknown token): its characters only
                text = "".join(c for c in text if raw.token_to_id(c) is not None)
                want_ids = raw.encode(text).ids
            got_ids = hf.encode(text, verbose=False)
            if got_ids != want_ids:
                i = _first_diff(want_ids, got_ids)
                problems.append(
                    f"{text[:30]!r} encodes to {got_ids[i : i + 4]} at token {i}, tokenizer.json gives "
                    f"{want_ids[i : i + 4]}"
                )
                break
    if problems:
        return Check(name, "fail", f"{how}: " + "; ".join(problems))
    return Check(name, "pass", f"{how}: same tokens and ids as written")


def _reconcile_id(
    role: str,
    tok_id: int | None,
    result: TokenizerResult,
    docs: dict[str, Any],
    tok_config: dict[str, Any],
    changed: set[str],
) -> Check:
    key = f"{role}_token_id"
    check = f"{role} token"
    token_name = tok_config.get(f"{role}_token")
    if isinstance(token_name, dict):
        token_name = token_name.get("content")
    if isinstance(token_name, str) and token_name in result.special_tokens and tok_id is not None:
        if result.special_tokens[token_name] != tok_id:
            return Check(
                check,
                "fail",
                f"tokenizer_config.json names {role}_token {token_name!r} = {result.special_tokens[token_name]}, "
                f"but the tokenizer's {key} is {tok_id}",
            )
    where = f"tokenizer_config.json ({token_name!r})" if isinstance(token_name, str) else "the tokenizer"
    consequence = (
        " — generation would never stop at the end of a text (it runs until max_new_tokens)" if role == "eos" else ""
    )
    values = {name: doc.get(key) for name, doc in docs.items()}
    if tok_id is None:
        present = {n: v for n, v in values.items() if v is not None and v != []}
        if len({json.dumps(v) for v in present.values()}) > 1:
            listed = ", ".join(f"{n} has {v}" for n, v in present.items())
            return Check(check, "fail", f"{key} disagrees: {listed}{consequence}")
        if present:
            listed = ", ".join(f"{n} has {v}" for n, v in present.items())
            return Check(check, "warn", f"the tokenizer has no {role} token but {listed}")
        if role == "eos":
            return Check(check, "warn", "no EOS token anywhere: generate() will only stop at max_new_tokens")
        return Check(check, "pass", "no BOS token (none in the tokenizer or the configs)")
    for name, value in values.items():
        if value is None or value == []:
            continue
        agrees = tok_id in value if isinstance(value, list) else _is_id(value) and value == tok_id
        if not agrees:
            return Check(check, "fail", f"{key} mismatch: {where} has {tok_id} but {name} has {value}{consequence}")
    filled = [name for name, value in values.items() if value is None or value == []]
    for name in filled:
        docs[name][key] = tok_id
        changed.add(name)
    if filled:
        return Check(check, "pass", f"filled {key}={tok_id} from the tokenizer into {', '.join(filled)}")
    return Check(check, "pass", f"{key}={tok_id} in the tokenizer and {', '.join(docs)}")
