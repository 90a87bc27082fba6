"""The diffusion stage: noise schedule, samplers (DDPM/DDIM/DPM-Solver++/consistency), probe
guidance, the score network, and the sampler step captured as CUDA graphs."""
