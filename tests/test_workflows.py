"""Security rules for the shipped workflows (examples/workflows/ and this repo's CI), beyond what actionlint checks:
untrusted pull-request code never runs in a job that can read a secret or write to the repository."""

from __future__ import annotations

import glob
import os
import re
import subprocess

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


def release_step(job: str, name_start: str) -> dict:
    steps = load(RELEASE)["jobs"][job]["steps"]
    return next(s for s in steps if str(s.get("name", s.get("id", ""))).startswith(name_start))


def run_step(script: str, env: dict[str, str], cwd: str) -> subprocess.CompletedProcess:
    """A `run:` script as GitHub's runner runs it on Linux (bash -e -o pipefail)."""
    full = {"PATH": os.environ["PATH"], "HOME": cwd, **env}
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    ("tag", "outputs"),
    [
        ("v1.2.3", {"version": "1.2.3", "major": "v1", "prerelease": "false"}),
        ("v0.4.0", {"version": "0.4.0", "major": "v0", "prerelease": "false"}),
        ("v1.3.0rc1", {"version": "1.3.0rc1", "major": "v1", "prerelease": "true"}),
        ("v1.2", None),
        ("v1.2.3-beta.1", None),
        ("v1", None),
    ],
)  # fmt: skip
def test_release_meta_step_derives_version_major_and_image_or_refuses_the_tag(
    tmp_path, tag: str, outputs: dict | None
) -> None:
    out = tmp_path / "output"
    out.write_text("")
    env = {"TAG": tag, "OWNER": "Hub-Conv", "GITHUB_OUTPUT": str(out)}
    done = run_step(release_step("meta", "meta")["run"], env, str(tmp_path))
    if outputs is None:
        assert done.returncode == 1 and f"::error::tag {tag} is not" in done.stdout
        return
    assert done.returncode == 0, done.stderr
    expected = {**outputs, "image": "ghcr.io/hub-conv/hubconv"}  # GHCR names are lower case
    assert dict(line.split("=", 1) for line in out.read_text().splitlines()) == expected


@pytest.mark.parametrize("prerelease", [False, True])
def test_release_commit_pins_action_yml_and_moves_the_version_and_major_tags(tmp_path, prerelease: bool) -> None:
    """The release job's script against a local 'origin': the release commit is the tagged commit plus one line of
    action.yml; the version tag (and the major tag, except for a pre-release) point at it; main is untouched."""
    import shutil

    tag, major = ("v1.3.0rc1", "v1") if prerelease else ("v1.2.3", "v1")
    digest = "sha256:" + "ab" * 32
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main"]
    origin, work = tmp_path / "origin.git", tmp_path / "work"

    def g(*args: str, cwd=work) -> str:
        return subprocess.run([*git, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()

    g("init", "-q", "--bare", str(origin), cwd=tmp_path)
    g("init", "-q", str(work), cwd=tmp_path)
    for rel in ("action.yml", "scripts/pin-action-image.py"):
        os.makedirs(work / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), work / rel)
    g("add", "-A")
    g("commit", "-q", "-m", "source")
    g("tag", "-a", "v1.0.0", "-m", "old release")
    g("tag", major, "v1.0.0")
    g("tag", "-a", tag, "-m", "maintainer's tag")
    g("remote", "add", "origin", str(origin))
    g("push", "-q", "origin", "main", "--tags")
    source = g("rev-parse", "HEAD")
    old_major = g("rev-parse", f"{major}^{{commit}}")
    g("checkout", "-q", "--detach", source)  # what actions/checkout leaves for a tag push
    pinned = f"ghcr.io/hub-conv/hubconv@{digest}"
    env = {"TAG": tag, "VERSION": tag[1:], "MAJOR": major, "PRERELEASE": str(prerelease).lower(), "PINNED": pinned,
           "GITHUB_SHA": source}  # fmt: skip
    done = run_step(release_step("release", "Release commit")["run"], env, str(work))
    assert done.returncode == 0, done.stderr
    release = g("rev-parse", f"refs/tags/{tag}^{{commit}}", cwd=origin)
    assert release != source and g("rev-parse", f"{release}^", cwd=origin) == source
    assert g("diff", "--name-only", source, release, cwd=origin) == "action.yml"
    diff = g("diff", "-U0", source, release, cwd=origin)
    assert "-  image: Dockerfile" in diff and f"+  image: docker://{pinned}" in diff
    assert g("cat-file", "-t", f"refs/tags/{tag}", cwd=origin) == "tag"  # annotated
    assert g("rev-parse", "refs/heads/main", cwd=origin) == source
    expected_major = old_major if prerelease else release
    assert g("rev-parse", f"refs/tags/{major}^{{commit}}", cwd=origin) == expected_major


@pytest.mark.parametrize("prerelease", [False, True])
def test_github_release_step_uses_generated_notes_and_attaches_the_assets(tmp_path, prerelease: bool) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "gh").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$GH_ARGS"\n')
    (fake / "gh").chmod(0o755)
    (tmp_path / "assets").mkdir()
    for name in ("hubconv-1.2.3.tar.gz", "hubconv-1.2.3-py3-none-any.whl", "hubconv-image.spdx.json"):
        (tmp_path / "assets" / name).write_text("x")
    args_file = tmp_path / "args"
    env = {"TAG": "v1.2.3", "VERSION": "1.2.3", "PRERELEASE": str(prerelease).lower(), "GH_ARGS": str(args_file),
           "PINNED": "ghcr.io/o/hubconv@sha256:" + "0" * 64, "PATH": f"{fake}:{os.environ['PATH']}"}  # fmt: skip
    step = release_step("release", "GitHub release")
    done = run_step(step["run"], env, str(tmp_path))
    assert done.returncode == 0, done.stderr
    args = args_file.read_text().splitlines()
    assert args[:3] == ["release", "create", "v1.2.3"]
    assert {"--verify-tag", "--generate-notes"} <= set(args) and ("--prerelease" in args) == prerelease
    assert "ghcr.io/o/hubconv@sha256:" + "0" * 64 in args[args.index("--notes") + 1]
    assert sorted(a for a in args if a.startswith("assets/")) == sorted(
        f"assets/{n}" for n in ("hubconv-1.2.3.tar.gz", "hubconv-1.2.3-py3-none-any.whl", "hubconv-image.spdx.json")
    )
    assert step["env"] == {"GH_TOKEN": "${{ github.token }}"}
