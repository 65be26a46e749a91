"""Distribution: the sdist and the wheel build offline from a git checkout with the version of its tag, hold what they
must (and nothing else), install into a fresh virtual environment and run; without git metadata the version is the
fallback or the one the release workflow passes; scripts/pin-action-image.py pins the released action.yml's image."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

TAG_VERSION = "9.8.7"
FALLBACK_VERSION = "0.0+unknown"
DIGEST = "sha256:" + "0123456789abcdef" * 4
SCM_ENV = ("SETUPTOOLS_SCM_PRETEND_VERSION", "SETUPTOOLS_SCM_PRETEND_VERSION_FOR_HUBCONV")


def run(*cmd: str | Path, cwd: Path | str | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any setuptools-scm version override (a developer's shell may set one)."""
    env = {k: v for k, v in os.environ.items() if k not in SCM_ENV}
    return {**env, **extra}


def worktree_files() -> list[str]:
    """The files a commit of the working tree would hold: tracked and new, not ignored."""
    out = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    return sorted({p for p in out.split("\0") if p and os.path.isfile(os.path.join(ROOT, p))})


def copy_worktree(dest: Path) -> Path:
    for rel in worktree_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), target)
    return dest


def build(src: Path, outdir: Path, *kinds: str, env: dict[str, str] | None = None) -> list[Path]:
    """`python -m build` without isolation: setuptools and setuptools-scm come from this environment (no network)."""
    run(sys.executable, "-m", "build", "--no-isolation", *kinds, "--outdir", outdir, src, env=env or clean_env())
    return sorted(outdir.iterdir())


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The working tree committed to a fresh repository tagged v9.8.7 (as a release tag), built as the release
    workflow does: the sdist, then the wheel from the unpacked sdist."""
    base = tmp_path_factory.mktemp("dist")
    src = copy_worktree(base / "src")
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main")
    run(*git, "init", "-q", cwd=src)
    run(*git, "add", "-A", cwd=src)
    run(*git, "commit", "-q", "--no-verify", "-m", "snapshot", cwd=src)
    run(*git, "tag", "-a", f"v{TAG_VERSION}", "-m", "release", cwd=src)
    files = build(src, base / "out")
    assert [p.name for p in files] == [f"hubconv-{TAG_VERSION}-py3-none-any.whl", f"hubconv-{TAG_VERSION}.tar.gz"]
    return {"wheel": files[0], "sdist": files[1], "src": src}


def pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def package_files() -> set[str]:
    """The package's files in the repository (modules and data), paths relative to the root."""
    return {p for p in worktree_files() if p.startswith("hubconv/") and not p.endswith(".pyc")}


def test_sdist_holds_the_package_metadata_and_license_and_nothing_else(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    prefix = f"hubconv-{TAG_VERSION}/"
    assert all(n.startswith(prefix) for n in names)
    rel = {n[len(prefix) :] for n in names}
    top = {n.split("/")[0] for n in rel}
    assert top == {"PKG-INFO", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.cfg", "hubconv",
                   "hubconv.egg-info"}  # fmt: skip
    assert package_files() <= rel, sorted(package_files() - rel)
    assert not [n for n in rel if "__pycache__" in n or n.endswith(".pyc")]
    assert "hubconv/templates/modelcard.md.j2" in rel
    with tarfile.open(dists["sdist"]) as tar:
        version_file = tar.extractfile(f"{prefix}hubconv/_version.py").read().decode()
    assert f"__version__ = version = '{TAG_VERSION}'" in version_file  # written by setuptools-scm, git-ignored


def test_wheel_holds_every_module_and_the_templates_with_complete_metadata(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        info = f"hubconv-{TAG_VERSION}.dist-info"
        meta = Parser().parsestr(whl.read(f"{info}/METADATA").decode())
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
        assert whl.read(f"{info}/licenses/LICENSE") == Path(ROOT, "LICENSE").read_bytes()
        assert f"__version__ = version = '{TAG_VERSION}'" in whl.read("hubconv/_version.py").decode()
    assert package_files() <= names, sorted(package_files() - names)
    assert {n.split("/")[0] for n in names} == {"hubconv", info}  # no tests, examples, benchmarks
    assert meta["Name"] == "hubconv" and meta["Version"] == TAG_VERSION
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["License-Expression"] == "Apache-2.0" and meta["License-File"] == "LICENSE"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Source", "Issues", "Changelog"} <= set(urls)
    classifiers = meta.get_all("Classifier")
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    assert meta["Description-Content-Type"] == "text/markdown" and "# hubconv" in meta.get_payload()
    project = pyproject()["project"]
    assert set(meta.get_all("Provides-Extra")) == set(project["optional-dependencies"]) >= {"remote", "dev"}
    required = {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower() for r in meta.get_all("Requires-Dist")}
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert required == {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower() for r in declared}
    assert re.search(r"^\[console_scripts\]\nhubconv = hubconv\.cli:main$", entry_points, re.M)


@pytest.mark.slow
def test_installed_wheel_runs_from_a_fresh_venv(dists: dict[str, Path], tmp_path: Path) -> None:
    """pip install of the wheel into a new venv; the dependencies come from this environment's site-packages (a .pth
    line: no network, and the .venv's editable hubconv is not activated), so the command runs the wheel's code."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    purelib = Path(run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    (purelib / "zz-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
        "--disable-pip-version-check", dists["wheel"])  # fmt: skip
    hubconv = venv / "bin" / "hubconv"
    env = clean_env(HUBCONV_CACHE_DIR=str(tmp_path / "cache"))
    assert run(hubconv, "--version", cwd=tmp_path, env=env).strip() == f"hubconv {TAG_VERSION}"
    where = run(venv / "bin" / "python", "-c", "import hubconv; print(hubconv.__file__)", cwd=tmp_path, env=env)
    assert Path(where.strip()).is_relative_to(purelib)  # the wheel's copy, not the repository's
    listing = run(hubconv, "adapters", cwd=tmp_path, env=env)
    assert "torchtitan" in listing and "nanogpt" in listing
    start = time.perf_counter()
    assert "usage: hubconv" in run(hubconv, "--help", cwd=tmp_path, env=env)
    print(f"installed wheel: hubconv --help {time.perf_counter() - start:.2f} s")


@pytest.mark.parametrize(("pretend", "expected"), [("", FALLBACK_VERSION), ("2.0.1", "2.0.1")])
def test_version_without_git_metadata_is_the_fallback_or_the_one_passed(
    tmp_path: Path, pretend: str, expected: str
) -> None:
    """What the Docker build sees: pyproject.toml, README.md, LICENSE and hubconv/ without .git; the release workflow
    passes the tag's version as SETUPTOOLS_SCM_PRETEND_VERSION_FOR_HUBCONV (an empty value changes nothing)."""
    src = tmp_path / "src"
    for rel in worktree_files():
        if rel in ("pyproject.toml", "README.md", "LICENSE") or rel.startswith("hubconv/"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), src / rel)
    env = clean_env(SETUPTOOLS_SCM_PRETEND_VERSION_FOR_HUBCONV=pretend, GIT_CEILING_DIRECTORIES=str(tmp_path))
    (wheel,) = build(src, tmp_path / "out", "--wheel", env=env)
    assert wheel.name == f"hubconv-{expected}-py3-none-any.whl"
    source = Path(ROOT, "hubconv", "__init__.py").read_text()
    assert f'__version__ = "{FALLBACK_VERSION}"' in source  # an uninstalled source tree says the same
    assert f'fallback_version = "{FALLBACK_VERSION}"' in Path(ROOT, "pyproject.toml").read_text()


def test_dockerfile_passes_the_release_version_to_the_package_build() -> None:
    text = Path(ROOT, "Dockerfile").read_text()
    arg = text.index('ARG SETUPTOOLS_SCM_PRETEND_VERSION_FOR_HUBCONV=""')
    assert arg < text.index('pip install -c /tmp/hubconv-src/docker/constraints.txt "/tmp/hubconv-src[remote]"')
    assert re.search(r"^COPY pyproject\.toml README\.md LICENSE /tmp/hubconv-src/$", text, re.M)
    assert pyproject()["tool"]["setuptools_scm"]["fallback_version"] == FALLBACK_VERSION


# ------------------------------------------------------------------------------------------ scripts/pin-action-image.py
def pin_module():
    spec = importlib.util.spec_from_file_location(
        "pin_action_image", os.path.join(ROOT, "scripts", "pin-action-image.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pin_rewrites_only_runs_image_to_the_digest() -> None:
    pin = pin_module()
    text = Path(ROOT, "action.yml").read_text()
    pinned = pin.pin(text, f"ghcr.io/hubconv/hubconv@{DIGEST}")
    before, after = yaml.safe_load(text), yaml.safe_load(pinned)
    assert before["runs"] == {"using": "docker", "image": "Dockerfile"}  # main builds from source
    assert after["runs"] == {"using": "docker", "image": f"docker://ghcr.io/hubconv/hubconv@{DIGEST}"}
    assert {k: v for k, v in after.items() if k != "runs"} == {k: v for k, v in before.items() if k != "runs"}
    changed = [(a, b) for a, b in zip(text.splitlines(), pinned.splitlines(), strict=True) if a != b]
    assert changed == [("  image: Dockerfile", f"  image: docker://ghcr.io/hubconv/hubconv@{DIGEST}")]
    assert pin.pin(text, f"docker://ghcr.io/hubconv/hubconv@{DIGEST}") == pinned


@pytest.mark.parametrize(
    ("image", "action", "message"),
    [
        ("ghcr.io/hubconv/hubconv:1.2.3", None, "only a digest pins the image"),
        (f"ghcr.io/HubConv/hubconv@{DIGEST}", None, "in lower case"),
        ("ghcr.io/hubconv/hubconv@sha256:abc", None, "64 hex digits"),
        (f"hubconv@{DIGEST}", None, "REGISTRY/NAME"),
        (f"ghcr.io/hubconv/hubconv@{DIGEST}", "runs:\n  using: composite\n  steps: []\n", "runs.using is not docker"),
        (f"ghcr.io/o/hubconv@{DIGEST}", f"runs:\n  using: docker\n  image: docker://ghcr.io/o/x@{DIGEST}\n",
         "expected Dockerfile"),
        (f"ghcr.io/o/hubconv@{DIGEST}", "name: x\n", "0 top-level `runs:` keys"),
    ],
)  # fmt: skip
def test_pin_refuses_tags_bad_references_and_non_development_action_files(
    image: str, action: str | None, message: str
) -> None:
    pin = pin_module()
    text = action if action is not None else Path(ROOT, "action.yml").read_text()
    with pytest.raises(pin.PinError, match=re.escape(message)) as err:
        pin.pin(text, image)
    assert "\n" not in str(err.value)


def test_pin_command_line_writes_the_file_or_fails_in_one_line(tmp_path: Path) -> None:
    action = tmp_path / "action.yml"
    shutil.copy(os.path.join(ROOT, "action.yml"), action)
    script = os.path.join(ROOT, "scripts", "pin-action-image.py")
    done = subprocess.run([sys.executable, script, "--action", action, f"ghcr.io/o/hubconv@{DIGEST}"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(action.read_text())["runs"]["image"] == f"docker://ghcr.io/o/hubconv@{DIGEST}"
    again = subprocess.run([sys.executable, script, "--action", action, f"ghcr.io/o/hubconv@{DIGEST}"],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert again.stderr.startswith(f"pin-action-image: error: {action}: runs.image is ")
    replaced = subprocess.run([sys.executable, script, "--replace", "--action", action,
                               f"ghcr.io/o/hubconv@sha256:{'f' * 64}"], capture_output=True, text=True)  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr
    assert yaml.safe_load(action.read_text())["runs"]["image"].endswith("f" * 64)
