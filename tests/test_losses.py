"""Distillation loss properties: zero KL to itself, gating picks the right target, padding carries nothing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.train.losses import cross_entropy, distill_loss, kl_to_teacher

LETTERS = jnp.arange(10, 20)


def _batch(closed, teacher_letter, student_letter, teacher_logits=None, weight=None):
    b = len(closed)
    return {"switch_closed": jnp.asarray(closed), "teacher_letter": jnp.asarray(teacher_letter),
            "student_letter": jnp.asarray(student_letter),
            "teacher_logits": jnp.zeros((b, 10)) if teacher_logits is None else jnp.asarray(teacher_logits),
            "weight": jnp.ones((b,)) if weight is None else jnp.asarray(weight, jnp.float32)}


def test_kl_of_a_student_equal_to_its_teacher_is_zero_and_positive_otherwise():
    logits = jax.random.normal(jax.random.key(0), (4, 10)) * 3
    np.testing.assert_allclose(kl_to_teacher(logits, logits, 2.0), 0.0, atol=1e-6)
    other = jax.random.normal(jax.random.key(1), (4, 10))
    assert (kl_to_teacher(other, logits, 2.0) > 1e-3).all()
    # T^2 scaling: at T = 1 it is the plain KL, computed by hand.
    p, q = jax.nn.softmax(logits), jax.nn.softmax(other)
    np.testing.assert_allclose(kl_to_teacher(other, logits, 1.0), jnp.sum(p * jnp.log(p / q), -1), rtol=1e-5)


def test_gating_selects_teacher_or_own_target_per_clip():
    logits = jax.random.normal(jax.random.key(2), (3, 32))
    batch = _batch(closed=[True, False, True], teacher_letter=[1, 2, 3], student_letter=[4, 5, 6])
    _, parts = distill_loss(logits, LETTERS, batch, mode="labels")
    expected = cross_entropy(logits, jnp.asarray([11, 15, 13]))  # teacher, own, teacher
    np.testing.assert_allclose(parts["per_clip"], expected, rtol=1e-6)
    teacher_logits = jax.random.normal(jax.random.key(3), (3, 10))
    batch = _batch([True, False, True], [1, 2, 3], [4, 5, 6], teacher_logits=teacher_logits)
    _, parts = distill_loss(logits, LETTERS, batch, mode="logits", temperature=2.0)
    kl = kl_to_teacher(logits[:, 10:20], teacher_logits, 2.0)
    np.testing.assert_allclose(parts["per_clip"], [kl[0], cross_entropy(logits[1:2], jnp.asarray([15]))[0], kl[2]],
                               rtol=1e-5)


def test_padded_rows_and_other_positions_carry_no_gradient():
    logits = jax.random.normal(jax.random.key(4), (3, 32))
    batch = _batch([True, False, True], [1, 2, 3], [4, 5, 6], weight=[1.0, 1.0, 0.0])
    grads = jax.grad(lambda x: distill_loss(x, LETTERS, batch)[0])(logits)
    assert np.abs(np.asarray(grads[2])).max() == 0.0  # the padded row
    assert np.abs(np.asarray(grads[:2])).max() > 0.0
    # the loss sees only the answer position: sequence logits elsewhere get zero gradient
    seq = jax.random.normal(jax.random.key(5), (3, 7, 32))
    grads = jax.grad(lambda x: distill_loss(x[:, -1], LETTERS, batch)[0])(seq)
    assert np.abs(np.asarray(grads[:, :-1])).max() == 0.0


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'soft'"):
        distill_loss(jnp.zeros((1, 32)), LETTERS, _batch([True], [0], [0]), mode="soft")
