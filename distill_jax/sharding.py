"""Meshes and the ONE logical-axis -> mesh-axis rules table.

Every parameter carries logical axis names (`out_sharding` metadata, e.g.
("embed", "mlp")); activations are constrained at block boundaries with
`constrain`. `LOGICAL_RULES` is the only place that says which mesh axis a
logical axis lives on. A logical name missing from the table is an error that
names the parameter, never a silent replication.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (a name, a tuple of names, or None = replicated).
LOGICAL_RULES: dict[str, Any] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_vocab": "tensor",
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "lora_rank": None,
    "layers": None,  # the stacked axis of scanned layers (layers.scan): every device holds all layers' slices
    "positions": None,  # learned position tables (audio tower)
    "conv_width": None,
    "conv_in": None,  # conv input channels (mel bins, or d_model when the output is d_model too)
    # Cnn14 (the switch): ~80M parameters, replicated; its batches shard over "batch".
    "conv_height": None,
    "conv_out": None,
    "channels": None,  # conv channels (BatchNorm, fc1's input), and bn0's mel bins
    "cnn_embed": None,  # fc1's width (the embedding)
    "classes": None,  # classifier outputs (fc_audioset, the switch head)
    "audio_embed": None,  # the audio tower's width where the other dim is already "embed"
    "vision_merge": None,  # the vision merger's input (4 patches' features stacked)
}


class UnmatchedAxisError(ValueError):
    """A parameter or activation carries a logical axis name the rules table lacks."""


def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
    """Mesh over ("data", "fsdp", "tensor") with explicit Auto axis types.

    `shape` maps axis names to sizes; missing axes are 1 and one axis may be -1
    (the devices left over). Example: make_mesh({"fsdp": -1, "tensor": 2}).
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid: {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f"mesh shape {dict(shape)} does not divide {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_mesh(logical_axes, *, name: str = "<value>", rules=None) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names (None entries stay None)."""
    rules = LOGICAL_RULES if rules is None else rules
    spec = []
    for axis in logical_axes:
        if axis is None:
            spec.append(None)
        elif axis in rules:
            spec.append(rules[axis])
        else:
            raise UnmatchedAxisError(
                f"{name}: logical axis {axis!r} has no rule in distill_jax.sharding.LOGICAL_RULES"
            )
    return PartitionSpec(*spec)


def fit_spec(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide (e.g. tiny test models, odd vocab sizes)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[n] for n in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def _path_name(path) -> str:
    return ".".join(str(p) for p in path)


def param_partition_specs(state: nnx.State, mesh: Mesh | None = None) -> nnx.State:
    """Mesh PartitionSpecs for every variable of `state` (an nnx.State of a model).

    Variables without `out_sharding` metadata are an error unless they are
    scalars (e.g. RNG counters), which are replicated.
    """

    problems = []

    def spec_of(path, var):
        name = _path_name(path)
        axes = var.get_metadata().get("out_sharding")
        shape = np.shape(var.get_value())
        if axes is None:
            if len(shape) == 0 or not isinstance(var, nnx.Param):
                return PartitionSpec()
            problems.append(f"{name}: parameter of shape {shape} has no logical axes")
            return PartitionSpec()
        if len(axes) != len(shape):
            problems.append(f"{name}: logical axes {axes} do not match shape {shape}")
            return PartitionSpec()
        try:
            spec = logical_to_mesh(axes, name=name)
        except UnmatchedAxisError as e:
            problems.append(str(e))
            return PartitionSpec()
        return fit_spec(spec, shape, mesh) if mesh is not None else spec

    specs = nnx.map_state(spec_of, state)
    if problems:
        raise UnmatchedAxisError("no sharding rule for: " + "; ".join(problems))
    return specs


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for every variable of `state` on `mesh`."""
    specs = param_partition_specs(state, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def put(x, sharding: NamedSharding) -> jax.Array:
    """`x` placed with `sharding`, also on several hosts: an array already spanning the hosts is
    resharded; a host-local value (the same on every host, e.g. a freshly initialised
    parameter) becomes the global array each host fills from its copy."""
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every variable of `model` on `mesh` by the rules table (in place; returns model)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    if jax.process_count() == 1:
        nnx.update(model, jax.device_put(state, shardings))
        return model
    targets = dict(nnx.to_flat_state(shardings))
    for path, var in nnx.to_flat_state(state):
        var.set_value(put(var.get_value(), targets[path]))
    nnx.update(model, state)
    return model


def abstract_model(factory):
    """nnx.eval_shape(factory) with any ambient mesh hidden: under `jax.set_mesh`, flax would
    turn the logical axis names of the parameters into mesh shardings unmapped (and fail)."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.eval_shape(factory)


def create_sharded(factory, mesh: Mesh):
    """Build `factory()` (an nnx.Module) directly sharded on `mesh`, never whole on one device."""
    abstract = abstract_model(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)

    state = jax.jit(lambda: nnx.state(factory()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_mesh(logical_axes)
    return jax.lax.with_sharding_constraint(x, fit_spec(spec, x.shape, mesh))
