"""The benchmark suite: the engine side by side with the baselines a user would otherwise run.

    python -m benchmarks.run --suite cpu|gpu [--quick]

Modules: `config` (presets, prompts, which method runs where), `methods` (every method as one
callable: Hugging Face `generate`, the engine with 0 / 1 / 2 probes, reference-style DGLM, FUDGE),
`measure` (latency percentiles, peak memory), `quality` (control success and perplexity from the
evaluation harness), `runner` (the interleaved loop), `report` (target checks, markdown, plots).
"""
