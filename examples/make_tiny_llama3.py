"""Build the bundled example checkpoint ``examples/tiny-llama3-torchtitan/``.

A tiny Llama 3 is *really trained* (not random weights) on a small English corpus, with
TorchTitan's model math, and saved the way TorchTitan saves it (a DCP ``step-N`` folder
with flattened model FQNs). hubconv's README demo converts it to a transformers folder,
and its samples are good enough for a smoke test to check that generated text still looks
like the corpus after conversion.

Run from the repository root (CPU only, one thread, deterministic, about 1.5 minutes)::

    python examples/make_tiny_llama3.py            # -> examples/tiny-llama3-torchtitan/
    python examples/make_tiny_llama3.py --out DIR  # somewhere else

Needs only torch and ``regex`` (a transformers dependency). If ``tiktoken`` is installed,
the tokenizer file is also loaded with it and checked to encode the corpus exactly as the
script's own pure-Python BPE does (and to round-trip it).

Training: rows of 256 tokens (``max_seq_len``), each ``<|begin_of_text|>`` followed by
corpus text; half the rows start at a paragraph (a paragraph plays the part of a document,
so prompts that open a paragraph are continued verbatim), half start anywhere. AdamW with
TorchTitan's betas / weight decay / clipping, warm-up then cosine decay. The model
memorises much of its 26k-token corpus, which is the point: a smoke test can check that a
converted model continues ``<|begin_of_text|>An assignment statement evaluates`` with the
corpus's own words.

What it writes (every file is regenerated; ``corpus.txt`` is *reused* when present):

``corpus.txt``
    ~60 KB of English prose: the first paragraphs (topic order) of the Python Language
    Reference as shipped in CPython's own stdlib, ``Lib/pydoc_data/topics.py`` (the
    ``help()`` topic index), keeping only plain prose paragraphs (no code, grammar or
    headings). The Python documentation is under the PSF License Version 2, which allows
    redistribution with the PSF notice kept; ``corpus-LICENSE.txt`` records the source
    and carries the interpreter's ``LICENSE.txt``. The extracted text depends on the Python
    version, so an existing ``corpus.txt`` is reused (``--fresh-corpus`` re-extracts it);
    everything else is a pure function of ``corpus.txt``.
``tokenizer/tokenizer.model``
    A Llama-3-style tiktoken BPE file (``base64(token bytes) rank`` per line): 256 byte
    tokens plus 256 merges, learned by plain byte-level BPE on the corpus after splitting
    it with Llama 3's pre-tokenizer regex. ``special_tokens.json`` gives the first ten
    Llama 3 special tokens (``<|begin_of_text|>``, ``<|end_of_text|>``, reserved, header
    and ``<|eot_id|>``) the ids right after the BPE ranks; ``tokenizer_meta.json`` holds
    the ``pat_str``. Load with::

        tiktoken.Encoding(name="tiny-llama3", pat_str=meta["pat_str"],
                          mergeable_ranks=tiktoken.load.load_tiktoken_bpe(path, expected_hash=sha256),
                          special_tokens=special_tokens)

    (pass ``expected_hash``: tiktoken caches local files by *path* in
    ``$TMPDIR/data-gym-cache`` and would otherwise return a stale copy after a rebuild).
``step-<STEPS>/``
    ``torch.distributed.checkpoint`` folder (model only, float32, flattened TorchTitan
    FQNs ``tok_embeddings.weight``, ``layers.{i}.attention.wq.weight``, ...,
    ``output.weight``), written by ``dcp.save`` from a single process. Its data file is
    byte-identical to what ``tests/native/torchtitan_llama3.save_dcp`` writes; only
    ``.metadata``'s storage id is pinned (DCP puts a random UUID and the absolute path
    there) so that rebuilds are byte-for-byte reproducible.
``model_args.yaml``
    The TorchTitan ``TransformerModelArgs`` for the checkpoint (TorchTitan field names)
    plus ``bos_token_id`` / ``eos_token_id``: what ``hubconv convert --model-args`` takes.
``README.md``
    How it was made, the corpus licence, the final loss and greedy samples.

Model math: the forward is ``tests/native/torchtitan_llama3.py`` (the repository's
re-implementation of TorchTitan's Llama 3). Its ``forward`` runs under ``no_grad`` and
detaches the weights, so training uses :func:`train_forward`, which chains the same
module's building blocks in the same order; after training the script asserts that it
matches ``forward`` on the final weights, and the reported loss and samples come from
``forward`` itself.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import itertools
import json
import math
import re
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import regex
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hubconv.tokenizers import LLAMA3_PAT_STR, llama3_special_tokens  # noqa: E402
from tests.native import torchtitan_llama3 as tt  # noqa: E402

DEFAULT_OUT = REPO / "examples" / "tiny-llama3-torchtitan"
PY_VERSION = sys.version.split()[0]

# ----------------------------------------------------------------------------- config

#: Meta Llama 3's pre-tokenizer regex (``llama/tokenizer.py``, ``Tokenizer.pat_str``).
PAT_STR = LLAMA3_PAT_STR
#: The first ten Llama 3 special tokens, in Llama 3's order.
SPECIAL_TOKENS = list(llama3_special_tokens())[:10]
NUM_BPE_TOKENS = 512  # 256 byte tokens + 256 merges
BOS_ID = NUM_BPE_TOKENS + SPECIAL_TOKENS.index("<|begin_of_text|>")
EOS_ID = NUM_BPE_TOKENS + SPECIAL_TOKENS.index("<|end_of_text|>")
CORPUS_BYTES = 60_000  # stop adding paragraphs once the corpus reaches this size

ARGS = tt.TitanArgs(
    dim=128,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,  # GQA: 2 query heads per KV head
    vocab_size=NUM_BPE_TOKENS + len(SPECIAL_TOKENS),
    multiple_of=32,  # FFN hidden = 32 * ceil(int(8 * dim / 3) / 32)
    ffn_dim_multiplier=None,
    norm_eps=1e-5,
    rope_theta=500000.0,
    max_seq_len=256,
    rope_scaling=None,  # TorchTitan rope_scaling_args: null (plain RoPE)
    tie_word_embeddings=False,
)

SEED = 0
STEPS = 800
BATCH = 8
SEQ = 256  # tokens per training row, <|begin_of_text|> included (= max_seq_len)
PEAK_LR = 5e-3
WARMUP = 20
ALIGNED_FRACTION = 0.5  # rows that start at a paragraph; the rest start anywhere
MIN_LR_RATIO = 0.1
# TorchTitan's AdamW defaults, except the learning rate.
BETAS, EPS, WEIGHT_DECAY, MAX_NORM = (0.9, 0.95), 1e-8, 0.1, 1.0

SAMPLE_PROMPTS = [
    "An assignment statement evaluates",
    "A class definition",
    "The following methods",
]
SAMPLE_TOKENS = 40

# ----------------------------------------------------------------------------- corpus

_UNDERLINE = re.compile(r"^[*=\-~^+]{3,}\s*$")


def extract_corpus(limit: int = CORPUS_BYTES) -> str:
    """Plain prose paragraphs of CPython's ``pydoc_data.topics``, in topic order, up to ``limit`` bytes."""
    from pydoc_data.topics import topics

    paragraphs: list[str] = []
    size = 0
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name].replace("\r\n", "\n")):
            lines = block.strip("\n").split("\n")
            if any(line[:1].isspace() for line in lines):  # code, grammar, indented lists
                continue
            if any(_UNDERLINE.match(line) for line in lines):  # section headings
                continue
            text = " ".join(" ".join(lines).split())
            if "::=" in text or len(text) < 80 or text.endswith(":"):
                continue
            paragraphs.append(text)
            size += len(text.encode()) + 2
            if size >= limit:
                return "\n\n".join(paragraphs) + "\n"
    return "\n\n".join(paragraphs) + "\n"


def corpus_python_version(out: Path) -> str:
    """The CPython version corpus.txt came from, as recorded at the top of corpus-LICENSE.txt."""
    m = re.search(r"of CPython (\S+)", (out / "corpus-LICENSE.txt").read_text(encoding="utf-8").split("\n", 1)[0])
    return m.group(1) if m else "unknown"


# -------------------------------------------------------------------------- tokenizer

_PAT = regex.compile(PAT_STR)


def pretokenize(text: str) -> list[str]:
    return _PAT.findall(text)


def train_bpe(text: str, num_tokens: int = NUM_BPE_TOKENS) -> dict[bytes, int]:
    """Byte-level BPE: ranks 0-255 are the bytes, then merges in the order they are learned."""
    chunk_counts = collections.Counter(pretokenize(text))
    words = [[bytes([b]) for b in chunk.encode("utf-8")] for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < num_tokens:
        pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for word, freq in zip(words, freqs, strict=True):
            for pair in itertools.pairwise(word):
                pairs[pair] += freq
        if not pairs:
            raise RuntimeError(f"corpus too small for {num_tokens} BPE tokens")
        # Most frequent pair; ties broken by the pair's bytes, so the result is deterministic.
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merged = a + b
        if merged not in ranks:  # the same bytes can be reached by two merge paths
            ranks[merged] = len(ranks)
        for word in words:
            i = 0
            while i < len(word) - 1:
                if word[i] == a and word[i + 1] == b:
                    word[i : i + 2] = [merged]
                i += 1
    return ranks


class Tokenizer:
    """Pure-Python twin of ``tiktoken.Encoding`` for these ranks (same merge rule, same ids)."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int]):
        self.ranks = ranks
        self.special_tokens = special_tokens
        self.decoder = {v: k for k, v in ranks.items()}
        self.decoder.update({v: k.encode() for k, v in special_tokens.items()})
        self._cache: dict[str, list[int]] = {}

    def _encode_piece(self, piece: bytes) -> list[int]:
        if piece in self.ranks:  # tiktoken's whole-piece shortcut
            return [self.ranks[piece]]
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:  # merge the lowest-ranked adjacent pair, leftmost first
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best_i = r, i
            if best_rank is None:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return [self.ranks[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for chunk in pretokenize(text):
            ids = self._cache.get(chunk)
            if ids is None:
                ids = self._cache[chunk] = self._encode_piece(chunk.encode("utf-8"))
            out.extend(ids)
        return out

    def paragraph_starts(self, text: str) -> list[int]:
        """Token offsets in ``encode(text)`` where a paragraph (text after a blank line) begins."""
        starts = {0} | {m.end() for m in re.finditer(r"\n\n", text)}
        out, n = [], 0
        for m in _PAT.finditer(text):
            if m.start() in starts:
                out.append(n)
            n += len(self.encode(m.group()))
        return out

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.decoder[i] for i in ids).decode("utf-8", errors="replace")


def write_tokenizer(tok_dir: Path, ranks: dict[bytes, int], special_tokens: dict[str, int]) -> str:
    tok_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    model_path = tok_dir / "tokenizer.model"
    model_path.write_text("".join(lines), encoding="ascii")
    _write_json(tok_dir / "special_tokens.json", special_tokens)
    sha256 = hashlib.sha256(model_path.read_bytes()).hexdigest()
    _write_json(
        tok_dir / "tokenizer_meta.json",
        {
            "format": "tiktoken",
            "pat_str": PAT_STR,
            "num_bpe_tokens": len(ranks),
            "num_special_tokens": len(special_tokens),
            "vocab_size": len(ranks) + len(special_tokens),
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "tokenizer_model_sha256": sha256,
        },
    )
    return sha256


def check_with_tiktoken(model_path: Path, sha256: str, special_tokens: dict[str, int], corpus: str, ours: list[int]):
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        print("  tiktoken not installed: skipped the tiktoken check")
        return
    enc = tiktoken.Encoding(
        name="tiny-llama3",
        pat_str=PAT_STR,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(model_path), expected_hash=sha256),
        special_tokens=special_tokens,
    )
    ids = enc.encode(corpus)
    assert ids == ours, "tiktoken and the pure-Python BPE disagree on the corpus"
    assert enc.decode(ids) == corpus, "tiktoken does not round-trip the corpus"
    assert enc.n_vocab == ARGS.vocab_size
    bos = enc.encode("<|begin_of_text|>", allowed_special="all")
    assert bos == [BOS_ID], bos
    print(f"  tiktoken {tiktoken.__version__}: loads, encodes the corpus identically and round-trips it")


# ------------------------------------------------------------------------------ model


def init_params(seed: int = SEED) -> dict[str, torch.Tensor]:
    """``random_state_dict`` weights, with RMSNorm weights reset to ones as TorchTitan initializes them."""
    sd = tt.random_state_dict(ARGS, seed=seed)
    for key, value in sd.items():
        if key.endswith("norm.weight"):
            sd[key] = torch.ones_like(value)
    return {k: v.clone().requires_grad_(True) for k, v in sd.items()}


def train_forward(p: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """``tt.forward`` without its ``no_grad``/``detach``: same blocks, same order, so gradients flow."""
    seqlen = tokens.shape[1]
    freqs_cis = tt.precompute_freqs_cis(ARGS.head_dim, seqlen, ARGS.rope_theta, ARGS.rope_scaling)
    h = F.embedding(tokens, p["tok_embeddings.weight"])
    for i in range(ARGS.n_layers):
        lp = f"layers.{i}."
        x = tt._rms_norm(h, p[lp + "attention_norm.weight"], ARGS.norm_eps)
        h = h + tt._attention(x, p, lp + "attention.", ARGS, freqs_cis)
        x = tt._rms_norm(h, p[lp + "ffn_norm.weight"], ARGS.norm_eps)
        gate = F.silu(F.linear(x, p[lp + "feed_forward.w1.weight"]))
        up = F.linear(x, p[lp + "feed_forward.w3.weight"])
        h = h + F.linear(gate * up, p[lp + "feed_forward.w2.weight"])
    h = tt._rms_norm(h, p["norm.weight"], ARGS.norm_eps)
    return F.linear(h, p["output.weight"]).float()


def lr_at(step: int) -> float:
    """Linear warm-up, then cosine decay to ``MIN_LR_RATIO * PEAK_LR``."""
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, STEPS - WARMUP)
    return PEAK_LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(stream: torch.Tensor, doc_starts: list[int]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Rows are <|begin_of_text|> + SEQ - 1 corpus tokens from the start of a random paragraph
    (a paragraph is a document, as in Llama pre-training); the loss covers all SEQ next tokens."""
    params = init_params()
    opt = torch.optim.AdamW(
        list(params.values()), lr=PEAK_LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False
    )
    gen = torch.Generator().manual_seed(SEED + 1)
    bos = torch.full((BATCH, 1), BOS_ID, dtype=torch.long)
    span = torch.arange(SEQ)
    firsts = torch.tensor([i for i in doc_starts if i + SEQ <= len(stream)])
    losses: list[float] = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        aligned = firsts[torch.randint(0, len(firsts), (BATCH,), generator=gen)]
        anywhere = torch.randint(0, len(stream) - SEQ + 1, (BATCH,), generator=gen)
        starts = torch.where(torch.rand(BATCH, generator=gen) < ALIGNED_FRACTION, aligned, anywhere)
        window = stream[starts[:, None] + span]  # [BATCH, SEQ] corpus tokens
        inputs = torch.cat([bos, window[:, :-1]], dim=1)  # every row starts with <|begin_of_text|>
        logits = train_forward(params, inputs)
        loss = F.cross_entropy(logits.reshape(-1, ARGS.vocab_size), window.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == STEPS - 1:
            print(f"  step {step + 1:4d}/{STEPS}  loss {loss.item():.4f}  lr {lr_at(step):.2e}", flush=True)
    return {k: v.detach().clone().contiguous() for k, v in params.items()}, losses


def corpus_loss(sd: dict[str, torch.Tensor], stream: torch.Tensor) -> float:
    """Mean next-token loss over the whole corpus (rows of SEQ tokens after <|begin_of_text|>), reference forward."""
    n = (len(stream) // SEQ) * SEQ
    rows = stream[:n].view(-1, SEQ)
    inputs = torch.cat([torch.full((rows.shape[0], 1), BOS_ID), rows[:, :-1]], dim=1)
    logits = tt.forward(sd, ARGS, inputs)
    return F.cross_entropy(logits.reshape(-1, ARGS.vocab_size), rows.reshape(-1)).item()


def greedy(sd: dict[str, torch.Tensor], ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        logits = tt.forward(sd, ARGS, torch.tensor([ids[-ARGS.max_seq_len :]]))
        ids.append(int(logits[0, -1].argmax()))
    return ids


# ------------------------------------------------------------------------ checkpoint


def save_checkpoint(path: Path, sd: dict[str, torch.Tensor]) -> None:
    """``dcp.save`` of the flat model state dict, as ``tt.save_dcp`` does, with a pinned ``.metadata`` id."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class PinnedIdWriter(dcp.FileSystemWriter):
        # DCP stores the absolute checkpoint path and a random save UUID in .metadata;
        # pin both so the bundled checkpoint is reproducible byte for byte.
        def storage_meta(self) -> StorageMeta:
            return StorageMeta(checkpoint_id=path.name, save_id=f"hubconv-tiny-llama3-{path.name}")

    path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to save in a single process.*")
        dcp.save(dict(sd), storage_writer=PinnedIdWriter(str(path)))


def check_checkpoint(path: Path, sd: dict[str, torch.Tensor], tmp: Path) -> None:
    """Read it back with the reference reader; compare the data file with ``tt.save_dcp``'s."""
    back = tt.read_dcp(path)
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))
    for k, v in sd.items():
        assert back[k].dtype == torch.float32 and torch.equal(back[k], v), k
    ref_dir = tmp / "save_dcp_reference"
    tt.save_dcp(ref_dir, sd)
    ours = sorted(p.name for p in path.iterdir())
    assert ours == sorted(p.name for p in ref_dir.iterdir()), ours
    for name in ours:
        if name != ".metadata":
            assert (path / name).read_bytes() == (ref_dir / name).read_bytes(), name
    shutil.rmtree(ref_dir)


# ---------------------------------------------------------------------------- outputs


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model_args(path: Path) -> None:
    a = ARGS
    fields = [
        ("dim", a.dim, "hidden size (tok_embeddings.weight is [vocab_size, dim])"),
        ("n_layers", a.n_layers, ""),
        ("n_heads", a.n_heads, f"head_dim = dim / n_heads = {a.head_dim}"),
        ("n_kv_heads", a.n_kv_heads, f"grouped-query attention: {a.n_heads // a.kv_heads} query heads per KV head"),
        ("vocab_size", a.vocab_size, f"{NUM_BPE_TOKENS} BPE ranks + {len(SPECIAL_TOKENS)} special tokens"),
        ("multiple_of", a.multiple_of, f"FFN hidden = {a.ffn_hidden}: int(2 * 4 * dim / 3) rounded up to a multiple"),
        ("ffn_dim_multiplier", "null", ""),
        ("norm_eps", "1.0e-05", "RMSNorm epsilon"),
        ("rope_theta", f"{a.rope_theta:.1f}", ""),
        ("rope_scaling_args", "null", "plain RoPE; TorchTitan's default would apply Llama 3.1 scaling"),
        ("max_seq_len", a.max_seq_len, "the model was trained on rows of this length"),
        ("enable_weight_tying", "false", "output.weight is its own matrix"),
        ("attn_type", "sdpa", ""),
        ("attn_mask_type", "causal", ""),
    ]
    tokens = [
        ("bos_token_id", BOS_ID, "<|begin_of_text|>"),
        ("eos_token_id", EOS_ID, "<|end_of_text|>"),
    ]

    def lines(items):
        width = max(len(f"{k}: {v}") for k, v, _ in items) + 2
        return "".join(f"{f'{k}: {v}':<{width}}# {c}\n" if c else f"{k}: {v}\n" for k, v, c in items)

    path.write_text(
        f"# TorchTitan llama3 TransformerModelArgs of step-{STEPS}/, in TorchTitan's own field names.\n"
        "# Written by examples/make_tiny_llama3.py; this is what `hubconv convert --model-args` takes.\n"
        + lines(fields)
        + "# Special-token ids (tokenizer/special_tokens.json). Not TorchTitan model fields: hubconv copies\n"
        "# them into the transformers config and generation config.\n" + lines(tokens),
        encoding="utf-8",
    )


def write_readme(path: Path, info: dict) -> None:
    samples = "\n\n".join(
        f"Prompt `<|begin_of_text|>{s['prompt']}` →\n\n```text\n{s['prompt']}{s['completion']}\n```"
        for s in info["samples"]
    )
    a = ARGS
    path.write_text(
        f"""\
# tiny-llama3-torchtitan

A tiny Llama 3 that was actually trained, saved the way TorchTitan saves it: a
`torch.distributed.checkpoint` (DCP) folder with flattened TorchTitan model FQNs
(`tok_embeddings.weight`, `layers.{{i}}.attention.wq.weight`, ...,
`output.weight`), float32, model only. hubconv's demo converts it to a transformers
`LlamaForCausalLM` folder.

| file | what |
| --- | --- |
| `step-{STEPS}/` | DCP checkpoint after {STEPS} AdamW steps |
| `model_args.yaml` | TorchTitan model args (`--model-args`), with `bos_token_id`/`eos_token_id` |
| `tokenizer/tokenizer.model` | Llama-3-style tiktoken BPE ({NUM_BPE_TOKENS} ranks), trained on the corpus |
| `tokenizer/special_tokens.json` | Llama 3 special tokens, ids {NUM_BPE_TOKENS}-{a.vocab_size - 1} |
| `tokenizer/tokenizer_meta.json` | Llama 3 `pat_str`, sizes, sha256 of `tokenizer.model` |
| `corpus.txt` | the training text ({info["corpus_bytes"]:,} bytes, {info["corpus_tokens"]:,} tokens) |
| `corpus-LICENSE.txt` | the PSF licence that covers `corpus.txt` |

Model: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads, {a.kv_heads} KV heads (GQA), FFN {a.ffn_hidden}
(`multiple_of` {a.multiple_of}), vocab {a.vocab_size}, RMSNorm eps {a.norm_eps:g}, RoPE theta {a.rope_theta:g}
without scaling, max_seq_len {a.max_seq_len}, untied output; {info["n_params"]:,} parameters.

## How it was made

```
python examples/make_tiny_llama3.py
```

The script is deterministic (fixed seeds, one CPU thread) and takes about 1.5 minutes on
CPU. It trains a byte-level BPE on the corpus (split first with Llama 3's pre-tokenizer
regex), then trains the model with TorchTitan's Llama 3 math
(`tests/native/torchtitan_llama3.py`): rows of {SEQ} tokens, `<|begin_of_text|>` then
corpus text that starts at a paragraph ({ALIGNED_FRACTION:.0%} of rows; a paragraph is a
document) or anywhere (the rest), batch {BATCH}, AdamW (lr {PEAK_LR:g}, {WARMUP} warm-up steps, cosine to
{MIN_LR_RATIO:g}x, betas {BETAS}, weight decay {WEIGHT_DECAY}), gradient clipping {MAX_NORM}.

Final training loss (mean of the last 10 steps): **{info["final_train_loss"]:.3f}**;
loss over the whole corpus with the reference forward: **{info["corpus_loss"]:.3f}**
(from {info["initial_loss"]:.2f} at step 1; nats per token).

## Corpus and licence

`corpus.txt` is the first {info["corpus_paragraphs"]} prose paragraphs (topic order;
no code, grammar or headings) of `Lib/pydoc_data/topics.py` from CPython
{info["python_version"]}, the `help()` topic index generated from the Python Language
Reference. The Python documentation is Copyright © 2001-2023 Python Software Foundation;
All Rights Reserved, and is distributed under the PSF License Agreement Version 2,
which permits redistribution provided the PSF copyright notice and licence are retained:
see `corpus-LICENSE.txt` (CPython's `LICENSE.txt`).

## Greedy samples (native model)

Generated with the reference forward (`tests/native/torchtitan_llama3.forward`), greedy,
{SAMPLE_TOKENS} new tokens, decoded with the tiktoken tokenizer:

{samples}

## Loading the tokenizer

```python
import json, tiktoken, tiktoken.load
d = "examples/tiny-llama3-torchtitan/tokenizer"
meta = json.load(open(f"{{d}}/tokenizer_meta.json"))
enc = tiktoken.Encoding(
    name="tiny-llama3",
    pat_str=meta["pat_str"],
    # expected_hash: tiktoken caches local files by path, so a rebuilt file could be served stale
    mergeable_ranks=tiktoken.load.load_tiktoken_bpe(
        f"{{d}}/tokenizer.model", expected_hash=meta["tokenizer_model_sha256"]
    ),
    special_tokens=json.load(open(f"{{d}}/special_tokens.json")),
)
ids = enc.encode("<|begin_of_text|>An assignment statement", allowed_special="all")
```
""",
        encoding="utf-8",
    )


# ------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--fresh-corpus", action="store_true", help="re-extract corpus.txt even if it exists")
    opts = ap.parse_args()

    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # same reductions on every machine, whatever its core count
    torch.use_deterministic_algorithms(True)

    out: Path = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("step-*"):
        shutil.rmtree(stale)
    tmp = out / ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    # 1. corpus
    corpus_path = out / "corpus.txt"
    if opts.fresh_corpus or not corpus_path.exists():
        corpus_path.write_text(extract_corpus(), encoding="utf-8")
        license_src = Path(sysconfig.get_path("stdlib")) / "LICENSE.txt"
        (out / "corpus-LICENSE.txt").write_text(
            f"corpus.txt holds paragraphs extracted from Lib/pydoc_data/topics.py of CPython {PY_VERSION}\n"
            "(the help() topic index generated from the Python documentation), Copyright (c) 2001-2023\n"
            "Python Software Foundation; All Rights Reserved. The Python documentation is licensed under\n"
            "the PSF License Agreement Version 2, reproduced below from that CPython's LICENSE.txt\n"
            "(also at https://docs.python.org/3/license.html).\n\n"
            + (license_src.read_text(encoding="utf-8") if license_src.exists() else ""),
            encoding="utf-8",
        )
        print(f"[corpus] extracted from pydoc_data.topics (Python {PY_VERSION})")
    else:
        print("[corpus] reusing existing corpus.txt (use --fresh-corpus to re-extract)")
    corpus = corpus_path.read_text(encoding="utf-8")
    n_paragraphs = corpus.count("\n\n") + 1
    print(f"  {len(corpus.encode()):,} bytes, {n_paragraphs} paragraphs")

    # 2. tokenizer
    ranks = train_bpe(corpus)
    special = {tok: NUM_BPE_TOKENS + i for i, tok in enumerate(SPECIAL_TOKENS)}
    sha256 = write_tokenizer(out / "tokenizer", ranks, special)
    tok = Tokenizer(ranks, special)
    ids = tok.encode(corpus)
    assert tok.decode(ids) == corpus
    print(
        f"[tokenizer] {len(ranks)} BPE ranks + {len(special)} special tokens; corpus = {len(ids):,} tokens "
        f"({len(corpus.encode()) / len(ids):.2f} bytes/token)"
    )
    check_with_tiktoken(out / "tokenizer" / "tokenizer.model", sha256, special, corpus, ids)

    # 3. train
    stream = torch.tensor(ids, dtype=torch.long)
    n_params = sum(v.numel() for v in tt.random_state_dict(ARGS).values())
    print(f"[train] {n_params:,} params, {STEPS} steps x {BATCH} x {SEQ} tokens")
    t_train = time.perf_counter()
    sd, losses = train(stream, tok.paragraph_starts(corpus))
    print(f"  trained in {time.perf_counter() - t_train:.1f}s")

    with torch.no_grad():  # the training forward *is* the reference forward
        probe = torch.cat([torch.tensor([[BOS_ID]]), stream[None, : SEQ - 1]], dim=1)
        diff = (train_forward(sd, probe) - tt.forward(sd, ARGS, probe)).abs().max().item()
    assert diff <= 1e-5, f"train_forward drifted from the reference forward: {diff}"

    # 4. checkpoint
    step_dir = out / f"step-{STEPS}"
    save_checkpoint(step_dir, sd)
    check_checkpoint(step_dir, sd, tmp)
    sd = {k: v for k, v in tt.read_dcp(step_dir).items() if isinstance(v, torch.Tensor)}
    size = sum(f.stat().st_size for f in step_dir.iterdir())
    print(f"[checkpoint] {step_dir.relative_to(out.parent)}: {size:,} bytes")

    # 5. evaluate with the reference forward on what was saved
    info = {
        "corpus_bytes": len(corpus.encode()),
        "corpus_tokens": len(ids),
        "corpus_paragraphs": n_paragraphs,
        "python_version": corpus_python_version(out),
        "n_params": n_params,
        "initial_loss": losses[0],
        "final_train_loss": sum(losses[-10:]) / 10,
        "corpus_loss": corpus_loss(sd, stream),
        "samples": [],
    }
    for prompt in SAMPLE_PROMPTS:
        prompt_ids = [BOS_ID, *tok.encode(prompt)]
        new = greedy(sd, prompt_ids, SAMPLE_TOKENS)[len(prompt_ids) :]
        info["samples"].append({"prompt": prompt, "completion": tok.decode(new)})
        print(f"[sample] {prompt!r} -> {tok.decode(new)!r}")
    print(f"[loss] final train (last 10 steps) {info['final_train_loss']:.4f}; corpus {info['corpus_loss']:.4f}")

    write_model_args(out / "model_args.yaml")
    write_readme(out / "README.md", info)
    shutil.rmtree(tmp)
    print(f"[done] {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
