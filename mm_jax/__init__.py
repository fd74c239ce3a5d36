"""mm_jax: multimodal language model training in JAX / Flax NNX."""
