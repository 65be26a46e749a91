"""`hubconv action` with real webhook payloads (@octokit/webhooks-examples) and a GitHub-like environment."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess

import pytest

from hubconv.action import plan_event, read_inputs, run_action, set_output
from hubconv.devhub import DevHub
from hubconv.errors import HubconvError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "tiny-llama3-torchtitan")
HOOKS = os.path.join(ROOT, "tests", "data", "webhooks")
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def payload(name: str) -> dict:
    with open(os.path.join(HOOKS, name)) as f:
        return json.load(f)


def pr_comment(body: str, association: str = "OWNER") -> dict:
    p = copy.deepcopy(payload("issue_comment.created.json"))
    p["issue"]["pull_request"] = {"url": p["issue"]["url"].replace("/issues/", "/pulls/")}
    p["comment"]["body"] = body
    p["comment"]["author_association"] = association
    return p


def parse_outputs(path: str) -> dict[str, str]:
    out, lines = {}, open(path).read().splitlines()
    i = 0
    while i < len(lines):
        name, delim = lines[i].split("<<", 1)
        end = lines.index(delim, i + 1)
        out[name] = "\n".join(lines[i + 1 : end])
        i = end + 1
    return out


def test_events_map_to_runs() -> None:
    inputs = read_inputs({"INPUT_TAG": "", "INPUT_DRY-RUN": "false"})
    rel = plan_event("release", payload("release.published.json"), inputs)
    assert rel.kind == "release" and rel.tag == payload("release.published.json")["release"]["tag_name"]
    assert not rel.dry_run
    assert plan_event("release", payload("release.prereleased.json"), inputs).kind == "release"
    assert plan_event("push", payload("push.tag.json"), inputs).tag == "simple-tag"
    assert plan_event("push", payload("push.branch.json"), inputs) is None
    dispatch = plan_event("workflow_dispatch", payload("workflow_dispatch.json"), read_inputs({"INPUT_TAG": "v2"}))
    assert dispatch.kind == "dispatch" and dispatch.tag == "v2"
    pr = plan_event("pull_request", payload("pull_request.opened.json"), inputs)
    assert pr.dry_run and pr.issue_number == payload("pull_request.opened.json")["pull_request"]["number"]
    push_cmd = plan_event("issue_comment", pr_comment("/hubconv push 1A2B3C4d"), inputs)
    assert push_cmd.create_pr and not push_cmd.dry_run and push_cmd.commit == "1a2b3c4d"
    for unpinned in ("/hubconv push", "/hubconv push main", "/hubconv push 1a2b3"):
        with pytest.raises(HubconvError, match=r"needs the commit to publish, e.g. `/hubconv push 1a2b3c4`"):
            plan_event("issue_comment", pr_comment(unpinned), inputs)
    assert plan_event("issue_comment", pr_comment("/hubconv"), inputs).dry_run
    assert plan_event("issue_comment", pr_comment("looks good"), inputs) is None
    assert plan_event("issue_comment", payload("issue_comment.created.json"), inputs) is None  # not on a PR
    with pytest.raises(HubconvError, match=r"needs a trusted author .* is NONE"):
        plan_event("issue_comment", pr_comment("/hubconv push 1a2b3c4", "NONE"), inputs)
    with pytest.raises(HubconvError, match="input `dry-run` must be true or false"):
        plan_event("workflow_dispatch", {}, read_inputs({"INPUT_DRY-RUN": "maybe"}))


def test_multiline_outputs_survive(tmp_path) -> None:
    path = str(tmp_path / "out")
    set_output(path, "report", "line 1\nline 2\nEOF\n<<")
    set_output(path, "smoke-status", "pass")
    assert parse_outputs(path) == {"report": "line 1\nline 2\nEOF\n<<", "smoke-status": "pass"}


@pytest.fixture
def workspace(tmp_path) -> str:
    ws = tmp_path / "ws"
    shutil.copytree(EXAMPLE, ws / "model", ignore=shutil.ignore_patterns(".hubconv.yml", "corpus*"))
    (ws / ".hubconv.yml").write_text(
        "adapter: torchtitan\ncheckpoint: model/step-800\nmodel_args: model/model_args.yaml\n"
        "tokenizer: {path: model/tokenizer/tokenizer.model}\noutput: dist/release\n"
        "hub: {repo_id: org/tiny}\ncard: {license: apache-2.0}\n"
        "smoke: {prompts: [{prompt: A class definition, expect: executable}], max_new_tokens: 8}\n"
    )
    return str(ws)


def github_env(tmp_path, workspace: str, event: str, body: dict, gh=None, **inputs: str) -> dict[str, str]:
    """A Docker action's environment; with `gh` (a tests.ghserver.FakeGitHub) the bot talks to it."""
    if gh is not None:
        inputs.setdefault("github_token", gh.token)
    event_path = tmp_path / "event.json"
    event_path.write_text(json.dumps(body))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INPUT_", "GITHUB_"))}
    env |= {
        "GITHUB_ACTIONS": "true",
        "GITHUB_EVENT_NAME": event,
        "GITHUB_EVENT_PATH": str(event_path),
        "GITHUB_WORKSPACE": workspace,
        "GITHUB_REPOSITORY": "octo/model",
        "GITHUB_SHA": "0" * 40,
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_OUTPUT": str(tmp_path / "output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary"),
        "RUNNER_TEMP": str(tmp_path),
    }
    env |= {f"INPUT_{k.upper().replace('_', '-')}": v for k, v in inputs.items()}
    if gh is not None:
        env |= {"GITHUB_API_URL": gh.api_url, "GITHUB_REPOSITORY": "acme/models"}
    return env


@pytest.fixture
def hub(tmp_path, loopback_hub_client):
    cwd = os.getcwd()
    with DevHub(str(tmp_path / "hubdata"), orgs=("org",)) as server:
        yield server
    os.chdir(cwd)


def test_release_published_publishes_and_reports(tmp_path, workspace, hub, capsys) -> None:
    body = payload("release.published.json")
    env = github_env(tmp_path, workspace, "release", body, endpoint=hub.url, hf_token=hub.token)
    assert run_action(env) == 0
    out = parse_outputs(env["GITHUB_OUTPUT"])
    tag = body["release"]["tag_name"]
    assert out["hub-tag"] == tag and hub.head("org/tiny", tag) == out["commit-sha"]
    assert out["smoke-status"] == "pass" and out["commit-url"].endswith(out["commit-sha"])
    assert out["report"] == ".hubconv/report.md"  # relative: valid inside the container and on the runner
    assert "parity" in open(os.path.join(workspace, out["report"])).read()
    summary = open(env["GITHUB_STEP_SUMMARY"]).read()
    assert out["repo-url"] in summary and "model.safetensors" in summary
    printed = capsys.readouterr().out
    assert f"::add-mask::{hub.token}" in printed and printed.count(hub.token) == 1
    assert "::group::hubconv release" in printed and "::endgroup::" in printed


def test_pull_request_runs_a_dry_run(tmp_path, workspace, hub) -> None:
    env = github_env(tmp_path, workspace, "pull_request", payload("pull_request.opened.json"))
    assert run_action(env) == 0
    out = parse_outputs(env["GITHUB_OUTPUT"])
    assert out["smoke-status"] == "pass" and "commit-sha" not in out
    assert hub.head("org/tiny") is None  # nothing published


def git_commit_all(workspace: str, message: str) -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", workspace, "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    if not os.path.isdir(os.path.join(workspace, ".git")):
        git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "--allow-empty", "-m", message)
    return git("rev-parse", "HEAD")


def test_trusted_push_comment_publishes_only_the_named_commit(tmp_path, workspace, hub, capsys) -> None:
    reviewed = git_commit_all(workspace, "the PR as reviewed")
    git_commit_all(workspace, "pushed after the maintainer's comment")
    env = github_env(
        tmp_path,
        workspace,
        "issue_comment",
        pr_comment(f"/hubconv push {reviewed[:7]}"),
        endpoint=hub.url,
        hf_token=hub.token,
        tag="v0.1",
    )
    assert run_action(env) == 1
    assert f"::error::/hubconv push {reviewed[:7]}: the checked-out commit is" in capsys.readouterr().out
    assert hub.head("org/tiny") is None  # nothing published

    from tests.ghserver import FakeGitHub

    head = git_commit_all(workspace, "another")
    comment = pr_comment(f"/hubconv push {head[:10]}")
    with FakeGitHub() as gh:
        env = github_env(
            tmp_path,
            workspace,
            "issue_comment",
            comment,
            endpoint=hub.url,
            hf_token=hub.token,
            gh=gh,
            tag="v0.1",
        )
        assert run_action(env) == 0
        out = parse_outputs(env["GITHUB_OUTPUT"])
        assert out["pr-number"] and hub.head("org/tiny", f"refs/pr/{out['pr-number']}") == out["commit-sha"]
        assert hub.head("org/tiny", "main") != out["commit-sha"]
        # the bot answers on the GitHub PR with both links: the model and the Hub PR
        (posted,) = gh.comments[comment["issue"]["number"]]
        assert f"Model: {out['repo-url']}" in posted["body"] and f"Hub PR: {out['pr-url']}" in posted["body"]


def test_workspace_commit_reads_git_without_git(tmp_path) -> None:
    from hubconv.action import workspace_commit

    ws = str(tmp_path / "repo")
    os.makedirs(ws)
    assert workspace_commit(ws) is None
    head = git_commit_all(ws, "one")
    assert workspace_commit(ws) == head  # HEAD -> refs/heads/<branch> file
    subprocess.run(["git", "-C", ws, "pack-refs", "--all"], check=True)
    assert workspace_commit(ws) == head  # packed-refs
    subprocess.run(["git", "-C", ws, "checkout", "-q", "--detach"], check=True)
    assert workspace_commit(ws) == head  # detached, as actions/checkout leaves a PR head
    wt = str(tmp_path / "wt")
    subprocess.run(["git", "-C", ws, "worktree", "add", "-q", "--detach", wt], check=True)
    assert workspace_commit(wt) == head  # .git is a file


def test_config_errors_become_annotations(tmp_path, workspace, hub, capsys) -> None:
    with open(os.path.join(workspace, ".hubconv.yml"), "a") as f:
        f.write("smoke_test: true\n")
    env = github_env(tmp_path, workspace, "workflow_dispatch", payload("workflow_dispatch.json"), dry_run="true")
    assert run_action(env) == 1
    printed = capsys.readouterr().out
    assert "::error file=.hubconv.yml,line=9::smoke_test: unknown field" in printed
    assert "failed" in open(env["GITHUB_STEP_SUMMARY"]).read()


def test_publishing_without_a_token_is_a_clear_error(tmp_path, workspace, hub, capsys) -> None:
    env = github_env(tmp_path, workspace, "push", payload("push.tag.json"), endpoint=hub.url)
    env.pop("HF_TOKEN", None)
    assert run_action(env) == 1
    assert "::error::input `hf-token` is required to publish" in capsys.readouterr().out
    assert hub.head("org/tiny") is None


def test_bot_reports_on_pr_once_and_on_release_notes(tmp_path, workspace, hub) -> None:
    """The action's bot, through PyGithub, against a loopback GitHub REST server."""
    from tests.ghserver import FakeGitHub

    with FakeGitHub() as gh:
        pr = payload("pull_request.opened.json")
        number = pr["pull_request"]["number"]
        for _ in range(2):
            env = github_env(tmp_path, workspace, "pull_request", pr, gh=gh)
            assert run_action(env) == 0
        comments = gh.comments[number]
        assert len(comments) == 1 and "parity" in comments[0]["body"]  # the second run edited it
        head = pr["pull_request"]["head"]["sha"][:7]
        assert f"a maintainer comments `/hubconv push {head}`" in comments[0]["body"]
        assert len(gh.calls("PATCH")) == 1

        body = payload("release.prereleased.json")
        tag = body["release"]["tag_name"]
        gh.add_release(tag, body="Notes from the maintainers.", draft=False, prerelease=True)
        env = github_env(tmp_path, workspace, "release", body, endpoint=hub.url, hf_token=hub.token, gh=gh)
        assert run_action(env) == 0
        release = next(r for r in gh.releases if r["tag_name"] == tag)
        assert release["body"].startswith("Notes from the maintainers.") and "/org/tiny" in release["body"]
        assert release["prerelease"] is True and release["draft"] is False
        assert gh.token not in open(env["GITHUB_STEP_SUMMARY"]).read()


def test_checkpoint_from_release_assets(tmp_path, workspace, hub) -> None:
    """`checkpoint: release-assets:`: the DCP files attached to the triggering release are downloaded
    (sha256 from the release notes checked) and converted."""
    import hashlib

    from tests.ghserver import FakeGitHub

    step = os.path.join(workspace, "model", "step-800")
    files = [(name, open(os.path.join(step, name), "rb").read()) for name in sorted(os.listdir(step))]
    shutil.rmtree(step)  # only the release has the checkpoint now
    config = os.path.join(workspace, ".hubconv.yml")
    text = open(config).read().replace("checkpoint: model/step-800", 'checkpoint: "release-assets:"')
    open(config, "w").write(text)
    body = payload("release.published.json")
    tag = body["release"]["tag_name"]
    sums = "\n".join(f"{hashlib.sha256(data).hexdigest()}  {name}" for name, data in files)
    with FakeGitHub() as gh:
        gh.add_release(tag, body=f"Weights attached.\n\n```\n{sums}\n```\n", assets=files)
        env = github_env(
            tmp_path,
            workspace,
            "release",
            body,
            endpoint=hub.url,
            hf_token=hub.token,
            gh=gh,
            comment="false",
        )
        assert run_action(env) == 0
        assert not [r for r in gh.requests if r.storage and "authorization" in {k.lower() for k in r.headers}]
    out = parse_outputs(env["GITHUB_OUTPUT"])
    assert out["smoke-status"] == "pass" and hub.head("org/tiny", tag) == out["commit-sha"]
    summary = open(env["GITHUB_STEP_SUMMARY"]).read()
    assert f"| checkpoint fetched | {sum(len(d) for _, d in files):,} |" in summary
    assert "| free on the workspace disk at end |" in summary


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_checkpoint_from_an_hf_url_on_the_configured_endpoint(tmp_path, workspace, hub) -> None:
    """`checkpoint: hf://...` is read with the action's `endpoint` and `hf-token` (a private checkpoint repo on the
    same Hub), verified against the Hub's checksums, converted and published."""
    from huggingface_hub import HfApi

    step = os.path.join(workspace, "model", "step-800")
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo("org/tiny-training", private=True)
    api.upload_folder(repo_id="org/tiny-training", folder_path=step, path_in_repo="checkpoints/step-800")
    shutil.rmtree(step)
    config = os.path.join(workspace, ".hubconv.yml")
    text = (
        open(config)
        .read()
        .replace("checkpoint: model/step-800", "checkpoint: hf://org/tiny-training/checkpoints/step-800")
    )
    open(config, "w").write(text)
    body = payload("release.published.json")
    env = github_env(tmp_path, workspace, "release", body, endpoint=hub.url, hf_token=hub.token)
    assert run_action(env) == 0
    out = parse_outputs(env["GITHUB_OUTPUT"])
    assert out["smoke-status"] == "pass" and hub.head("org/tiny", body["release"]["tag_name"]) == out["commit-sha"]
    assert "| checkpoint fetched |" in open(env["GITHUB_STEP_SUMMARY"]).read()
