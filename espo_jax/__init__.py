"""espo-jax: ESPO and its baselines for RL post-training of reasoning LLMs, in JAX."""

__version__ = "0.1.0"
