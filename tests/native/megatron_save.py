"""Megatron-LM's legacy torch checkpoint layout, written from a `MegatronGPT` for tests (after
NVIDIA/Megatron-LM `megatron/training/checkpointing.py` `save_checkpoint`/`get_checkpoint_name`,
`megatron/core/tensor_parallel/layers.py`, `megatron/legacy/model/{transformer,language_model,gpt_model}.py`;
nothing copied).

`save_legacy(model, cfg, folder, tp, pp)` writes::

    folder/latest_checkpointed_iteration.txt              "100"
    folder/iter_0000100/mp_rank_TT/model_optim_rng.pt       (pp == 1)
    folder/iter_0000100/mp_rank_TT_PPP/model_optim_rng.pt   (pp > 1)

each holding `{args, checkpoint_version, iteration, model, optimizer, opt_param_scheduler, rng_state,
num_floating_point_operations_so_far}`.

Sharding (`shard_core`): column-parallel weights (`linear_qkv`, `linear_fc1`) split on dim 0 — QKV by
whole query groups, SwiGLU `linear_fc1` per rank as `[gate_r; up_r]` —, row-parallel weights
(`linear_proj`, `linear_fc2`) on dim 1 with their biases replicated, vocab-parallel word embeddings and
output layer on dim 0, norms and position embeddings replicated. Pipeline stages hold `num_layers / pp`
layers numbered from 0, the embeddings on the first stage, the final norm and output layer on the last;
a tied output layer with pp > 1 is also saved on the last stage (`output_layer.weight`, legacy
`word_embeddings_for_head.weight`).

`naming="core"` keeps megatron-core keys in a flat `model` dict (`spec="te"`: fused norms plus an
`_extra_state` entry per TE module, `extra_state="tensor"|"bytesio"|"none"`; `spec="local"`:
`input_layernorm`/`pre_mlp_layernorm`).
`naming="legacy"` writes the nested `language_model` dict (`embedding`, `encoder`, `output_layer`) with
legacy layer names; `checkpoint_version` then sets the per-rank fused-QKV order: 0 → `[3, np, hn]`,
1.0 → `[np, hn, 3]`, ≥ 2.0 → `[np, 3, hn]` (per group `[q × np/ng, k, v]` with GQA, which needs ≥ 2.0).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tests.native.megatron_gpt import MegatronGPT, MegatronGPTConfig

ITERATION = 100

LEGACY_LAYER_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "self_attention.linear_qkv.weight": "self_attention.query_key_value.weight",
    "self_attention.linear_qkv.bias": "self_attention.query_key_value.bias",
    "self_attention.linear_proj.weight": "self_attention.dense.weight",
    "self_attention.linear_proj.bias": "self_attention.dense.bias",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "post_attention_layernorm.bias",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc1.bias": "mlp.dense_h_to_4h.bias",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
    "mlp.linear_fc2.bias": "mlp.dense_4h_to_h.bias",
}
LOCAL_LAYER_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
TE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.core_attention",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
DROP = object()  # pass as an args override to leave a field out


def rank_folder(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron's `mp_rank_TT` (pp == 1) or `mp_rank_TT_PPP` folder name."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def split_for_tp(name: str, t: torch.Tensor, cfg: MegatronGPTConfig, tp: int) -> list[torch.Tensor]:
    """One global megatron-core tensor -> its `tp` rank-local pieces (clones, so each saves its own storage)."""
    leaf = name.rsplit(".", 1)[-1]
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return [p.clone() for p in t.chunk(tp, dim=0)]
    if "linear_qkv" in name and leaf in ("weight", "bias"):
        return [p.clone() for p in t.chunk(tp, dim=0)]  # rows are whole groups, groups contiguous
    if "linear_fc1" in name and leaf in ("weight", "bias"):
        if cfg.activation == "swiglu":
            gate, up = t.chunk(2, dim=0)
            return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0), strict=True)]
        return [p.clone() for p in t.chunk(tp, dim=0)]
    if ("linear_proj" in name or "linear_fc2" in name) and leaf == "weight":
        return [p.clone() for p in t.chunk(tp, dim=1)]
    return [t.clone() for _ in range(tp)]  # norms, position embeddings, row-parallel biases


def qkv_to_version(t: torch.Tensor, cfg: MegatronGPTConfig, version: float) -> torch.Tensor:
    """Rank-local `[np, 3, hn]` QKV rows (weight or bias) into the order of `checkpoint_version`."""
    if version >= 2.0:
        return t
    hn = cfg.head_dim
    rest = t.shape[1:]
    heads = t.shape[0] // (3 * hn)
    per_head = t.reshape(heads, 3, hn, *rest)
    if version == 0:
        out = per_head.transpose(0, 1)  # [3, np, hn]
    elif version == 1.0:
        out = per_head.transpose(1, 2)  # [np, hn, 3]
    else:
        raise ValueError(f"no QKV order for checkpoint_version {version}")
    return out.reshape(t.shape).contiguous()


def shard_core(model: MegatronGPT, tp: int, pp: int) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Global state dict -> {(tp_rank, pp_rank): stage-local megatron-core state dict}."""
    cfg = model.cfg
    if cfg.num_layers % pp or cfg.groups % tp or cfg.ffn % tp or model.padded_vocab % tp:
        raise ValueError(f"layers/groups/ffn/vocab not divisible by tp={tp} pp={pp}")
    per_stage = cfg.num_layers // pp
    shards: dict[tuple[int, int], dict[str, torch.Tensor]] = {(r, s): {} for r in range(tp) for s in range(pp)}
    state = model.state_dict()
    if not cfg.untie_embeddings_and_output_weights and pp > 1:
        state["output_layer.weight"] = state["embedding.word_embeddings.weight"]
    for name, t in state.items():
        m = LAYER.fullmatch(name)
        if m:
            layer = int(m.group(1))
            stage, local = divmod(layer, per_stage)
            key = f"decoder.layers.{local}.{m.group(2)}"
        elif name.startswith("embedding."):
            stage, key = 0, name
        else:  # final norm, output layer
            stage, key = pp - 1, name
        for rank, piece in enumerate(split_for_tp(name, t, cfg, tp)):
            shards[(rank, stage)][key] = piece
    return shards


def te_extra_state(kind: str) -> object:
    """A TE module's `_extra_state` without FP8: an empty uint8 tensor (recent TE), a `torch.save(None)`
    into `io.BytesIO` (older TE: pickles the `_io.BytesIO` global), or None."""
    if kind == "tensor":
        return torch.empty(0, dtype=torch.uint8)
    if kind == "bytesio":
        buf = io.BytesIO()
        torch.save(None, buf)
        buf.seek(0)
        return buf
    return None


def to_core_spec(shard: dict[str, torch.Tensor], spec: str, extra_state: str = "tensor") -> dict[str, object]:
    """Rename for the local spec, or add TE's `_extra_state` entries (see `te_extra_state`)."""
    out: dict[str, object] = {}
    layers = sorted({int(m.group(1)) for k in shard if (m := LAYER.fullmatch(k))})
    for key, t in shard.items():
        m = LAYER.fullmatch(key)
        if spec == "local" and m and m.group(2) in LOCAL_LAYER_NAMES:
            key = f"decoder.layers.{m.group(1)}.{LOCAL_LAYER_NAMES[m.group(2)]}"
        out[key] = t
    if spec == "te":
        for i in layers:
            for module in TE_MODULES:
                out[f"decoder.layers.{i}.{module}._extra_state"] = te_extra_state(extra_state)
    return out


def to_legacy(shard: dict[str, torch.Tensor], cfg: MegatronGPTConfig, version: float) -> dict[str, object]:
    """A stage-local core shard -> legacy `{language_model: {embedding, encoder, output_layer}, ...}`."""
    lm: dict[str, dict] = {}
    model: dict[str, object] = {"language_model": lm}
    for key, t in shard.items():
        m = LAYER.fullmatch(key)
        if m:
            if m.group(2) in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                t = qkv_to_version(t, cfg, version)
            lm.setdefault("encoder", {})[f"layers.{m.group(1)}.{LEGACY_LAYER_NAMES[m.group(2)]}"] = t
        elif key == "embedding.word_embeddings.weight":
            lm.setdefault("embedding", {})["word_embeddings"] = {"weight": t}
        elif key == "embedding.position_embeddings.weight":
            lm.setdefault("embedding", {})["position_embeddings"] = {"weight": t}
        elif key.startswith("decoder.final_layernorm."):
            lm.setdefault("encoder", {})[key.replace("decoder.", "", 1)] = t
        elif key == "output_layer.weight":
            if cfg.untie_embeddings_and_output_weights:
                lm["output_layer"] = {"weight": t}
            else:
                model["word_embeddings_for_head"] = {"weight": t}
        else:
            raise KeyError(key)
    return model


def megatron_args(cfg: MegatronGPTConfig, tp: int, pp: int, **overrides: object) -> argparse.Namespace:
    """The saved `args` Namespace: the fields a converter needs plus typical training ones."""
    swiglu = cfg.activation == "swiglu"
    fields: dict[str, object] = {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn,
        "num_attention_heads": cfg.num_attention_heads,
        "group_query_attention": cfg.num_query_groups is not None,
        "num_query_groups": cfg.num_query_groups or 1,
        "kv_channels": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "seq_length": cfg.max_position_embeddings,
        "padded_vocab_size": cfg.padded_vocab_size(tp),
        "vocab_size": None,
        "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": None,
        "world_size": tp * pp,
        "data_parallel_size": 1,
        "position_embedding_type": "rope" if cfg.position_embedding_type == "rope" else "learned_absolute",
        "use_rotary_position_embeddings": cfg.position_embedding_type == "rope",
        "rotary_base": cfg.rotary_base,
        "rotary_percent": cfg.rotary_percent,
        "rotary_interleaved": False,
        "rotary_seq_len_interpolation_factor": cfg.rotary_seq_len_interpolation_factor,
        "use_rope_scaling": cfg.use_rope_scaling,
        "rope_scaling_factor": cfg.rope_scaling_factor,
        "normalization": cfg.normalization,
        "norm_epsilon": cfg.layernorm_epsilon,
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "apply_layernorm_1p": False,
        "swiglu": swiglu,
        "squared_relu": False,
        "openai_gelu": False,
        "bias_gelu_fusion": cfg.activation == "gelu_tanh",
        "bias_swiglu_fusion": swiglu,
        "add_bias_linear": cfg.add_bias_linear,
        "add_qkv_bias": cfg.qkv_bias,
        "untie_embeddings_and_output_weights": cfg.untie_embeddings_and_output_weights,
        "apply_query_key_layer_scaling": False,
        "attention_softmax_in_fp32": True,
        "apply_residual_connection_post_layernorm": False,
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
        "init_method_std": 0.02,
        "params_dtype": torch.float32,
        "fp16": False,
        "bf16": False,
        "tokenizer_type": "GPT2BPETokenizer",
        "vocab_file": "gpt2-vocab.json",
        "merge_file": "gpt2-merges.txt",
        "tokenizer_model": None,
        "transformer_impl": "transformer_engine",
        "use_mcore_models": True,
        "ckpt_format": "torch",
        "seed": 1234,
        "iteration": ITERATION,
        "consumed_train_samples": 800,
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "lr": 3e-4,
        "train_iters": 1000,
        "save": "/checkpoints/gpt",
    }
    fields.update(overrides)
    return argparse.Namespace(**{k: v for k, v in fields.items() if v is not DROP})


def optimizer_state(model_state: dict[str, object]) -> dict[str, object]:
    """Megatron's FP16/float optimizer state: Adam moments per parameter index plus fp32 master copies."""
    tensors = [t for t in model_state.values() if isinstance(t, torch.Tensor) and t.numel() and t.is_floating_point()]
    state = {i: {"step": torch.tensor(100.0), "exp_avg": t * 0.01, "exp_avg_sq": t * t} for i, t in enumerate(tensors)}
    group = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(range(len(tensors)))}
    return {
        "optimizer": {"state": state, "param_groups": [group]},
        "fp32_from_fp16_params": [[t.clone() for t in tensors]],
        "grad_scaler": None,
    }


def rng_state(seed: int) -> list[dict[str, object]]:
    """`get_rng_state()`: Python, NumPy (an ndarray inside), torch CPU/CUDA and tracker states."""
    random.seed(seed)
    np.random.seed(seed)
    return [
        {
            "random_rng_state": random.getstate(),
            "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),  # no GPU here: same type and role
            "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)},
        }
    ]


def save_legacy(
    model: MegatronGPT,
    cfg: MegatronGPTConfig,
    folder: str | Path,
    tp: int = 1,
    pp: int = 1,
    checkpoint_version: float = 3.0,
    naming: str = "core",
    spec: str = "te",
    args_overrides: dict[str, object] | None = None,
    with_optimizer: bool = True,
    extra_state: str = "tensor",
) -> dict[tuple[int, int], Path]:
    """Save `model` as Megatron-LM's legacy torch checkpoint; returns {(tp_rank, pp_rank): file}."""
    if model.padded_vocab != cfg.padded_vocab_size(tp):
        raise ValueError(f"model padded for TP={model.tp}, saving with TP={tp}: build MegatronGPT(cfg, tp={tp})")
    if checkpoint_version < 2.0 and (naming != "legacy" or cfg.num_query_groups is not None):
        raise ValueError("checkpoint_version < 2.0 exists only for legacy naming without GQA")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    args = megatron_args(cfg, tp, pp, **(args_overrides or {}))
    if naming == "legacy":
        args.use_mcore_models, args.transformer_impl = False, "local"
    files = {}
    for (rank, stage), shard in sorted(shard_core(model, tp, pp).items()):
        state = (
            to_legacy(shard, cfg, checkpoint_version) if naming == "legacy" else to_core_spec(shard, spec, extra_state)
        )
        path = folder / f"iter_{ITERATION:07d}" / rank_folder(rank, stage, pp) / "model_optim_rng.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt: dict[str, object] = {
            "args": args,
            "checkpoint_version": checkpoint_version,
            "iteration": ITERATION,
            "model": state,
            "rng_state": rng_state(1234 + rank),
            "num_floating_point_operations_so_far": 1.0e12,
        }
        if with_optimizer:
            flat = shard if naming == "legacy" else state
            ckpt["optimizer"] = optimizer_state(flat)
            ckpt["opt_param_scheduler"] = {"max_lr": 3e-4, "min_lr": 3e-5, "num_steps": 800, "warmup_steps": 10}
        torch.save(ckpt, path)
        files[(rank, stage)] = path
    return files


def save_legacy_virtual(
    model: MegatronGPT, cfg: MegatronGPTConfig, folder: str | Path, tp: int, pp: int, vp: int
) -> None:
    """A legacy checkpoint with virtual pipeline stages (interleaved schedule): each rank file holds `model0` ..
    `model{vp-1}`, chunk v of stage p holding the (v * pp + p)-th block of layers, as Megatron assigns them."""
    folder = Path(folder)
    (folder / "latest_checkpointed_iteration.txt").parent.mkdir(parents=True, exist_ok=True)
    (folder / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    args = megatron_args(cfg, tp, pp, virtual_pipeline_model_parallel_size=vp)
    states: dict[tuple[int, int], dict[str, object]] = {}
    for (rank, block), shard in sorted(shard_core(model, tp, pp * vp).items()):
        v, stage = divmod(block, pp)
        states.setdefault((rank, stage), {})[f"model{v}"] = to_core_spec(shard, "te")
    for (rank, stage), chunks in states.items():
        path = folder / f"iter_{ITERATION:07d}" / rank_folder(rank, stage, pp) / "model_optim_rng.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, **chunks}, path)


# ---------------------------------------------------------------- NeMo (MegatronGPTModel) layouts


def flat_keys(tree: dict[str, object], prefix: str = "") -> dict[str, object]:
    """Nested legacy dict -> dotted keys, as `nn.Module.state_dict()` names them in NeMo."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat_keys(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def nemo_state(shard: dict[str, torch.Tensor], cfg: MegatronGPTConfig, naming: str, amp_o2: bool) -> dict[str, object]:
    """A TP-rank shard as NeMo's `MegatronGPTModel.state_dict()`: `model.` (O2: `model.module.`) + core or
    legacy names; legacy QKV in the ≥ 2.0 order, and the legacy rotary `inv_freq` buffer."""
    prefix = "model.module." if amp_o2 else "model."
    if naming == "legacy":
        body = flat_keys(to_legacy(shard, cfg, 3.0))
        if cfg.position_embedding_type == "rope":
            rot_dim = int(cfg.head_dim * cfg.rotary_percent)
            inv = 1.0 / (cfg.rotary_base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
            body["language_model.rotary_pos_emb.inv_freq"] = inv
    else:
        body = to_core_spec(shard, "te")
    return {prefix + k: v for k, v in body.items()}


def nemo_config(
    cfg: MegatronGPTConfig, tp: int, naming: str, amp_o2: bool, tokenizer_member: str | None
) -> dict[str, object]:
    """The `cfg` NeMo saves (model_config.yaml / hyper_parameters.cfg) for a GPT model."""
    return {
        "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
        "nemo_version": "1.22.0",
        "mcore_gpt": naming == "core",
        "transformer_engine": naming == "core",
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": 1,
        "encoder_seq_length": cfg.max_position_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups,
        "kv_channels": None,
        "init_method_std": 0.02,
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "normalization": "layernorm" if cfg.normalization == "LayerNorm" else "rmsnorm",
        "bias": cfg.add_bias_linear,
        "activation": "fast-swiglu" if cfg.activation == "swiglu" else "gelu",
        "bias_activation_fusion": cfg.activation == "gelu_tanh",
        "position_embedding_type": cfg.position_embedding_type,
        "rotary_percentage": cfg.rotary_percent,
        "rotary_base": cfg.rotary_base,
        "share_embeddings_and_output_weights": not cfg.untie_embeddings_and_output_weights,
        "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by,
        "apply_query_key_layer_scaling": False,
        "megatron_amp_O2": amp_o2,
        "precision": 32,
        "tokenizer": {
            "library": "sentencepiece" if tokenizer_member else "megatron",
            "type": None if tokenizer_member else "GPT2BPETokenizer",
            "model": f"nemo:{tokenizer_member}" if tokenizer_member else None,
            "vocab_file": None,
            "merge_file": None,
        },
        "optim": {"name": "fused_adam", "lr": 3e-4, "weight_decay": 0.1},
    }


def save_nemo_ckpt(
    model: MegatronGPT,
    cfg: MegatronGPTConfig,
    path: str | Path,
    naming: str = "core",
    amp_o2: bool = False,
    with_optimizer: bool = True,
) -> Path:
    """A Lightning `.ckpt` of NeMo's MegatronGPTModel (TP=1 PP=1) with `hyper_parameters.cfg` a pickled DictConfig."""
    from omegaconf import OmegaConf  # test-only dependency (pyproject dev extra)

    if model.padded_vocab != cfg.padded_vocab_size(1):
        raise ValueError("NeMo .ckpt fixture is TP=1: build MegatronGPT(cfg, tp=1)")
    state = nemo_state(shard_core(model, 1, 1)[(0, 0)], cfg, naming, amp_o2)
    ckpt: dict[str, object] = {
        "epoch": 0,
        "global_step": ITERATION,
        "pytorch-lightning_version": "2.0.7",
        "state_dict": state,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}}}},
        "callbacks": {},
        "hparams_name": "cfg",
        "hyper_parameters": {"cfg": OmegaConf.create(nemo_config(cfg, 1, naming, amp_o2, None))},
    }
    if with_optimizer:
        ckpt["optimizer_states"] = [optimizer_state(state)["optimizer"]]
        ckpt["lr_schedulers"] = [{"last_epoch": ITERATION, "_step_count": ITERATION + 1}]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def save_nemo_archive(
    model: MegatronGPT,
    cfg: MegatronGPTConfig,
    path: str | Path,
    tp: int = 1,
    naming: str = "core",
    amp_o2: bool = False,
    tokenizer_model: str | Path | None = None,
    compress: bool = False,
) -> Path:
    """A `.nemo` tar as NeMo's `save_to` writes it (members `./model_config.yaml`, `./model_weights.ckpt` or
    `./mp_rank_TT/model_weights.ckpt` for TP > 1, `./<hex>_tokenizer.model`); uncompressed unless `compress`."""
    import tarfile
    import tempfile

    import yaml

    if model.padded_vocab != cfg.padded_vocab_size(tp):
        raise ValueError(f"model padded for TP={model.tp}, saving with TP={tp}")
    member = "a1b2c3d4e5f60718293a4b5c6d7e8f90_tokenizer.model" if tokenizer_model else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        conf = nemo_config(cfg, tp, naming, amp_o2, member)
        (root / "model_config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
        if member and tokenizer_model:
            (root / member).write_bytes(Path(tokenizer_model).read_bytes())
        for (rank, _), shard in sorted(shard_core(model, tp, 1).items()):
            weights = root / (f"mp_rank_{rank:02d}" if tp > 1 else "") / "model_weights.ckpt"
            weights.parent.mkdir(parents=True, exist_ok=True)
            torch.save(nemo_state(shard, cfg, naming, amp_o2), weights)
        with tarfile.open(path, "w:gz" if compress else "w:") as tar:
            tar.add(root, arcname=".")
    return path


def train_gpt_sw3_style_tokenizer(folder: str | Path, vocab_size: int = 400) -> tuple[Path, int]:
    """A tiny SentencePiece model with GPT-SW3-like special pieces (`<pad>`, `<unk>`, `<s>`, `<|endoftext|>`,
    byte fallback); returns (model file, its piece count), the true vocabulary to give `MegatronGPTConfig`."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = "hej och att det som en på är av för med till den har de inte om ett han men the of and to in is".split()
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(2000)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        byte_fallback=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        eos_piece="<|endoftext|>",
        num_threads=1,
        minloglevel=2,
    )
    model = folder / "tokenizer.model"
    return model, spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()


# ---------------------------------------------------------------- megatron-core torch_dist (DCP)

ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
COLUMN_PARALLEL = (
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc1.bias",
)


def dist_chunks(
    sub: str, t: torch.Tensor, cfg: MegatronGPTConfig, tp: int
) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """A layer tensor's TP chunks with their offsets in the unstacked global tensor, as megatron-core's
    sharded_state_dict lays them out (SwiGLU fc1: gate_r at row r*f/tp, up_r at f + r*f/tp)."""
    zeros = (0,) * (t.dim() - 1)
    if sub in ROW_PARALLEL:
        cols = t.shape[1] // tp
        return [(t[:, r * cols : (r + 1) * cols].clone(), (0, r * cols)) for r in range(tp)]
    if sub in COLUMN_PARALLEL:
        if sub.startswith("mlp.linear_fc1.") and cfg.activation == "swiglu":
            half, rows = t.shape[0] // 2, t.shape[0] // 2 // tp
            return [
                (t[o + r * rows : o + (r + 1) * rows].clone(), (o + r * rows, *zeros))
                for o in (0, half)
                for r in range(tp)
            ]
        rows = t.shape[0] // tp
        return [(t[r * rows : (r + 1) * rows].clone(), (r * rows, *zeros)) for r in range(tp)]
    return [(t.clone(), (0, *zeros))]  # replicated: saved once (replica 0)


@contextlib.contextmanager
def world_of_one() -> Iterator[None]:
    """A one-process gloo group (ShardedTensor and DCP need one), unless one already exists."""
    import tempfile

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", world_size=1, rank=0)
        try:
            yield
        finally:
            dist.destroy_process_group()


def save_torch_dist(
    model: MegatronGPT,
    cfg: MegatronGPTConfig,
    folder: str | Path,
    tp: int = 1,
    pp: int = 1,
    extra_state: bool = True,
    swiglu_split_keys: bool = False,
) -> Path:
    """Save `model` as a megatron-core `torch_dist` checkpoint: `iter_0000100/{metadata.json, common.pt,
    .metadata, __0_T.distcp}` through torch.distributed.checkpoint. Decoder layers are stacked on a leading
    layer axis (`decoder.layers.self_attention.linear_qkv.weight` is [L, ...]), one chunk per (layer, TP rank);
    row-parallel weights are chunked on the unstacked dim 1; replicated tensors are one chunk; a tied output
    layer is not stored. TE `_extra_state` are DCP byte objects under `<key>/shard_<offsets>_<shape>`.
    `swiglu_split_keys` stores SwiGLU fc1 as newer megatron-core's `singleton_local_shards` does: gate under
    `<key>_w` and up under `<key>_v`, each [L, ffn, h]; otherwise one [L, 2·ffn, h] tensor, gate chunks then up.
    Written by one process holding every rank's shards (a world of one), spread over `tp × pp` files."""
    import json

    import torch.distributed.checkpoint as dcp

    if model.padded_vocab != cfg.padded_vocab_size(tp):
        raise ValueError(f"model padded for TP={model.tp}, saving with TP={tp}")
    folder = Path(folder)
    target = folder / f"iter_{ITERATION:07d}"
    target.mkdir(parents=True, exist_ok=True)
    (folder / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))

    with world_of_one():
        dcp.save(
            dist_state(model, cfg, tp, extra_state, swiglu_split_keys),
            storage_writer=dcp.FileSystemWriter(target, thread_count=tp * pp),
        )
    args = megatron_args(cfg, tp, pp, ckpt_format="torch_dist")
    common = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": ITERATION,
        "opt_param_scheduler": {"max_lr": 3e-4, "min_lr": 3e-5, "num_steps": 800, "warmup_steps": 10},
        "num_floating_point_operations_so_far": 1.0e12,
    }
    torch.save(common, target / "common.pt")
    metadata = {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
    (target / "metadata.json").write_text(json.dumps(metadata))
    return target


def sharded(chunks: list[tuple[torch.Tensor, tuple[int, ...]]], shape: tuple[int, ...]) -> object:
    """A torch ShardedTensor of the global `shape` whose local shards (all on this rank) are `(chunk, offsets)`."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    shards = [Shard(c.contiguous(), ShardMetadata(list(o), list(c.shape), "rank:0/cpu")) for c, o in chunks]
    props = TensorProperties.create_from_tensor(chunks[0][0])
    meta = ShardedTensorMetadata([s.metadata for s in shards], torch.Size(shape), props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta)


def dist_state(
    model: MegatronGPT, cfg: MegatronGPTConfig, tp: int, extra_state: bool, swiglu_split_keys: bool = False
) -> dict[str, object]:
    """The DCP state dict: stacked layer ShardedTensors, vocab-chunked embeddings, replicated tensors, extra states."""
    state = model.state_dict()
    layers: dict[str, list[tuple[torch.Tensor, tuple[int, ...]]]] = {}
    layer_shapes: dict[str, tuple[int, ...]] = {}
    to_save: dict[str, object] = {}
    for name, t in state.items():
        m = LAYER.fullmatch(name)
        if m:
            i, sub = int(m.group(1)), m.group(2)
            layer_shapes[sub] = (cfg.num_layers, *t.shape)
            for c, o in dist_chunks(sub, t, cfg, tp):
                layers.setdefault(sub, []).append((c.unsqueeze(0), (i, *o)))
        elif name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            rows = t.shape[0] // tp
            to_save[name] = sharded([(t[r * rows : (r + 1) * rows].clone(), (r * rows, 0)) for r in range(tp)], t.shape)
        else:
            to_save[name] = sharded([(t.clone(), (0,) * t.dim())], t.shape)
    for sub, chunks in layers.items():
        shape = layer_shapes[sub]
        if swiglu_split_keys and cfg.activation == "swiglu" and sub.startswith("mlp.linear_fc1.") and "norm" not in sub:
            half = shape[1] // 2
            gate = [(c, o) for c, o in chunks if o[1] < half]
            up = [(c, (o[0], o[1] - half, *o[2:])) for c, o in chunks if o[1] >= half]
            to_save[f"decoder.layers.{sub}_w"] = sharded(gate, (shape[0], half, *shape[2:]))
            to_save[f"decoder.layers.{sub}_v"] = sharded(up, (shape[0], half, *shape[2:]))
            continue
        to_save[f"decoder.layers.{sub}"] = sharded(chunks, shape)
    if extra_state:
        for module in TE_MODULES:
            for i in range(cfg.num_layers):
                for r in range(tp):
                    buf = io.BytesIO()
                    torch.save(torch.empty(0, dtype=torch.uint8), buf)
                    buf.seek(0)
                    to_save[f"decoder.layers.{module}._extra_state/shard_{i}.{r}_{cfg.num_layers}.{tp}"] = buf
    return to_save
