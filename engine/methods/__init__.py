"""Controlled-generation methods on the engine's shared stages and decode loop, peers behind one
interface (`base.Method`): DGLM (`dglm`, the engine's default) and FUDGE (`fudge`, a logits
processor); RE-Control (a hidden-state hook) and Diffusion-LM land here as one module each."""
