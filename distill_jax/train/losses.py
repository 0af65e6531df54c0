"""Distillation losses on the answer position, gated per clip by the switch.

The student answers with one letter token at the last (answer) position. Where the
switch is closed (the teacher is the stronger modality for that clip) the target is
the teacher's: its letter ("labels": cross-entropy over the whole vocabulary, as
fine-tuning on the answer text) or its 10-way letter distribution ("logits": KL at a
temperature between the letter distributions, scaled by T^2). Elsewhere the target is
the student's own original letter (anti-forgetting). Only the answer position carries
loss; padded batch rows carry none.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("labels", "logits")


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per row, in float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]


def kl_to_teacher(student_letter_logits: jax.Array, teacher_letter_logits: jax.Array,
                  temperature: float) -> jax.Array:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per row (Hinton et al.'s scaling)."""
    t = jnp.float32(temperature)
    teacher = jax.nn.log_softmax(teacher_letter_logits.astype(jnp.float32) / t, axis=-1)
    student = jax.nn.log_softmax(student_letter_logits.astype(jnp.float32) / t, axis=-1)
    return t * t * jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


def distill_loss(answer_logits: jax.Array, letter_token_ids: jax.Array, batch: dict, *, mode: str = "labels",
                 temperature: float = 1.0) -> tuple[jax.Array, dict]:
    """Mean per-clip loss and per-clip parts.

    answer_logits: [B, V] student logits at the answer position.
    batch: `switch_closed` [B] bool, `teacher_letter` [B] int (0-9), `teacher_logits` [B, 10],
      `student_letter` [B] int (the student's original answer), `weight` [B] (0 for padding rows).
    """
    if mode not in MODES:
        raise ValueError(f"distill loss mode must be one of {MODES}, got {mode!r}")
    closed = batch["switch_closed"].astype(bool)
    weight = batch["weight"].astype(jnp.float32)
    own = cross_entropy(answer_logits, letter_token_ids[batch["student_letter"]])
    if mode == "labels":
        teacher = cross_entropy(answer_logits, letter_token_ids[batch["teacher_letter"]])
    else:
        teacher = kl_to_teacher(jnp.take(answer_logits, letter_token_ids, axis=-1), batch["teacher_logits"],
                                temperature)
    per_clip = jnp.where(closed, teacher, own)
    loss = jnp.sum(per_clip * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    return loss, {"per_clip": per_clip, "closed_fraction": jnp.sum(closed * weight) / jnp.maximum(jnp.sum(weight), 1.0)}
