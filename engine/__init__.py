"""dglm.engine: diffusion-guided controllable generation."""
