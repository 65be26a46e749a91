"""hubconv.tokenizers against the real libraries: tiktoken, sentencepiece, nanoGPT's meta.pkl, transformers."""

import base64
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from hubconv import tokenizers as tk
from hubconv.errors import HubconvError
from hubconv.tokenizers import (
    Check,
    TokenizerResult,
    detect_kind,
    llama3_special_tokens,
    reconcile_special_tokens,
    write_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-llama3-torchtitan"
EXAMPLE_TOKENIZER = EXAMPLE / "tokenizer"
CORPUS = EXAMPLE / "corpus.txt"

# Text the tokenizers were not trained on: accents, CJK and emoji (byte fallback / byte-level), whitespace runs.
UNSEEN = "Zoë's café 東京タワー 🙂👩‍💻  x\t\ty\n\n  z   "


def _auto(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == "fail"]


def _check(checks: list[Check], name: str) -> Check:
    found = [c for c in checks if c.name == name]
    assert len(found) == 1, (name, checks)
    return found[0]


def _write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_bytes(
        b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    )


def _small_ranks() -> dict[bytes, int]:
    """256 byte tokens plus a few merges, in the order a BPE trainer would learn them."""
    ranks = {bytes([i]): i for i in range(256)}
    for merged in (b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b"er", b"on", b" a"):
        ranks[merged] = len(ranks)
    return ranks


# ----------------------------------------------------------------------------------------------------- tiktoken


def test_example_tiktoken_converts_with_same_ids_as_tiktoken(tmp_path: Path) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    out = tmp_path / "out"
    template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
    )
    text = CORPUS.read_text(encoding="utf-8")[:4000]
    result = write_tokenizer(
        str(EXAMPLE_TOKENIZER), str(out), chat_template=template, model_max_length=256, sample_text=text
    )

    assert result.kind == "tiktoken"
    assert not _failed(result.checks), result.checks
    assert _check(result.checks, "encoding parity").status == "pass"
    sidecar = json.loads((EXAMPLE_TOKENIZER / "special_tokens.json").read_text())
    assert result.special_tokens == sidecar
    assert (result.vocab_size, result.bos_token_id, result.eos_token_id) == (522, 512, 513)
    assert (
        sorted(result.files)
        == sorted(os.listdir(out))
        == sorted(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
    )
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert config["model_max_length"] == 256 and config["chat_template"] == template
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"]["content"] == "<|end_of_text|>"

    # Independently of the module's own check: the README's tiktoken recipe and AutoTokenizer agree.
    meta = json.loads((EXAMPLE_TOKENIZER / "tokenizer_meta.json").read_text())
    enc = tiktoken.Encoding(
        name="tiny-llama3",
        pat_str=meta["pat_str"],
        mergeable_ranks=tk._load_tiktoken_ranks(EXAMPLE_TOKENIZER / "tokenizer.model"),
        special_tokens=sidecar,
    )
    hf = _auto(out)
    for s in (text, UNSEEN, "<|begin_of_text|>A class definition<|eot_id|>\n"):
        ids = enc.encode(s, allowed_special="all")
        assert hf.encode(s, add_special_tokens=False) == ids
        assert hf.encode(s) == [512, *ids]  # BOS, as TorchTitan trained and Meta's Llama 3 tokenizer.json does
    assert hf.decode(enc.encode(UNSEEN)) == UNSEEN
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|start_header_id|>user<|end_header_id|>hi<|eot_id|>"


def test_tiktoken_parity_check_catches_a_wrong_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tiktoken")
    real = tk._ranks_converter
    # The HF side splits words differently from tiktoken (whitespace-only pre-tokenizer): ids must differ somewhere.
    monkeypatch.setattr(tk, "_ranks_converter", lambda ranks, pattern: real(ranks, r"\S+|\s+"))
    result = write_tokenizer(str(EXAMPLE_TOKENIZER), str(tmp_path / "out"))
    parity = _check(result.checks, "encoding parity")
    assert parity.status == "fail" and "tiktoken" in parity.detail


def test_llama3_special_token_layout() -> None:
    layout = llama3_special_tokens()
    assert len(layout) == 256 and sorted(layout.values()) == list(range(128000, 128256))
    assert layout["<|begin_of_text|>"] == 128000 and layout["<|end_of_text|>"] == 128001
    assert layout["<|reserved_special_token_0|>"] == 128002 and layout["<|reserved_special_token_4|>"] == 128008
    assert layout["<|start_header_id|>"] == 128006 and layout["<|end_header_id|>"] == 128007
    assert layout["<|eot_id|>"] == 128009 and layout["<|reserved_special_token_5|>"] == 128010
    assert layout["<|reserved_special_token_250|>"] == 128255


def test_meta_layout_applies_to_a_llama3_sized_rank_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tiktoken")
    ranks = _small_ranks()
    n = len(ranks)
    _write_ranks(tmp_path / "tokenizer.model", ranks)  # no sidecars

    # Not Llama 3's size: no special tokens are invented, and the assumed pat_str is flagged.
    plain = write_tokenizer(str(tmp_path / "tokenizer.model"), str(tmp_path / "plain"))
    assert plain.special_tokens == {} and plain.bos_token_id is None and plain.vocab_size == n
    assert _check(plain.checks, "pre-tokenizer").status == "warn"

    # Meta's file has 128,000 ranks; pretend this one is that size to exercise the layout without 128k lines.
    monkeypatch.setattr(tk, "LLAMA3_NUM_BASE_TOKENS", n)
    result = write_tokenizer(str(tmp_path / "tokenizer.model"), str(tmp_path / "out"), sample_text="the thing")
    assert not _failed(result.checks), result.checks
    assert result.special_tokens == llama3_special_tokens(n)
    assert (result.vocab_size, result.bos_token_id, result.eos_token_id) == (n + 256, n, n + 1)
    hf = _auto(tmp_path / "out")
    assert hf.convert_tokens_to_ids("<|eot_id|>") == n + 9
    assert hf.encode("<|start_header_id|>the<|end_header_id|>", add_special_tokens=False) == [
        n + 6,
        ranks[b"the"],
        n + 7,
    ]


def test_special_token_gaps_are_filled_and_collisions_refused(tmp_path: Path) -> None:
    pytest.importorskip("tiktoken")
    ranks = _small_ranks()
    n = len(ranks)
    _write_ranks(tmp_path / "tokenizer.model", ranks)
    specials = {"<|bos|>": n, "<|eos|>": n + 3}
    result = write_tokenizer(
        str(tmp_path / "tokenizer.model"), str(tmp_path / "out"), special_tokens=specials, eos_token="<|eos|>"
    )
    assert not _failed(result.checks), result.checks
    assert (result.vocab_size, result.bos_token_id, result.eos_token_id) == (n + 4, None, n + 3)
    assert _check(result.checks, "tokenizer source").status == "warn"  # two placeholder ids
    assert _auto(tmp_path / "out").convert_ids_to_tokens(n + 1) == f"<|reserved_token_{n + 1}|>"

    with pytest.raises(HubconvError, match="id 5, which is the base vocabulary's token"):
        write_tokenizer(str(tmp_path / "tokenizer.model"), str(tmp_path / "bad"), special_tokens={"<|x|>": 5})
    with pytest.raises(HubconvError, match="not a token of this tokenizer"):
        write_tokenizer(str(tmp_path / "tokenizer.model"), str(tmp_path / "bad"), bos_token="<|nope|>")


def test_tiktoken_file_that_does_not_match_its_metadata_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "tokenizer"
    shutil.copytree(EXAMPLE_TOKENIZER, folder)
    lines = (folder / "tokenizer.model").read_bytes().splitlines(keepends=True)
    (folder / "tokenizer.model").write_bytes(b"".join(lines[:-1]))  # one rank short
    with pytest.raises(HubconvError, match="sha256"):
        write_tokenizer(str(folder), str(tmp_path / "out"))
    (folder / "tokenizer.model").write_bytes(b"".join(lines[:10]) + b"not base64!! 10\n")
    with pytest.raises(HubconvError, match=r"tokenizer.model:11: not a tiktoken BPE line"):
        tk._load_tiktoken_ranks(folder / "tokenizer.model")


# ------------------------------------------------------------------------------------------------ sentencepiece


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SentencePiece models trained here: sentencepiece defaults (nmt_nfkc, whitespace clean-up), a Llama-2
    style BPE (identity normalizer, whitespace kept, split digits) and one with unusual special-token ids."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS.read_text(encoding="utf-8")[:30000], encoding="utf-8")
    common = dict(input=str(corpus), vocab_size=700, hard_vocab_limit=False, byte_fallback=True, num_threads=1)
    variants = {
        "unigram": dict(model_type="unigram"),
        "bpe_llama": dict(
            model_type="bpe",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
        ),
        "odd_ids": dict(model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, user_defined_symbols=["<sep>"]),
    }
    models = {}
    for name, kwargs in variants.items():
        spm.SentencePieceTrainer.train(model_prefix=str(folder / name), minloglevel=2, **common, **kwargs)
        models[name] = folder / f"{name}.model"
    return models


@pytest.mark.parametrize("variant", ["unigram", "bpe_llama"])
def test_sentencepiece_converts_with_same_ids_as_sentencepiece(
    spm_models: dict[str, Path], tmp_path: Path, variant: str
) -> None:
    import sentencepiece

    model = spm_models[variant]
    assert detect_kind(str(model)) == "sentencepiece"
    result = write_tokenizer(str(model), str(tmp_path / "out"), sample_text=UNSEEN)
    assert result.kind == "sentencepiece"
    assert not _failed(result.checks), result.checks
    assert _check(result.checks, "encoding parity").status == "pass"
    assert (result.vocab_size, result.bos_token_id, result.eos_token_id) == (700, 1, 2)
    assert result.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    hf = _auto(tmp_path / "out")
    byte_ids = {sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    for s in (UNSEEN, CORPUS.read_text(encoding="utf-8")[30000:33000], "1234567 + 89 = 1234656", " lead", ""):
        ids = sp.encode(s, out_type=int)
        assert hf.encode(s, add_special_tokens=False) == ids, s
        assert hf.encode(s) == [1, *ids]  # BOS from the model proto, as LlamaTokenizer adds it
        assert hf.decode(ids) == sp.decode(ids)
    assert byte_ids & set(sp.encode(UNSEEN, out_type=int)), "the sample must exercise byte fallback"


def test_sentencepiece_normalizer_matters(
    spm_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converting without the model's normalizer (as transformers' LlamaConverter does) is caught by the check."""
    real = tk._parse_spm

    def llama_converter_view(path: Path) -> tk._SpmModel:
        m = real(path)
        m.precompiled_charsmap, m.remove_extra_whitespaces = b"", False
        return m

    monkeypatch.setattr(tk, "_parse_spm", llama_converter_view)
    result = write_tokenizer(str(spm_models["unigram"]), str(tmp_path / "out"))
    parity = _check(result.checks, "encoding parity")
    assert parity.status == "fail" and "sentencepiece" in parity.detail


def test_sentencepiece_special_ids_come_from_the_proto(spm_models: dict[str, Path], tmp_path: Path) -> None:
    import sentencepiece

    result = write_tokenizer(str(spm_models["odd_ids"]), str(tmp_path / "out"))
    assert not _failed(result.checks), result.checks
    assert (result.bos_token_id, result.eos_token_id) == (None, 1)
    assert result.special_tokens == {"<pad>": 0, "</s>": 1, "<unk>": 2}
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (config["pad_token"], config["eos_token"], config["unk_token"]) == ("<pad>", "</s>", "<unk>")
    assert "bos_token" not in config
    # sentencepiece does not prefix the text after a user-defined symbol; the HF convention does: reported, not hidden.
    assert _check(result.checks, "user-defined symbols").status == "warn"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_models["odd_ids"]))
    assert _auto(tmp_path / "out").encode(UNSEEN) == sp.encode(UNSEEN)  # no BOS to add


# ---------------------------------------------------------------------------------------------------- char / pkl


def _nanogpt_meta(path: Path, data: str) -> dict:
    """What nanoGPT's data/shakespeare_char/prepare.py writes."""
    chars = sorted(set(data))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {ch: i for i, ch in enumerate(chars)}}
    with open(path, "wb") as f:
        pickle.dump(meta, f)
    return meta


def test_nanogpt_char_table_converts_exactly(tmp_path: Path) -> None:
    data = CORPUS.read_text(encoding="utf-8")[:20000] + "\tçé日本🙂\r\n"
    meta = _nanogpt_meta(tmp_path / "meta.pkl", data)
    assert detect_kind(str(tmp_path)) == "char"
    result = write_tokenizer(str(tmp_path), str(tmp_path / "out"))
    assert result.kind == "char"
    assert not _failed(result.checks), result.checks
    assert (result.vocab_size, result.bos_token_id, result.eos_token_id) == (meta["vocab_size"], None, None)
    hf = _auto(tmp_path / "out")
    ids = [meta["stoi"][c] for c in data]
    assert hf.encode(data) == ids  # no BOS/EOS: nanoGPT has none
    assert hf.decode(ids) == data
    assert hf.encode("".join(meta["itos"][i] for i in range(meta["vocab_size"]))) == list(range(meta["vocab_size"]))

    with_eos = write_tokenizer(
        str(tmp_path / "meta.pkl"),
        str(tmp_path / "out2"),
        special_tokens={"<|endoftext|>": meta["vocab_size"]},
        eos_token="<|endoftext|>",
    )
    assert (with_eos.vocab_size, with_eos.eos_token_id) == (meta["vocab_size"] + 1, meta["vocab_size"])
    assert _auto(tmp_path / "out2").encode("the<|endoftext|>") == [*ids_of("the", meta), meta["vocab_size"]]


def ids_of(text: str, meta: dict) -> list[int]:
    return [meta["stoi"][c] for c in text]


class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_meta_pkl_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "meta.pkl"
    evil.write_bytes(pickle.dumps({"vocab_size": 1, "stoi": {"a": 0}, "itos": {0: "a"}, "x": _Boom(marker)}))
    with pytest.raises(HubconvError, match=r"meta\.pkl: refusing to load this pickle: .*system"):
        write_tokenizer(str(evil), str(tmp_path / "out"))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

    from collections import OrderedDict

    (tmp_path / "od.pkl").write_bytes(pickle.dumps({"stoi": OrderedDict(a=0)}))
    with pytest.raises(HubconvError, match=r"od\.pkl: refusing.*collections\.OrderedDict"):
        tk.load_char_meta(tmp_path / "od.pkl")


# ---------------------------------------------------------------------------------------------------- hf folder


def _save_hf_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    hf.save_pretrained(str(folder))


def test_hf_folder_is_validated_and_copied(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _save_hf_tokenizer(src)
    (src / "README.md").write_text("not a tokenizer file")
    (src / "model.safetensors").write_bytes(b"\0" * 16)
    assert detect_kind(str(src)) == "hf"
    template = "{{ messages[0]['content'] }}"
    result = write_tokenizer(str(src), str(tmp_path / "out"), chat_template=template, sample_text=UNSEEN)
    assert result.kind == "hf"
    assert not _failed(result.checks), result.checks
    assert set(os.listdir(tmp_path / "out")) == set(result.files) <= set(tk.HF_TOKENIZER_FILES)
    assert "tokenizer.json" in result.files and "README.md" not in result.files
    assert (result.vocab_size, result.bos_token_id, result.eos_token_id) == (400, 0, 0)
    assert result.special_tokens == {"<|endoftext|>": 0, "<|pad|>": 1}
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 5 wrote TokenizersBackend
    original, copied = _auto(src), _auto(tmp_path / "out")
    assert copied.encode(UNSEEN) == original.encode(UNSEEN)
    assert copied.chat_template == template


def test_broken_hf_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": "nonsense"}')
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(HubconvError, match="AutoTokenizer cannot load"):
        write_tokenizer(str(tmp_path), str(tmp_path / "out"))


def test_detect_kind(tmp_path: Path) -> None:
    assert detect_kind(str(EXAMPLE_TOKENIZER)) == "tiktoken"
    assert detect_kind(str(EXAMPLE_TOKENIZER / "tokenizer.model")) == "tiktoken"
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(HubconvError, match="unknown tokenizer format"):
        detect_kind(str(tmp_path / "notes.txt"))
    with pytest.raises(HubconvError, match="no tokenizer found"):
        detect_kind(str(tmp_path))
    with pytest.raises(HubconvError, match="no such"):
        detect_kind(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------------- reconcile


def _result(vocab_size: int = 522, bos: int | None = 512, eos: int | None = 513) -> TokenizerResult:
    specials = {"<|begin_of_text|>": 512, "<|end_of_text|>": 513}
    return TokenizerResult("tiktoken", "x", vocab_size, bos, eos, specials, [], [])


def _model_dir(path: Path, config: dict, generation: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def test_eos_mismatch_is_a_failure_naming_both_values(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, {"bos_token_id": 512, "eos_token_id": 2}, {"bos_token_id": 512, "eos_token_id": 513})
    checks = reconcile_special_tokens(str(model), _result(), 522)
    eos = _check(checks, "eos token")
    assert eos.status == "fail"
    assert "513" in eos.detail and "config.json has 2" in eos.detail and "max_new_tokens" in eos.detail
    assert _check(checks, "bos token").status == "pass"
    assert json.loads((model / "config.json").read_text())["eos_token_id"] == 2  # nothing rewritten


def test_null_ids_are_filled_from_the_tokenizer(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, {"bos_token_id": None, "vocab_size": 522}, {"eos_token_id": None})
    checks = reconcile_special_tokens(str(model), _result(), 522)
    assert not _failed(checks), checks
    assert "filled bos_token_id=512" in _check(checks, "bos token").detail
    assert "filled eos_token_id=513" in _check(checks, "eos token").detail
    config = json.loads((model / "config.json").read_text())
    generation = json.loads((model / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (512, 513, 522)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (512, 513)
    # A list of stop ids that contains the tokenizer's EOS agrees (Llama 3 instruct style).
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [513, 521]}))
    assert _check(reconcile_special_tokens(str(model), _result(), 522), "eos token").status == "pass"


def test_vocab_against_embedding_rows(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, {"bos_token_id": 512, "eos_token_id": 513})
    larger = _check(reconcile_special_tokens(str(model), _result(vocab_size=530), 522), "vocab size")
    assert larger.status == "fail" and "530" in larger.detail and "522" in larger.detail
    padded = _check(reconcile_special_tokens(str(model), _result(), 528), "vocab size")
    assert padded.status == "warn" and "6 padding rows" in padded.detail
    assert _check(reconcile_special_tokens(str(model), _result(), 522), "vocab size").status == "pass"
    with pytest.raises(HubconvError, match=r"config\.json: missing"):
        reconcile_special_tokens(str(tmp_path / "nowhere"), _result(), 522)


def test_model_folder_must_load_the_tokenizer_as_written(tmp_path: Path) -> None:
    """transformers 5 picks the tokenizer class from config.json's model_type for some families (qwen2 ignores
    tokenizer_class and rebuilds the tokenizer): the check loads the final folder, not just the files."""
    result = write_tokenizer(str(EXAMPLE_TOKENIZER), str(tmp_path))
    _model_dir(tmp_path, {"bos_token_id": 512, "eos_token_id": 513})
    assert _check(reconcile_special_tokens(str(tmp_path), result, 522), "tokenizer in model folder").status == "pass"
    _model_dir(tmp_path, {"model_type": "qwen2", "bos_token_id": 512, "eos_token_id": 513})
    folder = _check(reconcile_special_tokens(str(tmp_path), result, 522), "tokenizer in model folder")
    assert folder.status == "fail" and "qwen2" in folder.detail
