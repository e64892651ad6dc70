"""VL-Cache KV-cache compression for vision-language models, served by SGLang."""

__version__ = "0.1.0"
