"""BatchNorm over the last (channel) axis with logical axes on every variable.

nnx.BatchNorm's variables carry no axis metadata, so `distill_jax.sharding` could not
place them; this one creates them through `param` like every other layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from distill_jax.layers.linear import param


class BatchNorm(nnx.Module):
    """= torch.nn.BatchNorm1d/2d (momentum 0.1, eps 1e-5) on channels-last inputs.

    Eval (`use_running_average=True`, set by `model.eval()`): normalise with the running
    statistics. Train (`model.train()`): normalise with the batch's biased variance over
    every axis but the last, and update the running statistics as torch does:
    running = (1 - momentum) * running + momentum * batch (unbiased variance).
    """

    def __init__(self, features: int, *, momentum: float = 0.1, eps: float = 1e-5,
                 axes: tuple[str] = ("channels",), param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.momentum, self.eps = momentum, eps
        self.use_running_average = False  # torch and nnx modules start in train mode
        self.scale = param(nnx.initializers.ones, rngs.params(), (features,), param_dtype, axes)
        self.bias = param(nnx.initializers.zeros, rngs.params(), (features,), param_dtype, axes)
        self.mean = param(nnx.initializers.zeros, rngs.params(), (features,), jnp.float32, axes, kind=nnx.BatchStat)
        self.var = param(nnx.initializers.ones, rngs.params(), (features,), jnp.float32, axes, kind=nnx.BatchStat)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            reduce = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=reduce)
            var = jnp.mean(jnp.square(x32 - mean), axis=reduce)
            n = x.size // x.shape[-1]
            unbiased = var * (n / max(n - 1, 1))
            self.mean[...] = (1 - self.momentum) * self.mean[...] + self.momentum * jax.lax.stop_gradient(mean)
            self.var[...] = (1 - self.momentum) * self.var[...] + self.momentum * jax.lax.stop_gradient(unbiased)
        inv = jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        y = (x32 - mean) * inv + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)
