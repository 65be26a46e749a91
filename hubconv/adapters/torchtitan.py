"""TorchTitan -> transformers. Family `llama3` (Llama 3 / 3.1 / 3.2 layouts) -> LlamaForCausalLM.

A `RuleAdapter`: the rule table below plus hyperparameter resolution; ties, accounting for every
tensor and entry, completeness and lossy-step records come from the generic planning.

TorchTitan applies RoPE to interleaved (real, imaginary) pairs; transformers' Llama rotates
halves, so Q and K rows are permuted per head (`rope_permute` with `n_heads`, K with
`n_kv_heads`). Both key generations are read: `layers.N.attention.wq.weight` with `output.weight`,
and the newer `layers.N.attention.qkv_linear.wq.weight` with `lm_head.weight`; older full
checkpoints nest the model under `model.`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from hubconv import views as V
from hubconv.adapters import torchtitan_args
from hubconv.adapters.base import ConversionPlan
from hubconv.adapters.generic import RuleAdapter, same_data
from hubconv.adapters.registry import register
from hubconv.adapters.rules import Drop, Rule, RuleTable
from hubconv.adapters.torchtitan_flavors import (
    LLAMA3_DEFAULTS,
    LLAMA3_FLAVORS,
    LLAMA3_ROPE_SCALING_DEFAULTS,
    llama3_ffn_hidden_dim,
)
from hubconv.dtypes import F32
from hubconv.errors import MappingError, ModelArgsError
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import LazyTensor

TRAINING_DROPS = [
    Drop(r"^optimizer(\.|$)", "optimizer state (training only)"),
    Drop(r"^lr_scheduler(\.|$)", "learning-rate scheduler state (training only)"),
    Drop(r"^dataloader(\.|$)", "dataloader state (training only)"),
    Drop(r"^train_state(\.|$)", "train step counters (training only)"),
    Drop(r"(^|\.)freqs_cis$", "RoPE buffer; transformers recomputes it from rope_parameters"),
]


def llama3_table(qkv_prefix: str, head: str) -> RuleTable:
    """Native -> HF rules for one key generation (`qkv_prefix` is "" or "qkv_linear."; `head` the output
    projection's name, "output" or "lm_head"), in the order transformers saves a layer."""
    L, H = "layers.{i}.", "model.layers.{i}."
    return RuleTable(
        [
            Rule("tok_embeddings.weight", "model.embed_tokens.weight"),
            Rule(f"{L}attention_norm.weight", f"{H}input_layernorm.weight"),
            Rule(
                f"{L}attention.{qkv_prefix}wq.weight",
                f"{H}self_attn.q_proj.weight",
                ops=[("rope_permute", {"heads": "n_heads"})],
            ),
            Rule(
                f"{L}attention.{qkv_prefix}wk.weight",
                f"{H}self_attn.k_proj.weight",
                ops=[("rope_permute", {"heads": "n_kv_heads"})],  # per KV head: the classic GQA trap
            ),
            Rule(f"{L}attention.{qkv_prefix}wv.weight", f"{H}self_attn.v_proj.weight"),
            Rule(f"{L}attention.wo.weight", f"{H}self_attn.o_proj.weight"),
            Rule(f"{L}ffn_norm.weight", f"{H}post_attention_layernorm.weight"),
            Rule(f"{L}feed_forward.w1.weight", f"{H}mlp.gate_proj.weight"),
            Rule(f"{L}feed_forward.w3.weight", f"{H}mlp.up_proj.weight"),
            Rule(f"{L}feed_forward.w2.weight", f"{H}mlp.down_proj.weight"),
            Rule("norm.weight", "model.norm.weight"),
            Rule(f"{head}.weight", "lm_head.weight"),
        ],
        TRAINING_DROPS,
    )


_REQUIRED_MSG = (
    "{field} cannot be determined from the checkpoint's tensor shapes; provide it in --model-args "
    '(a JSON/YAML file such as {{"{field}": ...}}, a TorchTitan job TOML, or a flavor name: {flavors})'
)


def load_llama3_args(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """--model-args value: a dict, a JSON/YAML file, a TorchTitan job TOML, or a flavor / 0.3 config name,
    in TorchTitan 0.2 or 0.3 spelling (see `hubconv.adapters.torchtitan_args`)."""
    return torchtitan_args.load(value)


class TorchTitanAdapter(RuleAdapter):
    name = "torchtitan"
    description = "TorchTitan DCP checkpoints (step-N folders, model-only or full training state); Llama 3 family"
    families = ("llama3",)
    model_types = ("llama",)
    model_type = "llama"
    layer_count_arg = "n_layers"

    def load_args(self, value: str | Mapping[str, Any] | None) -> dict[str, Any]:
        return load_llama3_args(value)

    # ---- detection -------------------------------------------------------------------------
    def detect_family(self, ckpt: Checkpoint) -> str:
        keys = set(_model_view(ckpt.tensors))
        model_keys = {k for k in keys if not any(re.search(d.pattern, k) for d in TRAINING_DROPS)}
        if "tok_embeddings.weight" in keys and any(k.endswith("feed_forward.w1.weight") for k in keys):
            if any(k.endswith((".q_norm.weight", ".k_norm.weight")) for k in keys):
                raise MappingError(f"{ckpt.path}: TorchTitan checkpoint with q_norm/k_norm (Qwen3): not supported yet")
            if any(".moe." in k for k in keys):
                raise MappingError(f"{ckpt.path}: TorchTitan checkpoint with MoE layers: not supported yet")
            return "llama3"
        sample = ", ".join(sorted(model_keys)[:5]) or "(no tensors)"
        raise MappingError(
            f"{ckpt.path}: not a TorchTitan Llama checkpoint (expected tok_embeddings.weight and "
            f"layers.N.feed_forward.w1.weight); found keys like: {sample}"
        )

    def model_tensors(self, ckpt: Checkpoint) -> dict[str, LazyTensor]:
        return _model_view(ckpt.tensors)

    def entry_reason(self, entry: str) -> str | None:
        return next((d.reason for d in TRAINING_DROPS if re.search(d.pattern, entry)), None)

    # ---- hyperparameters -------------------------------------------------------------------
    def resolve_args(
        self, ckpt: Checkpoint | str, tensors: Mapping[str, LazyTensor], user: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Combine user args with what the tensor shapes determine; contradictions are errors.

        `ckpt` is the checkpoint (or just a label for messages); `user` is what `load_args` returns
        (a plain mapping is normalized, and validated, here too).
        """
        where = ckpt if isinstance(ckpt, str) else ckpt.path
        if torchtitan_args.SPELLING not in user:
            user = torchtitan_args.normalize(user, "--model-args") if user else {}
        spelling: Mapping[str, str] = user.get(torchtitan_args.SPELLING, {})

        def label(field: str) -> str:
            return spelling.get(field, field)

        def shape(key: str) -> tuple[int, ...]:
            if key not in tensors:
                raise MappingError(f"{where}: missing tensor {key!r}")
            return tensors[key].shape

        def check(field: str, from_shapes: Any, source: str, as_field: str | None = None, note: str = "") -> Any:
            given = user.get(field)
            if given is not None and not (field == "vocab_size" and given == -1) and given != from_shapes:
                raise ModelArgsError(
                    f"--model-args {label(field)}={given} contradicts the checkpoint: {source} implies "
                    f"{as_field or field}={from_shapes}{note}"
                )
            return from_shapes

        flavors = ", ".join(LLAMA3_FLAVORS)
        qkv = "qkv_linear." if "layers.0.attention.qkv_linear.wq.weight" in tensors else ""
        wq, wk = f"layers.0.attention.{qkv}wq.weight", f"layers.0.attention.{qkv}wk.weight"
        vocab, dim = shape("tok_embeddings.weight")
        layer_ids = {int(m.group(1)) for k in tensors if (m := re.match(r"^layers\.(\d+)\.", k))}
        n_layers = max(layer_ids) + 1 if layer_ids else 0
        if layer_ids != set(range(n_layers)) or not n_layers:
            missing = sorted(set(range(n_layers)) - layer_ids)
            raise MappingError(f"{where}: transformer layers are missing: {missing or 'all'}")
        q_rows, kv_rows = shape(wq)[0], shape(wk)[0]
        ffn = shape("layers.0.feed_forward.w1.weight")[0]
        a: dict[str, Any] = {
            "dim": check("dim", dim, f"tok_embeddings.weight {list((vocab, dim))}"),
            "vocab_size": check("vocab_size", vocab, f"tok_embeddings.weight {list((vocab, dim))}"),
            "n_layers": check("n_layers", n_layers, f"{n_layers} layers.N blocks"),
        }
        n_heads = user.get("n_heads")
        stated_hd = next((f for f in ("head_dim", "rope_dim") if user.get(f) is not None), None)
        if n_heads is None and stated_hd is not None:  # 0.3 states head_dim / rope.dim; n_heads follows
            if q_rows % user[stated_hd]:
                raise ModelArgsError(
                    f"--model-args {label(stated_hd)}={user[stated_hd]} contradicts the checkpoint: {wq} has "
                    f"{q_rows} rows, not a multiple of it"
                )
            n_heads = q_rows // user[stated_hd]
        if n_heads is None:
            raise ModelArgsError(_REQUIRED_MSG.format(field="n_heads", flavors=flavors))
        if q_rows % n_heads or (q_rows // n_heads) % 2:
            raise ModelArgsError(
                f"--model-args {label('n_heads')}={n_heads} contradicts the checkpoint: {wq} has "
                f"{q_rows} rows, not a multiple of 2*n_heads"
            )
        head_dim = q_rows // n_heads
        implied = f"{wq} {list(shape(wq))} with n_heads={n_heads}"
        check("head_dim", head_dim, implied)
        check("rope_dim", head_dim, implied, as_field="head_dim", note=" (llama3's RoPE dim is head_dim)")
        if kv_rows % head_dim:
            raise ModelArgsError(
                f"--model-args {label('n_heads')}={n_heads} gives head_dim={head_dim}, but {wk} has "
                f"{kv_rows} rows (not a multiple of head_dim)"
            )
        a["n_heads"], a["head_dim"] = n_heads, head_dim
        a["n_kv_heads"] = check("n_kv_heads", kv_rows // head_dim, f"{wk} ({kv_rows} rows, head_dim={head_dim})")
        if n_heads % a["n_kv_heads"]:
            raise ModelArgsError(
                f"--model-args {label('n_heads')}={n_heads} contradicts the checkpoint: {wk} implies "
                f"n_kv_heads={a['n_kv_heads']}, which does not divide n_heads"
            )
        if "multiple_of" in user or "ffn_dim_multiplier" in user:
            expect = llama3_ffn_hidden_dim(dim, user.get("multiple_of", 256), user.get("ffn_dim_multiplier"))
            if expect != ffn:
                raise ModelArgsError(
                    f"--model-args {label('multiple_of')}={user.get('multiple_of', 256)}, "
                    f"{label('ffn_dim_multiplier')}={user.get('ffn_dim_multiplier')} give an FFN width of {expect}, "
                    f"but layers.0.feed_forward.w1.weight has {ffn} rows"
                )
        a["ffn_hidden_dim"] = check(
            "ffn_hidden_dim", ffn, f"layers.0.feed_forward.w1.weight {list(shape('layers.0.feed_forward.w1.weight'))}"
        )
        if user.get("rope_theta") is None:
            raise ModelArgsError(_REQUIRED_MSG.format(field="rope_theta", flavors=flavors))
        a["rope_theta"] = float(user["rope_theta"])
        if "rope_scaling_args" not in user:
            raise ModelArgsError(
                "rope_scaling_args cannot be determined from the checkpoint: current TorchTitan applies Llama 3.1 "
                f"scaling by default ({LLAMA3_ROPE_SCALING_DEFAULTS}), versions before it applied none. Set "
                "rope_scaling_args in --model-args to that mapping, or to null for unscaled RoPE "
                "(TorchTitan 0.3 spelling: rope: {scaling: llama} or rope: {scaling: none})"
            )
        scaling = user["rope_scaling_args"]
        a["rope_scaling_args"] = None if scaling is None else {**LLAMA3_ROPE_SCALING_DEFAULTS, **scaling}
        a["norm_eps"] = float(user.get("norm_eps", LLAMA3_DEFAULTS["norm_eps"]))
        a["max_seq_len"] = int(user.get("max_seq_len", LLAMA3_DEFAULTS["max_seq_len"]))
        has_head = "output.weight" in tensors or "lm_head.weight" in tensors
        tie = user.get("tie_word_embeddings", user.get("enable_weight_tying"))
        if tie is None:  # not stated: tied when there is no head, or the head is a copy of the embeddings
            head_tensor = tensors.get("output.weight") or tensors.get("lm_head.weight")
            tie = head_tensor is None or same_data(head_tensor, tensors["tok_embeddings.weight"])
        if not tie and not has_head:
            raise MappingError(f"{where}: no output.weight although the model args say embeddings are untied")
        a["tie_word_embeddings"] = bool(tie)
        a["key_style"] = "qkv_linear" if qkv else "legacy"
        # The output projection was renamed `lm_head` in the same TorchTitan generation as qkv_linear.
        a["head_key"] = "lm_head" if "lm_head.weight" in tensors or (qkv and not has_head) else "output"
        for k in ("bos_token_id", "eos_token_id", "flavor"):
            if user.get(k) is not None:
                a[k] = user[k]
        return a

    def hf_config(self, a: Mapping[str, Any]) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": a["rope_theta"]}
        if a["rope_scaling_args"]:
            s = a["rope_scaling_args"]
            rope = {
                "rope_type": "llama3",
                "rope_theta": a["rope_theta"],
                "factor": float(s["scaling_factor"]),
                "low_freq_factor": float(s["low_freq_factor"]),
                "high_freq_factor": float(s["high_freq_factor"]),
                "original_max_position_embeddings": int(s["original_max_position_embeddings"]),
            }
        cfg = {
            "vocab_size": a["vocab_size"],
            "hidden_size": a["dim"],
            "intermediate_size": a["ffn_hidden_dim"],
            "num_hidden_layers": a["n_layers"],
            "num_attention_heads": a["n_heads"],
            "num_key_value_heads": a["n_kv_heads"],
            "head_dim": a["head_dim"],
            "hidden_act": "silu",
            "max_position_embeddings": a["max_seq_len"],
            "rms_norm_eps": a["norm_eps"],
            "rope_parameters": rope,
            "tie_word_embeddings": a["tie_word_embeddings"],
            "attention_bias": False,
            "mlp_bias": False,
        }
        # Unknown special tokens stay unset rather than inheriting LlamaConfig's defaults (1 and 2),
        # which would silently disagree with the tokenizer.
        for k in ("bos_token_id", "eos_token_id"):
            cfg[k] = a.get(k)
        return cfg

    # ---- mapping ---------------------------------------------------------------------------
    def table(self, args: Mapping[str, Any]) -> RuleTable:
        qkv = "qkv_linear." if args.get("key_style") == "qkv_linear" else ""
        return llama3_table(qkv, args.get("head_key", "output"))

    def tied_keys(self, args: Mapping[str, Any]) -> tuple[str, str]:
        return "tok_embeddings.weight", f"{args.get('head_key', 'output')}.weight"

    def plan(self, ckpt: Checkpoint, family: str, user_args: Mapping[str, Any]) -> ConversionPlan:
        plan = super().plan(ckpt, family, user_args)
        # Output order as transformers saves a Llama: embeddings, layer by layer, final norm, head.
        order = {n: i for i, n in enumerate(_output_order(self.table(plan.native_args), plan.native_args["n_layers"]))}
        plan.targets.sort(key=lambda t: order.get(t.name, len(order)))
        return plan

    def native_shapes(self, args: Mapping[str, Any]) -> dict[str, LazyTensor]:
        """Shape-only native tensors for `args` in its key generation (no head when tied): what `from_hf` plans
        against."""
        qkv = "qkv_linear." if args.get("key_style") == "qkv_linear" else ""
        dim, ffn, hd = args["dim"], args["ffn_hidden_dim"], args["head_dim"]
        q, kv = args["n_heads"] * hd, args["n_kv_heads"] * hd
        shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args["vocab_size"], dim)}
        for i in range(args["n_layers"]):
            p = f"layers.{i}."
            shapes |= {
                f"{p}attention.{qkv}wq.weight": (q, dim),
                f"{p}attention.{qkv}wk.weight": (kv, dim),
                f"{p}attention.{qkv}wv.weight": (kv, dim),
                f"{p}attention.wo.weight": (dim, q),
                f"{p}feed_forward.w1.weight": (ffn, dim),
                f"{p}feed_forward.w3.weight": (ffn, dim),
                f"{p}feed_forward.w2.weight": (dim, ffn),
                f"{p}attention_norm.weight": (dim,),
                f"{p}ffn_norm.weight": (dim,),
            }
        shapes["norm.weight"] = (dim,)
        if not self.tied(args):
            shapes[f"{args.get('head_key', 'output')}.weight"] = (args["vocab_size"], dim)
        return {k: V.Zeros(k, F32, s) for k, s in shapes.items()}

    # ---- parity ----------------------------------------------------------------------------
    def reference_logits(
        self, ckpt: Checkpoint, native_args: Mapping[str, Any], tokens: Any, positions: Any = None
    ) -> Any:
        from hubconv.native.llama3_torchtitan import reference_logits

        return reference_logits(_model_view(ckpt.tensors), native_args, tokens, positions)


def _output_order(table: RuleTable, n_layers: int) -> list[str]:
    """Target names layer by layer: rules before the first per-layer rule, then each layer's targets in rule
    order, then the rest (embeddings; layers; final norm and head)."""
    layered = [r for r in table.rules if "{i}" in r.targets[0]]
    first = table.rules.index(layered[0]) if layered else len(table.rules)
    names = [t for r in table.rules[:first] for t in r.targets]
    names += [t.format(i=i) for i in range(n_layers) for r in layered for t in r.targets]
    return names + [t for r in table.rules[first:] if r not in layered for t in r.targets]


def _model_view(tensors: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
    """Older TorchTitan full checkpoints nest the model under `model.`: strip that prefix."""
    model = [k for k in tensors if not any(re.search(d.pattern, k) for d in TRAINING_DROPS[:4])]
    if model and all(k.startswith("model.") for k in model):
        return {k.removeprefix("model."): v for k, v in tensors.items()}
    return dict(tensors)


register(TorchTitanAdapter())
