"""Controlled-generation methods on the engine's shared stages and decode loop, peers behind one
interface (`base.Method`): DGLM (`dglm`, the engine's default) and FUDGE (`fudge`, a logits
processor), RE-Control (`re_control`, a hidden-state hook); Diffusion-LM (`diffusion_lm`, a
package: it has no decoder, so it samples whole sequences through its own `DiffusionLMEngine`)."""
