"""Shared fixtures: seeds, and a tiny but real bundle (real MiniLM encoder, tiny random decoder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from decoder_fixtures import TINY_LLAMA_SHAPE
from dglm.engine import bundle as bundle_io
from dglm.engine.bundle import BundleConfig
from dglm.engine.diffusion.sampler import SamplerConfig
from dglm.engine.diffusion.score_network import ScoreNetConfig, ScoreNetwork
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.engine import Engine
from dglm.engine.probes import save_probes
from dglm.engine.prompt.generator import PromptGenerator, PromptGeneratorConfig
from dglm.engine.training.builder import SEED_SENTIMENT, probe_from_texts, read_labelled_jsonl

# read when huggingface_hub is first imported, which none of the imports above does
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CORPUS = [
    "The movie was great and the food was bad.",
    "I loved the story, but the ending was sad.",
    "Prices are rising while the weather stays cold.",
    "A quick brown fox jumps over the lazy dog!",
]


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda():
            item.add_marker(skip_gpu)


@pytest.fixture
def seed() -> int:
    return 1234


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_tiny_tokenizer(out: Path):
    """A byte-level BPE tokenizer (≈300 tokens) trained here, saved as a HF tokenizer."""
    # heavy (seconds to import): loaded only by the sessions that build a tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    hf.save_pretrained(out)
    return hf


def make_tiny_llama_dir(out: Path, seed: int = 0) -> Path:
    """A random tiny Llama (GQA) saved as a Hugging Face directory with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy, as in make_tiny_tokenizer

    tok = make_tiny_tokenizer(out)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        **TINY_LLAMA_SHAPE,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def minilm():
    return SentenceEncoder("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def sentiment_probe(minilm):
    texts, labels = read_labelled_jsonl(SEED_SENTIMENT)
    return probe_from_texts("sentiment", minilm, texts, labels, ("negative", "positive"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_llama_dir, minilm, sentiment_probe) -> Path:
    """Real MiniLM encoder + tiny random Llama decoder + tiny random networks + a real probe."""
    out = tmp_path_factory.mktemp("bundle")
    sn = ScoreNetConfig(latent_dim=384, dim=64, depth=2, head_dim=32, num_tokens=8)
    pg = PromptGeneratorConfig(
        latent_dim=384, decoder_dim=64, dim=64, depth=2, head_dim=32, prompt_len=4
    )
    config = BundleConfig(
        encoder="all-MiniLM-L6-v2",
        decoder=str(tiny_llama_dir),
        score_network=sn,
        prompt_generator=pg,
        sampler=SamplerConfig(num_inference_steps=8),
        trained=False,
    )
    torch.manual_seed(0)
    bundle_io.write_config(config, out)
    bundle_io.save_state(ScoreNetwork(sn), out / bundle_io.SCORE_NET_FILE)
    bundle_io.save_state(PromptGenerator(pg), out / bundle_io.PROMPT_GEN_FILE)
    save_probes(out / bundle_io.PROBES_FILE, [sentiment_probe])
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_bundle):
    return Engine.from_pretrained(tiny_bundle)


@pytest.fixture(scope="session")
def tiny_reference_lm(tiny_llama_dir):
    """The tiny Llama as `dglm eval`'s fluency judge (in place of Gemma), with the judges' extras
    required (the eval tests skip without them)."""
    pytest.importorskip("textblob")
    pytest.importorskip("hatesonar")
    from dglm.engine.evaluation.perplexity import ReferenceLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return ReferenceLM(
        "tiny-llama",
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(),
        AutoTokenizer.from_pretrained(tiny_llama_dir),
    )
