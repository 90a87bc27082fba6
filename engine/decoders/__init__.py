"""Compact decoders (Llama family, GPT-2) with a static KV cache, and their loader."""

from dglm.engine.decoders.base import Decoder, KVCache
from dglm.engine.decoders.gpt2 import GPT2Config, GPT2Decoder
from dglm.engine.decoders.llama import LlamaConfig, LlamaDecoder
from dglm.engine.decoders.loading import DEFAULT_DECODER, load_decoder

__all__ = [
    "DEFAULT_DECODER",
    "Decoder",
    "GPT2Config",
    "GPT2Decoder",
    "KVCache",
    "LlamaConfig",
    "LlamaDecoder",
    "load_decoder",
]
