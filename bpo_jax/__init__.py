"""bpo_jax: JAX-native preference optimization (sweet-spot pairs, BPO balancing, sharded DPO)."""

__version__ = "0.1.0"
