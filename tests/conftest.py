import pytest


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
