import json
import os

import pytest

from tests.helpers import EXAMPLE_CONFIG, hubconv


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own hubconv cache (never the user's ~/.cache)."""
    monkeypatch.setenv("HUBCONV_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hubconv-cache"))


@pytest.fixture
def loopback_hub_client(monkeypatch):
    """The real huggingface_hub client set up for the loopback Hub: no Xet (read once at import, so the
    constant is patched), online, and retry back-offs that do not sleep."""
    import types

    from huggingface_hub import constants
    from huggingface_hub.utils import _http as hf_http

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    no_sleep = types.SimpleNamespace(sleep=lambda s: None)
    monkeypatch.setattr(hf_http, "time", no_sleep)
    monkeypatch.setattr("hubconv.hub.time", no_sleep)


@pytest.fixture(scope="session")
def example_release(tmp_path_factory) -> str:
    """One `release --dry-run` of the bundled example (with parity), built once per session.

    Read-only: tests that change files copy it first."""
    out = str(tmp_path_factory.mktemp("example-release") / "release")
    # Session fixtures run outside the per-test cache isolation: name the session cache explicitly.
    env = {**os.environ, "HUBCONV_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "hubconv-cache")}
    r = hubconv("release", "--dry-run", "--config", EXAMPLE_CONFIG, "--output", out, "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["smoke_status"] == "pass"
    assert os.path.isfile(os.path.join(out, "smoke.json"))
    return out
