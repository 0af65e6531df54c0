"""LoRA: merge/unmerge, PEFT export loaded by peft, optimizer touches only adapters."""
import copy
import json
import os

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from distill_jax.convert import load_hf
from distill_jax.layers.scan import layer_paths
from distill_jax.models import lora
from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


def _randomize_adapters(model, seed=0):
    """Non-zero B (PEFT and we both init B to zero, which would hide a wrong export)."""
    key = jax.random.key(seed)
    for _, linear in lora.lora_layers(model):
        key, sub = jax.random.split(key)
        linear.lora.lora_b[...] = 0.05 * jax.random.normal(sub, linear.lora.lora_b[...].shape)


def _inputs(vocab, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (2, 8))
    mask = np.ones((2, 8), np.int64)
    mask[1, :2] = 0
    return ids, mask


def test_targets_and_fresh_adapter_is_identity():
    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0))
    ids, mask = _inputs(256)
    before = np.asarray(model(input_ids=ids, attention_mask=mask))
    lora.apply_lora(model, lora.LoraConfig(rank=4, target_modules=("q", "v", "down")), rngs=nnx.Rngs(1))
    assert sorted(path for path, _ in lora.lora_layers(model)) == [  # each stacked over the 2 scanned layers
        "model.layers.mlp.down_proj", "model.layers.self_attn.q_proj", "model.layers.self_attn.v_proj"]
    names = sorted(name for path, linear in lora.lora_layers(model) for name in layer_paths(path, linear.kernel))
    assert names == sorted(f"model.layers.{i}.{m}" for i in range(2)
                           for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    np.testing.assert_array_equal(np.asarray(model(input_ids=ids, attention_mask=mask)), before)
    with pytest.raises(ValueError, match="no Linear named"):
        lora.apply_lora(Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0)),
                        lora.LoraConfig(target_modules=("nonexistent",)), rngs=nnx.Rngs(1))


def test_merged_equals_unmerged():
    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    _randomize_adapters(model)
    ids, mask = _inputs(256)
    kernel_before = np.asarray(model.model.layers.mlp.up_proj.kernel[...])
    unmerged = np.asarray(model(input_ids=ids, attention_mask=mask))
    lora.merge_lora(model)
    merged = np.asarray(model(input_ids=ids, attention_mask=mask))
    lora.unmerge_lora(model)
    again = np.asarray(model(input_ids=ids, attention_mask=mask))
    assert np.abs(merged - unmerged).max() <= 1e-5
    assert np.abs(again - unmerged).max() <= 1e-5
    np.testing.assert_allclose(model.model.layers.mlp.up_proj.kernel[...], kernel_before, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_export_peft_loads_in_peft_with_our_logits(tiny_qwen2_dir, tmp_path, tie):
    import peft

    path, hf = tiny_qwen2_dir(tie_word_embeddings=tie)
    model = load_hf(path)
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=16.0), rngs=nnx.Rngs(1))
    _randomize_adapters(model)
    ids, mask = _inputs(128)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask))
    out = lora.export_peft(model, str(tmp_path / "adapter"), base_model_name_or_path=path)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.load(open(os.path.join(out, "adapter_config.json")))["r"] == 4
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(positions)).logits.numpy()
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_ref = base(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            position_ids=torch.tensor(positions)).logits.numpy()
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert np.abs(ours - base_ref)[valid].max() > 1e-3  # the adapters really change the output


def test_optimizer_step_changes_only_lora_parameters():
    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraConfig(rank=4), rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
    ids, mask = _inputs(256)
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))

    def loss_fn(model):
        logits = model(input_ids=ids, attention_mask=mask)
        return -jax.nn.log_softmax(logits)[..., 3].mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    step(model, optimizer)
    frozen_after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    lora_after = nnx.state(model, nnx.LoRAParam)
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora_before), jax.tree.leaves(lora_after))]
    assert all(changed) and len(changed) == 2 * 7  # A and B of 7 projections, each stacked over the 2 layers
    assert all(np.abs(a[i] - b[i]).max() > 0 for a, b in zip(jax.tree.leaves(lora_before),
                                                               jax.tree.leaves(lora_after)) for i in range(2))


def test_lora_dropout_only_in_training():
    with pytest.raises(NotImplementedError, match="LoRA dropout on scanned layers"):
        lora.apply_lora(Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0)),
                        lora.LoraConfig(rank=4, dropout=0.5), rngs=nnx.Rngs(1))
    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny", scan_layers=False), rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraConfig(rank=4, dropout=0.5), rngs=nnx.Rngs(1))
    _randomize_adapters(model)
    ids, _ = _inputs(256)
    model.eval()
    a, b = np.asarray(model(input_ids=ids)), np.asarray(model(input_ids=ids))
    np.testing.assert_array_equal(a, b)
    model.train()
    c = np.asarray(model(input_ids=ids))
    assert np.abs(c - a).max() > 1e-4


def test_export_peft_of_adapters_under_a_prefix(tiny_qwen2_dir, tmp_path):
    """`under` restricts adapters to a sub-tree; PEFT must attach them to exactly those modules."""
    import peft

    path, hf = tiny_qwen2_dir(seed=5)
    with pytest.raises(ValueError, match=r"under='model.layers.1' selects some layers of the scanned \(stacked\) "
                                         r"model.layers.mlp.up_proj"):
        lora.apply_lora(load_hf(path), lora.LoraConfig(target_modules=("up",), under="model.layers.1"),
                        rngs=nnx.Rngs(1))
    model = load_hf(path, scan_layers=False)  # one layer's adapters: the layers unrolled
    lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=4.0, target_modules=("q", "up"), under="model.layers.1"),
                    rngs=nnx.Rngs(1))
    assert sorted(p for p, _ in lora.lora_layers(model)) == ["model.layers.1.mlp.up_proj",
                                                             "model.layers.1.self_attn.q_proj"]
    _randomize_adapters(model, seed=2)
    out = lora.export_peft(model, str(tmp_path / "adapter"))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    wrapped = sorted(name for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert wrapped == ["base_model.model.model.layers.1.mlp.up_proj", "base_model.model.model.layers.1.self_attn.q_proj"]
    ids, mask = _inputs(128)
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(positions)).logits.numpy()
    ours = np.asarray(model(input_ids=ids, attention_mask=mask))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4
