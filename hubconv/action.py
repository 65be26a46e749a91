"""`hubconv action`: the GitHub Action entry point.

Reads the runner's environment (inputs arrive as `INPUT_<NAME>`, upper-cased with hyphens kept, and
`required:` is not enforced by the runner, so inputs are validated here), maps the triggering event
to a release run, writes step outputs (`$GITHUB_OUTPUT`, multi-line safe), a job summary
(`$GITHUB_STEP_SUMMARY`, under its 1 MiB cap), log groups and annotations, and reports back through
the GitHub bot.

Events: `release` (published / prereleased) and tag pushes publish the release named by the tag;
`workflow_dispatch` publishes with its inputs; `pull_request` runs a dry run; an `issue_comment`
starting with `/hubconv` on a pull request runs a dry run, and `/hubconv push` from a trusted
author (OWNER, MEMBER, COLLABORATOR) publishes as a Hub PR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hubconv.credentials import add_mask, clean_token, redact
from hubconv.errors import HubconvError

INPUTS = (
    "config",
    "adapter",
    "checkpoint",
    "model-args",
    "mapping",
    "tokenizer",
    "repo-id",
    "hf-token",
    "endpoint",
    "revision",
    "tag",
    "create-pr",
    "private",
    "dtype",
    "dry-run",
    "prompt",
    "max-new-tokens",
    "github-token",
    "comment",
)
TRUSTED = ("OWNER", "MEMBER", "COLLABORATOR")
SHA_RE = re.compile(r"[0-9a-f]{7,40}")
SUMMARY_LIMIT = 1024 * 1024 - 4096  # GitHub rejects step summaries over 1 MiB


@dataclass
class EventPlan:
    kind: str  # release | tag | dispatch | pull_request | comment
    dry_run: bool
    create_pr: bool = False
    tag: str | None = None
    issue_number: int | None = None
    commit: str | None = None  # `/hubconv push <sha>`: the commit a trusted author vouched for
    head_sha: str | None = None  # the PR head commit, when the payload names it (pull_request events)


def read_inputs(env: Mapping[str, str]) -> dict[str, str | None]:
    """`INPUT_REPO-ID` -> `repo-id`; empty values are None (how the runner passes unset inputs)."""
    return {name: (env.get(f"INPUT_{name.upper()}") or "").strip() or None for name in INPUTS}


def _flag(value: str | None, name: str, default: bool = False) -> bool:
    if value is None:
        return default
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise HubconvError(f"input `{name}` must be true or false, got {value!r}")


def plan_event(event: str, payload: Mapping[str, Any], inputs: Mapping[str, str | None]) -> EventPlan | None:
    """What to do for this event; None when it is not for us (e.g. an unrelated comment)."""
    dry = _flag(inputs.get("dry-run"), "dry-run")
    pr_mode = _flag(inputs.get("create-pr"), "create-pr")
    if event == "release":
        if payload.get("action") not in ("published", "prereleased", "released"):
            return None
        return EventPlan("release", dry, pr_mode, inputs.get("tag") or payload["release"]["tag_name"])
    if event == "push":
        ref = payload.get("ref", "")
        if not ref.startswith("refs/tags/") or payload.get("deleted"):
            return None
        return EventPlan("tag", dry, pr_mode, inputs.get("tag") or ref.removeprefix("refs/tags/"))
    if event == "workflow_dispatch":
        return EventPlan("dispatch", dry, pr_mode, inputs.get("tag"))
    if event == "pull_request":
        pr = payload["pull_request"]
        return EventPlan("pull_request", True, issue_number=pr["number"], head_sha=(pr.get("head") or {}).get("sha"))
    if event == "issue_comment":
        body = (payload.get("comment") or {}).get("body", "").strip()
        if payload.get("action") != "created" or "pull_request" not in payload.get("issue", {}):
            return None
        words = body.split()
        if not words or words[0] != "/hubconv":
            return None
        number = payload["issue"]["number"]
        if words[1:2] == ["push"]:
            association = payload["comment"].get("author_association", "NONE")
            if association not in TRUSTED:
                raise HubconvError(
                    f"/hubconv push needs a trusted author (one of {', '.join(TRUSTED)}); "
                    f"{payload['comment']['user']['login']} is {association}"
                )
            sha = words[2].lower() if len(words) > 2 else ""
            if not SHA_RE.fullmatch(sha):
                raise HubconvError(
                    "/hubconv push needs the commit to publish, e.g. `/hubconv push 1a2b3c4` (the PR head you "
                    "reviewed): the PR could receive new commits after your comment"
                )
            return EventPlan("comment", False, True, inputs.get("tag"), number, commit=sha)
        return EventPlan("comment", True, issue_number=number)
    raise HubconvError(
        f"event {event!r} is not supported (release, push of a tag, workflow_dispatch, pull_request, issue_comment)"
    )


def set_output(path: str | None, name: str, value: str) -> None:
    """Append a step output; the random delimiter keeps multi-line values intact."""
    if not path:
        return
    delimiter = f"hubconv_{uuid.uuid4().hex}"
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")


def write_summary(path: str | None, markdown: str) -> None:
    if not path:
        return
    if len(markdown.encode()) > SUMMARY_LIMIT:
        markdown = markdown.encode()[:SUMMARY_LIMIT].decode(errors="ignore") + "\n\n_(summary truncated)_\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(markdown)


def _escape_property(value: str) -> str:
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A").replace(":", "%3A").replace(",", "%2C")


def _escape_data(value: str) -> str:
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def annotate_error(e: HubconvError, workspace: str) -> None:
    """`::error file=...,line=...::` for config errors, plain `::error::` otherwise."""
    file, line = getattr(e, "file", None), getattr(e, "line", None)
    if file:
        rel = os.path.relpath(os.path.abspath(file), workspace)
        where = f"file={_escape_property(rel)}" + (f",line={line}" if line else "")
        detail = getattr(e, "detail", str(e))
        print(f"::error {where}::{_escape_data(redact(detail))}", flush=True)
    else:
        print(f"::error::{_escape_data(redact(str(e)))}", flush=True)


def _config_args(inputs: Mapping[str, str | None], plan: EventPlan, workspace: str) -> argparse.Namespace:
    """The inputs as `hubconv release` flags, so the action and the CLI share one config path."""
    config = inputs.get("config") or (
        ".hubconv.yml" if os.path.exists(os.path.join(workspace, ".hubconv.yml")) else None
    )
    prompt = inputs.get("prompt")
    return argparse.Namespace(
        config=os.path.join(workspace, config) if config else None,
        adapter=inputs.get("adapter"),
        checkpoint=inputs.get("checkpoint"),
        model_args=inputs.get("model-args"),
        mapping=inputs.get("mapping"),
        dtype=inputs.get("dtype"),
        max_shard_size=None,
        output=None,
        tokenizer=inputs.get("tokenizer"),
        tokenizer_kind=None,
        bos_token=None,
        eos_token=None,
        prompt=[prompt] if prompt else None,
        expect=None,
        max_new_tokens=int(inputs["max-new-tokens"]) if inputs.get("max-new-tokens") else None,
        no_parity=False,
        positions=None,
        device=None,
        repo_id=inputs.get("repo-id"),
        private=True if _flag(inputs.get("private"), "private") else None,
        create_pr=True if plan.create_pr else None,
        revision=inputs.get("revision"),
        endpoint=inputs.get("endpoint"),
        license=None,
        title=None,
        description=None,
        language=None,
        base_model=None,
    )


def run_action(env: Mapping[str, str] | None = None) -> int:
    """Run the action for the current event; returns the process exit code."""
    env = dict(os.environ if env is None else env)
    workspace = env.get("GITHUB_WORKSPACE") or os.getcwd()
    try:
        return _run(env, workspace)
    except HubconvError as e:
        return run_action_failed(env, workspace, e)
    except Exception as e:
        if env.get("HUBCONV_DEBUG") == "1":
            raise
        # Not a user error, but still one redacted line: a library's exception text may carry a URL or header.
        error = HubconvError(f"unexpected {type(e).__name__}: {' '.join(str(e).split())} (HUBCONV_DEBUG=1 shows more)")
        return run_action_failed(env, workspace, error)


def run_action_failed(env: Mapping[str, str], workspace: str, e: HubconvError) -> int:
    """Report `e` as the step's error annotation and job summary; returns the exit code."""
    annotate_error(e, workspace)
    write_summary(env.get("GITHUB_STEP_SUMMARY"), f"### hubconv: ❌ failed\n\n{_escape_md(redact(str(e)))}\n")
    return 1


def _escape_md(text: str) -> str:
    return text.replace("<", "&lt;")


def _run(env: dict[str, str], workspace: str) -> int:
    from hubconv.cli import release_config
    from hubconv.hub import HubFields, hub_endpoint, preflight, push
    from hubconv.release import ReleaseFailed, run_release

    inputs = read_inputs(env)
    _secret_inputs(inputs, env)
    event = env.get("GITHUB_EVENT_NAME", "")
    with open(env["GITHUB_EVENT_PATH"], encoding="utf-8") as f:
        payload = json.load(f)
    plan = plan_event(event, payload, inputs)
    if plan is None:
        print(f"hubconv: nothing to do for this {event} event")
        return 0
    os.chdir(workspace)
    head = workspace_commit(workspace)
    if plan.commit and not (head or "").startswith(plan.commit):
        raise HubconvError(
            f"/hubconv push {plan.commit}: the checked-out commit is {head or 'unknown (no .git in the workspace)'}, "
            "not the one named in the comment; check out the PR head and comment the new commit to publish it"
        )
    plan.head_sha = plan.head_sha or head
    cfg = release_config(_config_args(inputs, plan, workspace))
    fields = HubFields(
        repo_id="input `repo-id`" if inputs.get("repo-id") else "hub.repo_id",
        endpoint="input `endpoint`" if inputs.get("endpoint") else "hub.endpoint",
        token="input `hf-token`" if inputs.get("hf-token") else "HF_TOKEN",
    )
    token = inputs.get("hf-token") or clean_token(env.get("HF_TOKEN"), "HF_TOKEN")
    if cfg.hub.endpoint:
        cfg.hub.endpoint = hub_endpoint(cfg.hub.endpoint, fields.endpoint)
    if not plan.dry_run:  # every Hub input is checked before the conversion, not after it
        cfg.require_hub()
        if not token:
            raise HubconvError("input `hf-token` is required to publish (or set dry-run: true)")
        preflight(cfg.hub.repo_id, endpoint=cfg.hub.endpoint, token=token, fields=fields)
    disk = DiskReport(workspace)
    if cfg.checkpoint and (cfg.checkpoint.startswith("release-assets:") or "://" in cfg.checkpoint):
        from hubconv.github import GitHubContext
        from hubconv.sources import resolve_checkpoint

        github = None
        if inputs.get("github-token"):
            api_url = env.get("GITHUB_API_URL", "https://api.github.com")
            github = GitHubContext(api_url, env["GITHUB_REPOSITORY"], inputs["github-token"])
        print("::group::fetch the checkpoint", flush=True)
        cfg.checkpoint = resolve_checkpoint(
            cfg.checkpoint,
            workspace,
            github=github,
            tag=plan.tag,
            progress="log",
            hf_endpoint=cfg.hub.endpoint,
            hf_token=token,
        )
        disk.fetched = _tree_bytes(cfg.checkpoint)
        print(f"checkpoint: {cfg.checkpoint} ({disk.fetched:,} bytes fetched)", flush=True)
        print("::endgroup::", flush=True)
    print("::group::hubconv release (convert, tokenizer, smoke test, model card)", flush=True)
    try:
        result = run_release(cfg, overwrite=True, progress=False, tag=plan.tag)
    except ReleaseFailed as e:
        print("::endgroup::", flush=True)
        _write_report(env, workspace, e.report, "fail")
        _finish(env, inputs, plan, e.report, None, disk=disk)
        raise
    print("::endgroup::", flush=True)
    report = result.report_md + _push_hint(plan)
    _write_report(env, workspace, report, result.smoke_status)  # before publishing: kept if the push fails
    pushed = None
    if not plan.dry_run:
        print("::group::publish to the Hub", flush=True)
        pushed = push(
            result.output,
            cfg.hub.repo_id,
            revision=cfg.hub.revision,
            tag=plan.tag,
            create_pr=cfg.hub.create_pr,
            private=cfg.hub.private,
            endpoint=cfg.hub.endpoint,
            token=token,
            report_md=report,
            fields=fields,
        )
        print("::endgroup::", flush=True)
    _finish(env, inputs, plan, report, pushed, result.files, disk=disk)
    return 0


def _secret_inputs(inputs: dict[str, str | None], env: Mapping[str, str]) -> None:
    """Mask the tokens in the log (each line, before anything can fail), then clean them in place: surrounding
    whitespace is dropped and a token with a control, whitespace or non-ASCII character inside is refused."""
    for name in ("hf-token", "github-token"):
        add_mask(inputs.get(name), always=True)
    add_mask(env.get("HF_TOKEN"), always=True)
    for name in ("hf-token", "github-token"):
        inputs[name] = clean_token(inputs.get(name), f"input `{name}`")


def _push_hint(plan: EventPlan) -> str:
    if plan.issue_number is None or not plan.dry_run or not plan.head_sha:
        return ""
    return (
        f"\n_To publish commit `{plan.head_sha[:7]}` as a Hub pull request, a maintainer comments "
        f"`/hubconv push {plan.head_sha[:7]}`._\n"
    )


def workspace_commit(workspace: str) -> str | None:
    """The commit checked out in ``workspace``, read from ``.git`` directly: the image has no git, and git refuses a
    workspace owned by another user (the runner's) without a safe.directory setting."""
    git = os.path.join(workspace, ".git")
    if os.path.isfile(git):  # a worktree or submodule: "gitdir: <path>"
        with open(git, encoding="utf-8") as f:
            target = f.read().strip().removeprefix("gitdir:").strip()
        git = target if os.path.isabs(target) else os.path.join(workspace, target)
    try:
        with open(os.path.join(git, "HEAD"), encoding="utf-8") as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head.lower() if re.fullmatch(r"[0-9a-fA-F]{40}", head) else None
        ref = head.removeprefix("ref:").strip()
        common = git
        if os.path.isfile(os.path.join(git, "commondir")):
            with open(os.path.join(git, "commondir"), encoding="utf-8") as f:
                common = os.path.join(git, f.read().strip())
        for base in (git, common):
            path = os.path.join(base, *ref.split("/"))
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    return f.read().strip().lower()
        with open(os.path.join(common, "packed-refs"), encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0].lower()
    except OSError:
        return None
    return None


REPORT_FILE = os.path.join(".hubconv", "report.md")


def _write_report(env: Mapping[str, str], workspace: str, report: str, smoke_status: str) -> None:
    """The report goes into the workspace and its output is relative to it: a Docker action's paths
    (`/github/workspace`, `RUNNER_TEMP`) do not exist on the runner, but the workspace is shared and is
    the working directory on both sides."""
    path = os.path.join(workspace, REPORT_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(report)
    set_output(env.get("GITHUB_OUTPUT"), "smoke-status", smoke_status)
    set_output(env.get("GITHUB_OUTPUT"), "report", REPORT_FILE)


class DiskReport:
    """Disk use of a run, for the job summary: a GitHub-hosted runner has ~14 GB free, and a model that does not
    fit should say so in numbers (what was fetched, what was written, what is left)."""

    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        self.free_at_start = shutil.disk_usage(workspace).free
        self.fetched: int | None = None

    def rows(self, files: Mapping[str, int] | None) -> list[str]:
        rows = ["| disk | bytes |", "| --- | --- |"]
        if self.fetched is not None:
            rows.append(f"| checkpoint fetched | {self.fetched:,} |")
        if files:
            rows.append(f"| converted model | {sum(files.values()):,} |")
        rows.append(f"| free on the workspace disk at start | {self.free_at_start:,} |")
        rows.append(f"| free on the workspace disk at end | {shutil.disk_usage(self.workspace).free:,} |")
        return [*rows, ""]


def _tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _finish(
    env: Mapping[str, str],
    inputs: Mapping[str, str | None],
    plan: EventPlan,
    report: str,
    pushed: Any,
    files: Mapping[str, int] | None = None,
    *,
    disk: DiskReport | None = None,
) -> None:
    """Hub outputs, job summary and the bot's comments."""
    out = env.get("GITHUB_OUTPUT")
    links = []
    if pushed is not None:
        for name, value in (
            ("repo-url", pushed.repo_url),
            ("commit-url", pushed.commit_url),
            ("commit-sha", pushed.commit_sha),
            ("hub-tag", pushed.tag or ""),
            ("pr-url", pushed.pr_url or ""),
            ("pr-number", str(pushed.pr_number or "")),
        ):
            set_output(out, name, value)
        links.append(f"- Model: {pushed.repo_url}")
        links.append(f"- Commit: {pushed.commit_url}" + (" (unchanged, no new commit)" if pushed.no_op else ""))
        if pushed.pr_url:
            links.append(f"- Hub PR: {pushed.pr_url}")
        if pushed.tag:
            links.append(f"- Tag: `{pushed.tag}`")
    summary = [f"## hubconv: {plan.kind} ({'dry run' if plan.dry_run else 'publish'})", ""]
    if links:
        summary += [*links, ""]
    if files:
        summary += ["| file | bytes |", "| --- | --- |", *[f"| `{n}` | {s:,} |" for n, s in files.items()], ""]
    if disk is not None:
        summary += disk.rows(files)
    summary.append(report)
    write_summary(env.get("GITHUB_STEP_SUMMARY"), "\n".join(summary) + "\n")
    _report_to_github(env, inputs, plan, report, "\n".join(links))


def _report_to_github(
    env: Mapping[str, str], inputs: Mapping[str, str | None], plan: EventPlan, report: str, links: str
) -> None:
    token = inputs.get("github-token")
    if not token or not _flag(inputs.get("comment"), "comment", default=True):
        return
    from hubconv.github import Bot, GitHubContext

    bot = Bot(GitHubContext(env.get("GITHUB_API_URL", "https://api.github.com"), env["GITHUB_REPOSITORY"], token))
    if plan.issue_number is not None:
        bot.upsert_comment(plan.issue_number, f"{links}\n\n{report}" if links else report)
    elif plan.kind == "release" and links and plan.tag:
        bot.append_release_links(plan.tag, links)


def main() -> int:
    return run_action()


if __name__ == "__main__":
    sys.exit(main())
