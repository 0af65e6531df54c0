"""Linear and embedding layers with logical axis names, and the LoRA hook of `Linear`.

Kernels are stored [in, out] (torch.nn.Linear's weight transposed). Every
parameter is created through `param` so it carries `out_sharding` logical axis
names that `distill_jax.sharding` maps to the mesh.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def param(
    init: Initializer,
    rng: jax.Array,
    shape: tuple[int, ...],
    dtype,
    axes: tuple[str | None, ...],
    kind: type[nnx.Variable] = nnx.Param,
) -> nnx.Variable:
    """A variable of `kind` with logical axes; placement on a mesh is left to `sharding`."""
    return kind(init(rng, shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (= torch.nn.Linear); `lora` is set by `models.lora.apply_lora`, and
    `kernel_scale` by `layers.quantize.quantize_linears` (then `kernel` holds int8 values)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init: Initializer = nnx.initializers.normal(0.02),
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.axes = tuple(axes)
        self.dtype = dtype
        self.kernel = param(kernel_init, rngs.params(), (in_features, out_features), param_dtype, axes)
        self.bias = (
            param(nnx.initializers.zeros, rngs.params(), (out_features,), param_dtype, axes[1:])
            if use_bias
            else None
        )
        self.lora = nnx.data(None)
        self.kernel_scale = nnx.data(None)

    def quantized_kernel(self) -> qwix.QArray:
        """An int8 kernel as qwix's `QArray`, one scale per output column, in the compute dtype."""
        scale = self.kernel_scale[...][..., None, :].astype(self.dtype)
        return qwix.QArray(qvalue=self.kernel[...], scale=scale, qtype=jnp.int8)

    def dense_kernel(self) -> jax.Array:
        """The [in, out] kernel in the compute dtype (an int8 one dequantized)."""
        if self.kernel_scale is not None:
            return qwix.dequantize(self.quantized_kernel())
        return self.kernel[...].astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # One 2-D matmul over all leading dims: the weight gradients then contract a single
        # dimension, which XLA:CPU runs ~3x faster than a contraction over [batch, length].
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        if self.kernel_scale is not None:  # int8: qwix dequantizes into the matmul
            y = qwix.dot(x, self.quantized_kernel())
        else:
            y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None and not self.lora.merged:
            y = y + self.lora(x).astype(self.dtype)
        return y.reshape(*lead, self.out_features)


class Embed(nnx.Module):
    """Embedding table [num, features] (= torch.nn.Embedding): tokens, or learned positions."""

    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, axes: tuple[str, str] = ("vocab", "embed"), rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(nnx.initializers.normal(0.02), rngs.params(),
                               (num_embeddings, features), param_dtype, axes)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], input_ids, axis=0).astype(self.dtype)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Logits against the table (tied LM head)."""
        return hidden.astype(self.dtype) @ self.embedding[...].astype(self.dtype).T


class Conv1d(nnx.Module):
    """= torch.nn.Conv1d on [B, T, C] inputs (channels last); kernel [width, in, out]."""

    def __init__(self, in_features: int, out_features: int, *, kernel_size: int, stride: int = 1,
                 padding: int = 0, axes: tuple[str, str, str], dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.stride, self.padding, self.dtype = stride, padding, dtype
        self.kernel = param(nnx.initializers.lecun_normal(), rngs.params(),
                            (kernel_size, in_features, out_features), param_dtype, axes)
        self.bias = param(nnx.initializers.zeros, rngs.params(), (out_features,), param_dtype, axes[2:])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(self.stride,),
            padding=[(self.padding, self.padding)], dimension_numbers=("NWC", "WIO", "NWC"))
        return y + self.bias[...].astype(self.dtype)
