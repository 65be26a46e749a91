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
    docs = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]
    text = "\n".join(open(path, encoding="utf-8").read() for path in docs)  # README or a docs/ page
    for path in glob.glob(os.path.join(ROOT, "examples", "workflows", "*.yml")):
        assert f"examples/workflows/{os.path.basename(path)}" in text, os.path.basename(path)


# ------------------------------------------------------------------------------------------ this repository's release
RELEASE = os.path.join(ROOT, ".github", "workflows", "release.yml")
OWN_WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, ".github", "workflows", "*.yml")))
PINNED_USES = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
# The write scopes a step needs, recognized by the action it uses or the command it runs.
ACTION_SCOPES = {
    "actions/attest-build-provenance": {"id-token", "attestations"},
    "actions/attest": {"id-token", "attestations"},
    "pypa/gh-action-pypi-publish": {"id-token"},
    "docker/login-action": {"packages"},
}
COMMAND_SCOPES = {
    re.compile(r"\bgit push\b"): {"contents"},
    re.compile(r"\bgh release (?:create|upload|edit)\b"): {"contents"},
}


def step_scopes(step: dict) -> set[str]:
    action = str(step.get("uses", "")).split("@")[0]
    needed = set(ACTION_SCOPES.get(action, set()))
    if action == "docker/build-push-action" and (step.get("with") or {}).get("push") in (True, "true"):
        needed.add("packages")
    for pattern, scopes in COMMAND_SCOPES.items():
        if pattern.search(str(step.get("run", ""))):
            needed |= scopes
    return needed


def privilege_violations(doc: dict) -> list[str]:
    """Least privilege per job: each job's write scopes are exactly those its steps use; privileged jobs pin actions."""
    found = []
    if write_permissions(doc, {}):
        found.append("top-level permissions grant write scopes to every job")
    for name, job in doc["jobs"].items():
        granted = write_permissions(doc, job)
        needed = set().union(*(step_scopes(step) for step in job.get("steps", [])))
        if granted - needed:
            found.append(f"{name}: grants {sorted(granted - needed)} that no step uses")
        if needed - granted:
            found.append(f"{name}: needs {sorted(needed - granted)}")
        if granted or secrets_used(job) - {"GITHUB_TOKEN"}:
            for step in job.get("steps", []):
                uses = str(step.get("uses", ""))
                if uses and not uses.startswith("./") and not PINNED_USES.match(uses):
                    found.append(f"{name}: {uses} is not pinned by commit sha")
        if "id-token" in granted and any(
            str(s.get("uses", "")).startswith("pypa/gh-action-pypi-publish") for s in job.get("steps", [])
        ):
            if not job.get("environment"):
                found.append(f"{name}: publishes to PyPI without a deployment environment")
    return found


@pytest.mark.parametrize("path", OWN_WORKFLOWS, ids=os.path.basename)
def test_own_workflows_grant_each_job_only_the_write_scopes_it_uses(path: str) -> None:
    assert privilege_violations(load(path)) == []


def test_release_workflow_runs_on_version_tags_only_and_pins_every_action_by_sha() -> None:
    doc = load(RELEASE)
    assert doc["on"] == {"push": {"tags": ["v[0-9]+.[0-9]+.[0-9]+*"]}}  # no PR code, no other trigger
    assert doc["permissions"] == {}
    text = open(RELEASE, encoding="utf-8").read()
    uses = re.findall(r"^\s*(?:-\s*)?uses:\s*(\S+)(.*)$", text, re.M)
    assert len(uses) >= 10
    for ref, comment in uses:
        assert PINNED_USES.match(ref), ref
        assert re.match(r"\s+# v\d+\.\d+\.\d+$", comment), f"{ref}: no `# vX.Y.Z` comment for Dependabot and readers"


def test_release_workflow_stages() -> None:
    """test before anything is built; PyPI only after the image and the dists; the release commit last."""
    jobs = load(RELEASE)["jobs"]
    needs = {
        name: set([job["needs"]] if isinstance(job.get("needs"), str) else job.get("needs", []))
        for name, job in jobs.items()
    }

    def upstream(name: str) -> set[str]:
        return needs[name] | set().union(*(upstream(n) for n in needs[name]))

    assert "test" in upstream("image") and "test" in upstream("dist")
    assert {"image", "dist", "test"} <= upstream("pypi")
    assert {"pypi", "image", "dist"} <= upstream("release")
    runs = "\n".join(str(s.get("run", "")) for s in jobs["test"]["steps"])
    assert "make test" in runs
    assert secrets_used(jobs["test"]) == set() and write_permissions({}, jobs["test"]) == set()
    release_run = "\n".join(str(s.get("run", "")) for s in jobs["release"]["steps"])
    assert 'scripts/pin-action-image.py "$PINNED"' in release_run
    assert "--generate-notes" in release_run and "--verify-tag" in release_run
    assert jobs["pypi"]["environment"] == "pypi"
    build = next(s for s in jobs["image"]["steps"] if s.get("id") == "build")["with"]
    assert build["sbom"] is True and build["provenance"] == "mode=max" and build["push"] is True
    assert "SETUPTOOLS_SCM_PRETEND_VERSION_FOR_HUBCONV" in build["build-args"]


def test_privilege_rule_catches_extra_missing_and_unpinned() -> None:
    """Negative controls on mutated copies of the release workflow."""
    doc = load(RELEASE)
    doc["jobs"]["test"]["permissions"]["contents"] = "write"
    assert privilege_violations(doc) == ["test: grants ['contents'] that no step uses"]
    doc = load(RELEASE)
    del doc["jobs"]["image"]["permissions"]["packages"]
    assert privilege_violations(doc) == ["image: needs ['packages']"]
    doc = load(RELEASE)
    doc["permissions"] = {"packages": "write"}
    del doc["jobs"]["meta"]["permissions"]
    assert privilege_violations(doc) == [
        "top-level permissions grant write scopes to every job",
        "meta: grants ['packages'] that no step uses",
    ]
    doc = load(RELEASE)
    doc["jobs"]["dist"]["steps"][0]["uses"] = "actions/checkout@v7"
    assert privilege_violations(doc) == ["dist: actions/checkout@v7 is not pinned by commit sha"]
    doc = load(RELEASE)
    del doc["jobs"]["pypi"]["environment"]
    assert privilege_violations(doc) == ["pypi: publishes to PyPI without a deployment environment"]


def test_dependabot_watches_actions_python_and_docker() -> None:
    with open(os.path.join(ROOT, ".github", "dependabot.yml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    assert config["version"] == 2
    dirs = {u["package-ecosystem"]: set(u.get("directories", [u.get("directory")])) for u in config["updates"]}
    assert dirs == {"github-actions": {"/"}, "pip": {"/", "/docker"}, "docker": {"/"}}
    assert os.path.exists(os.path.join(ROOT, "docker", "constraints.txt"))
