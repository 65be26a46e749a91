"""nanoGPT (karpathy/nanoGPT `train.py` checkpoints) -> transformers `GPT2LMHeadModel`.

`--checkpoint` names `ckpt.pt` or the run's `out_dir`. The checkpoint is `{model, optimizer,
model_args, iter_num, best_val_loss, config}`; the configuration comes entirely from `model_args`
(checked against the tensor shapes), so no model-args file is needed. What the conversion does:

- `_orig_mod.` (torch.compile) and `module.` (DDP) key prefixes are stripped, in any combination;
- nanoGPT's `nn.Linear` weights are transposed into GPT-2's `Conv1D` layout (`c_attn`,
  `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`);
- causal-mask buffers (`attn.bias`, `attn.masked_bias`) are dropped with a reason, as are the
  optimizer state, `iter_num`, `best_val_loss` and the training `config`;
- `bias=False` models get zero biases (synthesized: recorded as inexact, although LayerNorm and
  Linear with a zero bias compute exactly what the bias-free layers do);
- GPT2Config with exact GELU (`activation_function: gelu`; GPT-2's own `gelu_new` is a tanh
  approximation and measurably different), `layer_norm_epsilon: 1e-5`, `n_positions = block_size`,
  tied embeddings (`lm_head.weight` dropped as tied after a byte comparison);
- the padded vocabulary (nanoGPT rounds GPT-2's 50257 up to 50304) is trimmed to the tokenizer's
  size, or kept with `keep_padded_vocab: true`; either way it is recorded.

The tokenizer's size comes from a char-level `meta.pkl` when there is one (beside the checkpoint,
or `data/<config.dataset>/meta.pkl` under one of the checkpoint's ancestors or the current
directory, as nanoGPT's `sample.py` looks it up), else from `tokenizer_vocab_size` in the
model-args file, else it is GPT-2's BPE (50257 tokens).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from hubconv import views as V
from hubconv.adapters.base import ConversionPlan
from hubconv.adapters.generic import RuleAdapter
from hubconv.adapters.naming import did_you_mean as _suggest
from hubconv.adapters.naming import strip_wrappers
from hubconv.adapters.registry import register
from hubconv.adapters.rules import Drop, Rule, RuleTable
from hubconv.dtypes import BY_NAME
from hubconv.errors import CheckpointError, MappingError, ModelArgsError
from hubconv.io.checkpoint import Checkpoint, open_checkpoint
from hubconv.io.tensor import LazyTensor

GPT2_BPE_VOCAB = 50257  # GPT-2's BPE vocabulary (tiktoken "gpt2"); nanoGPT pads it to 50304
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
OPTION_FIELDS = ("keep_padded_vocab", "tokenizer_vocab_size", "meta_pkl", "bos_token_id", "eos_token_id")

_DROPS = [
    Drop(r"^optimizer(\.|$)", "optimizer state (training only)"),
    Drop(r"^best_val_loss$", "best validation loss (a training metric)"),
    Drop(r"(^|\.)attn\.bias$", "causal-mask buffer (nanoGPT without flash attention); transformers builds its own"),
    Drop(r"(^|\.)attn\.masked_bias$", "causal-mask fill buffer; transformers builds its own"),
]
_ENTRIES = {
    "model_args": "nanoGPT model hyperparameters: converted into config.json",
    "config": "training configuration (train.py settings): not part of the model",
    "iter_num": "training iteration counter (training only)",
    "best_val_loss": "best validation loss (a training metric)",
}

# nanoGPT's nn.Linear weights are [out, in]; GPT-2's Conv1D stores [in, out].
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# (module, bias width as an expression over the args) for every bias GPT-2 has.
_BIASES = (
    ("ln_1", "n_embd"),
    ("attn.c_attn", "3 * n_embd"),
    ("attn.c_proj", "n_embd"),
    ("ln_2", "n_embd"),
    ("mlp.c_fc", "4 * n_embd"),
    ("mlp.c_proj", "n_embd"),
)


def _shown(path: str) -> str:
    """A path as recorded in hubconv.json: relative to the current directory when inside it."""
    rel = os.path.relpath(os.path.abspath(path))
    return rel if not rel.startswith("..") else os.path.basename(path)


def find_meta(ckpt_path: str, dataset: Any) -> str | None:
    """nanoGPT's char vocabulary for a checkpoint: `meta.pkl` beside it, else `data/<dataset>/meta.pkl` under the
    checkpoint's folder or one of its ancestors (nearest first), else under the current directory (`sample.py`)."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    beside = os.path.join(folder, "meta.pkl")
    if os.path.isfile(beside):
        return beside
    if not isinstance(dataset, str) or not dataset or os.sep in dataset or dataset in (".", ".."):
        return None
    bases, d = [], folder
    while True:
        bases.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    bases.append(os.getcwd())
    for base in bases:
        candidate = os.path.join(base, "data", dataset, "meta.pkl")
        if os.path.isfile(candidate):
            return candidate
    return None


class NanoGPTAdapter(RuleAdapter):
    name = "nanogpt"
    description = "nanoGPT train.py checkpoints (ckpt.pt or out_dir; compiled/DDP prefixes, char or GPT-2 BPE vocab)"
    families = ("gpt",)
    model_types = ("gpt2",)
    model_type = "gpt2"
    layer_count_arg = "n_layer"
    tied_pair = ("transformer.wte.weight", "lm_head.weight")

    # ---- opening and detection ----------------------------------------------------------------
    def plan(self, ckpt: Checkpoint, family: str, user_args: Mapping[str, Any]) -> ConversionPlan:
        plan = super().plan(ckpt, family, user_args)
        if plan.native_args.get("tokenizer", {}).get("kind") == "char":  # offer the meta.pkl as the tokenizer
            meta = self._meta_path(ckpt, user_args)
            plan.tokenizer = os.path.abspath(meta) if meta else None
        return plan

    @staticmethod
    def _meta_path(ckpt: Checkpoint, user: Mapping[str, Any]) -> str | None:
        """The char vocabulary: `meta_pkl` from the model args (False: none), else the one nanoGPT's sample.py finds."""
        meta = user.get("meta_pkl")
        if meta is None or meta is True:
            config = ckpt.values.get("config")
            return find_meta(ckpt.path, config.get("dataset") if isinstance(config, Mapping) else None)
        if meta is False:
            return None
        if not os.path.isfile(str(meta)):
            raise ModelArgsError(f"--model-args meta_pkl: {meta}: no such file")
        return str(meta)

    def open(self, path: str) -> Checkpoint:
        """`ckpt.pt`, or nanoGPT's `out_dir` holding it."""
        if os.path.isdir(path):
            candidate = os.path.join(path, "ckpt.pt")
            if not os.path.isfile(candidate):
                raise CheckpointError(f"{path}: no ckpt.pt in this folder (expected nanoGPT's out_dir or its ckpt.pt)")
            path = candidate
        return open_checkpoint(path)

    def detect_family(self, ckpt: Checkpoint) -> str:
        tensors = self.model_tensors(ckpt)
        if "transformer.wte.weight" in tensors and "transformer.wpe.weight" in tensors:
            return "gpt"
        sample = ", ".join(sorted(tensors)[:5]) or "(no tensors)"
        raise MappingError(
            f"{ckpt.path}: not a nanoGPT checkpoint (expected model.transformer.wte.weight and "
            f"model.transformer.wpe.weight); found keys like: {sample}"
        )

    def load_args(self, value: str | Mapping[str, Any] | None) -> dict[str, Any]:
        args = super().load_args(value)
        known = ARCH_FIELDS + OPTION_FIELDS
        for k in args:
            if k not in known:
                hint = _suggest(k, known)
                raise ModelArgsError(f"--model-args: unknown field {k!r}{hint}; known: {', '.join(known)}")
        return args

    def model_tensors(self, ckpt: Checkpoint) -> dict[str, LazyTensor]:
        """`model.*` tensors without wrapper prefixes; other tensors (optimizer, best_val_loss) as they are."""
        nested = any(k.startswith("model.") for k in ckpt.tensors)
        out: dict[str, LazyTensor] = {}
        origin: dict[str, str] = {}
        for key, t in ckpt.tensors.items():
            name = key
            if not nested or key.startswith("model."):
                name = strip_wrappers(key.removeprefix("model.") if nested else key)
            if name in origin:
                raise MappingError(
                    f"{ckpt.path}: {origin[name]!r} and {key!r} are both {name!r} once prefixes are removed"
                )
            origin[name] = key
            out[name] = t
        return out

    # ---- hyperparameters ------------------------------------------------------------------------
    def resolve_args(
        self, ckpt: Checkpoint, tensors: Mapping[str, LazyTensor], user: Mapping[str, Any]
    ) -> dict[str, Any]:
        where = ckpt.path
        saved = ckpt.values.get("model_args")
        saved = dict(saved) if isinstance(saved, Mapping) else {}

        def shape(key: str) -> tuple[int, ...]:
            if key not in tensors:
                raise MappingError(f"{where}: missing tensor model.{key}")
            return tuple(tensors[key].shape)

        vocab, n_embd = shape("transformer.wte.weight")
        block_size = shape("transformer.wpe.weight")[0]
        layers = {int(m.group(1)) for k in tensors if (m := re.match(r"^transformer\.h\.(\d+)\.", k))}
        measured = {
            "vocab_size": (vocab, "transformer.wte.weight rows"),
            "n_embd": (n_embd, "transformer.wte.weight columns"),
            "block_size": (block_size, "transformer.wpe.weight rows"),
            "bias": ("transformer.ln_f.bias" in tensors, "transformer.ln_f.bias present"),
        }
        a: dict[str, Any] = {}
        for f in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"):
            value = saved.get(f)
            if f in user and user[f] is not None:
                if value is not None and user[f] != value:
                    raise ModelArgsError(
                        f"--model-args {f}={user[f]!r} contradicts the checkpoint's model_args {f}={value!r}"
                    )
                value = user[f]
            if f in measured:
                got, how = measured[f]
                if value is not None and value != got:
                    raise ModelArgsError(
                        f"{where}: model_args {f}={value!r} contradicts the tensors: {how} gives {got!r}"
                    )
                value = got
            if f == "n_layer":
                top = max(layers) + 1 if layers else 0
                if value is None:
                    value = top
                elif top > value:
                    raise MappingError(f"{where}: model.transformer.h.{top - 1} is beyond model_args n_layer={value}")
                if not value:
                    raise MappingError(f"{where}: no transformer.h.N layers")
            if value is None:
                raise ModelArgsError(
                    f"{where}: {f} is not in the checkpoint's model_args and cannot be read from the shapes; "
                    "state it in --model-args"
                )
            a[f] = value
        for f in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if isinstance(a[f], bool) or not isinstance(a[f], int) or a[f] <= 0:
                raise ModelArgsError(f"{where}: model_args {f}={a[f]!r} is not a positive integer")
        if a["n_embd"] % a["n_head"]:
            raise ModelArgsError(f"{where}: n_embd={a['n_embd']} is not a multiple of n_head={a['n_head']}")
        a["bias"] = bool(a["bias"])
        a["dtype"] = tensors["transformer.wte.weight"].dtype.name
        a["tie_word_embeddings"] = True
        a.update(self._vocab(ckpt, user, vocab))
        for k in ("bos_token_id", "eos_token_id"):
            if user.get(k) is not None:
                a[k] = user[k]
        return a

    def _vocab(self, ckpt: Checkpoint, user: Mapping[str, Any], rows: int) -> dict[str, Any]:
        """The tokenizer behind the embedding rows, and how many rows the HF model keeps."""
        where = ckpt.path
        tok: dict[str, Any]
        stated = user.get("tokenizer_vocab_size")
        meta = self._meta_path(ckpt, user)
        if stated is not None:
            if isinstance(stated, bool) or not isinstance(stated, int) or stated <= 0:
                raise ModelArgsError(f"--model-args tokenizer_vocab_size={stated!r} is not a positive integer")
            tok = {"kind": "stated in --model-args", "vocab_size": stated}
        elif meta:
            from hubconv.tokenizers import load_char_meta

            tok = {"kind": "char", "meta_pkl": _shown(str(meta)), "vocab_size": len(load_char_meta(str(meta)))}
        elif rows >= GPT2_BPE_VOCAB:
            tok = {"kind": "gpt2-bpe", "vocab_size": GPT2_BPE_VOCAB}
        else:
            tok = {"kind": "unknown (no meta.pkl)", "vocab_size": rows}
        if tok["vocab_size"] > rows:
            raise MappingError(
                f"{where}: the tokenizer ({tok['kind']}) has {tok['vocab_size']} tokens but "
                f"transformer.wte.weight only {rows} rows"
            )
        keep = bool(user.get("keep_padded_vocab", False))
        out: dict[str, Any] = {
            "tokenizer": tok,
            "keep_padded_vocab": keep,
            "hf_vocab_size": rows if keep else tok["vocab_size"],
        }
        if tok["kind"] == "gpt2-bpe":  # <|endoftext|> is GPT-2's only special token, both BOS and EOS
            out["bos_token_id"] = out["eos_token_id"] = GPT2_BPE_VOCAB - 1
        return out

    # ---- tables and configs ----------------------------------------------------------------------
    def table(self, args: Mapping[str, Any]) -> RuleTable:
        h = "transformer.h.{i}."
        wte_ops = [] if args["hf_vocab_size"] == args["vocab_size"] else [("slice_rows", {"stop": "hf_vocab_size"})]
        rules = [
            Rule("transformer.wte.weight", "transformer.wte.weight", ops=wte_ops),
            Rule("transformer.wpe.weight", "transformer.wpe.weight"),
        ]
        for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            ops = [("transpose", {})] if module in _CONV1D else []
            rules.append(Rule(f"{h}{module}.weight", f"{h}{module}.weight", ops=ops))
        rules.append(Rule("transformer.ln_f.weight", "transformer.ln_f.weight"))
        for module, width in (*_BIASES, ("ln_f", "n_embd")):
            name = f"transformer.{module}.bias" if module == "ln_f" else f"{h}{module}.bias"
            if args["bias"]:
                rules.append(Rule(name, name))
            else:
                zeros = [("zeros", {"shape": [width], "dtype": args["dtype"]})]
                counts = {} if module == "ln_f" else {"i": "n_layer"}
                rules.append(Rule({}, name, ops=zeros, counts=counts, label=f"zero bias {name} (bias=False model)"))
        return RuleTable(rules, _DROPS)

    def hf_config(self, a: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "vocab_size": a["hf_vocab_size"],
            "n_positions": a["block_size"],
            "n_embd": a["n_embd"],
            "n_layer": a["n_layer"],
            "n_head": a["n_head"],
            "n_inner": None,  # 4 * n_embd, as nanoGPT's MLP
            "activation_function": "gelu",  # exact erf GELU (nn.GELU()); "gelu_new" would be the tanh approximation
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
            "bos_token_id": a.get("bos_token_id"),
            "eos_token_id": a.get("eos_token_id"),
        }

    def entry_reason(self, entry: str) -> str | None:
        if entry == "optimizer" or entry.startswith("optimizer."):
            return "optimizer state (training only)"
        return _ENTRIES.get(entry)

    def native_shapes(self, args: Mapping[str, Any]) -> dict[str, LazyTensor]:
        """Shape-only native tensors (what `from_hf` plans against), without the tied lm_head."""
        dt = BY_NAME[args.get("dtype", "F32")]
        c, layers = args["n_embd"], args["n_layer"]
        shapes: dict[str, tuple[int, ...]] = {
            "transformer.wte.weight": (args["vocab_size"], c),
            "transformer.wpe.weight": (args["block_size"], c),
        }
        widths = {"ln_1": c, "attn.c_attn": 3 * c, "attn.c_proj": c, "ln_2": c, "mlp.c_fc": 4 * c, "mlp.c_proj": c}
        fan_in = {"attn.c_attn": c, "attn.c_proj": c, "mlp.c_fc": c, "mlp.c_proj": 4 * c}
        for i in range(layers):
            for module, width in widths.items():
                p = f"transformer.h.{i}.{module}"
                shapes[f"{p}.weight"] = (width, fan_in[module]) if module in fan_in else (width,)
                if args["bias"]:
                    shapes[f"{p}.bias"] = (width,)
        shapes["transformer.ln_f.weight"] = (c,)
        if args["bias"]:
            shapes["transformer.ln_f.bias"] = (c,)
        return {k: V.Zeros(k, dt, s) for k, s in shapes.items()}

    # ---- parity ----------------------------------------------------------------------------------
    def reference_logits(
        self, ckpt: Checkpoint, native_args: Mapping[str, Any], tokens: Any, positions: Any = None
    ) -> Any:
        from hubconv.native.nanogpt import reference_logits

        return reference_logits(self.model_tensors(ckpt), native_args, tokens, positions)


register(NanoGPTAdapter())
