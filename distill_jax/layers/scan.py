"""Layers stacked on a leading "layers" axis and run with one `jax.lax.scan`.

A model's repeated blocks (decoder layers, tower layers) are built one by one, as
Hugging Face builds them (so a seed gives the same weights scanned or not), then
stacked: one module of the block's class whose every variable has a leading axis
of size L, logical name "layers" (unsharded). XLA then compiles one block instead
of L, which is what makes the 7B programs compile in seconds rather than minutes.

Checkpoints keep one tensor per block (`model.layers.3.mlp.up_proj.weight`):
`unrolled_path` names block i's parameter inside a stacked one, and the converter
reads and writes the slices (`convert.keymap`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_AXIS = "layers"
# The attribute names of stacked blocks (Hugging Face's): `layers` (decoders, audio towers),
# `blocks` (vision towers). A stacked variable's path holds one of them; block i's
# checkpoint path has `.i` after it.
CONTAINERS = ("layers", "blocks")
_CONTAINER = re.compile(rf"(^|\.)({'|'.join(CONTAINERS)})(\.|$)")


def stack_layers(layers: list[nnx.Module]) -> nnx.Module:
    """One module of the blocks' class whose variables are theirs stacked on a leading "layers" axis."""
    graphdef, first = nnx.split(layers[0])
    states = [first] + [nnx.split(layer)[1] for layer in layers[1:]]
    for i, state in enumerate(states[1:], 1):
        if jax.tree.structure(state) != jax.tree.structure(first):
            raise ValueError(f"block {i} differs in structure from block 0: blocks must be uniform to stack")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    for _, var in nnx.to_flat_state(stacked):
        axes = var.get_metadata().get("out_sharding")
        if axes is not None:
            var.set_metadata(out_sharding=(LAYER_AXIS,) + tuple(axes))
    return nnx.merge(graphdef, stacked)


def is_stacked(var: nnx.Variable) -> bool:
    """Whether a variable holds one slice per block (its first logical axis is "layers")."""
    axes = var.get_metadata().get("out_sharding")
    return bool(axes) and axes[0] == LAYER_AXIS


def unrolled_path(path: str, index: int) -> str:
    """Block `index`'s name for a stacked path: `model.layers.mlp.kernel` -> `model.layers.3.mlp.kernel`."""
    named, count = _CONTAINER.subn(lambda m: f"{m.group(1)}{m.group(2)}.{index}{m.group(3)}", path, count=1)
    if not count:
        raise ValueError(f"{path}: a stacked parameter must sit under a `layers` or `blocks` module")
    return named


def layer_paths(path: str, var: nnx.Variable) -> list[str]:
    """The per-layer (checkpoint) names of variable `var` at `path`: its own, or each layer's when stacked."""
    if not is_stacked(var):
        return [path]
    return [unrolled_path(path, i) for i in range(var.get_value().shape[0])]


def scan_layers(stacked: nnx.Module, body: Callable, carry, xs=None, *, remat_policy=None, remat: bool = False):
    """`jax.lax.scan` of `body(block, carry, x) -> (carry, y)` over the blocks of `stacked`.

    `xs` (a pytree with a leading axis of L, or None) gives each block its own inputs (a KV
    cache slice, a per-block flag). With `remat`, each block runs under `jax.checkpoint` with
    `remat_policy` (models.qwen2.REMAT_POLICIES): the backward pass recomputes what it does not save.
    The blocks' state is split off and merged per step, a pure function (nothing is written back).
    """
    graphdef, state = nnx.split(stacked)

    def step(carry, inputs):
        block_state, x = inputs
        return body(nnx.merge(graphdef, block_state), carry, x)

    if remat:
        step = jax.checkpoint(step, policy=remat_policy, prevent_cse=False)  # scan already keeps CSE out
    return jax.lax.scan(step, carry, (state, xs))


def with_scan_layers(config, scan_layers: bool):
    """A model config (a dataclass) with the layers of every part that has them (language model,
    towers: their `scan_layers` field) scanned or not."""
    parts = {f.name: with_scan_layers(getattr(config, f.name), scan_layers) for f in dataclasses.fields(config)
             if dataclasses.is_dataclass(getattr(config, f.name))}
    if any(f.name == "scan_layers" for f in dataclasses.fields(config)):
        parts["scan_layers"] = scan_layers
    return dataclasses.replace(config, **parts)


def layer_count(stacked: nnx.Module) -> int:
    """L, the number of blocks stacked in `stacked`."""
    leaves = [var for _, var in nnx.to_flat_state(nnx.state(stacked)) if is_stacked(var)]
    if not leaves:
        raise ValueError(f"{type(stacked).__name__} holds no stacked variables")
    return int(leaves[0].get_value().shape[0])
