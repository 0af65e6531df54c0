"""Weight-only int8 for the frozen Linear kernels (qwix), so a 7B model fits one 16 GB chip.

`quantize_linears(model)` turns every `Linear` of a model (built, or abstract before loading)
into an int8 one: `kernel` holds int8 values with its logical axes and `kernel_scale` one
scale per output channel (per layer when the layers are stacked), as
`qwix.quantize(kernel, int8, channelwise_axes=(out,))` computes them (absmax / 127.5). The
forward pass hands both to `qwix.dot` as a `QArray`, which dequantizes into the matmul (XLA
fuses it; with scanned layers one layer's weights are dequantized at a time).

The weights stay frozen: LoRA adapters and their optimizer state keep their own dtype, and an
adapter cannot be merged into an int8 kernel. Embedding tables are left as they are.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from distill_jax.layers.linear import Linear
from distill_jax.layers.scan import is_stacked

QUANTIZE = (None, "int8")  # config.models.quantize


def check_quantize(quantize: str | None) -> None:
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}; known: {QUANTIZE}")


def quantize_kernel(kernel: jax.Array, stacked: bool) -> tuple[jax.Array, jax.Array]:
    """(int8 values, per-output-channel scales) of a [in, out] (or stacked [L, in, out]) kernel."""
    out_axes = (0, 2) if stacked else (1,)
    q = qwix.quantize(kernel, jnp.int8, channelwise_axes=out_axes)
    return q.qvalue, jnp.squeeze(q.scale, axis=-2)  # scale [1, out] -> [out] ([L, 1, out] -> [L, out])


def quantize_linears(model: nnx.Module) -> nnx.Module:
    """Every Linear of `model` made int8 in place (returns `model`): a concrete model's kernels are
    quantized; an abstract one (nnx.eval_shape) gets int8 placeholders that `convert.load_hf`
    fills, quantizing each checkpoint tensor on its devices as it is read."""
    for path, linear in list(nnx.iter_modules(model)):
        if not isinstance(linear, Linear) or linear.kernel_scale is not None:
            continue
        if linear.lora is not None:
            raise ValueError(f"{'.'.join(map(str, path))}: quantize the base model before applying LoRA")
        kernel = linear.kernel
        stacked = is_stacked(kernel)
        axes = tuple(kernel.get_metadata()["out_sharding"])
        scale_axes = axes[:1] + axes[2:] if stacked else axes[1:]
        value = kernel.get_value()
        quantize = lambda k: quantize_kernel(k, stacked)  # noqa: E731
        qvalue, scale = jax.eval_shape(quantize, value) if isinstance(value, jax.ShapeDtypeStruct) \
            else quantize(value)
        linear.kernel = nnx.Param(qvalue, out_sharding=axes, eager_sharding=False)
        linear.kernel_scale = nnx.Param(scale, out_sharding=scale_axes, eager_sharding=False)
    return model


def is_quantized(model: nnx.Module) -> bool:
    return any(isinstance(m, Linear) and m.kernel_scale is not None for _, m in nnx.iter_modules(model))
