"""Compact decoders (Llama family, GPT-2) with a static KV cache, and their loader."""

from dglm.engine.models.base import Decoder, KVCache
from dglm.engine.models.gpt2 import GPT2Config, GPT2Decoder
from dglm.engine.models.llama import LlamaConfig, LlamaDecoder
from dglm.engine.models.loading import DEFAULT_DECODER, load_decoder

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
