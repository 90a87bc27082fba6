"""Controlled-generation methods that share the engine's stages and decode loop: DGLM (the
Engine's pipeline) and FUDGE (token-level baseline); RE-Control and Diffusion-LM land here."""
