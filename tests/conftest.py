import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own hubconv cache (never the user's ~/.cache)."""
    monkeypatch.setenv("HUBCONV_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hubconv-cache"))
