"""Mesh creation, the rules table, and sharded == unsharded forward on 8 fake CPU devices."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from distill_jax import sharding
from distill_jax.convert import load_hf
from distill_jax.layers.linear import param
from distill_jax.models import lora
from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


def test_make_mesh_shapes_and_axis_types():
    mesh = sharding.make_mesh({"fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(sharding.make_mesh({"data": 2, "fsdp": 4}).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for bad, msg in [({"fsdp": 3}, "does not divide"), ({"fsdp": -1, "data": -1}, "at most one"),
                     ({"model": 2}, "unknown mesh axes"), ({"fsdp": 2}, "uses 2 devices")]:
        with pytest.raises(ValueError, match=msg):
            sharding.make_mesh(bad)


def test_every_parameter_has_a_rule_including_lora():
    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraConfig(rank=4), rngs=nnx.Rngs(1))
    specs = sharding.param_partition_specs(nnx.state(model))
    flat = dict(nnx.to_flat_state(specs))
    # the stacked layer axis of the scanned layers is never sharded
    assert flat[("model", "layers", "self_attn", "q_proj", "kernel")] == PartitionSpec(None, "fsdp", "tensor")
    assert flat[("model", "layers", "mlp", "down_proj", "kernel")] == PartitionSpec(None, "tensor", "fsdp")
    assert flat[("model", "embed_tokens", "embedding")] == PartitionSpec("tensor", "fsdp")
    assert flat[("model", "layers", "self_attn", "q_proj", "lora", "lora_a")] == PartitionSpec(None, "fsdp", None)


def test_unmatched_logical_axis_names_the_parameter():
    class Odd(nnx.Module):
        def __init__(self):
            self.weight = param(nnx.initializers.zeros, jax.random.key(0), (4, 4), np.float32,
                                ("embed", "no_such_axis"))
            self.bare = nnx.Param(np.zeros((2, 2), np.float32))

    with pytest.raises(sharding.UnmatchedAxisError) as error:
        sharding.param_partition_specs(nnx.state(Odd()))
    assert "weight: logical axis 'no_such_axis'" in str(error.value)
    assert "bare: parameter of shape (2, 2) has no logical axes" in str(error.value)


def test_sharded_forward_equals_unsharded(tiny_qwen2_dir):
    path, _ = tiny_qwen2_dir()
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    plain = load_hf(path)
    sharded = load_hf(path, mesh=mesh)
    kernel = sharded.model.layers.mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert len({s.device for s in kernel.addressable_shards}) == 8
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 128, (8, 12))
    mask = np.ones((8, 12), np.int64)
    mask[::2, :4] = 0
    expected = np.asarray(plain(input_ids=ids, attention_mask=mask))

    @nnx.jit
    def forward(model, ids, mask):
        return model(input_ids=ids, attention_mask=mask)

    with jax.set_mesh(mesh):
        out = forward(sharded, ids, mask)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_create_sharded_places_parameters_by_the_rules():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    config = Qwen2Config.preset("tiny")
    model = sharding.create_sharded(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)), mesh)
    reference = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    up = model.model.layers.mlp.up_proj.kernel[...]
    assert up.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    # jit and eager initialisers round the last bit differently.
    np.testing.assert_allclose(np.asarray(up), np.asarray(reference.model.layers.mlp.up_proj.kernel[...]),
                               rtol=1e-6)
