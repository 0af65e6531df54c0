"""Rotary position embeddings: 1-D RoPE (= Qwen2RotaryEmbedding) and M-RoPE (Qwen2-VL).

Positions are [B, T] for text RoPE or [3, B, T] (temporal, height, width rows)
for M-RoPE. With M-RoPE each rotary frequency takes its angle from one of the
three rows: the first mrope_section[0] frequencies from the temporal row, the
next mrope_section[1] from height, the rest from width (= HF's
`apply_multimodal_rotary_pos_emb`, whose split of the doubled head dimension
selects the same row for frequency j in both halves).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i/d), i < d/2, in float32 (as HF computes them)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def rope_angles(position_ids: jax.Array, head_dim: int, theta: float,
                mrope_section: Sequence[int] | None = None) -> jax.Array:
    """Rotation angles [B, T, head_dim // 2] in float32 for [B, T] or [3, B, T] positions."""
    inv_freq = jnp.asarray(inv_frequencies(head_dim, theta))
    positions = position_ids.astype(jnp.float32)
    if positions.ndim == 2:
        return positions[..., None] * inv_freq
    if positions.ndim != 3 or positions.shape[0] != 3:
        raise ValueError(f"position_ids must be [B, T] or [3, B, T], got shape {position_ids.shape}")
    if mrope_section is None:
        raise ValueError("3-row (M-RoPE) position_ids need a config with mrope_section")
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
    angles = positions[..., None] * inv_freq  # [3, B, T, D/2]
    bounds = np.cumsum([0, *mrope_section])
    return jnp.concatenate(
        [angles[i % 3, ..., bounds[i]:bounds[i + 1]] for i in range(len(mrope_section))], axis=-1)


def rope_cos_sin(angles: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, head_dim] of the doubled angles, cast to the compute dtype."""
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, H] rotated by cos/sin [B, T, H] (rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
