"""llama.cpp (through llama-cpp-python) on the same SmolLM2 GGUF the default decoder is converted
from: the CPU decoder a user would run instead, measured in the same process as ours.

Optional: llama-cpp-python is not a dependency (it builds llama.cpp from source, ~9 minutes on
2 cores; on this project's machines build it with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON
-DGGML_AVX512=ON ..." — a native build can die with "Illegal instruction"). Without it, the
benchmarks report a skipped row with the reason.

llama.cpp decodes one sequence per call here (the high-level API's batch is the prompt's tokens),
so a batch of B prompts runs as B calls in turn; its weights stay Q4_1 (4-bit), ours are
converted from them.
"""

from __future__ import annotations

import time

from dglm.engine.models.loading import smollm2_gguf

MISSING = (
    'llama-cpp-python is not installed (optional; build it with CMAKE_ARGS="-DGGML_NATIVE=OFF '
    '-DGGML_AVX2=ON -DGGML_AVX512=ON" pip install llama-cpp-python)'
)


def load(threads: int, n_ctx: int = 512):
    """(Llama on the SmolLM2 GGUF, None) or (None, why not)."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        return None, f"{MISSING}: {e}"
    llm = Llama(
        model_path=str(smollm2_gguf()), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
        n_threads_batch=threads, seed=0, verbose=False,
    )  # fmt: skip
    return llm, None


def version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def sample(llm, prompt_ids: list[int], n: int, temperature: float, top_p: float, seed: int):
    """Exactly `n` new tokens after `prompt_ids` (EOS not special: the count is fixed, as with
    HF's min_new_tokens) → (tokens, prefill s (to the first token), decode s (first → last),
    decode CPU s of this process, every thread)."""
    llm.set_seed(seed)
    toks, stamps, cpu = [], [], []
    t0 = time.perf_counter()
    greedy = temperature <= 0
    for tok in llm.generate(
        prompt_ids, top_k=1 if greedy else 0, top_p=1.0 if greedy else top_p,
        temp=max(temperature, 1e-6), min_p=0.0, repeat_penalty=1.0, reset=True,
    ):  # fmt: skip
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        toks.append(int(tok))
        if len(toks) == n:
            break
    return toks, stamps[0] - t0, stamps[-1] - stamps[0], cpu[-1] - cpu[0]
