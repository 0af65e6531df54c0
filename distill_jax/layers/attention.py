"""Attention masks and the attention kernel call shared by all families.

Masks are boolean [B, 1, T, S] (True = may attend). Grouped-query attention is
native in `jax.nn.dot_product_attention` (query heads a multiple of kv heads),
so keys/values are never repeated in memory.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_padding_mask(key_valid: jax.Array, query_length: int, offset: jax.Array | int = 0) -> jax.Array:
    """[B, 1, T, S] mask: query t (at absolute slot offset + t) sees key s iff s <= offset + t and key s is valid.

    key_valid: [B, S] bool/int, 1 where the key slot holds a real token.
    """
    key_slots = jnp.arange(key_valid.shape[1])[None, :]
    query_slots = offset + jnp.arange(query_length)[:, None]
    causal = key_slots <= query_slots  # [T, S]
    return causal[None, None, :, :] & key_valid.astype(bool)[:, None, None, :]


def attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
              *, scale: float, implementation: str | None = None) -> jax.Array:
    """softmax(q k^T * scale + mask) v; q [B, T, N, H], k/v [B, S, K, H], N % K == 0.

    Fully masked query rows (left padding) come out as a uniform average, never NaN.
    """
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=scale, implementation=implementation)
