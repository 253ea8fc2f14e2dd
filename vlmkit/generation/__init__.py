"""Generation: the decode loop (`loop`), its static-cache fast path (`fast_path`), the one incremental text stream
(`text_stream`) and the caches `VLM` keeps between calls (`caches`)."""

from .loop import GenerationConfig, generate, generate_tokens
from .text_stream import TextStream

__all__ = ["GenerationConfig", "TextStream", "generate", "generate_tokens"]
