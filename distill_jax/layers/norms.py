"""Normalization layers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from distill_jax.layers.linear import param


class RMSNorm(nnx.Module):
    """= Qwen2RMSNorm: normalise in float32, cast back, then scale (in the input dtype)."""

    def __init__(self, features: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(nnx.initializers.ones, rngs.params(), (features,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        input_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(input_dtype) * x32.astype(input_dtype)
