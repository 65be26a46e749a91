"""hubconv: publish native LLM training checkpoints to the Hugging Face Hub as verified transformers models."""

from importlib.metadata import PackageNotFoundError, version

try:
    # Set at build time by setuptools-scm from the git tag (pyproject.toml [tool.setuptools_scm]).
    __version__ = version("hubconv")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0+unknown"
