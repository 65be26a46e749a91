"""Streamed verification (issue 13): transformers' own forward run one module at a time, from files or from the
conversion plan, against the full `from_pretrained` load; load checks; stream-upload releases; negative controls."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubconv.config import ReleaseConfig
from hubconv.convert import convert
from hubconv.errors import HubconvError
from hubconv.release import run_release
from hubconv.smoke import parity_positions, run_smoke
from hubconv.streamed_forward import (
    DigestingSink,
    DigestMismatch,
    FileWeights,
    StreamedModel,
    choose_mode,
    plan_weights,
    shard_digests,
)
from tests.helpers import EXAMPLE, EXAMPLE_CONFIG, hubconv
from tests.native import nanogpt as N

EXAMPLE_ARGS = os.path.join(EXAMPLE, "model_args.yaml")
EXAMPLE_CKPT = os.path.join(EXAMPLE, "step-800")


@pytest.fixture(scope="module")
def example_hf(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("streamed") / "hf")
    convert("torchtitan", EXAMPLE_CKPT, out, model_args=EXAMPLE_ARGS, progress=False)
    return out


def _tokens(vocab: int, n: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(3))


def _full_logits(folder: str, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        kwargs = {} if positions is None else {"position_ids": positions[None]}
        return model(tokens, **kwargs).logits


def _streamed_logits(folder: str, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    streamed = StreamedModel(folder, FileWeights(folder), progress=False)
    try:
        assert not any(streamed.loading_info.values()), streamed.loading_info
        return streamed.logits(tokens, positions)
    finally:
        streamed.close()


def _assert_same(full: torch.Tensor, streamed: torch.Tensor) -> None:
    """Bit-identical, or within float32 rounding of the logits' scale."""
    assert full.shape == streamed.shape
    if not torch.equal(full, streamed):
        assert (full - streamed).abs().max() <= 1e-5 * full.abs().max()


# ---------------------------------------------------------------------------- streamed == full load


def test_example_streamed_logits_equal_full_load(example_hf) -> None:
    tokens = _tokens(522)
    positions = parity_positions(96, 256)  # spread up to the model's context, as parity does
    _assert_same(_full_logits(example_hf, tokens, positions), _streamed_logits(example_hf, tokens, positions))


def test_nanogpt_gpt2_streamed_logits_equal_full_load(tmp_path: Path) -> None:
    """GPT-2 (Conv1D layers, learned positions, tied head read through the tied embedding)."""
    model = N.build(seed=0, block_size=128, bias=True)
    (tmp_path / "run").mkdir()
    N.save_ckpt(model, str(tmp_path / "run" / "ckpt.pt"))
    out = str(tmp_path / "hf")
    convert("nanogpt", str(tmp_path / "run"), out, progress=False)
    names = FileWeights(out).tensors
    assert "lm_head.weight" not in names  # tied: the head's forward reads the embedding's tensor
    tokens = _tokens(model.config.vocab_size, 64)
    _assert_same(_full_logits(out, tokens), _streamed_logits(out, tokens))


def _tiny_config(model_type: str):
    from transformers import AutoConfig

    common = dict(vocab_size=97, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=97, n_layer=3, n_head=4, n_embd=32, n_positions=128)
    if model_type == "gpt_neox":
        return AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, rotary_pct=0.5, **common)
    kv = {"num_key_value_heads": 2} if model_type in ("llama", "qwen2", "mistral") else {}
    return AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, **kv, **common)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt_neox", "gpt2", "phi"])
def test_transformers_architectures_stream_like_they_load(tmp_path: Path, model_type: str) -> None:
    """Architectures saved by transformers itself: streamed == full load; layers found from the structure."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(model_type), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases: a weight read from the wrong tensor shows
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    tokens = _tokens(97, 40)
    streamed = StreamedModel(str(tmp_path), FileWeights(str(tmp_path)), progress=False)
    try:
        assert not any(streamed.loading_info.values()), streamed.loading_info
        assert streamed.stats.groups == 3 + len({k.rpartition(".")[0] for k in _outside_layers(model)})
        got = streamed.logits(tokens)
        new, finite = streamed.generate(tokens[:, :5], 6)
    finally:
        streamed.close()
    _assert_same(_full_logits(str(tmp_path), tokens), got)
    expected = model.eval().generate(tokens[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert finite and new.tolist() == expected[0, 5:].tolist()


def _outside_layers(model) -> list[str]:
    return [k for k in model.state_dict() if ".layers." not in k and ".h." not in k]


# ---------------------------------------------------------------------------- load checks


def _edit(folder: str, change) -> str:
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    change(weights)
    save_file(weights, path, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "edit, key, expected",
    [
        (lambda w: w.pop("model.norm.weight"), "missing_keys", "model.norm.weight"),
        (lambda w: w.update({"model.extra.weight": torch.zeros(3)}), "unexpected_keys", "model.extra.weight"),
        (
            lambda w: w.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(8, 128)}),
            "mismatched_keys",
            "model.layers.1.mlp.up_proj.weight",
        ),
    ],
    ids=["missing", "extra", "wrong-shape"],
)
def test_load_checks_from_the_meta_model(example_hf, tmp_path, edit, key, expected) -> None:
    folder = _edit(shutil.copytree(example_hf, tmp_path / "hf"), edit)
    report = run_smoke(str(folder), load="stream", parity=False, max_new_tokens=2)
    assert report.mode == "files" and report.status == "fail"
    assert any(expected in k for k in report.loading_info[key])
    assert {c.name: c.status for c in report.checks}["load"] == "fail"
    assert sum(len(v) for v in report.loading_info.values()) == 1  # only the edited tensor is reported
    # The same tensors through from_pretrained: the same verdict (a wrong shape is an error there).
    if key == "mismatched_keys":
        with pytest.raises(HubconvError, match="ignore_mismatched_sizes"):
            run_smoke(str(folder), load="full", parity=False, max_new_tokens=2)
    else:
        full = run_smoke(str(folder), load="full", parity=False, max_new_tokens=2)
        assert any(expected in k for k in full.loading_info[key])


def test_clean_folder_passes_load_checks_and_matches_full_smoke(example_hf) -> None:
    streamed = run_smoke(example_hf, native=("torchtitan", EXAMPLE_CKPT), load="stream", max_new_tokens=6)
    full = run_smoke(example_hf, native=("torchtitan", EXAMPLE_CKPT), load="full", max_new_tokens=6)
    assert streamed.status == full.status == "pass"
    assert (streamed.mode, full.mode) == ("files", "full")
    assert streamed.generations[0].output == full.generations[0].output
    assert streamed.parity.max_abs_diff == pytest.approx(full.parity.max_abs_diff, rel=1e-3, abs=1e-6)
    for report in (streamed, full):  # costs are reported
        assert report.costs["parity_seconds"] > 0 and report.costs["parity_tokens_per_second"] > 0
        assert report.costs["generation_seconds"] > 0 and report.generations[0].seconds > 0
    assert streamed.costs["passes"] == 1 + 6 and streamed.costs["bytes_read"] > 0


# ---------------------------------------------------------------------------- negative controls


def test_corrupted_layer_fails_streamed_parity(example_hf, tmp_path) -> None:
    def corrupt(w: dict) -> None:
        k = "model.layers.1.self_attn.k_proj.weight"
        w[k] = w[k].flip(0).contiguous()  # right shape, wrong rows: only the values can tell

    folder = _edit(shutil.copytree(example_hf, tmp_path / "hf"), corrupt)
    report = run_smoke(str(folder), native=("torchtitan", EXAMPLE_CKPT), load="stream", max_new_tokens=2)
    assert report.mode == "files" and not any(report.loading_info.values())
    assert report.parity is not None and not report.parity.passed and report.status == "fail"


def test_plan_weights_check_every_tensor_against_the_written_digests(example_hf) -> None:
    written = shard_digests(os.path.join(example_hf, "model.safetensors"))
    opened = plan_weights("torchtitan", EXAMPLE_CKPT, EXAMPLE_ARGS, None, written)
    with opened() as source:
        report = run_smoke(example_hf, native=("torchtitan", EXAMPLE_CKPT), weights=lambda: _same(source))
        assert report.mode == "plan" and report.status == "pass"
        assert source.verified == set(written)
    name = "model.layers.0.mlp.down_proj.weight"
    tampered = {**written, name: {**written[name], "sha256": "0" * 64}}
    with pytest.raises(DigestMismatch, match="down_proj"):
        with plan_weights("torchtitan", EXAMPLE_CKPT, EXAMPLE_ARGS, None, tampered)() as source:
            run_smoke(example_hf, parity=False, max_new_tokens=1, weights=lambda: _same(source))


class _same:
    """An already open source as a context manager that does not close it."""

    def __init__(self, source):
        self.source = source

    def __enter__(self):
        return self.source

    def __exit__(self, *exc) -> None:
        return None


def test_full_load_refused_without_files(example_hf) -> None:
    with pytest.raises(HubconvError, match="cannot be fully loaded"):
        run_smoke(example_hf, load="full", weights=lambda: _same(FileWeights(example_hf)))


def test_mode_choice() -> None:
    assert choose_mode("auto", 10 << 20, 8 << 30) == "full"
    assert choose_mode("auto", 2 << 30, 64 << 30) == "stream"  # large: streamed however much memory there is
    assert choose_mode("auto", 100 << 20, 200 << 20) == "stream"  # small but memory is tight
    assert choose_mode("full", 2 << 30, 1 << 30) == "full"
    with pytest.raises(HubconvError, match="unknown load mode"):
        choose_mode("partial", 1, 1)


def test_progress_lines_for_large_passes(example_hf, capsys) -> None:
    run_smoke(example_hf, parity=False, load="stream", max_new_tokens=2, progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("smoke: ")]
    assert any(ln.startswith("smoke: generate token 2/2:") and ln.endswith("s") for ln in lines)
    assert not any("\r" in ln for ln in lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_streamed_forward_on_cuda(example_hf) -> None:
    report = run_smoke(example_hf, native=("torchtitan", EXAMPLE_CKPT), load="stream", device="cuda")
    assert report.device == "cuda" and report.status == "pass", report.checks


# ---------------------------------------------------------------------------- releases


class _UploadingSink:
    """Stands in for the streaming uploader: takes each finished shard away (as an upload does)."""

    def __init__(self, into: Path):
        self.into = into

    def reserve(self) -> None:
        pass

    def done(self, path: str) -> None:
        shutil.move(path, self.into / os.path.basename(path))

    def flush(self) -> None:
        pass


def test_streamed_release_verifies_the_plan_and_a_corrupt_upload_fails(tmp_path: Path, monkeypatch) -> None:
    from hubconv.config import load_config

    taken = tmp_path / "uploaded"
    taken.mkdir()
    cfg: ReleaseConfig = load_config(EXAMPLE_CONFIG)
    cfg.output = str(tmp_path / "release")
    cfg.max_shard_size = "300KB"
    result = run_release(cfg, progress=False, sink=_UploadingSink(taken))
    smoke = json.loads(Path(cfg.output, "smoke.json").read_text())
    assert smoke["mode"] == "plan" and smoke["status"] == "pass" and smoke["parity"]["passed"]
    names = {c["name"].split(" ")[0]: c["status"] for c in smoke["checks"]}
    assert names["load"] == names["generate"] == names["parity"] == names["uploaded"] == "pass"
    assert result.smoke_status == "pass" and not list(Path(cfg.output).glob("*.safetensors"))
    assert "streamed forward on the uploaded bytes" in Path(cfg.output, "README.md").read_text()

    # Negative control: a shard whose bytes differ from what the conversion plan produces (a writer fault):
    # the digests recorded from the file that is uploaded no longer match what the forward reads.
    from hubconv import streamed_forward

    record = streamed_forward.shard_digests

    def altered_then_recorded(path: str) -> dict:
        if path.endswith("00003-of-00009.safetensors"):
            with open(path, "r+b") as f:
                f.seek(-64, os.SEEK_END)
                f.write(b"\x7f" * 64)
        return record(path)

    monkeypatch.setattr(streamed_forward, "shard_digests", altered_then_recorded)
    shutil.rmtree(taken)
    taken.mkdir()
    cfg.output = str(tmp_path / "release2")
    with pytest.raises(HubconvError, match="sha256 mismatch"):
        run_release(cfg, progress=False, sink=_UploadingSink(taken))
    assert not os.path.exists(cfg.output)


def test_digesting_sink_records_what_the_file_holds(example_hf, tmp_path) -> None:
    seen: list[str] = []

    class Inner:
        def reserve(self) -> None: ...
        def done(self, path: str) -> None:
            seen.append(path)

        def flush(self) -> None: ...

    sink = DigestingSink(Inner())
    path = shutil.copy(os.path.join(example_hf, "model.safetensors"), tmp_path / "model.safetensors")
    sink.done(str(path))
    assert seen == [str(path)] and set(sink.tensors) == set(FileWeights(example_hf).tensors)
    import hashlib

    w = load_file(str(path))["model.norm.weight"]
    assert sink.tensors["model.norm.weight"]["sha256"] == hashlib.sha256(w.numpy().tobytes()).hexdigest()


def test_stream_upload_release_to_the_loopback_hub_runs_every_check(tmp_path: Path, loopback_hub_client) -> None:
    out, data = str(tmp_path / "release"), str(tmp_path / "hub")
    r = hubconv(
        *("release", "--config", EXAMPLE_CONFIG, "--output", out, "--local-hub", data),
        *("--stream-upload", "--max-shard-size", "500KB", "--quiet", "--json"),
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout[r.stdout.index("{") :])
    smoke = {c["name"].split(" ")[0]: c["status"] for c in result["checks"] if c["stage"] == "smoke"}
    assert smoke["load"] == smoke["generate"] == smoke["parity"] == smoke["uploaded"] == "pass"
    assert "skipped" not in json.dumps(result["checks"])
    report = json.loads(Path(out, "smoke.json").read_text())
    assert report["mode"] == "plan" and report["generations"][0]["new_tokens"] > 0
    assert report["costs"]["parity_seconds"] > 0 and report["costs"]["generation_tokens_per_second"] > 0


def test_smoke_cli_load_option(example_hf, tmp_path) -> None:
    folder = shutil.copytree(example_hf, tmp_path / "hf")
    r = hubconv("smoke", str(folder), "--load", "stream", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["mode"] == "files" and report["parity"]["passed"]  # native checkpoint found via hubconv.json
    assert report["costs"]["passes"] == 1 + 3 and report["generations"][0]["seconds"] > 0
    text = hubconv("smoke", str(folder), "--load", "stream", "--max-new-tokens", "1", "--no-parity").stdout
    assert "verified by streamed layer by layer from the safetensors files" in text
    bad = hubconv("smoke", str(folder), "--load", "partial")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_weights_read_outside_their_module_fall_back_to_the_full_load(example_hf, monkeypatch) -> None:
    """A module that runs without its weights materialized (as when a forward reads another module's weight)
    meets meta tensors: streaming is refused with the model named, and `auto` loads the model fully instead."""
    from hubconv import streamed_forward

    find = streamed_forward.StreamedModel._find_groups

    def without_head(self):
        groups = find(self)
        return [g for g in groups if g is not self.model.lm_head]

    monkeypatch.setattr(streamed_forward.StreamedModel, "_find_groups", without_head)
    with pytest.raises(streamed_forward.StreamUnsupported, match="LlamaForCausalLM"):
        run_smoke(example_hf, load="stream", parity=False, max_new_tokens=1)
    monkeypatch.setattr(streamed_forward, "FULL_LOAD_MAX_BYTES", 0)  # auto would stream even this tiny model
    report = run_smoke(example_hf, load="auto", parity=False, max_new_tokens=1)
    assert report.mode == "full" and report.status == "pass"
    assert report.checks[0].name == "load mode" and report.checks[0].status == "warn"
