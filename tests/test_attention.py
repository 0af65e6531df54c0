"""Attention implementations and remat policies: same numbers as the plain XLA path.

The Pallas TPU flash kernel runs here in Pallas' TPU interpret mode (no TPU needed).
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from distill_jax import sharding
from distill_jax.layers.attention import attention, causal_padding_mask, choose_implementation, flash_attention
from distill_jax.models import lora
from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from distill_jax.train.loop import OptimizerConfig, init_state, make_optimizer, make_step
from distill_jax.train.step import distill_objective


def _qkv(batch=2, length=256, heads=2, kv_heads=1, head_dim=16, padding=150):
    """Two of the kernel's 128-blocks; row 0's first `padding` slots are padding (150: a whole padded block)."""
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(batch, length, heads, head_dim), jnp.float32)
    k = jnp.asarray(rng.randn(batch, length, kv_heads, head_dim), jnp.float32)
    v = jnp.asarray(rng.randn(batch, length, kv_heads, head_dim), jnp.float32)
    valid = np.ones((batch, length), bool)
    valid[0, :padding] = False  # left padding
    return q, k, v, jnp.asarray(valid)


def test_flash_matches_xla_values_and_gradients():
    """Across blocks (online softmax, causal block skipping, an all-padding block), GQA; the
    gradients of q, k and v."""
    q, k, v, valid = _qkv()
    real = np.asarray(valid)[:, :, None, None]
    mask = causal_padding_mask(valid, q.shape[1])

    def loss(q, k, v, impl):
        if impl == "flash":
            out = flash_attention(q, k, v, valid, scale=0.25)
        else:
            out = attention(q, k, v, mask, scale=0.25, implementation="xla")
        return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, ref), ref_grads = grad(q, k, v, "xla")
    with pltpu.force_tpu_interpret_mode():
        (_, out), grads = grad(q, k, v, "flash")
    np.testing.assert_allclose(np.asarray(out)[np.asarray(valid)], np.asarray(ref)[np.asarray(valid)], atol=1e-5)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), atol=1e-4, rtol=1e-4, err_msg=name)
        assert float(jnp.max(jnp.abs(ref_g))) > 1.0, name  # the gradients compared are not all ~0


_MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.pallas import tpu as pltpu
from distill_jax import sharding
from distill_jax.layers.attention import attention, causal_padding_mask, flash_attention
from tests.test_attention import _qkv
q, k, v, valid = _qkv(length=128, heads=4, kv_heads=2, padding=50)
ref = attention(q, k, v, causal_padding_mask(valid, q.shape[1]), scale=0.25, implementation="xla")
mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2})
with pltpu.force_tpu_interpret_mode(), jax.set_mesh(mesh):
    fn = jax.jit(lambda q, k, v, m: flash_attention(q, k, v, m, scale=0.25))
    assert "shard_map" in str(fn.trace(q, k, v, valid).jaxpr)
    out = fn(q, k, v, valid)
real = np.asarray(valid)
print("max_diff", float(np.max(np.abs(np.asarray(out)[real] - np.asarray(ref)[real]))))
"""


def test_flash_under_a_mesh_runs_per_shard():
    """In a subprocess with 4 CPU devices: Pallas' interpret mode hangs with 8 devices on 2 cores."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    max_diff = float(out.stdout.split("max_diff")[-1])
    assert max_diff < 1e-5


def test_implementation_choice():
    q, *_ = _qkv()
    assert choose_implementation(None, q, causal_self=True) == "xla"  # CPU
    assert choose_implementation("cudnn", q, causal_self=False) == "cudnn"
    assert choose_implementation("flash", q, causal_self=False) == "xla"  # a pass with a KV cache
    with pytest.raises(ValueError, match="attention_impl='splash'"):
        choose_implementation("splash", q, causal_self=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_attention(q[:, :100], q[:, :100, :2], q[:, :100, :2], jnp.ones((2, 100), bool), scale=1.0)
    with pytest.raises(ValueError, match="remat='some'"):
        Qwen2Config.preset("tiny", remat="some")


def _tiny_model(**numerics):
    config = Qwen2Config.preset("tiny", **numerics)
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    return model


def _batch(length=256):
    rng = np.random.RandomState(1)
    ids = rng.randint(0, 250, (2, length)).astype(np.int32)
    mask = np.ones((2, length), np.int32)
    mask[1, :150] = 0
    targets = {"switch_closed": np.array([1.0, 0.0], np.float32), "teacher_letter": np.array([1, 2], np.int32),
               "teacher_logits": rng.randn(2, 4).astype(np.float32), "student_letter": np.array([3, 0], np.int32),
               "weight": np.ones(2, np.float32)}
    return {"inputs": {"input_ids": ids, "attention_mask": mask}, "targets": targets}


def _lora_grads(model):
    """Gradients of the distill loss w.r.t. every LoRA parameter, B made non-zero first (at its
    zero init the gradient of A vanishes)."""
    from distill_jax.train.losses import distill_loss

    for path, b in nnx.iter_graph(model):
        if path and path[-1] == "lora_b":
            b[...] = 0.1 * jax.random.normal(jax.random.key(len(path)), b.shape)
    graphdef, lora_params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    batch = _batch()

    def loss(lora_params):
        merged = nnx.merge(graphdef, lora_params, frozen)
        hidden = merged.hidden_states(**batch["inputs"])[:, -1]
        return distill_loss(merged.logits(hidden), jnp.asarray([10, 11, 12, 13]), batch["targets"])[0]

    return jax.jit(jax.grad(loss))(lora_params)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_policies_give_the_same_gradients(remat):
    ref = jax.tree.leaves(_lora_grads(_tiny_model()))
    grads = jax.tree.leaves(_lora_grads(_tiny_model(remat=remat)))
    # A and B of 7 projections, each stacked over the 2 scanned layers (remat runs inside the scan)
    assert len(ref) == 7 * 2 and all(float(jnp.max(jnp.abs(g[i]))) > 0 for g in ref for i in range(2))
    for g, ref_g in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), rtol=1e-5, atol=1e-7)


def test_remat_full_saves_fewer_residuals():
    """What the backward pass keeps: 'full' remat stores less than no remat (XLA's temp memory)."""
    def temp_bytes(remat):
        model = _tiny_model(remat=remat)
        tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10))
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
        sharding.shard_model(model, mesh)
        graphdef, state, frozen = init_state(model, tx, mesh)
        step = make_step(graphdef, tx, distill_objective([10, 11, 12, 13]))
        batch = _batch(length=512)
        flat = {**batch["inputs"], **{k: v for k, v in batch["targets"].items() if k != "weight"},
                "valid": np.ones(2, np.int32)}
        return step.lower(state, frozen, jax.tree.map(jnp.asarray, flat)).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") < temp_bytes("none")


def test_flash_in_the_decoder_matches_xla():
    xla_model = _tiny_model()
    flash_model = _tiny_model(attention_impl="flash")
    batch = _batch()["inputs"]
    ref = xla_model(**batch)
    # One jitted program: run op by op, the interpreter's callbacks could wait behind the next
    # eagerly dispatched op on the CPU stream (a deadlock seen once in a full run).
    with pltpu.force_tpu_interpret_mode():
        out = nnx.jit(lambda model, batch: model(**batch))(flash_model, batch)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-4)


@pytest.mark.parametrize("mask_kind", ["keys", "full"])
def test_query_chunks_give_the_same_attention(mask_kind):
    """attention(query_chunk=c): the queries scored c at a time (lax.map) equal one call, for a key
    padding mask [B, 1, 1, S] (Qwen2-VL's frames) and a full one [B, 1, T, S] (Qwen2.5-Omni's windows)."""
    from distill_jax.layers.attention import attention, query_chunk_size

    rng = np.random.default_rng(0)
    b, t, n, h = 3, 96, 4, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for _ in range(3))
    valid = jnp.arange(t)[None] < jnp.asarray([96, 50, 7])[:, None]
    if mask_kind == "keys":
        mask = valid[:, None, None, :]
    else:
        window = jnp.arange(t) // 16
        mask = (window[:, None] == window[None, :])[None, None] & valid[:, None, None, :]
    whole = attention(q, k, v, mask, scale=h ** -0.5, implementation="xla")
    assert query_chunk_size(t, 40) == 32 and query_chunk_size(t, None) == t and query_chunk_size(100, 60) == 100
    for chunk in (32, 8):
        chunked = attention(q, k, v, mask, scale=h ** -0.5, implementation="xla", query_chunk=chunk)
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6, atol=1e-6)
