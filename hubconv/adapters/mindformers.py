"""MindSpore Transformers (MindFormers) -> transformers: `llama` (LlamaForCausalLM), `qwen2` (Qwen2ForCausalLM).

`--checkpoint` is a MindSpore `.ckpt` (read without MindSpore, `hubconv.io.mindspore_ckpt`), a MindFormers
safetensors file or folder, or MindFormers' output folder with one `rank_N/` per rank (one rank, or identical
data-parallel replicas; sharded ranks need MindSpore's strategy file and are refused). Names are MindFormers'
(its `convert_weight.py`): `model.tok_embeddings.embedding_weight`, `model.layers.N.attention.wq/wk/wv/wo.weight`
(q/k/v biases make it Qwen2), `feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`, `model.norm_out`, `lm_head`.

- Fused weights (`qkv_concat: true`): `attention.w_qkv` (weight and bias) is split per KV group — [q heads of
  group g; k_g; v_g], MindFormers' `qkv_concat_hf2mg` — and `feed_forward.w_gate_hidden` row by row
  ([gate_0; up_0; gate_1; ...], `ffn_concat_hf2mg`, which its FeedForward reads as `reshape(..., hidden_dim, 2)`).
  Older MindFormers (`convert_weight.py --qkv_concat`) concatenated [Q; K; V] and [W1; W3]: `qkv_layout: concat`,
  `ffn_layout: concat`.
- Q/K are *not* permuted by default: MindFormers' HF import (`convert_weight.py`) copies q/k as they are and its
  RotaryEmbedding rotates halves, like transformers. Its Meta import permutes Meta's interleaved rows into that
  layout too. Only weights still in Meta's interleaved layout (checkpoints of MindFormers' early Llama, which
  `convert_weight.py --pre_ckpt_path --config_path` exists to permute) need `rope_permute: true`.
- Training checkpoints: AdamW moments (`adam_m.*`, `adam_v.*`), gradient accumulation buffers (`accu_grads.*`),
  counters and scalars (`global_step`, `learning_rate`, `beta1_power`, `beta2_power`, `epoch_num`, `step_num`,
  `scale_sense`, `loss_scale`, `current_iterator_step`, `last_overflow_iterator_step`) and `append_info` strings
  are dropped with reasons; any other tensor is an error.

Hyperparameters come from MindFormers' own config: `--model-args` takes its YAML run config (the
`model.model_config` section is used) or the `model_config` as JSON/YAML, in MindFormers' names (`hidden_size`,
`num_layers`, `num_heads`, `n_kv_heads`, `intermediate_size`, `multiple_of`, `ffn_dim_multiplier`, `rms_norm_eps`,
`theta`, `extend_method`, `scaling_factor`, `seq_length`, `vocab_size`, `qkv_has_bias`, `qkv_concat`,
`tie_word_embeddings`, `bos/eos/pad_token_id`); everything the shapes determine is checked against them.
Other run-config fields (dtypes, parallelism, generation settings) do not change the weights and are ignored.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from hubconv import views as V
from hubconv.adapters.base import ConversionPlan
from hubconv.adapters.generic import RuleAdapter, same_data
from hubconv.adapters.registry import register
from hubconv.adapters.rules import Drop, Rule, RuleTable
from hubconv.dtypes import BY_NAME
from hubconv.errors import MappingError, ModelArgsError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import LazyTensor

EMB, NORM, HEAD = "model.tok_embeddings.embedding_weight", "model.norm_out.weight", "lm_head.weight"
L = "model.layers.{i}."

TRAINING_DROPS = [
    Drop(r"^adam_m\.", "AdamW first moment (optimizer state, training only)"),
    Drop(r"^adam_v\.", "AdamW second moment (optimizer state, training only)"),
    Drop(r"^(moments|momentum)\.", "optimizer momentum (training only)"),
    Drop(r"^accu_grads\.", "gradient accumulation buffer (training only)"),
    Drop(r"^(global_step|step_num|epoch_num|current_iterator_step|last_overflow_iterator_step)$", "training counter"),
    Drop(r"^(learning_rate|beta1_power|beta2_power)$", "optimizer schedule state (training only)"),
    Drop(r"^(scale_sense|loss_scale)$", "loss scale (mixed-precision training only)"),
]

# MindFormers' model_config fields that determine or describe the weights (checked), and hubconv's own options.
ARCH_FIELDS = (
    "hidden_size", "num_layers", "num_heads", "n_kv_heads", "vocab_size", "intermediate_size", "multiple_of",
    "ffn_dim_multiplier", "rms_norm_eps", "theta", "extend_method", "scaling_factor", "seq_length",
    "max_position_embedding", "qkv_has_bias", "qkv_concat", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "type", "model_type",
)  # fmt: skip
OPTION_FIELDS = ("rope_permute", "qkv_layout", "ffn_layout", "tokenizer_vocab_size", "keep_padded_vocab")
QKV_LAYOUTS, FFN_LAYOUTS = ("grouped", "concat"), ("interleaved", "concat")


def _suggest(word: str, known: tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.85)
    return close[0] if close and close[0] != word else None


def model_config(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """MindFormers' `model_config` out of a run config (`model: {model_config: ...}`), a `model_config` mapping,
    or the flat fields themselves."""
    if isinstance(data.get("model"), Mapping) and "model_config" in data["model"]:
        data = data["model"]["model_config"]
    elif "model_config" in data:
        data = data["model_config"]
    if not isinstance(data, Mapping):
        raise ModelArgsError(f"{where}: model_config must be a mapping")
    out = dict(data)
    for key in out:  # a misspelt field would otherwise be ignored silently
        if key not in ARCH_FIELDS + OPTION_FIELDS and (hint := _suggest(key, ARCH_FIELDS + OPTION_FIELDS)):
            raise ModelArgsError(f"{where}: unknown field {key!r} (did you mean {hint!r}?)")
    return out


def mindformers_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """MindFormers' LlamaFeedForward width without `intermediate_size`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _number(user: Mapping[str, Any], field: str, default: float) -> float:
    value = user.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ModelArgsError(f"--model-args {field}={value!r} is not a positive number")
    return float(value)


def _flag(user: Mapping[str, Any], field: str, default: bool) -> bool:
    value = user.get(field, default)
    if not isinstance(value, bool):
        raise ModelArgsError(f"--model-args {field}={value!r} must be true or false")
    return value


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelArgsError(f"--model-args {field}={value!r} is not a positive integer")
    return value


class MindFormersAdapter(RuleAdapter):
    name = "mindformers"
    description = "MindSpore Transformers .ckpt / safetensors / rank_N folders (Llama, Qwen2; fused w_qkv)"
    families = ("llama", "qwen2")
    model_types = ("llama", "qwen2")
    model_type = "llama"
    layer_count_arg = "num_layers"

    # ---- detection and arguments ------------------------------------------------------------------
    def detect_family(self, ckpt: Checkpoint) -> str:
        keys = set(ckpt.tensors)
        if EMB not in keys or not any(re.match(r"^model\.layers\.\d+\.", k) for k in keys):
            sample = ", ".join(sorted(k for k in keys if not any(re.search(d.pattern, k) for d in TRAINING_DROPS))[:5])
            raise MappingError(
                f"{ckpt.path}: not a MindFormers Llama-family checkpoint (expected {EMB} and model.layers.N.*); "
                f"found keys like: {sample or '(no tensors)'}"
            )
        if any(".feed_forward.ffn." in k or ".routed_experts." in k or ".router." in k for k in keys):
            raise MappingError(f"{ckpt.path}: MindFormers MoE layers are not supported")
        bias = any(re.match(r"^model\.layers\.\d+\.attention\.(wq|w_qkv)\.bias$", k) for k in keys)
        return "qwen2" if bias else "llama"

    def load_args(self, value: str | Mapping[str, Any] | None) -> dict[str, Any]:
        where = value if isinstance(value, str) else "--model-args"
        return model_config(super().load_args(value), where)

    def entry_reason(self, entry: str) -> str | None:
        for d in TRAINING_DROPS:
            if re.search(d.pattern, entry):
                return d.reason
        if entry == "random_op":
            return "random generator state (training only)"
        if entry in self._strings:
            return "a string saved beside the weights (save_checkpoint append_dict / MindFormers append_info)"
        return None

    def resolve_args(
        self, ckpt: Checkpoint, tensors: Mapping[str, LazyTensor], user: Mapping[str, Any]
    ) -> dict[str, Any]:
        where = ckpt.path
        user = dict(user)

        def shape(key: str) -> tuple[int, ...]:
            if key not in tensors:
                raise MappingError(f"{where}: missing tensor {key}")
            return tuple(tensors[key].shape)

        def check(field: str, measured: Any, how: str) -> Any:
            given = user.get(field)
            if given is not None and given != measured:
                raise ModelArgsError(
                    f"--model-args {field}={given!r} contradicts the checkpoint: {how} gives {measured!r}"
                )
            return measured

        vocab, dim = shape(EMB)
        layers = {int(m.group(1)) for k in tensors if (m := re.match(r"^model\.layers\.(\d+)\.", k))}
        n_layers = max(layers) + 1 if layers else 0
        if not n_layers or layers != set(range(n_layers)):
            raise MappingError(
                f"{where}: transformer layers are missing: {sorted(set(range(n_layers)) - layers) or 'all'}"
            )
        a: dict[str, Any] = {
            "hidden_size": check("hidden_size", dim, f"{EMB} columns"),
            "num_layers": check("num_layers", n_layers, "the model.layers.N blocks"),
            "vocab_size": check("vocab_size", vocab, f"{EMB} rows"),
        }
        fused = "model.layers.0.attention.w_qkv.weight" in tensors
        if user.get("qkv_concat") is not None and bool(user["qkv_concat"]) != fused:
            raise ModelArgsError(
                f"--model-args qkv_concat={user['qkv_concat']!r} contradicts the checkpoint: "
                f"model.layers.0.attention.{'w_qkv' if fused else 'wq'}.weight is there"
            )
        a["qkv_concat"] = fused
        for opt, choices in (("qkv_layout", QKV_LAYOUTS), ("ffn_layout", FFN_LAYOUTS)):
            value = user.get(opt, choices[0])
            if value not in choices:
                raise ModelArgsError(f"--model-args {opt}={value!r}: expected one of {', '.join(choices)}")
            a[opt] = value
        n_heads = user.get("num_heads")
        if n_heads is None:
            raise ModelArgsError(
                "num_heads cannot be read from the tensor shapes; give MindFormers' run config (model.model_config) "
                "or a model_config with num_heads in --model-args"
            )
        n_heads = _positive_int(n_heads, "num_heads")
        if dim % n_heads or (dim // n_heads) % 2:
            raise ModelArgsError(f"--model-args num_heads={n_heads} does not divide hidden_size={dim} into even heads")
        head_dim = dim // n_heads
        if fused:
            qkv_rows = shape("model.layers.0.attention.w_qkv.weight")[0]
            kv_rows, odd = divmod(qkv_rows - dim, 2)
            how = f"model.layers.0.attention.w_qkv.weight ({qkv_rows} rows)"
            ffn, odd2 = divmod(shape("model.layers.0.feed_forward.w_gate_hidden.weight")[0], 2)
            ffn_how = "model.layers.0.feed_forward.w_gate_hidden.weight rows / 2"
        else:
            q_rows = shape("model.layers.0.attention.wq.weight")[0]
            if q_rows != dim:
                raise MappingError(
                    f"{where}: model.layers.0.attention.wq.weight has {q_rows} rows, not hidden_size={dim}"
                )
            kv_rows, odd = shape("model.layers.0.attention.wk.weight")[0], 0
            how = "model.layers.0.attention.wk.weight rows"
            ffn, odd2 = shape("model.layers.0.feed_forward.w1.weight")[0], 0
            ffn_how = "model.layers.0.feed_forward.w1.weight rows"
        if odd or odd2 or kv_rows <= 0 or kv_rows % head_dim:
            raise ModelArgsError(f"--model-args num_heads={n_heads} (head_dim {head_dim}) does not fit {how}")
        n_kv = kv_rows // head_dim
        given_kv = user.get("n_kv_heads")
        if given_kv is None and "n_kv_heads" in user:  # MindFormers: null means as many KV heads as heads
            given_kv = n_heads
        if given_kv is not None and given_kv != n_kv:
            raise ModelArgsError(
                f"--model-args n_kv_heads={given_kv} contradicts the checkpoint: {how} with head_dim {head_dim} "
                f"gives n_kv_heads={n_kv}"
            )
        if n_heads % n_kv:
            raise ModelArgsError(f"{where}: {n_kv} KV heads do not divide num_heads={n_heads}")
        a.update(num_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim)
        if user.get("intermediate_size") is not None:
            check("intermediate_size", ffn, ffn_how)
        elif "multiple_of" in user or "ffn_dim_multiplier" in user:
            expect = mindformers_ffn_dim(dim, int(user.get("multiple_of") or 256), user.get("ffn_dim_multiplier"))
            if expect != ffn:
                raise ModelArgsError(
                    f"--model-args multiple_of={user.get('multiple_of', 256)}, ffn_dim_multiplier="
                    f"{user.get('ffn_dim_multiplier')} give an FFN width of {expect}, but {ffn_how} gives {ffn}"
                )
        a["intermediate_size"] = ffn
        bias = any(k.endswith((".attention.wq.bias", ".attention.w_qkv.bias")) for k in tensors)
        a["qkv_has_bias"] = check("qkv_has_bias", bias, "q/k/v bias tensors present")
        a["rms_norm_eps"] = _number(user, "rms_norm_eps", 1e-5)
        a["theta"] = _number(user, "theta", 10000.0)
        a["rope_scaling"] = _rope_scaling(user)
        a["seq_length"] = _positive_int(
            user.get("max_position_embedding") or user.get("seq_length") or 4096, "seq_length"
        )
        a["rope_permute"] = _flag(user, "rope_permute", False)
        if a["rope_permute"] and fused:
            raise ModelArgsError(
                "--model-args rope_permute=true with a fused w_qkv: MindFormers only fuses weights in its own "
                "(rotate-half) layout; convert the unfused checkpoint instead"
            )
        head = tensors.get(HEAD)
        tie = user.get("tie_word_embeddings")
        if tie is None:
            tie = head is None or same_data(head, tensors[EMB])
        if not tie and head is None:
            raise MappingError(f"{where}: no {HEAD} although the model args say embeddings are untied")
        a["tie_word_embeddings"] = bool(tie)
        a.update(self._vocab(user, vocab))
        a["dtype"] = tensors[EMB].dtype.name
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if user.get(k) is not None:
                a[k] = user[k]
        return a

    @staticmethod
    def _vocab(user: Mapping[str, Any], rows: int) -> dict[str, Any]:
        stated = user.get("tokenizer_vocab_size")
        if stated is None:
            return {"hf_vocab_size": rows, "keep_padded_vocab": True}
        stated = _positive_int(stated, "tokenizer_vocab_size")
        if stated > rows:
            raise MappingError(f"--model-args tokenizer_vocab_size={stated} exceeds the {rows} embedding rows")
        keep = _flag(user, "keep_padded_vocab", False)
        return {"tokenizer_vocab_size": stated, "keep_padded_vocab": keep, "hf_vocab_size": rows if keep else stated}

    # ---- tables and configs ------------------------------------------------------------------------
    def table(self, a: Mapping[str, Any]) -> RuleTable:
        H = "model.layers.{i}."
        trim = [] if a["hf_vocab_size"] == a["vocab_size"] else [("slice_rows", {"stop": a["hf_vocab_size"]})]
        hd, n_kv, dim, ffn = a["head_dim"], a["n_kv_heads"], a["hidden_size"], a["intermediate_size"]
        rules = [
            Rule(EMB, "model.embed_tokens.weight", ops=trim),
            Rule(f"{L}attention_norm.weight", f"{H}input_layernorm.weight"),
        ]
        kinds = ("weight", "bias") if a["qkv_has_bias"] else ("weight",)
        for kind in kinds:
            dst = [f"{H}self_attn.{p}_proj.{kind}" for p in "qkv"]
            if a["qkv_concat"]:
                if a["qkv_layout"] == "grouped":
                    op = ("split_groups", {"groups": n_kv, "rows": [dim // n_kv, hd, hd]})
                else:
                    op = ("split_rows", {"sizes": [dim, n_kv * hd, n_kv * hd]})
                rules.append(Rule(f"{L}attention.w_qkv.{kind}", dst, ops=[op]))
            else:
                for w, target, heads in (("wq", dst[0], a["num_heads"]), ("wk", dst[1], n_kv), ("wv", dst[2], 0)):
                    ops = [("rope_permute", {"heads": heads})] if a["rope_permute"] and heads else []
                    rules.append(Rule(f"{L}attention.{w}.{kind}", target, ops=ops))
        rules.append(Rule(f"{L}attention.wo.weight", f"{H}self_attn.o_proj.weight"))
        rules.append(Rule(f"{L}ffn_norm.weight", f"{H}post_attention_layernorm.weight"))
        if a["qkv_concat"]:
            op = (
                ("split_interleaved_rows", {})
                if a["ffn_layout"] == "interleaved"
                else ("split_rows", {"sizes": [ffn, ffn]})
            )
            rules.append(
                Rule(
                    f"{L}feed_forward.w_gate_hidden.weight",
                    [f"{H}mlp.gate_proj.weight", f"{H}mlp.up_proj.weight"],
                    ops=[op],
                )
            )
        else:
            rules.append(Rule(f"{L}feed_forward.w1.weight", f"{H}mlp.gate_proj.weight"))
            rules.append(Rule(f"{L}feed_forward.w3.weight", f"{H}mlp.up_proj.weight"))
        rules.append(Rule(f"{L}feed_forward.w2.weight", f"{H}mlp.down_proj.weight"))
        rules.append(Rule(NORM, "model.norm.weight"))
        rules.append(Rule(HEAD, "lm_head.weight", ops=trim))
        return RuleTable(rules, TRAINING_DROPS)

    def tied_keys(self, a: Mapping[str, Any]) -> tuple[str, str]:
        return EMB, HEAD

    _strings: frozenset[str] = frozenset()

    def plan(self, ckpt: Checkpoint, family: str, user_args: Mapping[str, Any]) -> ConversionPlan:
        self._strings = frozenset(e for e in ckpt.entries if isinstance(ckpt.values.get(e), str))
        plan = super().plan(ckpt, family, user_args)
        a = plan.native_args
        plan.model_type = "qwen2" if a["qkv_has_bias"] else "llama"
        if plan.native_args["rope_permute"]:
            plan.notes.append("Q/K rows permuted from Meta's interleaved RoPE layout (rope_permute: true)")
        return plan

    def hf_config(self, a: Mapping[str, Any]) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "vocab_size": a["hf_vocab_size"],
            "hidden_size": a["hidden_size"],
            "intermediate_size": a["intermediate_size"],
            "num_hidden_layers": a["num_layers"],
            "num_attention_heads": a["num_heads"],
            "num_key_value_heads": a["n_kv_heads"],
            "hidden_act": "silu",
            "max_position_embeddings": a["seq_length"],
            "rms_norm_eps": a["rms_norm_eps"],
            "rope_parameters": {**(a["rope_scaling"] or {"rope_type": "default"}), "rope_theta": a["theta"]},
            "tie_word_embeddings": a["tie_word_embeddings"],
        }
        if a["qkv_has_bias"]:  # Qwen2: biases on q/k/v only
            cfg.update(use_sliding_window=False, max_window_layers=a["num_layers"])
        else:
            cfg.update(head_dim=a["head_dim"], attention_bias=False, mlp_bias=False)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            cfg[k] = a.get(k)
        return cfg

    def native_shapes(self, a: Mapping[str, Any]) -> dict[str, LazyTensor]:
        """Shape-only native tensors for `a` (what `from_hf` plans against)."""
        dt = BY_NAME[a.get("dtype", "F32")]
        dim, ffn, kv = a["hidden_size"], a["intermediate_size"], a["n_kv_heads"] * a["head_dim"]
        shapes: dict[str, tuple[int, ...]] = {EMB: (a["vocab_size"], dim)}
        for i in range(a["num_layers"]):
            p = f"model.layers.{i}."
            shapes[p + "attention_norm.weight"] = (dim,)
            kinds = ("weight", "bias") if a["qkv_has_bias"] else ("weight",)
            for kind in kinds:
                tail = (dim,) if kind == "weight" else ()
                if a["qkv_concat"]:
                    shapes[f"{p}attention.w_qkv.{kind}"] = (dim + 2 * kv, *tail)
                else:
                    shapes |= {
                        f"{p}attention.wq.{kind}": (dim, *tail),
                        f"{p}attention.wk.{kind}": (kv, *tail),
                        f"{p}attention.wv.{kind}": (kv, *tail),
                    }
            shapes[p + "attention.wo.weight"] = (dim, dim)
            shapes[p + "ffn_norm.weight"] = (dim,)
            if a["qkv_concat"]:
                shapes[p + "feed_forward.w_gate_hidden.weight"] = (2 * ffn, dim)
            else:
                shapes[p + "feed_forward.w1.weight"] = shapes[p + "feed_forward.w3.weight"] = (ffn, dim)
            shapes[p + "feed_forward.w2.weight"] = (dim, ffn)
        shapes[NORM] = (dim,)
        if not a["tie_word_embeddings"]:
            shapes[HEAD] = (a["vocab_size"], dim)
        return {k: V.Zeros(k, dt, s) for k, s in shapes.items()}

    # ---- parity ------------------------------------------------------------------------------------
    def reference_logits(
        self, ckpt: Checkpoint, native_args: Mapping[str, Any], tokens: Any, positions: Any = None
    ) -> Any:
        from hubconv.native.mindformers_llama import reference_logits

        return reference_logits(ckpt.tensors, native_args, tokens, positions)


def _rope_scaling(user: Mapping[str, Any]) -> dict[str, Any] | None:
    """transformers' rope_parameters (without rope_theta) for MindFormers' extend_method / scaling_factor."""
    method = user.get("extend_method")
    if method in (None, "None", "none"):
        return None
    factor = user.get("scaling_factor", 1.0)
    if method == "PI":
        if isinstance(factor, bool) or not isinstance(factor, int | float) or factor <= 0:
            raise ModelArgsError(f"--model-args scaling_factor={factor!r}: extend_method PI needs a positive number")
        return {"rope_type": "linear", "factor": float(factor)}
    if method == "LLAMA3":
        if not isinstance(factor, Mapping):
            raise ModelArgsError(
                "--model-args extend_method LLAMA3 needs scaling_factor {factor, low_freq_factor, ...}"
            )
        try:
            return {
                "rope_type": "llama3",
                "factor": float(factor["factor"]),
                "low_freq_factor": float(factor["low_freq_factor"]),
                "high_freq_factor": float(factor["high_freq_factor"]),
                "original_max_position_embeddings": int(
                    factor.get("original_max_position_embedding", factor.get("original_max_position_embeddings"))
                ),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ModelArgsError(f"--model-args scaling_factor for extend_method LLAMA3: missing or bad {e}") from None
    raise ModelArgsError(f"--model-args extend_method={method!r} is not supported (None, PI or LLAMA3)")


register(MindFormersAdapter())
