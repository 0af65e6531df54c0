"""distill_jax: cross-modal distillation between audio and visual LLMs in JAX/Flax NNX."""

__version__ = "0.1.0"
