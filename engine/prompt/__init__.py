"""The prompt-generator stage: a continuation latent → soft-prompt vectors for the decoder."""
