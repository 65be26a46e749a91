"""hubconv: publish native LLM training checkpoints to the Hugging Face Hub as verified transformers models."""

try:
    # Written by setuptools-scm when the package is built or installed: the git tag's version (pyproject.toml).
    from hubconv._version import __version__
except ImportError:  # a source tree that was never built or installed
    __version__ = "0.0+unknown"
