"""idsnn-jax: IDSNN (ANN-initialized, distilled Spiking ResNets) in JAX/Flax."""
