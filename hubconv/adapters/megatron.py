"""Megatron-LM and NeMo GPT checkpoints -> transformers GPT-2, Llama or Qwen2, without Megatron, NeMo or Apex.

`--adapter megatron` (alias `nemo`); `--checkpoint` names a Megatron save folder (tracker file and
`iter_*` folders), one iteration folder, a megatron-core `torch_dist` iteration folder, a NeMo `.nemo`
archive or a NeMo Lightning `.ckpt`. Tensors are read in place (rank files, tar members, `.distcp`
records) and un-sharded as lazy views (`megatron_source`, `megatron_layouts`): tensor-parallel ranks
concatenated by layout, replicated tensors checked equal, pipeline stages renumbered, fused QKV split by
`checkpoint_version` and query groups, SwiGLU fc1 split into gate and up per rank.

Hyperparameters come from the saved Megatron `args` or NeMo config (`megatron_args`), checked against the
tensor shapes; `--model-args` overrides any of them in Megatron's names, plus:

- `vocab_size`: the true vocabulary (the embedding rows are padded to a multiple of
  `make_vocab_size_divisible_by × TP`); `tokenizer_model`: a SentencePiece model or HF tokenizer whose size
  gives it; `keep_padded_vocab: true` keeps the padded rows. Without these, the size comes from the `.nemo`
  archive's SentencePiece model, or Megatron's GPT-2 BPE tokenizer (50257); otherwise the padded rows are
  kept and the card says so. A trim is recorded as lossy.
- `bos_token_id`, `eos_token_id`.

Targets: learned absolute positions + LayerNorm + GELU (exact, or tanh with bias-GELU fusion) →
`GPT2LMHeadModel` (Conv1D transposes; zero biases synthesized for bias-free models; a SentencePiece
tokenizer makes it GPT-SW3: `tokenizer_class: GPTSw3Tokenizer`); rotary + RMSNorm + SwiGLU (GQA,
linear / Llama 3.1 rope scaling) → `LlamaForCausalLM`, or `Qwen2ForCausalLM` with biases on q/k/v only.
Everything else is refused by name (`megatron_args.REFUSED`, `choose_target`).

Parity runs Megatron's forward rank by rank on the native tensors (`hubconv.native.megatron_gpt`).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubconv import views as V
from hubconv.adapters import megatron_args as MA
from hubconv.adapters.base import ConversionPlan
from hubconv.adapters.generic import RuleAdapter
from hubconv.adapters.megatron_layouts import Attention, Merged, padded_vocab_size
from hubconv.adapters.megatron_source import RankModels, entry_reason, merged, rank_models, saved_config
from hubconv.adapters.registry import register
from hubconv.adapters.rules import Rule, RuleTable
from hubconv.dtypes import BY_NAME
from hubconv.errors import CheckpointError, HubconvError, MappingError, ModelArgsError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import LazyTensor

GPT2_BPE_VOCAB = 50257  # Megatron's GPT2BPETokenizer (GPT-2's vocab.json + <|endoftext|>)
MAX_TOKENIZER_BYTES = 64 << 20
L = "decoder.layers.{i}."
EMB, HEAD = "embedding.word_embeddings.weight", "output_layer.weight"


@dataclass
class _Prepared:
    models: RankModels
    merged: Merged
    args: dict[str, Any]
    tokenizer: str | None


# ---------------------------------------------------------------------------------------------- vocabulary


def tokenizer_vocab_size(path: str) -> int:
    """Token count of a SentencePiece `.model`, or of an HF tokenizer (`tokenizer.json` or its folder)."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if os.path.isdir(path) and not os.path.isfile(file):
        spm = os.path.join(path, "tokenizer.model")
        if os.path.isfile(spm):
            file = spm
    if not os.path.isfile(file):
        raise ModelArgsError(f"tokenizer_model: {path}: no such file (a SentencePiece .model or tokenizer.json)")
    if os.path.getsize(file) > MAX_TOKENIZER_BYTES:
        raise ModelArgsError(f"tokenizer_model: {file}: larger than {MAX_TOKENIZER_BYTES >> 20} MiB")
    if file.endswith(".json"):
        try:
            with open(file, "rb") as f:
                doc = json.load(f)
            vocab = doc["model"]["vocab"]
            ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
            ids += [t["id"] for t in doc.get("added_tokens") or []]
            return max(ids) + 1
        except (ValueError, KeyError, TypeError) as e:
            raise ModelArgsError(f"tokenizer_model: {file}: not a tokenizers JSON file ({e})") from None
    from hubconv.tokenizers import _parse_spm

    try:
        return len(_parse_spm(Path(file)).pieces)
    except HubconvError as e:
        raise ModelArgsError(f"tokenizer_model: {e}") from None


_EXTRACTED: list[str] = []


def _extract_member(ckpt: Checkpoint, member: str) -> str:
    """A tokenizer member of a `.nemo` archive, copied (bounded) to a private temp file kept until exit."""
    from hubconv.io.tar_members import read_member, tar_index

    members = tar_index(ckpt.path)
    if member not in members:
        raise CheckpointError(f"{ckpt.path}: the config names tokenizer nemo:{member}, but the archive lacks it")
    data = read_member(ckpt.path, members[member], MAX_TOKENIZER_BYTES)
    if not _EXTRACTED:
        _EXTRACTED.append(tempfile.mkdtemp(prefix="hubconv-nemo-tokenizer-"))
        atexit.register(shutil.rmtree, _EXTRACTED[0], True)
    out = os.path.join(_EXTRACTED[0], os.path.basename(member).split("_", 1)[-1] or "tokenizer.model")
    with open(out, "wb") as f:
        f.write(data)
    return out


def _vocab(
    ckpt: Checkpoint, a: dict[str, Any], user: Mapping[str, Any], rows: int
) -> tuple[dict[str, Any], str | None]:
    """(vocabulary fields, a tokenizer found with the checkpoint)."""
    where, found = ckpt.path, None
    tok: dict[str, Any] = {}
    if user.get("vocab_size") is not None:
        tok = {"kind": "stated in --model-args", "vocab_size": user["vocab_size"]}
    elif user.get("tokenizer_model"):
        found = str(user["tokenizer_model"])
        tok = {"kind": "tokenizer_model", "vocab_size": tokenizer_vocab_size(found)}
    else:
        member = a.get("tokenizer_member")
        if ckpt.format == "nemo" and isinstance(member, str) and member.startswith("nemo:"):
            found = _extract_member(ckpt, member.removeprefix("nemo:"))
            tok = {"kind": "SentencePiece model in the .nemo archive", "vocab_size": tokenizer_vocab_size(found)}
        elif a.get("tokenizer_type") == "GPT2BPETokenizer":
            tok = {"kind": "Megatron GPT2BPETokenizer", "vocab_size": GPT2_BPE_VOCAB}
        elif isinstance(a.get("saved_vocab_size"), int):
            tok = {"kind": "saved args.vocab_size", "vocab_size": a["saved_vocab_size"]}
    size = tok.get("vocab_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ModelArgsError(f"{where}: vocabulary size {size!r} ({tok['kind']}) is not a positive integer")
    if size is not None and size > rows:
        raise ModelArgsError(f"{where}: the vocabulary ({tok['kind']}) has {size} tokens but the embedding {rows} rows")
    divisible, tp = a.get("make_vocab_size_divisible_by"), a.get("tensor_model_parallel_size") or 1
    if size is not None and isinstance(divisible, int) and not user.get("keep_padded_vocab"):
        want = padded_vocab_size(size, divisible, tp)
        if want != rows:
            raise ModelArgsError(
                f"{where}: a vocabulary of {size} ({tok['kind']}) pads to {want} rows (multiple of {divisible} x TP "
                f"{tp}), but {EMB} has {rows}; give the right vocab_size, or keep_padded_vocab: true"
            )
    keep = bool(user.get("keep_padded_vocab")) or size is None
    out = {
        "padded_vocab_size": rows,
        "vocab_size": size,
        "tokenizer": tok or {"kind": "unknown", "vocab_size": None},
        "keep_padded_vocab": keep,
        "hf_vocab_size": rows if keep else size,
    }
    if tok.get("kind") == "Megatron GPT2BPETokenizer":
        out["bos_token_id"] = out["eos_token_id"] = GPT2_BPE_VOCAB - 1  # <|endoftext|>
    return out, found


# ----------------------------------------------------------------------------------------- the adapter


class MegatronAdapter(RuleAdapter):
    name = "megatron"
    description = "Megatron-LM legacy / torch_dist and NeMo .nemo / .ckpt GPT checkpoints (TP/PP merged; no Megatron)"
    families = ("gpt",)
    model_types = ("gpt2", "llama", "qwen2")
    layer_count_arg = "num_layers"
    tied_pair = (EMB, HEAD)

    def detect_family(self, ckpt: Checkpoint) -> str:
        models = rank_models(ckpt)
        if not any(EMB in s for s in models.shards.values()):
            raise MappingError(f"{ckpt.path}: no {EMB} on any rank: not a Megatron / NeMo GPT checkpoint")
        return "gpt"

    def load_args(self, value: str | Mapping[str, Any] | None) -> dict[str, Any]:
        args = super().load_args(value)
        MA.check_user_fields(args)
        return args

    # ---- preparation: rank models, args, merge -----------------------------------------------------
    def prepare(self, ckpt: Checkpoint, user: Mapping[str, Any]) -> _Prepared:
        cached = getattr(ckpt, "_hubconv_megatron", None)
        if cached is not None:
            return cached
        where = ckpt.path
        models = rank_models(ckpt)
        kind, saved = saved_config(ckpt)
        base = MA.from_nemo(saved) if kind == "nemo" else MA.from_megatron(saved)
        if kind == "megatron":
            version = ckpt.values.get("checkpoint_version")
            base["checkpoint_version"] = float(version) if isinstance(version, int | float) else 0.0
        if ckpt.format == "torch" and (base.get("tensor_model_parallel_size") or 1) > 1:
            raise CheckpointError(
                f"{where}: this .ckpt is one rank of a tensor-parallel {base['tensor_model_parallel_size']} model; "
                "convert the .nemo archive (or all ranks) instead"
            )
        a = dict(base)
        for k, v in user.items():
            if k in MA.ARCH_FIELDS and v is not None:
                a[k] = v
        a["config_source"] = {"megatron": "Megatron args", "nemo": "NeMo model config"}[kind] if saved else "none"
        heads, hidden = a.get("num_attention_heads"), a.get("hidden_size")
        if a.get("kv_channels") is None and isinstance(heads, int) and isinstance(hidden, int) and heads:
            a["kv_channels"] = hidden // heads
        if a.get("num_query_groups") is None:
            a["num_query_groups"] = heads
        for f in ("num_attention_heads", "num_query_groups", "kv_channels", "activation", "checkpoint_version"):
            if a.get(f) is None:
                raise ModelArgsError(
                    f"{where}: {f} is not in the checkpoint's saved configuration; state it in --model-args"
                )
        MA.refuse_unsupported(a, where)
        att = Attention(
            int(a["num_attention_heads"]),
            int(a["num_query_groups"]),
            int(a["kv_channels"]),
            float(a["checkpoint_version"]),
        )
        merged_model = merged(models, att, a["activation"] == "swiglu", a.get("num_layers"))
        tensors = merged_model.tensors
        self._check_shapes(where, a, tensors)
        MA.refuse_unsupported(a, where)  # again, now that the tensors settled what the config left open
        vocab, found = _vocab(ckpt, a, user, tensors[EMB].shape[0])
        a.update(vocab)
        for k in ("bos_token_id", "eos_token_id"):
            if user.get(k) is not None:
                a[k] = user[k]
        a["target"] = MA.choose_target(a, where)
        sentencepiece = (
            (found or "").endswith(".model")
            or str(a.get("tokenizer_library") or "").lower() == "sentencepiece"
            or a.get("tokenizer_type") in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")
        )
        a["gpt_sw3_tokenizer"] = a["target"] == "gpt2" and sentencepiece  # GPT-SW3: GPT-2 + SentencePiece
        a["naming"], a["tensor_parallel"], a["pipeline_parallel"] = models.naming, models.tp, models.pp
        a["virtual_pipeline"], a["torch_dist"] = models.vp, models.stacked
        a["dtype"] = tensors[EMB].dtype.name
        for k in ("tokenizer_member", "tokenizer_library"):
            a.pop(k, None)
        if models.inv_freq is not None and a["position_embedding_type"] == "rope":
            from hubconv.native.megatron_gpt import check_inv_freq

            check_inv_freq(models.inv_freq, a, where)
        prepared = _Prepared(models, merged_model, a, found)
        ckpt._hubconv_megatron = prepared  # type: ignore[attr-defined]
        return prepared

    @staticmethod
    def _check_shapes(where: str, a: dict[str, Any], t: Mapping[str, LazyTensor]) -> None:
        """The configuration agrees with the tensors; facts only the tensors know are taken from them."""
        if EMB not in t:
            raise MappingError(f"{where}: no {EMB}")
        hidden = t[EMB].shape[1]
        if a.get("hidden_size") not in (None, hidden):
            raise ModelArgsError(f"{where}: hidden_size {a['hidden_size']} but {EMB} has {hidden} columns")
        a["hidden_size"] = hidden
        layers = {int(k.split(".")[2]) for k in t if k.startswith("decoder.layers.")}
        if not layers:
            raise MappingError(f"{where}: no decoder layers")
        a["num_layers"] = a.get("num_layers") or len(layers)
        fc2 = t.get("decoder.layers.0.mlp.linear_fc2.weight")
        if fc2 is not None:
            if a.get("ffn_hidden_size") not in (None, fc2.shape[1]):
                raise ModelArgsError(
                    f"{where}: ffn_hidden_size {a['ffn_hidden_size']} but linear_fc2 has {fc2.shape[1]} columns"
                )
            a["ffn_hidden_size"] = fc2.shape[1]
        has = lambda k: f"decoder.layers.0.{k}" in t  # noqa: E731
        a["add_qkv_bias"] = has("self_attention.linear_q.bias")
        a["add_bias_linear"] = has("self_attention.linear_proj.bias")
        layernorm = has("input_layernorm.bias")
        if layernorm != (a["normalization"] == "LayerNorm"):
            raise ModelArgsError(
                f"{where}: normalization {a['normalization']} but input_layernorm "
                f"{'has' if layernorm else 'has no'} bias"
            )
        learned = "embedding.position_embeddings.weight" in t
        if a["position_embedding_type"] is None:  # not stated (or not readable): the tensors tell
            a["position_embedding_type"] = "learned_absolute" if learned else "rope"
        if learned != (a["position_embedding_type"] == "learned_absolute"):
            raise ModelArgsError(
                f"{where}: position_embedding_type {a['position_embedding_type']} but the checkpoint "
                f"{'has' if learned else 'has no'} learned position embeddings"
            )
        if learned:
            rows = t["embedding.position_embeddings.weight"].shape[0]
            if a.get("max_position_embeddings") not in (None, rows):
                raise ModelArgsError(
                    f"{where}: max_position_embeddings {a['max_position_embeddings']} but the position "
                    f"embeddings have {rows} rows"
                )
            a["max_position_embeddings"] = rows
        if a.get("max_position_embeddings") is None:
            raise ModelArgsError(f"{where}: max_position_embeddings is unknown; state it in --model-args")
        if HEAD not in t and not a["tie_word_embeddings"]:
            raise MappingError(f"{where}: untied output layer, but no {HEAD} in the checkpoint")

    # ---- RuleAdapter hooks -------------------------------------------------------------------------
    def plan(self, ckpt: Checkpoint, family: str, user_args: Mapping[str, Any]) -> ConversionPlan:
        prepared = self.prepare(ckpt, user_args)
        plan = super().plan(ckpt, family, user_args)
        plan.model_type = prepared.args["target"]
        plan.dropped.update(prepared.models.dropped)
        plan.dropped.update({k: entry_reason(k) or "not a parameter" for k in prepared.merged.dropped})
        plan.tokenizer = prepared.tokenizer
        a = prepared.args
        if a["keep_padded_vocab"]:
            why = "kept as asked" if a["vocab_size"] else "the true vocabulary size is unknown"
            reason = (
                f"{a['padded_vocab_size']} padded vocabulary rows kept ({why}; give vocab_size or tokenizer_model "
                "in --model-args to trim them)"
            )
            for t in plan.targets:
                if t.name in ("transformer.wte.weight", "model.embed_tokens.weight", "lm_head.weight"):
                    plan.lossy.setdefault(t.name, reason)
        return plan

    def model_tensors(self, ckpt: Checkpoint) -> dict[str, LazyTensor]:
        return dict(self.prepare(ckpt, {}).merged.tensors)

    def resolve_args(
        self, ckpt: Checkpoint, tensors: Mapping[str, LazyTensor], user: Mapping[str, Any]
    ) -> dict[str, Any]:
        return self.prepare(ckpt, user).args

    def entry_reason(self, entry: str) -> str | None:
        return entry_reason(entry)

    # ---- tables ------------------------------------------------------------------------------------
    def table(self, a: Mapping[str, Any]) -> RuleTable:
        return RuleTable(_gpt2_rules(a) if a["target"] == "gpt2" else _llama_rules(a))

    def hf_config(self, a: Mapping[str, Any]) -> dict[str, Any]:
        common = {"bos_token_id": a.get("bos_token_id"), "eos_token_id": a.get("eos_token_id")}
        if a["target"] == "gpt2":
            return {
                **common,
                "vocab_size": a["hf_vocab_size"],
                "n_positions": a["max_position_embeddings"],
                "n_embd": a["hidden_size"],
                "n_layer": a["num_layers"],
                "n_head": a["num_attention_heads"],
                "n_inner": a["ffn_hidden_size"],
                "activation_function": "gelu_pytorch_tanh" if a["activation"] == "gelu_tanh" else "gelu",
                "layer_norm_epsilon": a["norm_epsilon"],
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                "scale_attn_weights": True,
                "tie_word_embeddings": a["tie_word_embeddings"],
                **({"tokenizer_class": "GPTSw3Tokenizer"} if a.get("gpt_sw3_tokenizer") else {}),
            }
        config = {
            **common,
            "vocab_size": a["hf_vocab_size"],
            "hidden_size": a["hidden_size"],
            "intermediate_size": a["ffn_hidden_size"],
            "num_hidden_layers": a["num_layers"],
            "num_attention_heads": a["num_attention_heads"],
            "num_key_value_heads": a["num_query_groups"],
            "head_dim": a["kv_channels"],
            "max_position_embeddings": a["max_position_embeddings"],
            "rms_norm_eps": a["norm_epsilon"],
            "rope_parameters": MA.rope_parameters(a),
            "hidden_act": "silu",
            "tie_word_embeddings": a["tie_word_embeddings"],
        }
        if a["target"] == "llama":
            config.update(attention_bias=a["add_bias_linear"], mlp_bias=a["add_bias_linear"])
        else:
            config.update(use_sliding_window=False)
        return config

    def generation_config(self, a: Mapping[str, Any]) -> dict[str, Any]:
        return {k: a.get(k) for k in ("bos_token_id", "eos_token_id")}

    def native_shapes(self, a: Mapping[str, Any]) -> dict[str, LazyTensor]:
        """Shape-only global tensors in the merged canonical naming (what `from_hf` plans against)."""
        dt = BY_NAME[a.get("dtype", "F32")]
        h, f, hn = a["hidden_size"], a["ffn_hidden_size"], a["kv_channels"]
        q, kv = a["num_attention_heads"] * hn, a["num_query_groups"] * hn
        layernorm = a["normalization"] == "LayerNorm"
        shapes: dict[str, tuple[int, ...]] = {EMB: (a["padded_vocab_size"], h)}
        if a["position_embedding_type"] == "learned_absolute":
            shapes["embedding.position_embeddings.weight"] = (a["max_position_embeddings"], h)
        for i in range(a["num_layers"]):
            p = f"decoder.layers.{i}."
            parts = {"linear_q": q, "linear_k": kv, "linear_v": kv}
            for n, rows in parts.items():
                shapes[f"{p}self_attention.{n}.weight"] = (rows, h)
                if a["add_qkv_bias"]:
                    shapes[f"{p}self_attention.{n}.bias"] = (rows,)
            shapes[f"{p}self_attention.linear_proj.weight"] = (h, q)
            fc1 = ["linear_fc1_gate", "linear_fc1_up"] if a["activation"] == "swiglu" else ["linear_fc1"]
            for n in fc1:
                shapes[f"{p}mlp.{n}.weight"] = (f, h)
            shapes[f"{p}mlp.linear_fc2.weight"] = (h, f)
            if a["add_bias_linear"]:
                shapes[f"{p}self_attention.linear_proj.bias"] = (h,)
                shapes.update({f"{p}mlp.{n}.bias": (f,) for n in fc1})
                shapes[f"{p}mlp.linear_fc2.bias"] = (h,)
            for n in ("input_layernorm", "pre_mlp_layernorm"):
                shapes[f"{p}{n}.weight"] = (h,)
                if layernorm:
                    shapes[f"{p}{n}.bias"] = (h,)
        shapes["decoder.final_layernorm.weight"] = (h,)
        if layernorm:
            shapes["decoder.final_layernorm.bias"] = (h,)
        if not a["tie_word_embeddings"]:
            shapes[HEAD] = (a["padded_vocab_size"], h)
        return {k: V.Zeros(k, dt, s) for k, s in shapes.items()}

    # ---- parity ------------------------------------------------------------------------------------
    def reference_logits(
        self, ckpt: Checkpoint, native_args: Mapping[str, Any], tokens: Any, positions: Any = None
    ) -> Any:
        from hubconv.native.megatron_gpt import reference_logits

        return reference_logits(rank_models(ckpt), native_args, tokens, positions)


def _vocab_ops(a: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [] if a["keep_padded_vocab"] else [("slice_rows", {"stop": "hf_vocab_size"})]


def _gpt2_rules(a: Mapping[str, Any]) -> list[Rule]:
    h = "transformer.h.{i}."
    t = [("transpose", {})]
    rules = [
        Rule(EMB, "transformer.wte.weight", ops=_vocab_ops(a)),
        Rule("embedding.position_embeddings.weight", "transformer.wpe.weight"),
        Rule(L + "input_layernorm.weight", h + "ln_1.weight"),
        Rule(L + "input_layernorm.bias", h + "ln_1.bias"),
        Rule(
            {
                "q": L + "self_attention.linear_q.weight",
                "k": L + "self_attention.linear_k.weight",
                "v": L + "self_attention.linear_v.weight",
            },
            h + "attn.c_attn.weight",
            ops=[("concat_rows", {}), *t],
        ),
        Rule(L + "self_attention.linear_proj.weight", h + "attn.c_proj.weight", ops=t),
        Rule(L + "pre_mlp_layernorm.weight", h + "ln_2.weight"),
        Rule(L + "pre_mlp_layernorm.bias", h + "ln_2.bias"),
        Rule(L + "mlp.linear_fc1.weight", h + "mlp.c_fc.weight", ops=t),
        Rule(L + "mlp.linear_fc2.weight", h + "mlp.c_proj.weight", ops=t),
        Rule("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
        Rule("decoder.final_layernorm.bias", "transformer.ln_f.bias"),
        Rule(HEAD, "lm_head.weight", ops=_vocab_ops(a)),
    ]
    hidden, ffn, dtype = a["hidden_size"], a["ffn_hidden_size"], a["dtype"]

    def zeros(name: str, width: int, why: str) -> Rule:
        return Rule(
            {},
            name,
            ops=[("zeros", {"shape": [width], "dtype": dtype})],
            counts={"i": "num_layers"},
            label=f"zero bias {name} ({why})",
        )

    if a["add_qkv_bias"]:
        rules.append(
            Rule(
                {
                    "q": L + "self_attention.linear_q.bias",
                    "k": L + "self_attention.linear_k.bias",
                    "v": L + "self_attention.linear_v.bias",
                },
                h + "attn.c_attn.bias",
                ops=[("concat_rows", {})],
            )
        )
    else:
        rules.append(zeros(h + "attn.c_attn.bias", 3 * hidden, "no q/k/v bias"))
    for src, dst, width in (
        ("self_attention.linear_proj.bias", "attn.c_proj.bias", hidden),
        ("mlp.linear_fc1.bias", "mlp.c_fc.bias", ffn),
        ("mlp.linear_fc2.bias", "mlp.c_proj.bias", hidden),
    ):
        rules.append(Rule(L + src, h + dst) if a["add_bias_linear"] else zeros(h + dst, width, "add_bias_linear off"))
    return rules


def _llama_rules(a: Mapping[str, Any]) -> list[Rule]:
    m = "model.layers.{i}."
    rules = [
        Rule(EMB, "model.embed_tokens.weight", ops=_vocab_ops(a)),
        Rule(L + "input_layernorm.weight", m + "input_layernorm.weight"),
        Rule(L + "self_attention.linear_q.weight", m + "self_attn.q_proj.weight"),
        Rule(L + "self_attention.linear_k.weight", m + "self_attn.k_proj.weight"),
        Rule(L + "self_attention.linear_v.weight", m + "self_attn.v_proj.weight"),
        Rule(L + "self_attention.linear_proj.weight", m + "self_attn.o_proj.weight"),
        Rule(L + "pre_mlp_layernorm.weight", m + "post_attention_layernorm.weight"),
        Rule(L + "mlp.linear_fc1_gate.weight", m + "mlp.gate_proj.weight"),
        Rule(L + "mlp.linear_fc1_up.weight", m + "mlp.up_proj.weight"),
        Rule(L + "mlp.linear_fc2.weight", m + "mlp.down_proj.weight"),
        Rule("decoder.final_layernorm.weight", "model.norm.weight"),
        Rule(HEAD, "lm_head.weight", ops=_vocab_ops(a)),
    ]
    if a["add_qkv_bias"]:
        rules += [Rule(L + f"self_attention.linear_{x}.bias", m + f"self_attn.{x}_proj.bias") for x in "qkv"]
    if a["add_bias_linear"]:
        rules += [
            Rule(L + "self_attention.linear_proj.bias", m + "self_attn.o_proj.bias"),
            Rule(L + "mlp.linear_fc1_gate.bias", m + "mlp.gate_proj.bias"),
            Rule(L + "mlp.linear_fc1_up.bias", m + "mlp.up_proj.bias"),
            Rule(L + "mlp.linear_fc2.bias", m + "mlp.down_proj.bias"),
        ]
    return rules


class NemoAdapter(MegatronAdapter):
    name = "nemo"
    description = "alias of megatron (NeMo .nemo archives and Lightning .ckpt files)"


register(MegatronAdapter())
register(NemoAdapter())
