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


class LayerNorm(nnx.Module):
    """= torch.nn.LayerNorm (eps 1e-5 by default), statistics in float32."""

    def __init__(self, features: int, *, eps: float = 1e-5, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(nnx.initializers.ones, rngs.params(), (features,), param_dtype, ("norm",))
        self.bias = param(nnx.initializers.zeros, rngs.params(), (features,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)
