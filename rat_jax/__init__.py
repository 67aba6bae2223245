"""rat_jax: Model Ratatouille in JAX/Flax."""
__version__ = "0.1.0"
