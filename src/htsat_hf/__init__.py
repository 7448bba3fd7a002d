"""HTS-AT for Hugging Face Transformers."""

__version__ = "0.1.0"
