"""`hubconv release --dry-run` on the bundled example: the whole folder, and atomic failure."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest

from tests.helpers import EXAMPLE, EXAMPLE_SOURCE, ROOT, hubconv

__all__ = ["EXAMPLE_SOURCE", "hubconv"]


@pytest.fixture
def release(example_release) -> str:
    return example_release


def test_release_folder_is_complete_and_loads(release) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "smoke.json",
        "hubconv.json",
    ):
        assert os.path.exists(os.path.join(release, name)), name
    tok = AutoTokenizer.from_pretrained(release)
    model = AutoModelForCausalLM.from_pretrained(release)
    ids = tok("A class definition", return_tensors="pt").input_ids
    assert ids[0, 0].item() == 512  # <|begin_of_text|>, as TorchTitan trained it
    text = tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :])
    assert "executable statement" in text
    cfg = json.load(open(os.path.join(release, "config.json")))
    gen = json.load(open(os.path.join(release, "generation_config.json")))
    assert cfg["eos_token_id"] == gen["eos_token_id"] == tok.eos_token_id == 513


def test_card_lists_real_checksums_and_parity(release) -> None:
    card = open(os.path.join(release, "README.md")).read()
    digest = hashlib.sha256(open(os.path.join(release, "model.safetensors"), "rb").read()).hexdigest()
    assert digest in card
    assert card.startswith("---\n") and "library_name: transformers" in card and "- torchtitan" in card
    smoke = json.load(open(os.path.join(release, "smoke.json")))
    assert smoke["parity"]["passed"] and smoke["parity"]["positions"] == 96
    assert f"{smoke['parity']['max_abs_diff']:.3g}" in card
    assert "/work" not in card and os.path.expanduser("~") + "/" not in card  # no local paths leaked
    # hubconv.json is published too: its checkpoint path is relative to the config's folder.
    record = json.load(open(os.path.join(release, "hubconv.json")))
    assert record["checkpoint"] == "step-800"
    assert ROOT not in open(os.path.join(release, "hubconv.json")).read()


def test_failed_smoke_leaves_nothing(tmp_path) -> None:
    out = str(tmp_path / "release")
    r = hubconv(
        "release",
        "--dry-run",
        "--config",
        os.path.join(EXAMPLE, ".hubconv.yml"),
        "--output",
        out,
        "--prompt",
        "A class definition",
        "--expect",
        "^definitely not this$",
        "--quiet",
    )
    assert r.returncode == 1
    assert "release failed at smoke" in r.stderr and "❌" in r.stderr  # the report is still shown
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if "hubconv" in n]


def test_flags_alone_without_config(tmp_path) -> None:
    out = str(tmp_path / "release")
    r = hubconv(
        "release",
        "--dry-run",
        *EXAMPLE_SOURCE,
        "--output",
        out,
        "--no-parity",
        "--prompt",
        "An assignment statement",
        "--max-new-tokens",
        "6",
        "--quiet",
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert "no tokenizer configured" in r.stdout
    smoke = json.load(open(os.path.join(out, "smoke.json")))
    assert smoke["generations"][0]["new_tokens"] == 6 and smoke["parity"] is None
    # No repo id and no title: the card is titled after the release folder, not its temporary sibling.
    card = open(os.path.join(out, "README.md")).read()
    assert "\n# release\n" in card and "hubconv-release" not in card


def test_existing_output_is_kept_without_overwrite(tmp_path) -> None:
    out = tmp_path / "release"
    out.mkdir()
    r = hubconv("release", "--dry-run", "--config", os.path.join(EXAMPLE, ".hubconv.yml"), "--output", str(out))
    assert r.returncode == 1 and "already exists" in r.stderr


def test_convert_with_tokenizer(tmp_path) -> None:
    from transformers import AutoTokenizer

    out = str(tmp_path / "hf")
    r = hubconv(
        "convert",
        *EXAMPLE_SOURCE,
        "--output",
        out,
        "--quiet",
        "--tokenizer",
        os.path.join(EXAMPLE, "tokenizer", "tokenizer.model"),
    )
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 522 and tok.eos_token == "<|end_of_text|>"


def test_git_provenance_never_publishes_local_paths_or_credentials(tmp_path, monkeypatch) -> None:
    from hubconv.release import git_provenance

    for var in ("GITHUB_REPOSITORY", "GITHUB_SHA", "GITHUB_REF_NAME", "GITHUB_REF_TYPE"):
        monkeypatch.delenv(var, raising=False)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)

    def origin(url: str) -> str | None:
        subprocess.run(["git", "-C", str(tmp_path), "remote", "remove", "origin"], capture_output=True)
        subprocess.run(["git", "-C", str(tmp_path), "remote", "add", "origin", url], check=True)
        return git_provenance(str(tmp_path))["git_repository"]

    assert origin("/home/me/work/repo") is None
    assert origin("https://user:ghp_secret@github.com/org/repo.git") == "https://github.com/org/repo.git"
    assert origin("git@github.com:org/repo.git") == "git@github.com:org/repo.git"
    monkeypatch.setenv("GITHUB_REPOSITORY", "org/repo")
    monkeypatch.setenv("GITHUB_SHA", "abc")
    monkeypatch.setenv("GITHUB_REF_TYPE", "tag")
    monkeypatch.setenv("GITHUB_REF_NAME", "v1.0")
    assert git_provenance(str(tmp_path)) == {
        "git_repository": "https://github.com/org/repo",
        "git_commit": "abc",
        "release_tag": "v1.0",
    }
