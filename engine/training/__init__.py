"""Everything that makes a bundle, none of it needed at inference: offline data, the trainers
(score network, prompt generator, steering with LoRA, distillation), data parallelism, recipes
and builders."""
