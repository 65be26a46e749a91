"""TorchTitan Llama 3 adapter: logits parity with the native reference, negative controls, round trips."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hubconv.adapters.registry import get
from hubconv.convert import convert
from hubconv.dtypes import BF16, F32
from hubconv.io.tensor import ArrayTensor
from hubconv.views import materialize, rope_permute
from tests.native import torchtitan_llama3 as tt
from tests.native.parity import Parity, check_dir, compare, fixed_tokens, hf_logits

SCALING = {
    "scaling_factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny(**kw) -> tt.TitanArgs:
    base = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=256,
        multiple_of=32,
        rope_theta=500000.0,
        max_seq_len=256,
    )
    return tt.TitanArgs(**{**base, **kw})


def user_args(a: tt.TitanArgs) -> dict:
    return {
        "n_heads": a.n_heads,
        "rope_theta": a.rope_theta,
        "rope_scaling_args": a.rope_scaling,
        "max_seq_len": a.max_seq_len,
        "multiple_of": a.multiple_of,
    }


def make(
    tmp_path,
    a: tt.TitanArgs,
    *,
    key_style="legacy",
    dtype=torch.float32,
    training_state=False,
    model_prefix="",
    **sd_kw,
) -> tuple[str, dict]:
    sd = tt.random_state_dict(a, seed=0, dtype=dtype, key_style=key_style, **sd_kw)
    path = str(tmp_path / "step-10")
    tt.save_dcp(path, sd, training_state=training_state, model_prefix=model_prefix)
    return path, sd


CASES = {
    "legacy-gqa-untied": dict(),
    "qkv_linear-gqa-tied-scaled": dict(
        key_style="qkv_linear", args=dict(tie_word_embeddings=True, rope_scaling=SCALING)
    ),
    "legacy-mha-full-training-state": dict(training_state=True, args=dict(n_kv_heads=None)),
    "legacy-old-trainer-model-prefix": dict(training_state="legacy", model_prefix="model.", include_freqs_cis=True),
    "legacy-tied-output-present": dict(args=dict(tie_word_embeddings=True), include_tied_output=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_matches_native_logits(tmp_path, case) -> None:
    spec = dict(CASES[case])
    a = tiny(**spec.pop("args", {}))
    ckpt, _ = make(tmp_path, a, **spec)
    out = str(tmp_path / "hf")
    result = convert("torchtitan", ckpt, out, model_args=user_args(a), progress=False)
    assert result.family == "llama3"
    parity = check_dir(ckpt, out, result.native_args, positions=96)
    assert parity.ok, str(parity)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["tie_word_embeddings"] == a.tie_word_embeddings
    assert cfg["num_key_value_heads"] == a.kv_heads and cfg["head_dim"] == a.head_dim
    assert cfg["rope_parameters"]["rope_type"] == ("llama3" if a.rope_scaling else "default")
    if spec.get("training_state"):
        assert any(r == "optimizer state (training only)" for r in result.dropped.values())


def _swap_qk(out: str, sd: dict, a: tt.TitanArgs, mode: str) -> str:
    """Rewrite the converted Q/K weights with a wrong layout (what buggy converters produce)."""
    weights = load_file(os.path.join(out, "model.safetensors"))
    for i in range(a.n_layers):
        for proj, n in (("q", a.n_heads), ("k", a.kv_heads)):
            src = sd[f"layers.{i}.attention.w{proj}.weight"]
            if mode == "no-permute":
                w = src
            else:  # n_heads used for K as well
                heads = a.n_heads if mode == "k-with-n_heads" else n
                w = torch.from_numpy(materialize(rope_permute(ArrayTensor("w", F32, src.numpy()), heads)))
            weights[f"model.layers.{i}.self_attn.{proj}_proj.weight"] = w.contiguous()
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("mode", ["no-permute", "k-with-n_heads"])
def test_negative_control_wrong_permute_fails_parity(tmp_path, mode) -> None:
    a = tiny()
    ckpt, sd = make(tmp_path, a)
    out = str(tmp_path / "hf")
    result = convert("torchtitan", ckpt, out, model_args=user_args(a), progress=False)
    assert check_dir(ckpt, out, result.native_args).ok
    _swap_qk(out, sd, a, mode)
    broken = check_dir(ckpt, out, result.native_args)
    assert not broken.ok and broken.max_abs_diff > 1e-2, str(broken)


def test_wrong_permute_survives_a_five_token_check_but_not_64_positions(tmp_path) -> None:
    """Position 0 has no rotation, so a short check can look fine while long contexts diverge."""
    a = tiny()
    ckpt, sd = make(tmp_path, a)
    out = str(tmp_path / "hf")
    result = convert("torchtitan", ckpt, out, model_args=user_args(a), progress=False)
    _swap_qk(out, sd, a, "k-with-n_heads")
    args = tt.TitanArgs(**{**a.__dict__})
    tokens = fixed_tokens(a.vocab_size, 96)
    ref = tt.forward(sd, args, tokens)
    got, _ = hf_logits(out, tokens)
    assert compare(ref[:, :1], got[:, :1]).ok  # the first position cannot see the bug
    assert not compare(ref, got).ok
    assert result.native_args["n_kv_heads"] == 2


@pytest.mark.parametrize("key_style", ["legacy", "qkv_linear"])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_from_hf_to_hf_is_bit_exact(key_style, tied) -> None:
    a = tiny(tie_word_embeddings=tied)
    sd = tt.random_state_dict(a, seed=3, dtype=torch.bfloat16, key_style=key_style)
    native = {k: ArrayTensor(k, BF16, v.view(torch.int16).numpy().view(np.uint16)) for k, v in sd.items()}
    adapter, _ = get("torchtitan")
    resolved = adapter.resolve_args("test", native, user_args(a))
    hf = {t.name: ArrayTensor(t.name, t.dtype, materialize(t)) for t in adapter.to_hf(native, resolved)}
    assert "model.layers.1.self_attn.k_proj.weight" in hf
    back = {t.name: materialize(t) for t in adapter.from_hf(hf, resolved)}
    assert set(back) == set(native)
    for k, v in native.items():
        assert np.array_equal(back[k], v.array), k
    # The permute is not the identity, so the round trip is a real test.
    q = "model.layers.0.self_attn.q_proj.weight"
    src_q = "layers.0.attention.wq.weight" if key_style == "legacy" else "layers.0.attention.qkv_linear.wq.weight"
    assert not np.array_equal(hf[q].array, native[src_q].array)


def test_bfloat16_checkpoint_keeps_dtype_and_casts_on_request(tmp_path) -> None:
    a = tiny()
    ckpt, _sd = make(tmp_path, a, dtype=torch.bfloat16)
    keep = convert("torchtitan", ckpt, str(tmp_path / "bf16"), model_args=user_args(a), progress=False)
    f32 = convert("torchtitan", ckpt, str(tmp_path / "f32"), model_args=user_args(a), dtype="float32", progress=False)
    w_bf16 = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    w_f32 = load_file(str(tmp_path / "f32" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in w_bf16.values())
    assert all(t.dtype == torch.float32 for t in w_f32.values())
    assert torch.equal(w_bf16["model.embed_tokens.weight"].float(), w_f32["model.embed_tokens.weight"])
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
    assert check_dir(ckpt, str(tmp_path / "f32"), f32.native_args).ok
    assert keep.native_args == f32.native_args


def test_sharded_output_loads_and_matches(tmp_path) -> None:
    a = tiny()
    ckpt, _ = make(tmp_path, a)
    out = str(tmp_path / "hf")
    r = convert("torchtitan", ckpt, out, model_args=user_args(a), max_shard_size="100KB", progress=False)
    shards = [f for f in r.files if f.endswith(".safetensors")]
    assert len(shards) > 3 and "model.safetensors.index.json" in r.files
    assert check_dir(ckpt, out, r.native_args).ok


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_converts_identically(tmp_path) -> None:
    """A 2-rank DCP (tensors split into chunks across .distcp files) gives the same bytes."""
    a = tiny()
    sd = tt.random_state_dict(a, seed=0)
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    tt.save_dcp(single, sd)
    tt.sharded_save_dcp(multi, sd, world_size=2)
    assert len([f for f in os.listdir(multi) if f.endswith(".distcp")]) == 2
    convert("torchtitan", single, str(tmp_path / "a"), model_args=user_args(a), progress=False)
    convert("torchtitan", multi, str(tmp_path / "b"), model_args=user_args(a), progress=False)
    wa = (tmp_path / "a" / "model.safetensors").read_bytes()
    wb = (tmp_path / "b" / "model.safetensors").read_bytes()
    assert wa == wb


def test_parity_object_flags_failures() -> None:
    assert not Parity(96, 0.5, 1.0, 3).ok and not Parity(96, 0.0, 0.99, 3).ok and Parity(96, 1e-6, 1.0, None).ok


def test_target_architecture_cache(tmp_path, monkeypatch) -> None:
    """Second conversion of the same architecture reuses the transformers answer; bad entries are redone."""
    from hubconv import hf_target

    monkeypatch.setenv("HUBCONV_CACHE_DIR", str(tmp_path / "cache"))
    a = tiny()
    ckpt, _ = make(tmp_path, a)
    seen: list[bool] = []
    real = hf_target.TargetCheck.result

    def spy(self):
        spec = real(self)
        seen.append(spec.cached)
        return spec

    monkeypatch.setattr(hf_target.TargetCheck, "result", spy)
    for name in ("a", "b"):
        convert("torchtitan", ckpt, str(tmp_path / name), model_args=user_args(a), progress=False)
    assert seen == [False, True]
    for f in ("config.json", "generation_config.json"):
        assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text()
    (entry,) = (tmp_path / "cache" / "targets").iterdir()
    entry.write_text("{broken")
    convert("torchtitan", ckpt, str(tmp_path / "c"), model_args=user_args(a), progress=False)
    convert("torchtitan", ckpt, str(tmp_path / "d"), model_args=user_args(a), progress=False, use_cache=False)
    assert seen == [False, True, False, False]
    assert check_dir(ckpt, str(tmp_path / "c"), user_args(a) | convert_args(a)).ok


def convert_args(a: tt.TitanArgs) -> dict:
    return {
        "dim": a.dim,
        "n_layers": a.n_layers,
        "n_kv_heads": a.kv_heads,
        "vocab_size": a.vocab_size,
        "norm_eps": a.norm_eps,
        "tie_word_embeddings": a.tie_word_embeddings,
    }


@pytest.mark.parametrize("case", ["legacy-gqa-untied", "qkv_linear-gqa-tied-scaled", "legacy-old-trainer-model-prefix"])
def test_streaming_reference_forward_matches_the_test_reference(tmp_path, case) -> None:
    """hubconv's own native forward (used by `hubconv smoke` parity) agrees with tests/native."""
    from hubconv.io.checkpoint import open_checkpoint

    spec = dict(CASES[case])
    a = tiny(**spec.pop("args", {}))
    ckpt, sd = make(tmp_path, a, dtype=torch.bfloat16, **spec)
    adapter, _ = get("torchtitan")
    tokens = fixed_tokens(a.vocab_size, 80)
    with open_checkpoint(ckpt) as ck:
        native = adapter.plan(ck, "llama3", user_args(a)).native_args
        ours = adapter.reference_logits(ck, native, tokens)
    theirs = tt.forward({k: v for k, v in sd.items() if k != "freqs_cis"}, a, tokens)
    assert compare(theirs, ours).max_abs_diff < 1e-4


def _arrays(sd: dict) -> dict[str, ArrayTensor]:
    return {k: ArrayTensor(k, F32, v.float().numpy()) for k, v in sd.items()}


@pytest.mark.parametrize("key_style", ["legacy", "qkv_linear"])
@pytest.mark.parametrize("tied", [False, True])
def test_native_shapes_describe_the_checkpoint(key_style, tied) -> None:
    """`from_hf` plans against `native_shapes`: it must be exactly the checkpoint's layout (keys and shapes)."""
    a = tiny(tie_word_embeddings=tied)
    native = _arrays(tt.random_state_dict(a, seed=1, key_style=key_style))
    adapter, _ = get("torchtitan")
    resolved = adapter.resolve_args("test", native, user_args(a))
    shapes = {k: t.shape for k, t in adapter.native_shapes(resolved).items()}
    assert shapes == {k: t.shape for k, t in native.items()}


def test_plan_in_memory_ties_drops_and_exactness() -> None:
    from hubconv.errors import MappingError
    from hubconv.io.checkpoint import Checkpoint

    a = tiny(tie_word_embeddings=True)
    sd = tt.random_state_dict(a, seed=2, include_tied_output=True)
    adapter, _ = get("torchtitan")
    ckpt = Checkpoint("mem", "test", _arrays(sd), entries=["train_state.step"])
    plan = adapter.plan(ckpt, "llama3", user_args(a))
    assert plan.dropped == {
        "output.weight": "tied to tok_embeddings.weight (identical data)",
        "train_state.step": "train step counters (training only)",
    }
    assert plan.lossy == {} and "lm_head.weight" not in {t.name for t in plan.targets}
    names = [t.name for t in plan.targets]
    assert names[:3] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                         "model.layers.0.self_attn.q_proj.weight"] and names[-1] == "model.norm.weight"  # fmt: skip
    # A head that differs from the embeddings while the args say tied is refused, in native names.
    sd["output.weight"] = sd["tok_embeddings.weight"] + 1
    user = {**user_args(a), "tie_word_embeddings": True}
    with pytest.raises(MappingError, match=r"mem: the model is tied, but output\.weight differs from tok_embeddings"):
        adapter.plan(Checkpoint("mem", "test", _arrays(sd)), "llama3", user)
    ckpt = Checkpoint("mem", "test", _arrays(sd), entries=["rng_state"])
    with pytest.raises(MappingError, match=r"non-tensor entry 'rng_state' matches nothing torchtitan knows"):
        adapter.plan(ckpt, "llama3", user_args(a))


def test_key_generations_and_model_prefix_convert_to_identical_bytes(tmp_path) -> None:
    """Legacy keys (`attention.wq`, `output`), the newer ones (`attention.qkv_linear.wq`, `lm_head`) and an
    older full checkpoint's `model.` prefix are the same model: the output must be byte-identical."""
    a = tiny()
    legacy = tt.random_state_dict(a, seed=4)

    def newer(k: str) -> str:
        k = k.replace("attention.wq.", "attention.qkv_linear.wq.").replace("attention.wk.", "attention.qkv_linear.wk.")
        return k.replace("attention.wv.", "attention.qkv_linear.wv.").replace("output.weight", "lm_head.weight")

    layouts = {
        "legacy": legacy,
        "qkv_linear": {newer(k): v for k, v in legacy.items()},
        "prefixed": {f"model.{k}": v for k, v in legacy.items()},
    }
    assert "layers.0.attention.qkv_linear.wq.weight" in layouts["qkv_linear"]
    weights = {}
    for name, sd in layouts.items():
        tt.save_dcp(str(tmp_path / name), sd)
        r = convert(
            "torchtitan", str(tmp_path / name), str(tmp_path / f"{name}-hf"), model_args=user_args(a), progress=False
        )
        assert r.native_args["head_key"] == ("lm_head" if name == "qkv_linear" else "output")
        weights[name] = (tmp_path / f"{name}-hf" / "model.safetensors").read_bytes()
    assert weights["legacy"] == weights["qkv_linear"] == weights["prefixed"]
