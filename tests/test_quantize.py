"""Weight-only int8 (layers.quantize, qwix): what loads, what it computes, and that the LoRA
student trains on the frozen int8 base."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix
from flax import nnx

from distill_jax.convert import load_hf, save_hf
from distill_jax.layers.linear import Linear
from distill_jax.layers.quantize import quantize_linears
from distill_jax.models import lora
from distill_jax.sharding import make_mesh
from distill_jax.train.loop import init_state, make_step
from distill_jax.train.step import distill_objective


def _dequantized_float_model(path, **kwargs):
    """The float model with each Linear kernel replaced by qwix's dequantize(quantize(kernel)): what
    the int8 model must compute, up to float rounding."""
    model = load_hf(path, **kwargs)
    for _, linear in nnx.iter_modules(model):
        if isinstance(linear, Linear):
            kernel = linear.kernel[...]
            axes = (0, kernel.ndim - 1) if kernel.ndim == 3 else (1,)
            linear.kernel[...] = qwix.dequantize(qwix.quantize(kernel, jnp.int8, channelwise_axes=axes))
    return model


def test_an_int8_kernel_is_qwix_per_channel_int8_within_half_a_step():
    kernel = np.random.RandomState(0).randn(48, 24).astype(np.float32)
    kernel[:, 3] *= 100.0  # one loud output channel must not coarsen the others' steps
    linear = Linear(48, 24, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    linear.kernel[...] = jnp.asarray(kernel)
    quantize_linears(linear)
    assert linear.kernel[...].dtype == jnp.int8 and linear.kernel_scale[...].shape == (24,)
    scale = np.abs(kernel).max(axis=0) / 127.5  # qwix's absmax calibration: int8's [-128, 127] as +-127.5
    np.testing.assert_allclose(np.asarray(linear.kernel_scale[...]), scale, rtol=1e-6)
    dense = np.asarray(linear.dense_kernel())
    # rounding to the nearest step, up to float32's rounding of the dequantized value
    assert np.all(np.abs(dense - kernel) <= scale / 2 + 4 * np.finfo(np.float32).eps * np.abs(kernel))
    x = np.random.RandomState(1).randn(5, 48).astype(np.float32)
    np.testing.assert_allclose(np.asarray(linear(x)), x @ dense, rtol=1e-5, atol=1e-5)
    assert linear.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert linear.kernel_scale.get_metadata()["out_sharding"] == ("mlp",)


@pytest.mark.parametrize("scan", [True, False])
def test_int8_load_computes_the_dequantized_model_and_its_logit_error(tiny_qwen2_dir, scan):
    path, _ = tiny_qwen2_dir(seed=11)
    model = load_hf(path, quantize="int8", scan_layers=scan)
    kernels = [m for _, m in nnx.iter_modules(model) if isinstance(m, Linear)]
    assert kernels and all(m.kernel[...].dtype == jnp.int8 for m in kernels)
    assert model.model.embed_tokens.embedding[...].dtype == jnp.float32  # tables stay float
    ids = np.random.RandomState(0).randint(0, 128, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[0, :3] = 0
    valid = mask.astype(bool)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask))[valid]
    reference = np.asarray(_dequantized_float_model(path, scan_layers=scan)(input_ids=ids, attention_mask=mask))
    np.testing.assert_allclose(ours, reference[valid], atol=2e-5)
    exact = np.asarray(load_hf(path, scan_layers=scan)(input_ids=ids, attention_mask=mask))[valid]
    error = np.abs(ours - exact).max() / np.abs(exact).max()
    assert 1e-5 < error < 0.02, error  # int8 moves the logits, by ~1 % of their range on this model
    with pytest.raises(ValueError, match="save_hf writes float checkpoints"):
        save_hf(model, "/nonexistent")


def _lora_gradient(model, batch) -> np.ndarray:
    """The distill loss's gradient w.r.t. every adapter parameter, flattened into one vector."""
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    objective = distill_objective((5, 6, 7, 8))
    grad = jax.grad(lambda p: objective(nnx.merge(graphdef, p, rest), batch, ())[0])(params)
    return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad)])


def test_the_lora_student_trains_on_a_frozen_int8_base(tiny_qwen2_dir):
    path, _ = tiny_qwen2_dir(seed=11)
    rng = np.random.RandomState(1)
    batch = {"input_ids": rng.randint(0, 128, (4, 9)), "attention_mask": np.ones((4, 9), np.int32),
             "switch_closed": np.array([True, False, True, False]), "teacher_letter": np.array([0, 1, 2, 3]),
             "teacher_logits": rng.randn(4, 4).astype(np.float32), "student_letter": np.array([1, 1, 0, 2]),
             "valid": np.ones(4, np.int32)}
    models = {}
    for quantize in (None, "int8"):
        models[quantize] = load_hf(path, quantize=quantize)
        lora.apply_lora(models[quantize], lora.LoraConfig(rank=4), rngs=nnx.Rngs(0))
        for _, linear in lora.lora_layers(models[quantize]):
            linear.lora.lora_b[...] = 0.05 * jnp.ones_like(linear.lora.lora_b[...])  # A's gradient then flows
    for _, linear in lora.lora_layers(models["int8"]):
        assert linear.lora.lora_a[...].dtype == jnp.float32 and linear.kernel[...].dtype == jnp.int8
    # the adapters' gradient through the int8 base points where the float base's does
    g_int8, g_float = _lora_gradient(models["int8"], batch), _lora_gradient(models[None], batch)
    cosine = g_int8 @ g_float / np.linalg.norm(g_int8) / np.linalg.norm(g_float)
    assert cosine > 0.99, cosine

    model = models["int8"]
    tx = optax.adam(1e-2)
    graphdef, state, frozen = init_state(model, tx, make_mesh({}, devices=jax.devices()[:1]))
    step = make_step(graphdef, tx, distill_objective((5, 6, 7, 8)))
    frozen_before = jax.tree.map(np.asarray, frozen)
    losses = []
    for _ in range(8):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.95 * losses[0], losses  # it learns
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):  # the int8 base stays frozen
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(ValueError, match="cannot be merged into an int8 kernel"):
        lora.merge_lora(model)
    with pytest.raises(ValueError, match="quantize the base model before applying LoRA"):
        quantize_linears(models[None])
