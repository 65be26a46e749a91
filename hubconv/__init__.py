"""hubconv: publish native LLM training checkpoints to the Hugging Face Hub as verified transformers models."""

__version__ = "0.1.0"
