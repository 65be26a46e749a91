"""The action image's recipe: pinned dependencies that agree with pyproject.toml, and an entrypoint GitHub can run.
(The image itself is built and run by scripts/verify-image.sh, which CI runs.)"""

from __future__ import annotations

import json
import os
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pins() -> dict[str, str]:
    out = {}
    with open(os.path.join(ROOT, "docker", "constraints.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                out[canonicalize_name(name)] = version
    return out


def test_every_runtime_dependency_is_pinned_within_its_range() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    deps = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["remote"]]
    pinned = pins()
    for req in deps:
        name = canonicalize_name(req.name)
        if name == "torch":  # pinned by the Dockerfile's TORCH_SPEC
            continue
        assert name in pinned, f"{req.name} is not in docker/constraints.txt: run scripts/lock-image.sh"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"docker/constraints.txt pins {req.name}=={pinned[name]}, outside {req.specifier}: "
            "run scripts/lock-image.sh"
        )
    assert "torch" not in pinned and "hubconv" not in pinned


def test_dockerfile_installs_with_the_constraints_and_torch_pinned() -> None:
    text = open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8").read()
    assert re.search(r'pip install -c /tmp/hubconv-src/docker/constraints\.txt "/tmp/hubconv-src\[remote\]"', text)
    torch_spec = re.search(r'^ARG TORCH_SPEC="([^"]+)"', text, re.M).group(1)
    assert re.match(r"torch==\d+\.\d+\.\d+ ", torch_spec)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]
    torch_range = next(r.specifier for r in deps if r.name == "torch")
    assert torch_range.contains(torch_spec.split()[0].split("==")[1])
    entry = re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1)
    assert json.loads(entry) == ["/usr/local/bin/hubconv", "action"]  # exec form, absolute path
    assert not re.search(r"^WORKDIR", text, re.M)  # GitHub sets the working directory to the workspace
    ignored = open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8").read().split()
    assert "docker" not in ignored and "hubconv" not in ignored


def test_action_yml_declares_exactly_what_the_entrypoint_reads_and_writes() -> None:
    import yaml

    from hubconv.action import INPUTS

    with open(os.path.join(ROOT, "action.yml"), encoding="utf-8") as f:
        action = yaml.safe_load(f)
    assert action["runs"] == {"using": "docker", "image": "Dockerfile"}
    assert set(action["inputs"]) == set(INPUTS)
    assert all(spec.get("description") for spec in action["inputs"].values())
    source = open(os.path.join(ROOT, "hubconv", "action.py"), encoding="utf-8").read()
    written = set(re.findall(r'set_output\([^,]+, "([a-z-]+)"', source)) | set(
        re.findall(r'\("([a-z-]+)", (?:str\()?pushed\.', source)
    )
    assert (
        set(action["outputs"])
        == written
        == {
            "repo-url",
            "commit-url",
            "commit-sha",
            "hub-tag",
            "pr-url",
            "pr-number",
            "smoke-status",
            "report",
        }
    )
