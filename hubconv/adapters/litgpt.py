"""LitGPT (Lightning-AI/litgpt) checkpoints -> transformers Llama / Mistral / Qwen2 / Gemma / Phi / GPT-NeoX.

`--checkpoint` names LitGPT's checkpoint folder (`lit_model.pth` + `model_config.yaml`, as written by
`litgpt download`, `finetune` and `pretrain`) or the `lit_model.pth` inside it. The architecture comes
from `model_config.yaml` (LitGPT's `Config` dumped by `save_config`; read with the bounded YAML loader and
checked against the tensor shapes); `--model-args` may supply that file when it is missing, and carries the
options below. What the conversion does:

- `lit_model.pth` is a plain state dict (download, merge_lora), a pretrain checkpoint
  `{model, optimizer, train_dataloader, iter_num, step_count}`, a full-finetune step checkpoint
  `{model, optimizer, scheduler, iter_num, step_count}` or its final `{model}`: the `model` entries are converted,
  the optimizer, scheduler and dataloader states and the counters are dropped with reasons (`_orig_mod.` /
  `module.` prefixes are stripped);
- the fused `attn.qkv` is split (Llama-style targets) or re-interleaved per head (GPT-NeoX's
  `query_key_value`): current LitGPT stores `[all Q; all K; all V]`, LitGPT before 0.5.5 stored `attn.attn`
  interleaved per query group `[q..q k v]` per group. The layout follows the key name (`qkv_layout` in
  `--model-args` forces one: `current` or `legacy`);
- the padded vocabulary (`padded_vocab_size` rows) is trimmed to `vocab_size` (recorded as inexact), or kept
  with `keep_padded_vocab: true`;
- `lm_head.weight` identical to the embeddings (byte comparison) makes a tied model; `tie_word_embeddings`
  in `--model-args` states it instead;
- the folder's `tokenizer.json` / `tokenizer.model` is offered as the tokenizer, and BOS/EOS ids come from its
  `generation_config.json` or `tokenizer_config.json`.

Families (by `model_config.yaml`): `llama` (LLaMAMLP, RMSNorm, sequential residual, full rotary; `bias`
gives attention and MLP biases), `mistral` (the same with sliding-window attention in every layer),
`qwen2` (biases on q/k/v only: `attn_bias` without `bias`), `gemma` (a config named Gemma*, so LitGPT's
RMSNorm scales by 1 + weight, with `scale_embeddings` and GemmaMLP), `phi` (phi-1.5/phi-2: GptNeoxMLP,
LayerNorm, parallel residual with a shared attention norm, partial rotary, biases including lm_head's),
`gpt_neox` (GptNeoxMLP, LayerNorm, parallel or sequential residual, partial rotary, exact or tanh GELU).
Everything else is refused with the reason (`REFUSED` and `_family`): transformers would compute something else.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from hubconv import safe_yaml
from hubconv import views as V
from hubconv.adapters.base import ConversionPlan
from hubconv.adapters.generic import RuleAdapter, same_data
from hubconv.adapters.naming import did_you_mean as _suggest
from hubconv.adapters.naming import strip_wrappers
from hubconv.adapters.registry import register
from hubconv.adapters.rules import Drop, Rule, RuleTable
from hubconv.dtypes import BY_NAME
from hubconv.errors import CheckpointError, MappingError, ModelArgsError
from hubconv.io.checkpoint import Checkpoint, open_checkpoint
from hubconv.io.tensor import LazyTensor

MODEL_FILE = "lit_model.pth"
CONFIG_FILE = "model_config.yaml"
MAX_JSON_BYTES = 1 << 20  # tokenizer_config.json / generation_config.json read for special-token ids
MAX_TOKENIZER_JSON_BYTES = 64 << 20

# LitGPT's Config fields (litgpt/config.py) and their defaults: a field missing from model_config.yaml has
# its default, as `Config(**yaml)` would give it.
CONFIG_DEFAULTS: dict[str, Any] = {
    "name": "",
    "hf_config": {},
    "block_size": 4096,
    "n_layer": 16,
    "n_embd": 4096,
    "vocab_size": 50254,
    "padding_multiple": 512,
    "padded_vocab_size": None,
    "norm_class_name": "LayerNorm",
    "norm_eps": 1e-5,
    "norm_qk": False,
    "norm_qk_type": "default",
    "post_attention_norm": False,
    "post_mlp_norm": False,
    "parallel_residual": True,
    "shared_attention_norm": False,
    "n_head": 32,
    "head_size": None,
    "n_query_groups": None,
    "attn_bias": False,
    "attention_scores_scalar": None,
    "sliding_window_size": None,
    "sliding_window_indices": None,
    "attention_logit_softcapping": None,
    "rope_base": 10000,
    "rotary_percentage": 0.25,
    "rope_condense_ratio": 1,
    "rope_adjustments": None,
    "rope_interleave": False,
    "intermediate_size": None,
    "moe_intermediate_size": None,
    "bias": True,
    "mlp_class_name": "GptNeoxMLP",
    "gelu_approximate": "none",
    "n_expert": 0,
    "n_shared_expert": None,
    "n_expert_groups": None,
    "n_topk_groups": None,
    "n_topk_scores_per_group": None,
    "n_expert_per_token": 0,
    "first_k_dense_replace": None,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": False,
    "scale_embeddings": False,
    "lm_head_bias": False,
    "final_logit_softcapping": None,
    "norm_1": True,
    "norm_2": True,
    "latent_attention": None,
    "rope_local_base_freq": None,
    "rope_indices": None,
}
OPTION_FIELDS = ("qkv_layout", "tie_word_embeddings", "keep_padded_vocab", "bos_token_id", "eos_token_id")
# Fields that only matter for mixture-of-experts models (refused as a whole through mlp_class_name/n_expert).
_MOE_ONLY = ("moe_intermediate_size", "n_shared_expert", "n_expert_groups", "n_topk_groups", "n_topk_scores_per_group")

# (condition over the config, why no transformers class computes the same): checked in this order.
REFUSED: list[tuple[str, Any, str]] = [
    ("mlp_class_name", lambda c: c["mlp_class_name"] == "LLaMAMoE" or c["n_expert"], "mixture-of-experts (LLaMAMoE)"),
    ("latent_attention", lambda c: c["latent_attention"], "multi-head latent attention (DeepSeek)"),
    ("norm_qk", lambda c: c["norm_qk"], "q/k normalization (OLMo 2, Qwen3, Gemma 3 style)"),
    ("post_attention_norm", lambda c: c["post_attention_norm"] or c["post_mlp_norm"], "post-attention/MLP norms"),
    ("attention_logit_softcapping", lambda c: c["attention_logit_softcapping"] is not None, "attention softcapping"),
    ("final_logit_softcapping", lambda c: c["final_logit_softcapping"] is not None, "final logit softcapping"),
    ("name", lambda c: "OLMo" in str(c["name"]), "an OLMo config (LitGPT's LayerNorm has no weights for it)"),
    ("norm_1", lambda c: not c["norm_1"] or not c["norm_2"], "blocks without norm_1/norm_2"),
    ("rope_interleave", lambda c: c["rope_interleave"], "interleaved RoPE"),
    ("rope_local_base_freq", lambda c: c["rope_local_base_freq"] is not None, "a separate local RoPE base"),
    ("first_k_dense_replace", lambda c: c["first_k_dense_replace"] is not None, "dense-then-MoE layers"),
    (
        "attention_scores_scalar",
        lambda c: c["attention_scores_scalar"] not in (None, c["head_size"]),
        "an attention scale other than 1/sqrt(head_size)",
    ),
]

TRAINING_DROPS = [
    Drop(r"^optimizer(\.|$)", "optimizer state (training checkpoint; training only)"),
    Drop(r"^scheduler(\.|$)", "learning-rate scheduler state (finetune checkpoint; training only)"),
    Drop(r"^train_dataloader(\.|$)", "dataloader state (pretrain checkpoint; training only)"),
]
_ENTRIES = {
    "iter_num": "training iteration counter (training checkpoint)",
    "step_count": "optimizer step counter (training checkpoint)",
}
_LORA = re.compile(r"(^|\.)lora_[AB]$|\.linear\.(weight|bias)$")
_ADAPTER = re.compile(r"(^|\.)(adapter_wte|gating_factor|adapter_bias|adapter_scale)(\.|$)")

MODEL_TYPES = {f: f for f in ("llama", "mistral", "qwen2", "gemma", "phi", "gpt_neox")}


def _folder(ckpt: Checkpoint) -> str:
    return os.path.dirname(os.path.abspath(ckpt.path))


def read_config(folder: str) -> dict[str, Any] | None:
    """The folder's `model_config.yaml` as a mapping (bounded YAML), or None when there is none."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        data = safe_yaml.load_file(path, "LitGPT model config")
    except safe_yaml.YamlFileError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a LitGPT model config (expected a mapping of Config fields)")
    return data


def _small_json(path: str, limit: int = MAX_JSON_BYTES) -> Any:
    """A small JSON file's content, or None when absent, too large or unreadable (these files are optional)."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > limit:
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def special_token_ids(folder: str) -> dict[str, int]:
    """BOS/EOS ids as LitGPT's Tokenizer finds them: `generation_config.json` ids, else `tokenizer_config.json`
    tokens looked up in `tokenizer.json` (added tokens, then the model vocabulary)."""
    out: dict[str, int] = {}
    gen = _small_json(os.path.join(folder, "generation_config.json"))
    for k in ("bos_token_id", "eos_token_id"):
        v = gen.get(k) if isinstance(gen, dict) else None
        v = v[0] if isinstance(v, list) and v else v
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[k] = v
    cfg = _small_json(os.path.join(folder, "tokenizer_config.json"))
    wanted = {}
    for k in ("bos_token", "eos_token"):
        if f"{k}_id" in out or not isinstance(cfg, dict):
            continue
        tok = cfg.get(k)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str):
            wanted[f"{k}_id"] = tok
    if wanted:
        tj = _small_json(os.path.join(folder, "tokenizer.json"), MAX_TOKENIZER_JSON_BYTES)
        ids: dict[str, int] = {}
        if isinstance(tj, dict):
            vocab = (tj.get("model") or {}).get("vocab") if isinstance(tj.get("model"), dict) else None
            if isinstance(vocab, dict):
                ids.update({t: i for t, i in vocab.items() if isinstance(i, int)})
            for added in tj.get("added_tokens") or []:
                if (
                    isinstance(added, dict)
                    and isinstance(added.get("content"), str)
                    and isinstance(added.get("id"), int)
                ):
                    ids[added["content"]] = added["id"]
        for k, tok in wanted.items():
            if tok in ids:
                out[k] = ids[tok]
    return out


def tokenizer_source(folder: str) -> str | None:
    """The folder itself when it holds a tokenizer LitGPT would load (`tokenizer.json` or `tokenizer.model`)."""
    if os.path.isfile(os.path.join(folder, "tokenizer.json")) or os.path.isfile(
        os.path.join(folder, "tokenizer.model")
    ):
        return folder
    return None


class LitGPTAdapter(RuleAdapter):
    name = "litgpt"
    description = "LitGPT checkpoint folders (lit_model.pth + model_config.yaml; plain, pretrain or finetune saves)"
    families = tuple(MODEL_TYPES)
    model_types = tuple(MODEL_TYPES.values())
    model_type = "llama"
    layer_count_arg = "n_layer"

    # ---- opening and detection ----------------------------------------------------------------------
    def open(self, path: str) -> Checkpoint:
        """The checkpoint folder (holding `lit_model.pth`) or `lit_model.pth` itself."""
        if os.path.isdir(path):
            candidate = os.path.join(path, MODEL_FILE)
            if not os.path.exists(candidate):
                if os.path.isfile(candidate + ".lora"):
                    raise CheckpointError(
                        f"{path}: only LoRA weights ({MODEL_FILE}.lora), no {MODEL_FILE}: merge them into the base "
                        f"model first with `litgpt merge_lora {path}`"
                    )
                raise CheckpointError(f"{path}: no {MODEL_FILE} in this folder (expected a LitGPT checkpoint folder)")
            path = candidate
        if os.path.isdir(path):
            raise CheckpointError(
                f"{path}: a folder, not a file (a sharded FSDP save): save it with state_dict_type='full' or "
                "consolidate it into one lit_model.pth first"
            )
        return open_checkpoint(path)

    def detect_family(self, ckpt: Checkpoint) -> str:
        raw = read_config(_folder(ckpt))
        if raw is None:
            return "auto"  # resolved from --model-args in plan()
        return _family(_full_config(raw, _folder(ckpt)), os.path.join(_folder(ckpt), CONFIG_FILE))

    def load_args(self, value: str | Mapping[str, Any] | None) -> dict[str, Any]:
        args = super().load_args(value)
        known = (*CONFIG_DEFAULTS, *OPTION_FIELDS)
        for k in args:
            if k not in known:
                raise ModelArgsError(
                    f"--model-args: unknown field {k!r}{_suggest(k, known)}; LitGPT Config fields or "
                    f"{', '.join(OPTION_FIELDS)}"
                )
        layout = args.get("qkv_layout")
        if layout is not None and layout not in ("current", "legacy"):
            raise ModelArgsError(f"--model-args qkv_layout={layout!r}: expected 'current' or 'legacy'")
        return args

    def model_tensors(self, ckpt: Checkpoint) -> dict[str, LazyTensor]:
        """`model.*` of a pretrain checkpoint (or the plain state dict) without wrapper prefixes; other tensors
        (optimizer state) as they are."""
        nested = any(
            k.startswith("model.") and strip_wrappers(k.removeprefix("model.")).startswith(("transformer.", "lm_head."))
            for k in ckpt.tensors
        )
        out: dict[str, LazyTensor] = {}
        origin: dict[str, str] = {}
        for key, t in ckpt.tensors.items():
            name = key
            if not nested:
                name = strip_wrappers(key)
            elif key.startswith("model."):
                name = strip_wrappers(key.removeprefix("model."))
            if name in origin:
                raise MappingError(f"{ckpt.path}: {origin[name]!r} and {key!r} are both {name!r} once prefixes go")
            origin[name] = key
            out[name] = t
        lora = next((k for k in out if _LORA.search(k)), None)
        if lora:
            raise MappingError(
                f"{ckpt.path}: unmerged LoRA weights ({lora}): merge them into the base model first with "
                f"`litgpt merge_lora {_folder(ckpt)}`, then convert the merged {MODEL_FILE}"
            )
        adapter = next((k for k in out if _ADAPTER.search(k)), None)
        if adapter:
            raise MappingError(
                f"{ckpt.path}: LLaMA-Adapter weights ({adapter}) have no transformers equivalent; convert a full or "
                "LoRA-merged checkpoint instead"
            )
        return out

    def entry_reason(self, entry: str) -> str | None:
        reason = next((d.reason for d in TRAINING_DROPS if re.search(d.pattern, entry)), None)
        return reason or _ENTRIES.get(entry)

    # ---- hyperparameters ------------------------------------------------------------------------------
    def resolve_args(
        self, ckpt: Checkpoint, tensors: Mapping[str, LazyTensor], user: Mapping[str, Any]
    ) -> dict[str, Any]:
        where, folder = ckpt.path, _folder(ckpt)
        config_path = os.path.join(folder, CONFIG_FILE)
        saved = read_config(folder)
        stated = {k: v for k, v in user.items() if k in CONFIG_DEFAULTS}
        if saved is None:
            if not stated:
                raise CheckpointError(
                    f"{folder}: no {CONFIG_FILE} beside {MODEL_FILE}; pass LitGPT's model_config.yaml as --model-args"
                )
            saved, config_path = stated, "--model-args"
        else:
            unknown = sorted(set(saved) - set(CONFIG_DEFAULTS))
            if unknown:
                raise MappingError(
                    f"{config_path}: unknown LitGPT Config field(s) {', '.join(unknown)} (a newer LitGPT?); "
                    "hubconv cannot tell whether they change the architecture"
                )
            for k, v in stated.items():
                if k in saved and saved[k] != v:
                    raise ModelArgsError(f"--model-args {k}={v!r} contradicts {config_path}: {k}={saved[k]!r}")
            saved = {**saved, **stated}
        c = _full_config(saved, config_path)
        family = _family(c, config_path)
        a: dict[str, Any] = {k: c[k] for k in (
            "name", "n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "intermediate_size", "vocab_size",
            "padded_vocab_size", "block_size", "norm_eps", "rope_base", "rotary_percentage", "rope_n_elem",
            "parallel_residual", "bias", "attn_bias", "norm_class_name", "mlp_class_name", "gelu_approximate",
            "rope_condense_ratio", "rope_adjustments", "sliding_window_size", "scale_embeddings",
            "shared_attention_norm", "lm_head_bias",
        )}  # fmt: skip
        a["rms_unit_offset"] = c["norm_class_name"] == "RMSNorm" and "Gemma" in str(c["name"])
        a["family"] = family
        a["q_per_kv"] = c["n_head"] // c["n_query_groups"]
        a["rope"] = _rope(c, config_path)
        self._check_shapes(where, tensors, a)
        legacy_key = "transformer.h.0.attn.attn.weight" in tensors
        a["qkv_key"] = "attn" if legacy_key else "qkv"
        a["qkv_layout"] = user.get("qkv_layout") or ("legacy" if legacy_key else "current")
        a["dtype"] = tensors["transformer.wte.weight"].dtype.name
        keep = bool(user.get("keep_padded_vocab", False))
        a["keep_padded_vocab"] = keep
        a["hf_vocab_size"] = c["padded_vocab_size"] if keep else c["vocab_size"]
        tie = user.get("tie_word_embeddings")
        if tie is None:
            head = tensors.get("lm_head.weight")
            tie = head is None or same_data(head, tensors["transformer.wte.weight"])
        a["tie_word_embeddings"] = bool(tie)
        if not tie and "lm_head.weight" not in tensors:
            raise MappingError(f"{where}: no lm_head.weight although tie_word_embeddings is false")
        a.update(special_token_ids(folder))
        for k in ("bos_token_id", "eos_token_id"):
            if user.get(k) is not None:
                a[k] = user[k]
        return a

    @staticmethod
    def _check_shapes(where: str, tensors: Mapping[str, LazyTensor], a: Mapping[str, Any]) -> None:
        """The config against the tensors: a contradiction names the field and the tensor."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in tensors:
                raise MappingError(f"{where}: missing tensor {key}")
            return tuple(tensors[key].shape)

        hs, c = a["head_size"], a["n_embd"]
        qkv_rows = (a["n_head"] + 2 * a["n_query_groups"]) * hs
        qkv = next((k for k in ("transformer.h.0.attn.qkv.weight", "transformer.h.0.attn.attn.weight") if k in tensors),
                   "transformer.h.0.attn.qkv.weight")  # fmt: skip
        fc = (
            "transformer.h.0.mlp.fc.weight" if a["family"] in ("gpt_neox", "phi") else "transformer.h.0.mlp.fc_1.weight"
        )
        expected = {
            "transformer.wte.weight": ((a["padded_vocab_size"], c), "padded_vocab_size, n_embd"),
            qkv: ((qkv_rows, c), "(n_head + 2 * n_query_groups) * head_size, n_embd"),
            fc: ((a["intermediate_size"], c), "intermediate_size, n_embd"),
        }
        for key, (want, fields) in expected.items():
            got = shape(key)
            if got != want:
                raise MappingError(f"{where}: {key} is {list(got)} but the config gives [{fields}] = {list(want)}")
        layers = {int(m.group(1)) for k in tensors if (m := re.match(r"^transformer\.h\.(\d+)\.", k))}
        if layers and max(layers) >= a["n_layer"]:
            raise MappingError(f"{where}: transformer.h.{max(layers)} is beyond the config's n_layer={a['n_layer']}")

    # ---- tables and configs ---------------------------------------------------------------------------
    def table(self, args: Mapping[str, Any]) -> RuleTable:
        return {"gpt_neox": _neox_table, "phi": _phi_table}.get(args["family"], _llama_table)(args)

    def tied_keys(self, args: Mapping[str, Any]) -> tuple[str, str]:
        return "transformer.wte.weight", "lm_head.weight"

    def hf_config(self, a: Mapping[str, Any]) -> dict[str, Any]:
        common = {
            "vocab_size": a["hf_vocab_size"],
            "hidden_size": a["n_embd"],
            "intermediate_size": a["intermediate_size"],
            "num_hidden_layers": a["n_layer"],
            "num_attention_heads": a["n_head"],
            "max_position_embeddings": a["block_size"],
            "tie_word_embeddings": a["tie_word_embeddings"],
            "attention_dropout": 0.0,
            "bos_token_id": a.get("bos_token_id"),
            "eos_token_id": a.get("eos_token_id"),
        }
        act = "gelu" if a["gelu_approximate"] == "none" else "gelu_pytorch_tanh"  # F.gelu, exact or tanh
        partial = {**a["rope"], "partial_rotary_factor": a["rotary_percentage"]}
        if a["family"] == "phi":
            return {
                **common,
                "num_key_value_heads": a["n_query_groups"],
                "hidden_act": act,
                "layer_norm_eps": a["norm_eps"],
                "rope_parameters": partial,
                "qk_layernorm": False,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
            }
        if a["family"] == "gpt_neox":
            return {
                **common,
                "hidden_act": act,
                "layer_norm_eps": a["norm_eps"],
                "use_parallel_residual": a["parallel_residual"],
                "rope_parameters": partial,
                "attention_bias": bool(a["bias"] or a["attn_bias"]),
                "hidden_dropout": 0.0,
                "classifier_dropout": 0.0,
            }
        cfg = {
            **common,
            "num_key_value_heads": a["n_query_groups"],
            "hidden_act": "silu",
            "rms_norm_eps": a["norm_eps"],
            "rope_parameters": dict(a["rope"]),
        }
        if a["family"] == "llama":
            cfg |= {"head_dim": a["head_size"], "attention_bias": a["bias"], "mlp_bias": a["bias"]}
        elif a["family"] == "gemma":  # (1 + w) RMSNorm and sqrt(hidden_size) embedding scale are Gemma's own
            cfg |= {"head_dim": a["head_size"], "hidden_act": act, "attention_bias": False, "pad_token_id": None}
        elif a["family"] == "mistral":
            cfg |= {"head_dim": a["head_size"], "sliding_window": a["sliding_window_size"]}
        else:  # qwen2: head_dim is hidden_size // num_attention_heads (checked)
            cfg |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": a["n_layer"]}
        return cfg

    def plan(self, ckpt: Checkpoint, family: str, user_args: Mapping[str, Any]) -> ConversionPlan:
        plan = super().plan(ckpt, family, user_args)
        resolved = plan.native_args["family"]
        if family not in ("auto", resolved):
            raise MappingError(f"{ckpt.path}: the config describes a {resolved} model, not {family}")
        plan.family, plan.model_type = resolved, MODEL_TYPES[resolved]
        plan.targets.sort(key=_output_rank)  # embeddings, layer by layer, final norm, head (as transformers saves)
        plan.tokenizer = tokenizer_source(_folder(ckpt))
        return plan

    def native_shapes(self, args: Mapping[str, Any]) -> dict[str, LazyTensor]:
        """Shape-only LitGPT tensors for `args` (in its QKV key generation; a tied model has no lm_head here)."""
        dt = BY_NAME[args.get("dtype", "F32")]
        c, hs, ffn = args["n_embd"], args["head_size"], args["intermediate_size"]
        q = args["n_head"] * hs
        qkv = (args["n_head"] + 2 * args["n_query_groups"]) * hs
        layer_norm = args["family"] in ("gpt_neox", "phi")  # LayerNorm (weight and bias), GptNeoxMLP fc/proj
        shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (args["padded_vocab_size"], c)}
        for i in range(args["n_layer"]):
            p = f"transformer.h.{i}."
            norms = ["norm_1"] if args.get("shared_attention_norm") else ["norm_1", "norm_2"]
            shapes |= {f"{p}{n}.{w}": (c,) for n in norms for w in (("weight", "bias") if layer_norm else ("weight",))}
            shapes[f"{p}attn.{args['qkv_key']}.weight"] = (qkv, c)
            shapes[f"{p}attn.proj.weight"] = (c, q)
            mlp = {"fc": (ffn, c), "proj": (c, ffn)}
            if not layer_norm:
                mlp = {"fc_1": (ffn, c), "fc_2": (ffn, c), "proj": (c, ffn)}
            shapes |= {f"{p}mlp.{m}.weight": s for m, s in mlp.items()}
            if args["bias"] or args["attn_bias"]:
                shapes[f"{p}attn.{args['qkv_key']}.bias"] = (qkv,)
            if args["bias"]:
                shapes[f"{p}attn.proj.bias"] = (c,)
                shapes |= {f"{p}mlp.{m}.bias": (s[0],) for m, s in mlp.items()}
        shapes["transformer.ln_f.weight"] = (c,)
        if layer_norm:
            shapes["transformer.ln_f.bias"] = (c,)
        if not self.tied(args):
            shapes["lm_head.weight"] = (args["padded_vocab_size"], c)
        if args.get("lm_head_bias"):
            shapes["lm_head.bias"] = (args["padded_vocab_size"],)
        return {k: V.Zeros(k, dt, s) for k, s in shapes.items()}

    # ---- parity ---------------------------------------------------------------------------------------
    def reference_logits(
        self, ckpt: Checkpoint, native_args: Mapping[str, Any], tokens: Any, positions: Any = None
    ) -> Any:
        from hubconv.native.litgpt import reference_logits

        return reference_logits(self.model_tensors(ckpt), native_args, tokens, positions)


# ------------------------------------------------------------------------------------------------ config


def _full_config(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """LitGPT's Config.__post_init__ over the saved fields: defaults, head_size, query groups, padded vocab,
    intermediate size and rope_n_elem derived as LitGPT derives them; impossible values refused in one line."""
    c = {**CONFIG_DEFAULTS, **{k: v for k, v in raw.items() if k in CONFIG_DEFAULTS}}
    for f in ("n_layer", "n_embd", "n_head", "vocab_size", "block_size", "padding_multiple"):
        if isinstance(c[f], bool) or not isinstance(c[f], int) or c[f] <= 0:
            raise MappingError(f"{where}: {f}={c[f]!r} is not a positive integer")
    for f in ("head_size", "n_query_groups", "intermediate_size", "padded_vocab_size", "sliding_window_size"):
        if c[f] is not None and (isinstance(c[f], bool) or not isinstance(c[f], int) or c[f] <= 0):
            raise MappingError(f"{where}: {f}={c[f]!r} is not a positive integer")
    for f in ("norm_eps", "rotary_percentage", "rope_base"):
        if isinstance(c[f], bool) or not isinstance(c[f], int | float) or not c[f] > 0:
            raise MappingError(f"{where}: {f}={c[f]!r} is not a positive number")
    if c["head_size"] is None:
        if c["n_embd"] % c["n_head"]:
            raise MappingError(f"{where}: n_embd={c['n_embd']} is not a multiple of n_head={c['n_head']}")
        c["head_size"] = c["n_embd"] // c["n_head"]
    if c["padded_vocab_size"] is None:
        m = c["padding_multiple"]
        c["padded_vocab_size"] = -(-c["vocab_size"] // m) * m
    else:
        c["vocab_size"] = min(c["vocab_size"], c["padded_vocab_size"])
    if c["n_query_groups"] is None:
        c["n_query_groups"] = c["n_head"]
    elif c["n_head"] % c["n_query_groups"]:
        raise MappingError(f"{where}: n_head={c['n_head']} is not a multiple of n_query_groups={c['n_query_groups']}")
    if c["intermediate_size"] is None:
        if c["mlp_class_name"] == "LLaMAMLP":
            raise MappingError(f"{where}: a LLaMAMLP config needs intermediate_size")
        c["intermediate_size"] = 4 * c["n_embd"]
    c["rope_n_elem"] = int(c["rotary_percentage"] * c["head_size"])
    return c


def _family(c: Mapping[str, Any], where: str) -> str:
    """The transformers family computing exactly what LitGPT computes for config `c`, or a one-line refusal."""
    for field, refused, what in REFUSED:
        if refused(c):
            raise MappingError(f"{where}: {field}: {what} is not supported (no transformers class computes it)")
    for f in _MOE_ONLY:
        if c[f] is not None:
            raise MappingError(f"{where}: {f}: mixture-of-experts settings are not supported")
    if c["sliding_window_size"] is not None and c["sliding_window_indices"] is not None:
        if any(x != 1 for x in list(c["sliding_window_indices"])[: c["n_layer"]]):
            raise MappingError(
                f"{where}: sliding_window_indices: sliding-window attention in some layers only is not supported"
            )
    if c["gelu_approximate"] not in ("none", "tanh"):
        raise MappingError(f"{where}: gelu_approximate={c['gelu_approximate']!r} is not 'none' or 'tanh'")
    norm, mlp = c["norm_class_name"], c["mlp_class_name"]
    gemma = {
        "name": "Gemma" in str(c["name"]),  # LitGPT's RMSNorm adds 1 to its weight for these names
        "scale_embeddings": bool(c["scale_embeddings"]),
        "mlp_class_name": mlp == "GemmaMLP",
    }
    if any(gemma.values()) and not all(gemma.values()):
        off = ", ".join(f for f, on in gemma.items() if not on)
        raise MappingError(
            f"{where}: {off}: only the whole Gemma combination (a name containing 'Gemma', so RMSNorm adds 1 to its "
            "weight; scale_embeddings; GemmaMLP) maps onto GemmaForCausalLM"
        )
    if c["lm_head_bias"] and not (mlp == "GptNeoxMLP" and c["shared_attention_norm"]):
        raise MappingError(f"{where}: lm_head_bias: a bias on lm_head exists in Phi-style configs only")
    if mlp == "GptNeoxMLP" and norm == "LayerNorm":
        if c["sliding_window_size"] is not None:
            raise MappingError(f"{where}: sliding_window_size: GPT-NeoX and Phi have no sliding-window attention")
        if c["head_size"] * c["n_head"] != c["n_embd"]:
            raise MappingError(f"{where}: head_size: GPT-NeoX and Phi need head_size * n_head == n_embd")
        if c["shared_attention_norm"]:
            if not c["parallel_residual"]:
                raise MappingError(f"{where}: shared_attention_norm: LitGPT has it with parallel_residual only")
            if not (c["bias"] and c["lm_head_bias"]):
                raise MappingError(
                    f"{where}: bias, lm_head_bias: a shared attention norm without biases everywhere (Falcon style) "
                    "is not supported; Phi has biases everywhere, lm_head included"
                )
            return "phi"
        if c["n_query_groups"] != c["n_head"]:
            raise MappingError(f"{where}: n_query_groups: GPT-NeoX has no grouped-query attention")
        return "gpt_neox"
    if c["shared_attention_norm"]:
        raise MappingError(f"{where}: shared_attention_norm: a shared attention norm exists in Phi-style configs only")
    if mlp in ("LLaMAMLP", "GemmaMLP") and norm == "RMSNorm":
        if c["parallel_residual"]:
            raise MappingError(f"{where}: parallel_residual: a parallel-residual {mlp} model has no transformers class")
        if c["rope_n_elem"] != c["head_size"]:
            raise MappingError(
                f"{where}: rotary_percentage={c['rotary_percentage']}: Llama-style classes rotate the whole head"
            )
        if mlp == "GemmaMLP":
            if c["sliding_window_size"] is not None or c["bias"] or c["attn_bias"]:
                raise MappingError(f"{where}: Gemma configs with biases or a sliding window are not supported")
            if c["gelu_approximate"] != "tanh":  # GemmaConfig turns hidden_act "gelu" into "gelu_pytorch_tanh"
                raise MappingError(
                    f"{where}: gelu_approximate={c['gelu_approximate']!r}: GemmaForCausalLM always uses the tanh GELU"
                )
            return "gemma"
        if c["sliding_window_size"] is not None:
            if c["bias"] or c["attn_bias"]:
                raise MappingError(f"{where}: sliding_window_size: Mistral has no attention biases")
            return "mistral"
        if c["attn_bias"] and not c["bias"]:
            if c["head_size"] * c["n_head"] != c["n_embd"]:
                raise MappingError(f"{where}: head_size: Qwen2 needs head_size * n_head == n_embd")
            return "qwen2"
        return "llama"
    raise MappingError(
        f"{where}: mlp_class_name={mlp!r} with norm_class_name={norm!r} has no transformers class "
        "(supported: LLaMAMLP or GemmaMLP + RMSNorm, GptNeoxMLP + LayerNorm)"
    )


def _rope(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    """transformers' rope_parameters for LitGPT's rope_base, rope_condense_ratio and rope_adjustments."""
    base = float(c["rope_base"])
    adj, condense = c["rope_adjustments"], c["rope_condense_ratio"]
    if isinstance(condense, bool) or not isinstance(condense, int | float) or condense <= 0:
        raise MappingError(f"{where}: rope_condense_ratio={condense!r} is not a positive number")
    if adj is None:
        if condense == 1:
            return {"rope_type": "default", "rope_theta": base}
        return {"rope_type": "linear", "rope_theta": base, "factor": float(condense)}  # positions / ratio
    if not isinstance(adj, dict):
        raise MappingError(f"{where}: rope_adjustments must be a mapping, not {type(adj).__name__}")
    if condense != 1:
        raise MappingError(f"{where}: rope_condense_ratio with rope_adjustments is not supported")
    keys = set(adj)
    llama3 = {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
    if keys & {"beta_fast", "beta_slow", "mscale", "mscale_all_dim"}:
        raise MappingError(f"{where}: rope_adjustments: YaRN scaling is not supported")
    if keys & {"low_freq_factor", "high_freq_factor"}:
        if keys != llama3:
            raise MappingError(f"{where}: rope_adjustments: Llama 3 scaling needs exactly {', '.join(sorted(llama3))}")
        return {
            "rope_type": "llama3",
            "rope_theta": base,
            "factor": float(adj["factor"]),
            "low_freq_factor": float(adj["low_freq_factor"]),
            "high_freq_factor": float(adj["high_freq_factor"]),
            "original_max_position_embeddings": int(adj["original_max_seq_len"]),
        }
    if "factor" in keys:
        return {"rope_type": "linear", "rope_theta": base, "factor": float(adj["factor"])}
    return {"rope_type": "default", "rope_theta": base}  # LitGPT ignores other keys: standard RoPE


# ------------------------------------------------------------------------------------------------ tables


def _vocab_ops(a: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [] if a["hf_vocab_size"] == a["padded_vocab_size"] else [("slice_rows", {"stop": "hf_vocab_size"})]


def _qkv_split(a: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if a["qkv_layout"] == "legacy":  # per query group: [q_per_kv heads of q; k; v]
        return [
            ("split_groups", {"groups": "n_query_groups", "rows": ["q_per_kv * head_size", "head_size", "head_size"]})
        ]
    return [
        ("split_rows", {"sizes": ["n_head * head_size", "n_query_groups * head_size", "n_query_groups * head_size"]})
    ]


def _llama_table(a: Mapping[str, Any]) -> RuleTable:
    L, H = "transformer.h.{i}.", "model.layers.{i}."
    qkv = f"{L}attn.{a['qkv_key']}"
    att = f"{H}self_attn."
    rules = [
        Rule("transformer.wte.weight", "model.embed_tokens.weight", ops=_vocab_ops(a)),
        Rule(f"{L}norm_1.weight", f"{H}input_layernorm.weight"),
        Rule(f"{qkv}.weight", [f"{att}q_proj.weight", f"{att}k_proj.weight", f"{att}v_proj.weight"], ops=_qkv_split(a)),
    ]
    if a["bias"] or a["attn_bias"]:
        rules.append(
            Rule(f"{qkv}.bias", [f"{att}q_proj.bias", f"{att}k_proj.bias", f"{att}v_proj.bias"], ops=_qkv_split(a))
        )
    rules.append(Rule(f"{L}attn.proj.weight", f"{att}o_proj.weight"))
    if a["bias"]:
        rules.append(Rule(f"{L}attn.proj.bias", f"{att}o_proj.bias"))
    rules.append(Rule(f"{L}norm_2.weight", f"{H}post_attention_layernorm.weight"))
    for lit, hf in (("fc_1", "gate_proj"), ("fc_2", "up_proj"), ("proj", "down_proj")):
        rules.append(Rule(f"{L}mlp.{lit}.weight", f"{H}mlp.{hf}.weight"))
        if a["bias"]:
            rules.append(Rule(f"{L}mlp.{lit}.bias", f"{H}mlp.{hf}.bias"))
    rules += [
        Rule("transformer.ln_f.weight", "model.norm.weight"),
        Rule("lm_head.weight", "lm_head.weight", ops=_vocab_ops(a)),
    ]
    return RuleTable(rules, TRAINING_DROPS)


def _phi_table(a: Mapping[str, Any]) -> RuleTable:
    """Phi (phi-1.5, phi-2): one LayerNorm feeds attention and MLP; q/k/v split as for Llama; lm_head has a bias."""
    L, H = "transformer.h.{i}.", "model.layers.{i}."
    qkv, att = f"{L}attn.{a['qkv_key']}", f"{H}self_attn."
    rules = [Rule("transformer.wte.weight", "model.embed_tokens.weight", ops=_vocab_ops(a))]
    rules += [Rule(f"{L}norm_1.{w}", f"{H}input_layernorm.{w}") for w in ("weight", "bias")]
    rules += [
        Rule(f"{qkv}.{w}", [f"{att}q_proj.{w}", f"{att}k_proj.{w}", f"{att}v_proj.{w}"], ops=_qkv_split(a))
        for w in ("weight", "bias")
    ]
    rules += [Rule(f"{L}attn.proj.{w}", f"{att}dense.{w}") for w in ("weight", "bias")]
    rules += [Rule(f"{L}mlp.{lit}.{w}", f"{H}mlp.{hf}.{w}") for lit, hf in (("fc", "fc1"), ("proj", "fc2"))
              for w in ("weight", "bias")]  # fmt: skip
    rules += [Rule(f"transformer.ln_f.{w}", f"model.final_layernorm.{w}") for w in ("weight", "bias")]
    rules += [Rule(f"lm_head.{w}", f"lm_head.{w}", ops=_vocab_ops(a)) for w in ("weight", "bias")]
    return RuleTable(rules, TRAINING_DROPS)


def _neox_table(a: Mapping[str, Any]) -> RuleTable:
    L, H = "transformer.h.{i}.", "gpt_neox.layers.{i}."
    qkv = f"{L}attn.{a['qkv_key']}"
    # GPT-NeoX fuses per head [q_h; k_h; v_h]: LitGPT's legacy layout is exactly that (one head per group);
    # the current [Q; K; V] is regrouped head by head.
    regroup = [] if a["qkv_layout"] == "legacy" else [("transpose_groups", {"groups": 3, "rows": "head_size"})]
    dt = a["dtype"]

    def bias(src: str, dst: str, present: bool, width: str) -> Rule:
        if present:
            return Rule(src, dst)
        return Rule({}, dst, ops=[("zeros", {"shape": [width], "dtype": dt})], counts={"i": "n_layer"},
                    label=f"zero bias {dst} (LitGPT model without it)")  # fmt: skip

    attn_bias = bool(a["bias"] or a["attn_bias"])
    rules = [
        Rule("transformer.wte.weight", "gpt_neox.embed_in.weight", ops=_vocab_ops(a)),
        Rule(f"{L}norm_1.weight", f"{H}input_layernorm.weight"),
        Rule(f"{L}norm_1.bias", f"{H}input_layernorm.bias"),
        Rule(f"{qkv}.weight", f"{H}attention.query_key_value.weight", ops=regroup),
    ]
    if attn_bias:
        rules.append(Rule(f"{qkv}.bias", f"{H}attention.query_key_value.bias", ops=regroup))
    rules.append(Rule(f"{L}attn.proj.weight", f"{H}attention.dense.weight"))
    if attn_bias:
        rules.append(bias(f"{L}attn.proj.bias", f"{H}attention.dense.bias", a["bias"], "n_embd"))
    rules += [
        Rule(f"{L}norm_2.weight", f"{H}post_attention_layernorm.weight"),
        Rule(f"{L}norm_2.bias", f"{H}post_attention_layernorm.bias"),
        Rule(f"{L}mlp.fc.weight", f"{H}mlp.dense_h_to_4h.weight"),
        bias(f"{L}mlp.fc.bias", f"{H}mlp.dense_h_to_4h.bias", a["bias"], "intermediate_size"),
        Rule(f"{L}mlp.proj.weight", f"{H}mlp.dense_4h_to_h.weight"),
        bias(f"{L}mlp.proj.bias", f"{H}mlp.dense_4h_to_h.bias", a["bias"], "n_embd"),
        Rule("transformer.ln_f.weight", "gpt_neox.final_layer_norm.weight"),
        Rule("transformer.ln_f.bias", "gpt_neox.final_layer_norm.bias"),
        Rule("lm_head.weight", "lm_head.weight", ops=_vocab_ops(a)),
    ]
    return RuleTable(rules, TRAINING_DROPS)


def _output_rank(t: LazyTensor) -> tuple[int, int]:
    m = re.search(r"\.layers\.(\d+)\.", t.name)
    if m:
        return 1, int(m.group(1))
    return (0, 0) if "embed" in t.name else (2, 0)


register(LitGPTAdapter())
