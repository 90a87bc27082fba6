"""Token decoding: the sampling state of a batch (`sampling`: temperature, top-k/top-p, per-row
generators, EOS and stop strings, logits processors), left padding (`padding`), batch buckets for
captured graphs (`buckets`), the one decode loop and its step-backend protocol (`loop`), and the
static-buffer step (`runner`: eager, traced or CUDA graphs)."""
