"""Shape twins of the default models: random weights, the real shapes and tokenizers.

    python -m benchmarks.shape_twins DIR     → DIR/encoder, DIR/decoder (about 360 MB, ~10 s on 2 cores)
    DGLM_SHAPE_TWINS=DIR python -m benchmarks.bench_decode --device cuda ...

DIR/decoder is a Hugging Face Llama directory with SmolLM2-135M's config (vocab 49152, hidden 576,
30 layers, 9 heads, 3 KV heads, MLP 1536, tied embeddings, context 8192) and tokenizer; DIR/encoder
a sentence-transformers directory with all-MiniLM-L6-v2's (BERT, 6 layers, hidden 384, 12 heads,
MLP 1536, vocab 30522, mean pooling). Both configs and tokenizers are copied from
benchmarks/gpu_assets/; the weights are drawn here (seeded, transformers' own initialisation). The
decoder is saved in bf16 (half the bytes to write; its loaders always name the dtype they want),
the encoder in fp32 like the real one (sentence-transformers loads the dtype it finds).

With $DGLM_SHAPE_TWINS set, `dglm.engine.models.loading.shape_twin_dir` swaps them in wherever the
default models are named ("smollm2", "all-MiniLM-L6-v2"), so the shipped default bundle, whose
score network, student, prompt generator, decoder adapters and probes fit these shapes, runs
unchanged. Work per token, kernels launched and bytes read are the real models'; speeds carry over,
text and quality numbers do not.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "gpu_assets"
DECODER_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
ENCODER_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)


def _copy(names: tuple[str, ...], src: Path, out: Path) -> None:
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, out / name)


def write_decoder_twin(out: Path, seed: int = 0) -> Path:
    """A random SmolLM2-135M (Hugging Face Llama directory, bf16 safetensors) with its tokenizer."""
    from transformers import AutoConfig, LlamaForCausalLM  # heavy: only when building

    config = AutoConfig.from_pretrained(ASSETS / "smollm2")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    _copy(DECODER_FILES, ASSETS / "smollm2", out)
    return out


def write_encoder_twin(out: Path, seed: int = 0) -> Path:
    """A random all-MiniLM-L6-v2 (sentence-transformers directory, fp32 safetensors)."""
    from transformers import AutoConfig, BertModel  # heavy: only when building

    config = AutoConfig.from_pretrained(ASSETS / "minilm")
    torch.manual_seed(seed)
    model = BertModel(config)
    model.save_pretrained(out)
    _copy(ENCODER_FILES, ASSETS / "minilm", out)
    return out


def write_twins(out: Path, seed: int = 0) -> dict[str, Path]:
    """DIR/encoder and DIR/decoder, each written to a temporary sibling and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for kind, write in (("encoder", write_encoder_twin), ("decoder", write_decoder_twin)):
        target, tmp = out / kind, out / f".{kind}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp, seed)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        made[kind] = target
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="folder to write encoder/ and decoder/ into")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    made = write_twins(args.out, args.seed)
    print(
        f"shape twins (random weights, real shapes) in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(str(p) for p in made.values())
        + f"; use them with DGLM_SHAPE_TWINS={args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
