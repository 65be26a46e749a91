"""`hubconv push` against the loopback Hub, with the real huggingface_hub client, end to end."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from hubconv.devhub import DevHub
from hubconv.errors import HubconvError
from hubconv.hub import REPORT_MARKER, push
from hubconv.verify import verify_download
from tests.helpers import EXAMPLE_SOURCE, hubconv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "tiny-llama3-torchtitan")
pytestmark = [
    pytest.mark.usefixtures("loopback_hub_client"),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]


@pytest.fixture
def release_dir(example_release) -> str:
    return example_release


@pytest.fixture
def hub(tmp_path):
    with DevHub(str(tmp_path / "hubdata"), orgs=("org",)) as server:
        yield server


@pytest.fixture
def folder(release_dir, tmp_path) -> str:
    path = str(tmp_path / "release")
    shutil.copytree(release_dir, path)
    return path


def commits(hub) -> list[dict]:
    return [r for r in hub.requests(method="POST") if "/commit/" in r["path"]]


def test_push_download_load_generate(hub, folder) -> None:
    result = push(folder, "org/tiny", endpoint=hub.url, token=hub.token, tag="v1.0")
    assert not result.no_op and result.tag == "v1.0" and len(result.commit_sha) == 40
    assert hub.head("org/tiny") == result.commit_sha == hub.head("org/tiny", "v1.0")
    check = verify_download("org/tiny", result.commit_sha, hub.url, hub.token, folder, "A class definition")
    assert check["files_identical"] and check["same_generation"], check
    names = {f.path for f in result.files}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "smoke.json"} <= names


def test_rerun_is_a_no_op(hub, folder) -> None:
    first = push(folder, "org/tiny", endpoint=hub.url, token=hub.token, tag="v1.0")
    mark = hub.mark()
    with open(os.path.join(folder, "smoke.json"), "a") as f:
        f.write(" ")  # a regenerated report alone is not a new release
    again = push(folder, "org/tiny", endpoint=hub.url, token=hub.token, tag="v1.0")
    assert again.no_op and again.commit_sha == first.commit_sha
    new = hub.requests(since=mark)
    assert not [r for r in new if "/commit/" in r["path"] or r["method"] == "PUT"], new


def test_tag_on_different_content_needs_force(hub, folder) -> None:
    first = push(folder, "org/tiny", endpoint=hub.url, token=hub.token, tag="v1.0")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["max_position_embeddings"] = 512
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(HubconvError, match=r"tag 'v1.0' already points at .* with different content.*nothing was"):
        push(folder, "org/tiny", endpoint=hub.url, token=hub.token, tag="v1.0")
    assert hub.head("org/tiny") == first.commit_sha  # refused before committing
    moved = push(folder, "org/tiny", endpoint=hub.url, token=hub.token, tag="v1.0", force=True)
    assert not moved.no_op and moved.commit_sha != first.commit_sha
    assert hub.head("org/tiny", "v1.0") == moved.commit_sha


def test_pr_mode_updates_one_pr_and_one_comment(hub, folder) -> None:
    from huggingface_hub import HfApi

    first = push(
        folder, "org/tiny", endpoint=hub.url, token=hub.token, tag="v2.0", create_pr=True, report_md="report one"
    )
    assert first.pr_number is not None and first.pr_url.endswith(f"/discussions/{first.pr_number}")
    assert hub.head("org/tiny", "main") != first.commit_sha  # main untouched
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["max_position_embeddings"] = 1024
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    second = push(
        folder, "org/tiny", endpoint=hub.url, token=hub.token, tag="v2.0", create_pr=True, report_md="report two"
    )
    assert second.pr_number == first.pr_number and second.commit_sha != first.commit_sha
    api = HfApi(endpoint=hub.url, token=hub.token)
    prs = list(api.get_repo_discussions("org/tiny", discussion_type="pull_request"))
    assert len(prs) == 1
    comments = [
        e
        for e in api.get_discussion_details("org/tiny", first.pr_number).events
        if e.type == "comment" and REPORT_MARKER in (e.content or "")
    ]
    ours = [c for c in comments if "report" in c.content and not c.content.startswith("Published")]
    assert len(ours) == 1 and "report two" in ours[0].content and ours[0].edited
    assert hub.head("org/tiny", f"refs/pr/{first.pr_number}") == second.commit_sha


def test_failure_mid_upload_leaves_repo_unchanged_and_retry_completes(hub, folder) -> None:
    push(folder, "org/tiny", endpoint=hub.url, token=hub.token)
    before = hub.head("org/tiny")
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "r+b") as f:  # new weights: a new LFS object must be uploaded
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x3f")
    hub.drop_next(10, method="PUT", after_bytes=1000)  # every upload attempt is cut mid-body
    with pytest.raises(Exception):  # noqa: B017 - whatever the client raises, the point is the repo state
        push(folder, "org/tiny", endpoint=hub.url, token=hub.token)
    assert hub.head("org/tiny") == before
    hub.clear_faults()
    hub.fail_next(2, method="POST", path="/commit/", status=503)  # transient: retried
    after = push(folder, "org/tiny", endpoint=hub.url, token=hub.token)
    assert after.commit_sha != before and hub.head("org/tiny") == after.commit_sha
    assert hub.files("org/tiny")["model.safetensors"] == open(weights, "rb").read()


def test_bad_tokens_fail_clearly_and_write_nothing(hub, folder, monkeypatch) -> None:
    with pytest.raises(HubconvError, match=r"rejected the Hub token \(HTTP 401\)"):
        push(folder, "org/tiny", endpoint=hub.url, token="hf_wrong")
    with pytest.raises(HubconvError, match=r"cannot create or access org/tiny .*HTTP 403"):
        push(folder, "org/tiny", endpoint=hub.url, token=hub.read_token)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubconvError, match="set the HF_TOKEN environment variable"):
        push(folder, "org/tiny", endpoint=hub.url)
    assert hub.head("org/tiny") is None


def test_cli_json_and_the_token_never_printed(hub, folder) -> None:
    env = {**os.environ, "HF_TOKEN": hub.token, "HF_ENDPOINT": hub.url, "GITHUB_ACTIONS": "true"}
    r = hubconv("push", folder, "--repo-id", "org/tiny", "--tag", "v3", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.index("{") :])
    assert out["commit_url"].endswith(out["commit_sha"]) and out["tag"] == "v3" and out["pr_number"] is None
    assert {f["path"] for f in out["files"]} >= {"model.safetensors"} and all(
        len(f["sha256"]) == 64 for f in out["files"]
    )
    # The only occurrence is GitHub's own masking command; it is never printed otherwise.
    assert (r.stdout + r.stderr).replace(f"::add-mask::{hub.token}", "").count(hub.token) == 0
    bad = hubconv("push", folder, "--repo-id", "org/tiny", env={**env, "HF_TOKEN": "hf_wrong_token_123"})
    assert bad.returncode == 1 and "hf_wrong_token_123" not in bad.stdout.replace("::add-mask::hf_wrong_token_123", "")
    assert "hf_wrong_token_123" not in bad.stderr
    assert hub.token not in open(hub.log_path).read()


def test_stream_upload_keeps_two_shards_on_disk(tmp_path) -> None:
    """release --stream-upload: shards leave as they are written; the commit still has them all."""
    from safetensors import safe_open

    out, data = str(tmp_path / "release"), str(tmp_path / "hub")
    r = hubconv(
        "release",
        "--config",
        os.path.join(EXAMPLE, ".hubconv.yml"),
        "--output",
        out,
        "--local-hub",
        data,
        "--stream-upload",
        "--max-shard-size",
        "300KB",
        "--quiet",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout[r.stdout.index("{") :])
    shards = [f for f in result["push"]["files"] if f["path"].startswith("model-")]
    assert len(shards) == 9
    biggest = max(f["size"] for f in shards)
    assert 0 < result["stream"]["peak_shard_bytes_on_disk"] <= 2 * biggest
    assert not [n for n in os.listdir(out) if n.endswith(".safetensors")]  # none kept locally
    assert result["verify"]["files_identical"]
    # Same tokens as the non-streamed release of the same checkpoint.
    with DevHub(data) as hub:
        files = hub.files("hubconv-demo/tiny-llama3-torchtitan")
    assert {f["path"] for f in shards} <= set(files)
    card = open(os.path.join(out, "README.md")).read()
    assert all(f["sha256"] in card for f in shards)  # checksums recorded while streaming
    assert json.load(open(os.path.join(out, "smoke.json")))["mode"] == "plan"  # verified on the uploaded bytes
    local = tmp_path / "plain"
    plain = hubconv("convert", *EXAMPLE_SOURCE, "--output", str(local), "--max-shard-size", "300KB", "--quiet")
    assert plain.returncode == 0, plain.stderr
    for f in shards:
        assert files[f["path"]] == (local / f["path"]).read_bytes()
    with safe_open(str(local / shards[0]["path"]), framework="pt") as f:
        assert list(f.keys())
