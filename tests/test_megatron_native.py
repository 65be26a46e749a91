"""The Megatron test fixtures are right, proven without hubconv: the reference forward
(tests/native/megatron_gpt.py) equals transformers' GPT-2 and Llama on hand-converted weights, and the
legacy checkpoints (tests/native/megatron_save.py) re-assemble, by plain torch code here, into the
global state dict bit for bit, for every TP/PP split, spec, naming and `checkpoint_version`."""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tests.native.megatron_gpt import (
    MegatronGPT,
    MegatronGPTConfig,
    apply_rope,
    gpt2_like,
    llama_like,
    normalize,
    rope_tables,
)
from tests.native.megatron_save import (
    DROP,
    save_legacy,
    save_nemo_archive,
    save_nemo_ckpt,
    save_torch_dist,
    train_gpt_sw3_style_tokenizer,
)

GPT2_LIKE = gpt2_like()  # padded to 112 rows (TP=1), 128 (TP=2)
LLAMA_LIKE = llama_like()
SEQ = 64


def tokens_positions(cfg: MegatronGPTConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=g)
    positions = torch.linspace(0, cfg.max_position_embeddings - 1, SEQ).round().long().expand(2, SEQ)
    return tokens, positions


# ---------------------------------------------------------------- (a) reference forward vs transformers


def gpt2_state(model: MegatronGPT, per_head_qkv: bool = True) -> dict[str, torch.Tensor]:
    """Hand conversion to GPT2LMHeadModel (Conv1D weights are [in, out]; c_attn columns [Q; K; V])."""
    c, sd = model.cfg, model.state_dict()
    out = {
        "transformer.wte.weight": sd["embedding.word_embeddings.weight"][: c.vocab_size],
        "transformer.wpe.weight": sd["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": sd["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": sd["decoder.final_layernorm.bias"],
    }
    for i in range(c.num_layers):
        m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
        qkv_w, qkv_b = sd[m + "self_attention.linear_qkv.weight"], sd[m + "self_attention.linear_qkv.bias"]
        if per_head_qkv:  # megatron rows [np, 3, hn] -> [3, np, hn]
            qkv_w = qkv_w.view(c.num_attention_heads, 3, c.head_dim, -1).transpose(0, 1).reshape(qkv_w.shape)
            qkv_b = qkv_b.view(c.num_attention_heads, 3, c.head_dim).transpose(0, 1).reshape(qkv_b.shape)
        out |= {
            h + "ln_1.weight": sd[m + "self_attention.linear_qkv.layer_norm_weight"],
            h + "ln_1.bias": sd[m + "self_attention.linear_qkv.layer_norm_bias"],
            h + "attn.c_attn.weight": qkv_w.T,
            h + "attn.c_attn.bias": qkv_b,
            h + "attn.c_proj.weight": sd[m + "self_attention.linear_proj.weight"].T,
            h + "attn.c_proj.bias": sd[m + "self_attention.linear_proj.bias"],
            h + "ln_2.weight": sd[m + "mlp.linear_fc1.layer_norm_weight"],
            h + "ln_2.bias": sd[m + "mlp.linear_fc1.layer_norm_bias"],
            h + "mlp.c_fc.weight": sd[m + "mlp.linear_fc1.weight"].T,
            h + "mlp.c_fc.bias": sd[m + "mlp.linear_fc1.bias"],
            h + "mlp.c_proj.weight": sd[m + "mlp.linear_fc2.weight"].T,
            h + "mlp.c_proj.bias": sd[m + "mlp.linear_fc2.bias"],
        }
    return out


def gpt2_logits(model: MegatronGPT, activation: str, per_head_qkv: bool = True) -> torch.Tensor:
    c = model.cfg
    config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.max_position_embeddings,
        n_embd=c.hidden_size,
        n_layer=c.num_layers,
        n_head=c.num_attention_heads,
        n_inner=c.ffn,
        activation_function=activation,
        layer_norm_epsilon=c.layernorm_epsilon,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = GPT2LMHeadModel(config).eval()
    missing, unexpected = hf.load_state_dict(gpt2_state(model, per_head_qkv), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    tokens, positions = tokens_positions(c)
    with torch.no_grad():
        return hf(input_ids=tokens, position_ids=positions).logits


@pytest.mark.parametrize(("activation", "hf_activation"), [("gelu", "gelu"), ("gelu_tanh", "gelu_pytorch_tanh")])
def test_reference_forward_equals_gpt2(activation: str, hf_activation: str) -> None:
    cfg = gpt2_like(activation=activation)
    model = MegatronGPT(cfg).init_random(seed=1).eval()
    tokens, positions = tokens_positions(cfg)
    with torch.no_grad():
        ref = model(tokens, positions)
        padded = model.forward_padded(tokens, positions)
    assert padded.shape[-1] == 112 and ref.shape[-1] == 100 and torch.equal(padded[..., :100], ref)
    hf = gpt2_logits(model, hf_activation)
    assert ref.shape == hf.shape and ref.shape[1] >= 64
    assert (ref - hf).abs().max() <= 1e-4
    assert torch.equal(ref.argmax(-1), hf.argmax(-1))
    # negative controls: the other GELU, and QKV read as [Q|K|V] instead of per head, both differ
    other = "gelu_pytorch_tanh" if activation == "gelu" else "gelu"
    assert (ref - gpt2_logits(model, other)).abs().max() > 1e-4
    assert (ref - gpt2_logits(model, hf_activation, per_head_qkv=False)).abs().max() > 1e-2


def llama_state(model: MegatronGPT) -> dict[str, torch.Tensor]:
    """Hand conversion to LlamaForCausalLM: QKV rows per group [q × np/ng, k, v], fc1 rows [gate; up]."""
    c, sd = model.cfg, model.state_dict()
    per_group = c.num_attention_heads // c.groups
    out = {
        "model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][: c.vocab_size],
        "model.norm.weight": sd["decoder.final_layernorm.weight"],
        "lm_head.weight": sd["output_layer.weight"][: c.vocab_size],
    }
    for i in range(c.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = sd[m + "self_attention.linear_qkv.weight"].view(c.groups, per_group + 2, c.head_dim, c.hidden_size)
        gate, up = sd[m + "mlp.linear_fc1.weight"].chunk(2)
        out |= {
            h + "input_layernorm.weight": sd[m + "self_attention.linear_qkv.layer_norm_weight"],
            h + "self_attn.q_proj.weight": qkv[:, :per_group].reshape(-1, c.hidden_size),
            h + "self_attn.k_proj.weight": qkv[:, per_group].reshape(-1, c.hidden_size),
            h + "self_attn.v_proj.weight": qkv[:, per_group + 1].reshape(-1, c.hidden_size),
            h + "self_attn.o_proj.weight": sd[m + "self_attention.linear_proj.weight"],
            h + "post_attention_layernorm.weight": sd[m + "mlp.linear_fc1.layer_norm_weight"],
            h + "mlp.gate_proj.weight": gate,
            h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": sd[m + "mlp.linear_fc2.weight"],
        }
    return out


def test_reference_forward_equals_llama_with_gqa() -> None:
    cfg = LLAMA_LIKE
    model = MegatronGPT(cfg).init_random(seed=2).eval()
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.groups,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
        tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(llama_state(model), strict=True)
    tokens, positions = tokens_positions(cfg)
    with torch.no_grad():
        ref, theirs = model(tokens, positions), hf(input_ids=tokens, position_ids=positions).logits
    assert ref.shape == theirs.shape == (2, SEQ, cfg.vocab_size)
    assert (ref - theirs).abs().max() <= 1e-4
    assert torch.equal(ref.argmax(-1), theirs.argmax(-1))
    # negative control: positions matter (RoPE honours them), 0..s-1 gives other logits
    with torch.no_grad():
        assert (model(tokens) - ref).abs().max() > 1e-3


# ---------------------------------------------------------------- (b) shards re-assemble bit-exact

LEGACY_TO_CORE = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "post_attention_layernorm.": "mlp.linear_fc1.layer_norm_",
    "self_attention.query_key_value.": "self_attention.linear_qkv.",
    "self_attention.dense.": "self_attention.linear_proj.",
    "mlp.dense_h_to_4h.": "mlp.linear_fc1.",
    "mlp.dense_4h_to_h.": "mlp.linear_fc2.",
}


def load_all(folder: Path) -> dict[tuple[int, int], dict]:
    it = int((folder / "latest_checkpointed_iteration.txt").read_text())
    out = {}
    for path in sorted((folder / f"iter_{it:07d}").glob("mp_rank_*/model_optim_rng.pt")):
        nums = [int(n) for n in re.findall(r"\d+", path.parent.name)]
        out[(nums[0], nums[1] if len(nums) > 1 else 0)] = torch.load(path, weights_only=False)
    return out


def core_layer_name(rest: str) -> str:
    """'input_layernorm.weight' -> 'self_attention.linear_qkv.layer_norm_weight' etc."""
    for old, new in LEGACY_TO_CORE.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    raise KeyError(rest)


def qkv_from_version(t: torch.Tensor, heads: int, hn: int, version: float) -> torch.Tensor:
    if version >= 2.0:
        return t
    shape = (3, heads, hn) if version == 0 else (heads, hn, 3)
    v = t.reshape(*shape, *t.shape[1:])
    return (v.transpose(0, 1) if version == 0 else v.transpose(1, 2)).reshape(t.shape)


def flatten_rank(model: dict, cfg: MegatronGPTConfig, tp: int, version: float) -> dict[str, torch.Tensor]:
    """One rank's `model` dict (core flat or legacy nested) -> core names, QKV in [np, 3, hn] order."""
    if "language_model" not in model:
        return {k: v for k, v in model.items() if not k.endswith("._extra_state")}
    lm, flat = model["language_model"], {}
    for kind in ("word_embeddings", "position_embeddings"):
        if kind in lm.get("embedding", {}):
            flat[f"embedding.{kind}.weight"] = lm["embedding"][kind]["weight"]
    for key, t in lm.get("encoder", {}).items():
        if key.startswith("final_layernorm."):
            flat["decoder." + key] = t
            continue
        _, i, rest = key.split(".", 2)
        name = core_layer_name(rest)
        if name.startswith("self_attention.linear_qkv.") and "layer_norm" not in name:
            t = qkv_from_version(t, cfg.num_attention_heads // tp, cfg.head_dim, version)
        flat[f"decoder.layers.{i}.{name}"] = t
    if "output_layer" in lm:
        flat["output_layer.weight"] = lm["output_layer"]["weight"]
    if "word_embeddings_for_head" in model:
        flat["output_layer.weight"] = model["word_embeddings_for_head"]["weight"]
    return flat


def local_to_te(name: str) -> str:
    return name.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_").replace(
        ".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"
    )


def merge_tp(name: str, pieces: list[torch.Tensor], cfg: MegatronGPTConfig) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if cfg.activation == "swiglu" and "linear_fc1" in name and leaf in ("weight", "bias"):
        halves = [p.chunk(2) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if ("linear_proj" in name or "linear_fc2" in name) and leaf == "weight":
        return torch.cat(pieces, dim=1)
    row_parallel_bias = leaf == "bias" and ("linear_proj" in name or "linear_fc2" in name)
    if "layer_norm" in name or "final_layernorm" in name or "position_embeddings" in name or row_parallel_bias:
        assert all(torch.equal(p, pieces[0]) for p in pieces), f"replicated {name} differs across ranks"
        return pieces[0]
    return torch.cat(pieces, dim=0)


def reassemble(folder: Path, cfg: MegatronGPTConfig, tp_order: list[int] | None = None, version: float | None = None):
    ranks = load_all(folder)
    args = next(iter(ranks.values()))["args"]
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    assert set(ranks) == {(r, s) for r in range(tp) for s in range(pp)}
    per_stage = args.num_layers // pp
    by_name: dict[str, list[torch.Tensor]] = {}
    for r in tp_order or range(tp):
        for s in range(pp):
            ck = ranks[(r, s)]
            flat = flatten_rank(ck["model"], cfg, tp, ck["checkpoint_version"] if version is None else version)
            for key, t in flat.items():
                key = local_to_te(key)
                m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key)
                if m:
                    key = f"decoder.layers.{s * per_stage + int(m.group(1))}.{m.group(2)}"
                by_name.setdefault(key, []).append(t)
    return {k: merge_tp(k, v, cfg) for k, v in by_name.items()}


def expected_state(model: MegatronGPT, pp: int) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    if pp > 1 and not model.cfg.untie_embeddings_and_output_weights:
        sd["output_layer.weight"] = sd["embedding.word_embeddings.weight"]  # the last stage's tied copy
    return sd


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


CASES = [
    # cfg, tp, pp, naming, spec, checkpoint_version
    (GPT2_LIKE, 1, 1, "core", "te", 3.0),
    (GPT2_LIKE, 2, 1, "core", "te", 3.0),
    (GPT2_LIKE, 1, 2, "core", "te", 3.0),
    (GPT2_LIKE, 2, 2, "core", "te", 3.0),
    (GPT2_LIKE, 2, 1, "core", "local", 3.0),
    (LLAMA_LIKE, 2, 2, "core", "te", 3.0),
    (LLAMA_LIKE, 2, 1, "core", "local", 3.0),
    (GPT2_LIKE, 1, 1, "legacy", "te", 3.0),
    (GPT2_LIKE, 2, 1, "legacy", "te", 0),
    (GPT2_LIKE, 2, 1, "legacy", "te", 1.0),
    (GPT2_LIKE, 2, 1, "legacy", "te", 2.0),
    (GPT2_LIKE, 2, 2, "legacy", "te", 3.0),
    (LLAMA_LIKE, 2, 2, "legacy", "te", 3.0),
]


@pytest.mark.parametrize(("cfg", "tp", "pp", "naming", "spec", "version"), CASES)
def test_shards_reassemble_bit_exact(tmp_path: Path, cfg, tp: int, pp: int, naming: str, spec: str, version) -> None:
    model = MegatronGPT(cfg, tp=tp).init_random(seed=3)
    save_legacy(model, cfg, tmp_path, tp=tp, pp=pp, checkpoint_version=version, naming=naming, spec=spec)
    assert_same(reassemble(tmp_path, cfg), expected_state(model, pp))


def test_negative_controls_wrong_rank_order_and_wrong_version(tmp_path: Path) -> None:
    cfg = GPT2_LIKE
    model = MegatronGPT(cfg, tp=2).init_random(seed=4)
    save_legacy(model, cfg, tmp_path, tp=2, checkpoint_version=0, naming="legacy")
    want = expected_state(model, 1)
    assert_same(reassemble(tmp_path, cfg), want)
    swapped = reassemble(tmp_path, cfg, tp_order=[1, 0])
    assert not torch.equal(swapped["embedding.word_embeddings.weight"], want["embedding.word_embeddings.weight"])
    as_v3 = reassemble(tmp_path, cfg, version=3.0)
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert as_v3[name].shape == want[name].shape and not torch.equal(as_v3[name], want[name])


def test_per_rank_qkv_holds_its_own_heads(tmp_path: Path) -> None:
    """Version 0 rank 1 starts with Q of head np/2 (its first head); version 1.0 interleaves q,k,v per channel."""
    cfg = GPT2_LIKE
    model = MegatronGPT(cfg, tp=2).init_random(seed=5)
    heads, hn = cfg.num_attention_heads, cfg.head_dim
    bias = model.state_dict()["decoder.layers.1.self_attention.linear_qkv.bias"].view(heads, 3, hn)
    save_legacy(model, cfg, tmp_path / "v0", tp=2, pp=2, checkpoint_version=0, naming="legacy")
    save_legacy(model, cfg, tmp_path / "v1", tp=2, pp=2, checkpoint_version=1.0, naming="legacy")
    enc0 = load_all(tmp_path / "v0")[(1, 1)]["model"]["language_model"]["encoder"]
    enc1 = load_all(tmp_path / "v1")[(1, 1)]["model"]["language_model"]["encoder"]
    b0, b1 = enc0["layers.0.self_attention.query_key_value.bias"], enc1["layers.0.self_attention.query_key_value.bias"]
    assert torch.equal(b0[:hn], bias[heads // 2, 0]) and torch.equal(b0[2 * hn : 3 * hn], bias[heads // 2, 1])
    assert torch.equal(b1[:3], torch.stack([bias[heads // 2, j, 0] for j in range(3)]))


# ---------------------------------------------------------------- (c) on-disk structure


def test_files_have_megatron_structure(tmp_path: Path) -> None:
    cfg = LLAMA_LIKE
    model = MegatronGPT(cfg, tp=2).init_random(seed=6)
    files = save_legacy(model, cfg, tmp_path, tp=2, pp=2, args_overrides={"layernorm_epsilon": DROP})
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "100"
    names = sorted(p.relative_to(tmp_path).as_posix() for p in files.values())
    assert names == [f"iter_0000100/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt" for t in range(2) for p in range(2)]
    with pytest.raises(Exception, match=r"Namespace|weights_only"):
        torch.load(files[(0, 0)], weights_only=True)  # the saved args need a full unpickler, as in Megatron
    ck = torch.load(files[(1, 1)], weights_only=False)
    assert set(ck) == {
        "args",
        "checkpoint_version",
        "iteration",
        "model",
        "optimizer",
        "opt_param_scheduler",
        "rng_state",
        "num_floating_point_operations_so_far",
    }
    args = ck["args"]
    assert isinstance(args, argparse.Namespace) and ck["checkpoint_version"] == 3.0 and ck["iteration"] == 100
    assert not hasattr(args, "layernorm_epsilon") and args.norm_epsilon == 1e-6
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads) == (2, 64, 96, 4)
    assert args.group_query_attention and args.num_query_groups == 2 and args.kv_channels == 16
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert args.padded_vocab_size == 128 == 2 * ck["model"]["output_layer.weight"].shape[0]
    assert args.position_embedding_type == "rope" and args.rotary_base == 500000 and args.swiglu
    assert args.normalization == "RMSNorm" and not args.add_bias_linear and args.untie_embeddings_and_output_weights
    assert args.params_dtype is torch.float32
    model_keys = set(ck["model"])
    assert "decoder.layers.0.self_attention.core_attention._extra_state" in model_keys
    assert "decoder.final_layernorm.weight" in model_keys and "decoder.layers.0.mlp.linear_fc2.weight" in model_keys
    assert not any(k.startswith("embedding.") or k.startswith("decoder.layers.1.") for k in model_keys)  # stage-local
    rng = ck["rng_state"][0]
    assert isinstance(rng["np_rng_state"][1], np.ndarray) and rng["torch_rng_state"].dtype == torch.uint8
    assert len(ck["optimizer"]["fp32_from_fp16_params"][0]) == len(ck["optimizer"]["optimizer"]["state"])
    first = torch.load(files[(0, 0)], weights_only=False)["model"]
    assert first["embedding.word_embeddings.weight"].shape == (64, 64) and "output_layer.weight" not in first


def test_older_te_extra_state_is_a_bytesio(tmp_path: Path) -> None:
    cfg = GPT2_LIKE
    model = MegatronGPT(cfg).init_random(seed=8)
    files = save_legacy(model, cfg, tmp_path, extra_state="bytesio", with_optimizer=False)
    ck = torch.load(files[(0, 0)], weights_only=False)
    extra = ck["model"]["decoder.layers.1.mlp.linear_fc2._extra_state"]
    assert isinstance(extra, io.BytesIO) and torch.load(extra, weights_only=True) is None
    assert "optimizer" not in ck and "opt_param_scheduler" not in ck
    assert_same(reassemble(tmp_path, cfg), expected_state(model, 1))


def test_legacy_layout_names(tmp_path: Path) -> None:
    cfg = GPT2_LIKE
    model = MegatronGPT(cfg, tp=1).init_random(seed=7)
    files = save_legacy(model, cfg, tmp_path, tp=1, pp=1, naming="legacy")
    assert files[(0, 0)].parent.name == "mp_rank_00"
    ck = torch.load(files[(0, 0)], weights_only=False)
    lm = ck["model"]["language_model"]
    assert set(lm) == {"embedding", "encoder"} and set(ck["model"]) == {"language_model"}  # tied, PP=1
    assert set(lm["embedding"]) == {"word_embeddings", "position_embeddings"}
    assert "layers.1.mlp.dense_4h_to_h.weight" in lm["encoder"] and "final_layernorm.bias" in lm["encoder"]
    assert not ck["args"].use_mcore_models
    with pytest.raises(ValueError, match="checkpoint_version"):
        save_legacy(model, cfg, tmp_path / "bad", checkpoint_version=0, naming="core")
    with pytest.raises(ValueError, match="TP=1"):
        save_legacy(model, cfg, tmp_path / "bad", tp=2)


# ---------------------------------------------------------------- NeMo .ckpt and .nemo


def nemo_to_rank_model(state: dict[str, object], prefix: str) -> dict[str, object]:
    """NeMo's flat `model.`-prefixed keys -> the rank `model` dict `flatten_rank` reads (core flat or legacy nested)."""
    assert all(k.startswith(prefix) for k in state)
    body = {k[len(prefix) :]: v for k, v in state.items()}
    if not any(k.startswith("language_model.") for k in body):
        return body
    lm: dict[str, dict] = {"embedding": {}, "encoder": {}}
    for key, t in body.items():
        part, rest = key.removeprefix("language_model.").split(".", 1)
        if part == "embedding":
            kind, leaf = rest.split(".")
            lm["embedding"][kind] = {leaf: t}
        elif part == "encoder":
            lm["encoder"][rest] = t
        elif part == "output_layer":
            lm["output_layer"] = {"weight": t}
        else:
            assert key == "language_model.rotary_pos_emb.inv_freq", key
    return {"language_model": lm}


@pytest.mark.parametrize(("cfg", "naming", "amp_o2"), [(GPT2_LIKE, "legacy", False), (LLAMA_LIKE, "core", True)])
def test_nemo_ckpt_holds_a_dictconfig_and_the_weights(tmp_path: Path, cfg, naming: str, amp_o2: bool) -> None:
    from omegaconf import DictConfig, OmegaConf

    model = MegatronGPT(cfg).init_random(seed=9)
    path = save_nemo_ckpt(model, cfg, tmp_path / "megatron_gpt.ckpt", naming=naming, amp_o2=amp_o2)
    ck = torch.load(path, weights_only=False)
    assert {"state_dict", "hyper_parameters", "global_step", "pytorch-lightning_version"} <= set(ck)
    conf = ck["hyper_parameters"]["cfg"]
    assert isinstance(conf, DictConfig)
    plain = OmegaConf.to_container(conf)
    assert (plain["num_layers"], plain["hidden_size"], plain["num_attention_heads"]) == (2, 64, 4)
    assert plain["mcore_gpt"] == (naming == "core") and plain["megatron_amp_O2"] == amp_o2
    assert plain["share_embeddings_and_output_weights"] == (not cfg.untie_embeddings_and_output_weights)
    assert plain["normalization"] == ("rmsnorm" if cfg.normalization == "RMSNorm" else "layernorm")
    rank_model = nemo_to_rank_model(ck["state_dict"], "model.module." if amp_o2 else "model.")
    assert_same(flatten_rank(rank_model, cfg, 1, 3.0), dict(model.state_dict()))


def test_nemo_ckpt_legacy_rope_has_inv_freq(tmp_path: Path) -> None:
    cfg = LLAMA_LIKE
    model = MegatronGPT(cfg).init_random(seed=10)
    state = torch.load(save_nemo_ckpt(model, cfg, tmp_path / "x.ckpt", naming="legacy"), weights_only=False)
    inv = state["state_dict"]["model.language_model.rotary_pos_emb.inv_freq"]
    assert (
        inv.shape == (cfg.head_dim // 2,) and inv[0] == 1.0 and torch.isclose(inv[1], torch.tensor(500000 ** (-2 / 16)))
    )
    rank_model = nemo_to_rank_model(state["state_dict"], "model.")
    assert_same(flatten_rank(rank_model, cfg, 1, 3.0), dict(model.state_dict()))


@pytest.mark.parametrize(
    ("cfg", "tp", "naming"), [(GPT2_LIKE, 2, "legacy"), (LLAMA_LIKE, 2, "core"), (GPT2_LIKE, 1, "core")]
)
def test_nemo_archive_members_in_place(tmp_path: Path, cfg, tp: int, naming: str) -> None:
    import tarfile

    import yaml

    model = MegatronGPT(cfg, tp=tp).init_random(seed=11)
    spm = tmp_path / "tokenizer.model"
    spm.write_bytes(b"\x0a\x05piece-bytes-standing-in-for-a-sentencepiece-model")
    path = save_nemo_archive(model, cfg, tmp_path / "model.nemo", tp=tp, naming=naming, tokenizer_model=spm)
    raw = path.read_bytes()
    with tarfile.open(path, "r:") as tar:  # uncompressed: opening as plain tar must work
        files = {m.name: m for m in tar.getmembers() if m.isfile()}
        weights = ["./model_weights.ckpt"] if tp == 1 else [f"./mp_rank_{r:02d}/model_weights.ckpt" for r in range(tp)]
        tok = [n for n in files if n.endswith("_tokenizer.model")]
        assert set(files) == {"./model_config.yaml", *weights, *tok} and len(tok) == 1
        conf = yaml.safe_load(tar.extractfile(files["./model_config.yaml"]).read())
        assert conf["tensor_model_parallel_size"] == tp and conf["tokenizer"]["model"] == "nemo:" + tok[0][2:]

        def member(name: str) -> bytes:  # a member's bytes read in place, without the tar module
            m = files[name]
            return raw[m.offset_data : m.offset_data + m.size]

        assert member(tok[0]) == spm.read_bytes()
        ranks = [torch.load(io.BytesIO(member(w)), weights_only=False) for w in weights]
    pieces: dict[str, list[torch.Tensor]] = {}
    for state in ranks:
        for k, t in flatten_rank(nemo_to_rank_model(state, "model."), cfg, tp, 3.0).items():
            pieces.setdefault(k, []).append(t)
    assert_same({k: merge_tp(k, v, cfg) for k, v in pieces.items()}, dict(model.state_dict()))
    gz = save_nemo_archive(model, cfg, tmp_path / "gz.nemo", tp=tp, naming=naming, compress=True)
    with pytest.raises(tarfile.ReadError):
        tarfile.open(gz, "r:")  # the compressed variant is not readable in place


# ---------------------------------------------------------------- shards run as Megatron runs them


def tp_attention(h, w, b, proj_w, cfg: MegatronGPTConfig, tp: int, rope) -> torch.Tensor:
    """One rank's attention over its own groups: the partial (pre-all-reduce) output of linear_proj."""
    groups, per_group = cfg.groups // tp, cfg.num_attention_heads // cfg.groups
    bsz, s, _ = h.shape
    qkv = torch.nn.functional.linear(h, w, b).view(bsz, s, groups, (per_group + 2) * cfg.head_dim)
    q, k, v = qkv.split([per_group * cfg.head_dim, cfg.head_dim, cfg.head_dim], dim=-1)
    q = q.reshape(bsz, s, groups * per_group, cfg.head_dim)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v = k.repeat_interleave(per_group, dim=2), v.repeat_interleave(per_group, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / cfg.head_dim**0.5
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, s, -1)
    return ctx @ proj_w.T


def tensor_parallel_logits(folder: Path, cfg: MegatronGPTConfig, tokens, positions, version=None) -> torch.Tensor:
    """Megatron's tensor- and pipeline-parallel forward over the saved rank files, never re-assembling a tensor:
    vocab-parallel embedding (masked lookup + all-reduce), column-parallel QKV/fc1 on local heads/columns,
    row-parallel linear_proj/fc2 partial sums + replicated bias, vocab-parallel logits gathered on the last dim."""
    ranks = load_all(folder)
    args = ranks[(0, 0)]["args"]
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    sd = {
        key: flatten_rank(ck["model"], cfg, tp, ck["checkpoint_version"] if version is None else version)
        for key, ck in ranks.items()
    }
    x = torch.zeros(*tokens.shape, cfg.hidden_size)
    rows = args.padded_vocab_size // tp
    for r in range(tp):
        local = tokens - r * rows
        inside = (local >= 0) & (local < rows)
        x += sd[(r, 0)]["embedding.word_embeddings.weight"][local.clamp(0, rows - 1)] * inside[..., None]
    rope = rope_tables(cfg, positions) if cfg.position_embedding_type == "rope" else None
    if rope is None:
        x = x + sd[(0, 0)]["embedding.position_embeddings.weight"][positions]
    for stage in range(pp):
        for i in range(cfg.num_layers // pp):
            p = f"decoder.layers.{i}."
            a, m = p + "self_attention.", p + "mlp."
            ln = sd[(0, stage)]
            h = normalize(cfg, x, ln[a + "linear_qkv.layer_norm_weight"], ln.get(a + "linear_qkv.layer_norm_bias"))
            out = sum(
                tp_attention(
                    h,
                    sd[(r, stage)][a + "linear_qkv.weight"],
                    sd[(r, stage)].get(a + "linear_qkv.bias"),
                    sd[(r, stage)][a + "linear_proj.weight"],
                    cfg,
                    tp,
                    rope,
                )
                for r in range(tp)
            )
            x = x + out + ln.get(a + "linear_proj.bias", 0)
            h = normalize(cfg, x, ln[m + "linear_fc1.layer_norm_weight"], ln.get(m + "linear_fc1.layer_norm_bias"))
            out = 0
            for r in range(tp):
                rank = sd[(r, stage)]
                f = torch.nn.functional.linear(h, rank[m + "linear_fc1.weight"], rank.get(m + "linear_fc1.bias"))
                if cfg.activation == "swiglu":
                    gate, up = f.chunk(2, dim=-1)
                    f = torch.nn.functional.silu(gate) * up
                else:
                    f = torch.nn.functional.gelu(f, approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
                out = out + f @ rank[m + "linear_fc2.weight"].T
            x = x + out + ln.get(m + "linear_fc2.bias", 0)
    last = sd[(0, pp - 1)]
    x = normalize(cfg, x, last["decoder.final_layernorm.weight"], last.get("decoder.final_layernorm.bias"))
    head = "output_layer.weight" if "output_layer.weight" in last else "embedding.word_embeddings.weight"
    return torch.cat([x @ sd[(r, pp - 1)][head].T for r in range(tp)], dim=-1)


@pytest.mark.parametrize(
    ("cfg", "tp", "pp", "naming", "version"),
    [(GPT2_LIKE, 2, 2, "core", 3.0), (LLAMA_LIKE, 2, 2, "core", 3.0), (GPT2_LIKE, 2, 1, "legacy", 0)],
)
def test_shards_compute_the_reference_logits_without_reassembly(tmp_path: Path, cfg, tp, pp, naming, version) -> None:
    model = MegatronGPT(cfg, tp=tp).init_random(seed=12).eval()
    save_legacy(model, cfg, tmp_path, tp=tp, pp=pp, checkpoint_version=version, naming=naming, with_optimizer=False)
    tokens, positions = tokens_positions(cfg)
    with torch.no_grad():
        want = model.forward_padded(tokens, positions)
    got = tensor_parallel_logits(tmp_path, cfg, tokens, positions)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4
    if version == 0:  # negative control: checkpoint_version 0 read as 3.0 computes something else
        assert (tensor_parallel_logits(tmp_path, cfg, tokens, positions, version=3.0) - want).abs().max() > 1e-2


def test_gpt_sw3_layout_nemo_with_its_sentencepiece_and_padded_vocab(tmp_path: Path) -> None:
    """GPT-SW3: NeMo legacy `language_model` names, learned positions, LayerNorm, GELU, tied head, TP=2, a
    SentencePiece tokenizer inside the archive whose size is the true vocabulary (< the padded rows)."""
    import tarfile

    import sentencepiece

    spm_file, vocab = train_gpt_sw3_style_tokenizer(tmp_path / "spm")
    cfg = MegatronGPTConfig(vocab_size=vocab, make_vocab_size_divisible_by=128)
    model = MegatronGPT(cfg, tp=2).init_random(seed=13)
    assert model.padded_vocab > vocab and model.padded_vocab % 256 == 0
    path = save_nemo_archive(model, cfg, tmp_path / "gpt-sw3.nemo", tp=2, naming="legacy", tokenizer_model=spm_file)
    with tarfile.open(path) as tar:
        name = next(n for n in tar.getnames() if n.endswith("_tokenizer.model"))
        sp = sentencepiece.SentencePieceProcessor(model_proto=tar.extractfile(name).read())
        state = torch.load(io.BytesIO(tar.extractfile("./mp_rank_01/model_weights.ckpt").read()), weights_only=False)
    assert sp.get_piece_size() == vocab and sp.id_to_piece(3) == "<|endoftext|>" and sp.pad_id() == 0
    emb = state["model.language_model.embedding.word_embeddings.weight"]
    assert emb.shape == (model.padded_vocab // 2, cfg.hidden_size)
    assert torch.equal(emb, model.embedding.word_embeddings.weight.detach()[model.padded_vocab // 2 :])
    tokens = torch.tensor([sp.encode("hej och det är the end")])
    with torch.no_grad():
        assert model(tokens).shape == (1, tokens.shape[1], vocab)


# ---------------------------------------------------------------- megatron-core torch_dist


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize(
    ("cfg", "tp", "pp", "split"),
    [(GPT2_LIKE, 2, 2, False), (LLAMA_LIKE, 2, 1, False), (LLAMA_LIKE, 2, 2, True), (GPT2_LIKE, 1, 1, False)],
)
def test_torch_dist_reads_back_through_dcp(tmp_path: Path, cfg, tp: int, pp: int, split: bool) -> None:
    import json

    import torch.distributed.checkpoint as dcp

    model = MegatronGPT(cfg, tp=tp).init_random(seed=14)
    target = save_torch_dist(model, cfg, tmp_path, tp=tp, pp=pp, swiglu_split_keys=split)
    assert target == tmp_path / "iter_0000100" and (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "100"
    assert json.loads((target / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    common = torch.load(target / "common.pt", weights_only=False)
    assert common["args"].ckpt_format == "torch_dist" and common["args"].tensor_model_parallel_size == tp
    assert "model" not in common and len(list(target.glob("*.distcp"))) >= 1
    meta = dcp.FileSystemReader(target).read_metadata().state_dict_metadata
    qkv = meta["decoder.layers.self_attention.linear_qkv.weight"]
    assert tuple(qkv.size) == (cfg.num_layers, *model.decoder.layers[0].self_attention.linear_qkv.weight.shape)
    assert len(qkv.chunks) == cfg.num_layers * tp
    proj = meta["decoder.layers.self_attention.linear_proj.weight"]
    assert sorted(tuple(c.offsets) for c in proj.chunks) == sorted(
        (i, 0, r * cfg.hidden_size // tp) for i in range(cfg.num_layers) for r in range(tp)
    )  # row-parallel: chunked on the unstacked dim 1
    assert any(k.startswith("decoder.layers.mlp.linear_fc2._extra_state/shard_") for k in meta)
    if cfg.activation == "swiglu" and not split:  # fc1 chunks: gate_r at r·f/tp, up_r at f + r·f/tp
        rows = {c.offsets[1] for c in meta["decoder.layers.mlp.linear_fc1.weight"].chunks}
        assert rows == {o + r * cfg.ffn // tp for o in (0, cfg.ffn) for r in range(tp)}
    # read every tensor whole (DCP stitches the chunks), unstack the layers: the global state dict, bit-exact
    tensors = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in meta.items() if hasattr(v, "size")}
    dcp.load(tensors, storage_reader=dcp.FileSystemReader(target), no_dist=True)
    if split:
        w, v = (
            tensors.pop("decoder.layers.mlp.linear_fc1.weight_w"),
            tensors.pop("decoder.layers.mlp.linear_fc1.weight_v"),
        )
        tensors["decoder.layers.mlp.linear_fc1.weight"] = torch.cat([w, v], dim=1)
    got = {}
    for key, t in tensors.items():
        if key.startswith("decoder.layers."):
            for i in range(cfg.num_layers):
                got[f"decoder.layers.{i}.{key.removeprefix('decoder.layers.')}"] = t[i]
        else:
            got[key] = t
    assert_same(got, dict(model.state_dict()))
