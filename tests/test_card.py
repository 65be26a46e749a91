"""Model card rendering (hubconv.card): metadata round trip and validation, weights facts, escaping, templates."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hubconv.card import (
    CardFields,
    Provenance,
    codeblock,
    count_parameters,
    render_card,
    sha256_file,
    validate_metadata,
    write_card,
)
from hubconv.errors import HubconvError

SMOKE = {
    "status": "pass",
    "device": "cpu",
    "dtype": "float32",
    "load_seconds": 0.5,
    "loading_info": {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []},
    "generations": [
        {
            "prompt": "Once upon a time",
            "output": "there was a tiny model.",
            "new_tokens": 8,
            "tokens_per_second": 50.0,
            "expect": None,
            "passed": True,
        }
    ],
    "parity": {"positions": 96, "max_abs_diff": 1e-5, "kl_divergence": 1e-9, "top1_agreement": 1.0, "passed": True},
    "checks": [{"name": "generate", "status": "pass", "detail": "8 tokens"}],
}

FIELDS = CardFields(
    repo_id="acme/tiny-llama",
    license="apache-2.0",
    language=["en"],
    datasets=["HuggingFaceFW/fineweb-edu"],
    tags=["llama3"],
)
PROVENANCE = Provenance(
    git_repository="acme/train",
    git_commit="0123456789abcdef0123456789abcdef01234567",
    release_tag="v1.0",
    converted_at="2025-01-02T03:04:05Z",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, int]:
    """A converted folder (tiny Llama config + weights, hubconv.json, smoke.json) and its parameter count."""
    d = str(tmp_path_factory.mktemp("card") / "tiny-llama")
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    config.save_pretrained(d)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    record = {
        "hubconv_version": "0.1.0",
        "adapter": "torchtitan",
        "family": "llama3",
        "checkpoint": "/runs/tiny/step-200",
        "native_args": {"dim": 32},
        "dropped": {"optimizer.state.0": "optimizer state", "optimizer.state.1": "optimizer state", "lr": "scheduler"},
        "lossy": {
            "transformer.wte.weight": "slice_rows: rows outside 0..50257 of 50304 dropped (e.g. vocabulary padding)",
            "transformer.h.0.attn.c_attn.bias": "zeros: synthesized zeros (the source model has no such parameter)",
        },
    }
    with open(os.path.join(d, "hubconv.json"), "w") as f:
        json.dump(record, f)
    with open(os.path.join(d, "smoke.json"), "w") as f:
        json.dump(SMOKE, f)
    return d, sum(p.numel() for p in model.parameters())


def _copy(src: str, dst) -> str:
    out = str(dst / os.path.basename(src))
    shutil.copytree(src, out)
    return out


def test_yaml_round_trips_through_model_card(tiny):
    d, _ = tiny
    text = render_card(d, FIELDS, PROVENANCE)
    data = ModelCard(text).data
    # Concrete values, not the output of the function that rendered them.
    assert data.to_dict() == {
        "datasets": ["HuggingFaceFW/fineweb-edu"],
        "language": ["en"],
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["hubconv", "torchtitan", "llama", "llama3"],
    }
    assert validate_metadata(data) == []
    assert "# tiny-llama" in text
    assert 'model_id = "acme/tiny-llama"' in text and 'revision = "v1.0"' in text
    assert "[acme/train](https://github.com/acme/train)" in text


def test_files_table_sha256_matches_hashlib(tiny, tmp_path):
    d, _ = tiny
    path = os.path.join(d, "model.safetensors")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    row = next(line for line in render_card(d, FIELDS, PROVENANCE).splitlines() if "`model.safetensors`" in line)
    assert re.findall(r"\b[0-9a-f]{64}\b", row) == [digest]
    assert f"({os.path.getsize(path):,} bytes)" in row
    # Streaming over several blocks (odd size) gives the same digest as reading the file at once.
    assert sha256_file(path, block=4099) == digest


def test_parameter_count_equals_model(tiny, tmp_path):
    d, n_params = tiny
    assert count_parameters(d)[0] == n_params
    assert f"| Parameters | {n_params:,} (" in render_card(d, FIELDS, PROVENANCE)
    # Sharded: the same tensors over two files count the same.
    sharded = _copy(d, tmp_path)
    from safetensors.torch import load_file

    state = load_file(os.path.join(sharded, "model.safetensors"))
    os.remove(os.path.join(sharded, "model.safetensors"))
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, os.path.join(sharded, "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[1::2]}, os.path.join(sharded, "model-00002-of-00002.safetensors"))
    assert count_parameters(sharded)[0] == n_params


def test_license_other_needs_license_name(tiny):
    d, _ = tiny
    bad = ModelCardData(license="other", pipeline_tag="text-generation")
    assert any(p.startswith("license_name:") for p in validate_metadata(bad))
    good = ModelCardData(license="other", license_name="acme-license", license_link="LICENSE")
    assert validate_metadata(good) == []
    with pytest.raises(HubconvError, match="license_name"):
        render_card(d, CardFields(repo_id="acme/x", license="other"), PROVENANCE)
    with pytest.raises(HubconvError, match="license: 'apache2'"):
        render_card(d, CardFields(repo_id="acme/x", license="apache2"), PROVENANCE)


def test_bad_language_and_pipeline_tag_name_the_field(tiny):
    d, _ = tiny
    problems = validate_metadata({"language": ["en", "english"], "pipeline_tag": "text-gen", "license": "mit"})
    assert [p.split(":")[0] for p in problems] == ["pipeline_tag", "language"]
    assert "'english'" in problems[1] and "'text-gen'" in problems[0]
    assert validate_metadata({"language": ["en", "fra", "code"], "pipeline_tag": "text-generation"}) == []
    assert [p.split(":")[0] for p in validate_metadata({"tags": ["ok", 3], "base_model": "gpt2"})] == [
        "tags",
        "base_model",
    ]
    fields = CardFields(repo_id="acme/x", language=["EN"], base_model="not a repo id")
    with pytest.raises(HubconvError) as e:
        render_card(d, fields, PROVENANCE)
    assert "- language: 'EN'" in str(e.value) and "- base_model: 'not a repo id'" in str(e.value)


def test_user_template_and_extra_sections(tiny, tmp_path):
    d, n_params = tiny
    (tmp_path / "eval.md").write_text("| task | score |\n|---|---|\n| hellaswag | 0.25 |\n")
    template = tmp_path / "card.md.j2"
    template.write_text(
        "---\n{{ card_data }}\n---\n# Custom {{ title | md }}\n\nparams={{ arch.parameters }}\n\n"
        "{{ sections.files }}\n\n{{ sections.extra }}\n"
    )
    extra = {"Evaluation": str(tmp_path / "eval.md"), "Notes": "Trained on *tiny* data."}
    fields = CardFields(repo_id="acme/tiny-llama", license="mit", template=str(template), extra_sections=extra)
    text = render_card(d, fields, PROVENANCE)
    assert "# Custom tiny-llama" in text and f"params={n_params}" in text
    assert "## Evaluation\n\n| task | score |\n|---|---|\n| hellaswag | 0.25 |" in text
    assert "## Notes\n\nTrained on *tiny* data." in text
    assert ModelCard(text).data.license == "mit"
    # The default template places extra sections too.
    assert "## Notes\n\nTrained on *tiny* data." in render_card(d, CardFields(extra_sections=extra), PROVENANCE)
    # A template without a YAML block still yields the metadata; one with other metadata is refused.
    template.write_text("# Bare {{ title }}\n")
    assert ModelCard(render_card(d, fields, PROVENANCE)).data.license == "mit"
    template.write_text("---\nlicense: gpl-3.0\n---\n# {{ title }}\n")
    with pytest.raises(HubconvError, match=r"differs from the card metadata in: .*license"):
        render_card(d, fields, PROVENANCE)
    # Mistyped .md path and undefined template variables are errors, not silent text.
    with pytest.raises(HubconvError, match="extra_sections"):
        render_card(d, CardFields(extra_sections={"Eval": "missing.md"}), PROVENANCE)
    template.write_text("{{ no_such_variable }}\n")
    with pytest.raises(HubconvError, match="no_such_variable"):
        render_card(d, fields, PROVENANCE)
    # An alias bomb in a template's YAML block is refused before huggingface_hub parses it.
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    template.write_text(f"---\n{bomb}---\n# {{{{ title }}}}\n")
    with pytest.raises(HubconvError, match=r"card\.md\.j2 \(YAML block\).*(expand|aliases)"):
        render_card(d, fields, PROVENANCE)


MALICIOUS = "ok ```\n</code></pre><script>alert(1)</script>\n````\n~~~\n---\n# heading"


def _fenced_blocks(text: str) -> tuple[list[str], str]:
    """(contents of fenced code blocks, text outside them), by the CommonMark backtick-fence rules."""
    blocks, outside, current, fence = [], [], [], None
    for line in text.split("\n"):
        m = re.match(r"^(`{3,})(.*)$", line)
        if fence is None and m and "`" not in m.group(2):
            fence, current = m.group(1), []
        elif fence is not None and re.fullmatch(rf"{fence}`*\s*", line):
            blocks.append("\n".join(current))
            fence = None
        elif fence is not None:
            current.append(line)
        else:
            outside.append(line)
    assert fence is None, "unterminated code block"
    return blocks, "\n".join(outside)


def test_malicious_generation_is_escaped(tiny, tmp_path):
    d = _copy(tiny[0], tmp_path)
    smoke = json.loads(json.dumps(SMOKE))
    smoke["generations"][0]["output"] = MALICIOUS
    smoke["checks"].append({"name": "x<img src=x onerror=alert(1)>", "status": "warn", "detail": "a | b `c` <b>"})
    with open(os.path.join(d, "smoke.json"), "w") as f:
        json.dump(smoke, f)
    text = render_card(d, FIELDS, PROVENANCE)
    blocks, outside = _fenced_blocks(text)
    assert MALICIOUS in blocks
    assert "<script>" not in outside and "<img" not in outside and "<b>" not in outside
    assert "x&lt;img src=x onerror=alert(1)&gt;" in outside
    check_row = next(line for line in outside.splitlines() if "onerror" in line)
    assert check_row.count(" | ") == 2  # the pipe in the detail does not add a table column
    markdown_it = pytest.importorskip("markdown_it")
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(text)

    def walk(ts):
        for t in ts:
            yield t
            yield from walk(t.children or [])

    all_tokens = list(walk(tokens))
    assert not [t for t in all_tokens if t.type in ("html_block", "html_inline")]
    assert MALICIOUS + "\n" in [t.content for t in all_tokens if t.type == "fence"]


def test_codeblock_controls_and_long_fences():
    block = codeblock("a\x1b[31m\u202e````````b\r\nc", "text")
    assert block.startswith("`````````text\n") and block.endswith("\n`````````")
    assert "\\u001b[31m\\u202e" in block and "\r" not in block


def test_rendering_is_deterministic_and_path_independent(tiny, tmp_path):
    d, _ = tiny
    first = render_card(d, FIELDS, PROVENANCE)
    assert render_card(d, FIELDS, PROVENANCE) == first
    assert render_card(_copy(d, tmp_path), FIELDS, PROVENANCE) == first
    assert "2025-01-02T03:04:05Z" in first
    assert "Converted at" not in render_card(d, FIELDS, Provenance())


def test_write_card_and_missing_config(tiny, tmp_path):
    d = _copy(tiny[0], tmp_path)
    path = write_card(d, FIELDS, PROVENANCE)
    assert path == os.path.join(d, "README.md")
    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0"
    assert open(path, encoding="utf-8").read() == render_card(d, FIELDS, PROVENANCE)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(HubconvError, match=r"config\.json"):
        render_card(d, FIELDS, PROVENANCE)


def test_dropped_entries_and_lossy_steps_are_listed(tiny):
    d, _ = tiny
    text = render_card(d, FIELDS, PROVENANCE)
    dropped = text[text.index("### Dropped source entries") :]
    assert "3 source checkpoint entries were not converted" in dropped
    assert "| optimizer state | 2 | `optimizer.state.0`, `optimizer.state.1` |" in dropped
    lossy = text[text.index("### Inexact conversion steps") :]
    assert "2 parameters are not an exact copy of the source checkpoint" in lossy
    assert "`transformer.wte.weight`" in lossy and "vocabulary padding" in lossy
    assert "synthesized zeros" in lossy
