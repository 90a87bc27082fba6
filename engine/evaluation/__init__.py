"""Evaluation of controlled generation (`dglm eval`), by concern:

- `metrics`: Dist-n, 95% Wilson intervals of rates, means ± 1.96·se;
- `perplexity`: fluency, under the engine's decoder or a reference LM (Gemma-3-270M);
- `judges`: the independent sentiment and toxicity judges (VADER, TextBlob, alt-profanity-check,
  HateSonar), the probes' view and proposal fidelity;
- `prefixes`: deterministic held-out prefixes from the offline sources;
- `settings`: EvalConfig, its presets, and the settings (methods × controls × scales) to run;
- `generation`: one setting's continuations by DGLM, plain decoding or FUDGE;
- `scoring`: every metric of one setting's continuations;
- `targets`: the steering issue's targets, met or missed with a margin;
- `report`: results.md, results.json, samples.jsonl and the strict-JSON writers;
- `provenance`: the one capture of commit, machine, device and versions that every results file
  (here and in benchmarks/) records;
- `run`: the harness that ties them together (`run_eval`).
"""
