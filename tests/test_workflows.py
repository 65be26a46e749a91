"""Security rules for the shipped workflows (examples/workflows/ and this repo's CI), beyond what actionlint checks:
untrusted pull-request code never runs in a job that can read a secret or write to the repository."""

from __future__ import annotations

import glob
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "examples", "workflows", "*.yml"))) + sorted(
    glob.glob(os.path.join(ROOT, ".github", "workflows", "*.yml"))
)
PR_EVENTS = {"pull_request", "pull_request_target", "issue_comment"}
TRUSTED_IF = re.compile(
    r"""contains\(fromJSON\('\["OWNER", "MEMBER", "COLLABORATOR"\]'\),\s*"""
    r"""github\.event\.comment\.author_association\)"""
)


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as a boolean
    return doc


def events(doc: dict) -> set[str]:
    on = doc["on"]
    return {on} if isinstance(on, str) else set(on)


def checks_out_pr_code(job: dict, evs: set[str]) -> bool:
    """A job that checks out a PR's code: any checkout on pull_request, or an explicit PR ref elsewhere."""
    for step in job.get("steps", []):
        if str(step.get("uses", "")).startswith("actions/checkout"):
            ref = str((step.get("with") or {}).get("ref", ""))
            if "pull_request" in evs or "refs/pull/" in ref or "head.sha" in ref or "head_ref" in ref:
                return True
    return False


def secrets_used(job: dict) -> set[str]:
    return set(re.findall(r"secrets\.([A-Za-z_][A-Za-z0-9_]*)", yaml.safe_dump(job)))


def write_permissions(doc: dict, job: dict) -> set[str]:
    perms = job.get("permissions", doc.get("permissions", "write-all"))
    if isinstance(perms, str):
        return {"*"} if perms == "write-all" else set()
    return {scope for scope, level in perms.items() if level == "write"}


def violations(doc: dict) -> list[str]:
    """What is unsafe in a workflow: PR code with a secret or a write token, unless a trusted commenter asked."""
    found = []
    evs = events(doc)
    if "permissions" not in doc:
        found.append("no top-level permissions (the default token may be read-write)")
    if "pull_request_target" in evs:
        found.append("pull_request_target runs PR code with secrets: use workflow_run")
    for name, job in doc["jobs"].items():
        if not (evs & PR_EVENTS) or not checks_out_pr_code(job, evs):
            continue
        for step in job["steps"]:
            if str(step.get("uses", "")).startswith("actions/checkout"):
                if (step.get("with") or {}).get("persist-credentials") is not False:
                    found.append(f"{name}: actions/checkout leaves the token in .git/config for PR code to read")
        risky = (secrets_used(job) - {"GITHUB_TOKEN"}) | write_permissions(doc, job)
        if not risky:
            continue
        if "pull_request" in evs:
            found.append(f"{name}: PR code runs with {sorted(risky)}")
        elif not TRUSTED_IF.search(str(job.get("if", ""))):
            found.append(f"{name}: PR code runs with {sorted(risky)} for any commenter")
    return found


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_shipped_workflows_never_run_pr_code_with_secrets_unless_a_trusted_person_asked(path: str) -> None:
    assert violations(load(path)) == []


def test_rule_catches_a_dry_run_job_given_the_hf_token_or_a_persisted_token() -> None:
    """Negative controls: unsafe variants of the shipped PR workflows are caught."""
    doc = load(os.path.join(ROOT, "examples", "workflows", "pr-dry-run.yml"))
    steps = doc["jobs"]["dry-run"]["steps"]
    next(s for s in steps if s.get("id") == "hubconv")["with"]["hf-token"] = "${{ secrets.HF_TOKEN }}"
    assert violations(doc) == ["dry-run: PR code runs with ['HF_TOKEN']"]
    doc = load(os.path.join(ROOT, "examples", "workflows", "pr-dry-run.yml"))
    del doc["jobs"]["dry-run"]["steps"][0]["with"]["persist-credentials"]
    doc["jobs"]["dry-run"]["permissions"] = {"contents": "write"}
    assert violations(doc) == [
        "dry-run: actions/checkout leaves the token in .git/config for PR code to read",
        "dry-run: PR code runs with ['contents']",
    ]


def test_rule_catches_a_push_job_open_to_any_commenter() -> None:
    doc = load(os.path.join(ROOT, "examples", "workflows", "pr-chatops.yml"))
    doc["jobs"]["push"]["if"] = "startsWith(github.event.comment.body, '/hubconv push ')"
    assert violations(doc) == ["push: PR code runs with ['HF_TOKEN', 'pull-requests'] for any commenter"]


def test_every_example_workflow_is_documented_in_the_readme() -> None:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for path in glob.glob(os.path.join(ROOT, "examples", "workflows", "*.yml")):
        assert f"examples/workflows/{os.path.basename(path)}" in readme, os.path.basename(path)
