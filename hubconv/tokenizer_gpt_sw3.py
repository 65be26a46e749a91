"""GPT-SW3 tokenizer files: a SentencePiece model published as transformers' `GPTSw3Tokenizer`.

GPT-SW3 (trained with NeMo / Megatron) is a `GPT2LMHeadModel` whose tokenizer is a SentencePiece model
used through `GPTSw3Tokenizer`, which normalizes text before encoding (non-printing characters removed,
Unicode spaces to " ", NFC) exactly as the training data was. Its Hub repos hold `spiece.model` and a
`tokenizer_config.json` naming the class and the special pieces; that is what is written here (a fast
`tokenizer.json` would skip the normalization). The written folder is loaded back with `AutoTokenizer`
and must give `GPTSw3Tokenizer` and, on sample texts, the ids `sentencepiece` gives for the normalized
text.
"""

from __future__ import annotations

import json
import os
import shutil
import unicodedata
from pathlib import Path

from hubconv.checks import Check
from hubconv.tokenizers import DEFAULT_SAMPLES, TokenizerError, TokenizerResult, _parse_spm

CLASS = "GPTSw3Tokenizer"
VOCAB_FILE = "spiece.model"
# GPTSw3Tokenizer.preprocess_text, restated: dropped code points and the spaces mapped to " ".
_NON_PRINTING = {*range(0, 9), *range(11, 32), *range(127, 160), 160, 173, 8203}
_SPACES = {0x20, 0x2002, 0x2003, 0x2005, 0x2008, 0x2009, 0x200A, 0x202F, 0x3000, 0xFFFC, 0x84}


def wants_gpt_sw3(model_dir: str) -> bool:
    """The model folder's config.json asks for GPTSw3Tokenizer (the Megatron adapter sets it)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f).get("tokenizer_class") == CLASS
    except (OSError, ValueError, AttributeError):
        return False


def _normalized(text: str) -> str:
    kept = (c for c in text if ord(c) not in _NON_PRINTING)
    return unicodedata.normalize("NFC", "".join(" " if ord(c) in _SPACES else c for c in kept))


def write_gpt_sw3_tokenizer(
    source: str, out_dir: str, *, model_max_length: int | None = None, sample_text: str | None = None
) -> TokenizerResult:
    """Write `spiece.model` + `tokenizer_config.json` for GPTSw3Tokenizer into `out_dir` and check them."""
    src = Path(source)
    if src.is_dir():
        candidates = [src / n for n in ("spiece.model", "tokenizer.model") if (src / n).is_file()]
        if not candidates:
            raise TokenizerError(f"{source}: no spiece.model or tokenizer.model in this folder")
        src = candidates[0]
    m = _parse_spm(src)

    def piece(i: int, default: str) -> str:
        return m.pieces[i][0] if 0 <= i < len(m.pieces) else default

    specials = {
        "bos_token": piece(m.bos_id, "<s>"),
        "eos_token": piece(m.eos_id, "<|endoftext|>"),
        "unk_token": piece(m.unk_id, "<unk>"),
        "pad_token": piece(m.pad_id, piece(m.unk_id, "<unk>")),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out / VOCAB_FILE)
    config = {
        "tokenizer_class": CLASS,
        "do_lower_case": False,
        "remove_space": False,
        "keep_accents": False,
        **specials,
        **({"model_max_length": model_max_length} if model_max_length else {}),  # else transformers' "unlimited"
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    files = [VOCAB_FILE, "tokenizer_config.json"]

    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    except Exception as e:  # any loading failure is the check's result
        raise TokenizerError(f"{out}: the GPT-SW3 tokenizer files do not load: {type(e).__name__}: {e}") from None
    checks = [
        Check("tokenizer source", "pass", f"SentencePiece {src.name}: {len(m.pieces)} pieces, published as {CLASS}"),
        Check(
            "tokenizer load",
            "pass" if type(hf).__name__ == CLASS else "fail",
            f"AutoTokenizer: {type(hf).__name__}, {len(hf)} tokens",
        ),
    ]
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(src))
    texts = [sample_text] if sample_text else list(DEFAULT_SAMPLES)
    bad = [t for t in texts if hf.encode(t, add_special_tokens=False) != sp.encode(_normalized(t), out_type=int)]
    checks.append(
        Check(
            "encoding parity",
            "fail" if bad else "pass",
            f"{len(texts) - len(bad)}/{len(texts)} samples encode as sentencepiece does after GPT-SW3's normalization"
            + (f"; first difference on {bad[0][:40]!r}" if bad else ""),
        )
    )
    ids = {v: hf.convert_tokens_to_ids(v) for v in specials.values()}
    return TokenizerResult(
        kind="sentencepiece",
        source=source,
        vocab_size=len(hf),
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        special_tokens=dict(sorted(ids.items(), key=lambda kv: kv[1])),
        files=files,
        checks=checks,
    )
