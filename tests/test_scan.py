"""Scanned layers (layers.scan): the same model as the unrolled one, through load, save, LoRA,
PEFT export, the KV cache, remat and the towers, and a stacked checkpoint error names the layer."""
import json
import os
import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from distill_jax import decoding
from distill_jax.convert import CheckpointMismatchError, load_hf, save_hf
from distill_jax.layers.scan import is_stacked, layer_paths, unrolled_path
from distill_jax.models import lora
from distill_jax.train.step import distill_objective


def _flat(model, kind=nnx.Param) -> dict[str, np.ndarray]:
    """Every parameter by its per-layer (checkpoint-style) path: a stacked one split into its layers."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, kind)):
        value = np.asarray(var.get_value())
        out.update(zip(layer_paths(".".join(str(p) for p in path), var), value if is_stacked(var) else [value]))
    return out


def _same_parameters(scanned, unrolled):
    flat_s, flat_u = _flat(scanned), _flat(unrolled)
    assert sorted(flat_s) == sorted(flat_u)
    for name in flat_s:
        np.testing.assert_array_equal(flat_s[name], flat_u[name], err_msg=name)


def test_unrolled_path_names_the_layer():
    assert unrolled_path("language_model.model.layers.mlp.up_proj.kernel", 3) == \
        "language_model.model.layers.3.mlp.up_proj.kernel"
    assert unrolled_path("visual.blocks.attn.qkv.bias", 0) == "visual.blocks.0.attn.qkv.bias"
    with pytest.raises(ValueError, match="must sit under a `layers` or `blocks` module"):
        unrolled_path("lm_head.kernel", 0)


def test_qwen2_scanned_equals_unrolled_in_logits_save_lora_export_and_generate(tiny_qwen2_dir, tmp_path):
    path, _ = tiny_qwen2_dir(seed=7)
    scanned, unrolled = load_hf(path), load_hf(path, scan_layers=False)
    assert scanned.model.layers.mlp.up_proj.kernel[...].shape[0] == 2 and len(unrolled.model.layers) == 2
    _same_parameters(scanned, unrolled)
    for model in (scanned, unrolled):
        lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(3))
        _set_lora_b(model)
    _same_parameters(scanned, unrolled)
    lora_s, lora_u = _flat(scanned, nnx.LoRAParam), _flat(unrolled, nnx.LoRAParam)
    assert sorted(lora_s) == sorted(lora_u) and len(lora_s) == 2 * 7 * 2
    for name in lora_s:  # A too: its keys are drawn in the unrolled model's order
        np.testing.assert_array_equal(lora_s[name], lora_u[name], err_msg=name)
    ids = np.random.RandomState(0).randint(0, 128, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[1, :4] = 0
    logits_s = np.asarray(scanned(input_ids=ids, attention_mask=mask))
    np.testing.assert_allclose(logits_s, np.asarray(unrolled(input_ids=ids, attention_mask=mask)), atol=1e-5)

    # the KV cache: one [L, B, S, K, H] pair scanned with the layers; greedy tokens and cached logits agree
    tokens_s = np.asarray(decoding.generate(scanned, ids, mask, 6))
    np.testing.assert_array_equal(tokens_s, np.asarray(decoding.generate(unrolled, ids, mask, 6)))
    cache = scanned.init_cache(3, 16)
    assert cache["layers"]["k"].shape == (2, 3, 16, 2, 16)
    cached, _ = scanned.forward_cached(cache, jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)  # padding positions attend to nothing: their logits are arbitrary
    np.testing.assert_allclose(np.asarray(cached)[valid], logits_s[valid], atol=1e-5)

    # save_hf writes each layer under its hub key: byte-equal to the unrolled model's checkpoint
    save_hf(scanned, str(tmp_path / "s"))
    save_hf(unrolled, str(tmp_path / "u"))
    saved_s, saved_u = load_file(tmp_path / "s" / "model.safetensors"), load_file(tmp_path / "u" / "model.safetensors")
    assert sorted(saved_s) == sorted(saved_u) and "model.layers.1.mlp.up_proj.weight" in saved_s
    assert all(np.array_equal(saved_s[k], saved_u[k]) for k in saved_s)

    # the PEFT export names every layer's adapters, as the unrolled model's does
    lora.export_peft(scanned, str(tmp_path / "ps"))
    lora.export_peft(unrolled, str(tmp_path / "pu"))
    peft_s, peft_u = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ps", "pu"))
    assert sorted(peft_s) == sorted(peft_u) and len(peft_s) == 2 * 7 * 2
    assert all(np.array_equal(peft_s[k], peft_u[k]) for k in peft_s)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ps", "pu")]
    assert configs[0] == configs[1]


def _set_lora_b(model):
    """A non-zero B on every layer's adapter, drawn from its per-layer name (the same in both layouts)."""
    for name, linear in lora.lora_layers(model):
        b = jnp.stack([0.05 * jax.random.normal(jax.random.key(zlib.crc32(n.encode())), linear.lora.lora_b.shape[-2:])
                       for n in layer_paths(name, linear.kernel)])
        linear.lora.lora_b[...] = b if is_stacked(linear.lora.lora_b) else b[0]


def test_scanned_gradients_equal_the_unrolled_ones(tiny_qwen2_dir):
    """The distill loss and its adapter gradients, scanned with full remat inside the scan, equal the
    unrolled model's without remat (tests/test_attention.py compares the policies, scanned)."""
    path, _ = tiny_qwen2_dir(seed=7)
    letters = (5, 6, 7, 8)
    rng = np.random.RandomState(1)
    batch = {"input_ids": rng.randint(0, 128, (4, 9)), "attention_mask": np.ones((4, 9), np.int32),
             "switch_closed": np.array([True, False, True, False]), "teacher_letter": np.array([0, 1, 2, 3]),
             "teacher_logits": rng.randn(4, 4).astype(np.float32), "student_letter": np.array([1, 1, 0, 2]),
             "valid": np.ones(4, np.int32)}
    grads = []
    for scan, policy in ((False, "none"), (True, "full")):
        model = load_hf(path, remat=policy, scan_layers=scan)
        lora.apply_lora(model, lora.LoraConfig(rank=4), rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
        objective = distill_objective(letters)

        def loss(params):
            return objective(nnx.merge(graphdef, params, rest), batch, ())[0]

        value, grad = jax.jit(jax.value_and_grad(loss))(params)
        flat = {}
        for p, var in nnx.to_flat_state(grad):
            name, g = ".".join(str(x) for x in p), np.asarray(var.get_value())
            flat.update({unrolled_path(name, i): v for i, v in enumerate(g)} if scan else {name: g})
        grads.append((float(value), flat))
    (loss_u, grad_u), (loss_s, grad_s) = grads
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    assert sorted(grad_s) == sorted(grad_u)
    assert max(np.abs(g).max() for g in grad_u.values()) > 1e-3  # B is zero, A's gradient is not: they move
    for name in grad_u:
        np.testing.assert_allclose(grad_s[name], grad_u[name], atol=1e-6, err_msg=name)


def test_towers_scanned_equal_unrolled(tiny_qwen2_audio_dir, tiny_qwen2_vl_dir, tiny_qwen2_5_omni_dir):
    """The audio towers, Qwen2-VL's vision tower, and Qwen2.5-Omni's, whose scan picks full or windowed
    attention per block (blocks 1 and 3 of 4 full), give the unrolled towers' outputs."""
    rng = np.random.RandomState(0)
    features = rng.randn(2, 128, 64).astype(np.float32)
    feature_mask = np.ones((2, 64), np.int32)
    feature_mask[1, 40:] = 0
    pixels = rng.randn(2 * 2 * 8 * 8, 3 * 2 * 14 * 14).astype(np.float32)
    grids = ((2, 8, 8), (2, 8, 8))
    for (path, _), run in ((tiny_qwen2_audio_dir, lambda m: m.audio_tower(features, feature_mask)),
                           (tiny_qwen2_vl_dir, lambda m: m.visual(pixels, grids)),
                           (tiny_qwen2_5_omni_dir, lambda m: m.visual(pixels, grids)),
                           (tiny_qwen2_5_omni_dir, lambda m: m.audio_tower(features, feature_mask))):
        scanned, unrolled = load_hf(path), load_hf(path, scan_layers=False)
        _same_parameters(scanned, unrolled)
        out_s, out_u = np.asarray(run(scanned)), np.asarray(run(unrolled))
        assert np.abs(out_u).max() > 0.1
        np.testing.assert_allclose(out_s, out_u, atol=1e-5, err_msg=path)


def test_a_missing_layer_in_a_stacked_parameter_is_named(tiny_qwen2_dir, tmp_path):
    path, _ = tiny_qwen2_dir(seed=7)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = tensors["model.layers.0.self_attn.q_proj.bias"][:3]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as error:
        load_hf(str(broken))
    assert "missing keys (1): model.layers.1.mlp.up_proj.weight (for model.layers.1.mlp.up_proj.kernel)" \
        in str(error.value)
    assert "model.layers.0.self_attn.q_proj.bias: checkpoint shape (3,) -> (3,), model " \
           "model.layers.0.self_attn.q_proj.bias expects (64,)" in str(error.value)
    assert os.path.exists(broken / "config.json")
