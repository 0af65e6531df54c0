"""Declarative checkpoint key maps and the streaming, bijection-checked loader.

A `KeyMap` says, for every parameter path of our model, which checkpoint key(s)
may hold it and which per-tensor transform turns the tensor into our layout.
`load_state` fills an abstract model's state tensor by tensor, each straight
into its sharded place (`jax.make_array_from_callback`, each device reading its slice), and
refuses a checkpoint whose keys do not match ours one to one. A stacked parameter of
scanned layers (layers.scan) is read from its layers' tensors, each checked on its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from distill_jax import sharding as sharding_lib
from distill_jax.convert.safetensors_io import SafetensorsCheckpoint
from distill_jax.layers.quantize import quantize_kernel
from distill_jax.layers.scan import is_stacked, layer_paths

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """torch.nn.Linear weight [out, in] -> our kernel [in, out] (a view; no copy)."""
    return x.T


# Our leaf name -> (checkpoint leaf name, transform).
LEAVES: dict[str, tuple[str, Transform]] = {
    "kernel": ("weight", transpose),
    "embedding": ("weight", identity),
    "scale": ("weight", identity),
    "bias": ("bias", identity),
}


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model one to one."""


@dataclass(frozen=True)
class KeyMap:
    """Module-prefix renames (ours -> alternatives in checkpoints) plus leaf renames.

    prefixes: (our prefix, [checkpoint prefixes]) tried in order; the first whose
      key exists is used (e.g. Qwen2-VL's `model.` vs `model.language_model.` naming).
    ignore: regexes of checkpoint keys that are known to carry nothing we need.
    skip: (regex, what it is) of checkpoint parts deliberately not loaded (e.g. Qwen2.5-Omni's
      speech decoder); unlike `ignore` they are counted in the load report.
    leaves: our leaf name -> (checkpoint leaf name, transform).
    transforms: per-parameter transform overrides (e.g. a Conv3d weight that we store as a matmul kernel).
    """

    prefixes: Sequence[tuple[str, Sequence[str]]] = (("", ("",)),)
    ignore: Sequence[str] = ()
    skip: Sequence[tuple[str, str]] = ()
    leaves: dict[str, tuple[str, Transform]] = field(default_factory=lambda: dict(LEAVES))
    transforms: dict[str, Transform] = field(default_factory=dict)  # our-path regex -> transform override
    inverse_transforms: dict[str, Transform] = field(default_factory=dict)  # the same paths, ours -> checkpoint
    # Module names of the transformers model object (what PEFT wraps), where they differ from
    # the checkpoint keys (transformers 5 nests e.g. Qwen2-Audio's LM as `model.language_model`).
    peft_prefixes: Sequence[tuple[str, str]] | None = None

    def hf_modules(self, module_path: str) -> list[str]:
        """Checkpoint module names that our module `module_path` may have."""
        for ours, theirs in self.prefixes:
            if module_path.startswith(ours):
                return [t + module_path[len(ours):] for t in theirs]
        raise KeyError(f"{module_path}: no prefix rule in the key map")

    def peft_module(self, module_path: str) -> str:
        """The transformers module name of our module `module_path` (for PEFT adapters)."""
        if self.peft_prefixes is None:
            return self.hf_modules(module_path)[0]
        for ours, theirs in self.peft_prefixes:
            if module_path.startswith(ours):
                return theirs + module_path[len(ours):]
        raise KeyError(f"{module_path}: no PEFT module rule in the key map")

    def candidates(self, path: str) -> tuple[list[str], Transform]:
        """Checkpoint keys that may hold our parameter `path`, and its transform."""
        module, _, leaf = path.rpartition(".")
        if leaf not in self.leaves:
            raise KeyError(f"{path}: no key-map rule for leaf {leaf!r}")
        hf_leaf, fn = self.leaves[leaf]
        fn = next((t for pattern, t in self.transforms.items() if re.fullmatch(pattern, path)), fn)
        return [f"{m}.{hf_leaf}" for m in self.hf_modules(module)], fn

    def checkpoint_key(self, path: str) -> tuple[str, Transform]:
        """The key our parameter `path` is written under (the first alternative) and the
        transform from our layout back to the checkpoint's (for `save_hf`)."""
        keys, fn = self.candidates(path)
        if any(re.fullmatch(pattern, path) for pattern in self.transforms):
            fn = next((t for pattern, t in self.inverse_transforms.items() if re.fullmatch(pattern, path)), None)
            if fn is None:
                raise ValueError(f"{path}: its transform has no inverse in the key map")
        elif fn not in (identity, transpose):  # both are their own inverse
            raise ValueError(f"{path}: leaf transform {fn.__name__} has no known inverse")
        return keys[0], fn

    def ignored(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.ignore)

    def skipped(self, key: str) -> str | None:
        """What `key` belongs to if it is in a part deliberately not loaded, else None."""
        return next((what for pattern, what in self.skip if re.search(pattern, key)), None)


def raise_on_mismatch(what: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    """CheckpointMismatchError listing every missing, unexpected and mis-shaped key, if there is any."""
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if mismatched:
        parts.append(f"mis-shaped keys ({len(mismatched)}): " + "; ".join(mismatched))
    if parts:
        raise CheckpointMismatchError(f"{what}: " + " | ".join(parts))


def _kind(dtype) -> str:
    """"float", "int" or "bool": a checkpoint tensor must be of its parameter's kind."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "bool"
    return "float" if jnp.issubdtype(dtype, jnp.floating) else "int"


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


@dataclass
class LoadReport:
    """What `load_state` read: tensors loaded, and the tensors of each skipped part (`KeyMap.skip`)."""

    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        parts += [f"skipped {n} tensors of {what}" for what, n in sorted(self.skipped.items())]
        return "; ".join(parts)


def load_state(abstract_model: nnx.Module, ckpt: SafetensorsCheckpoint, key_map: KeyMap, *,
               dtype, mesh: Mesh | None = None, report: LoadReport | None = None) -> nnx.Module:
    """A concrete model with every base parameter of `abstract_model` read from `ckpt`.

    LoRA parameters are not in base checkpoints and are left out (apply LoRA after loading).
    `report`, when given, is filled in (tensors loaded; skipped parts with their counts).
    """
    graphdef, state = nnx.split(abstract_model)
    flat = list(nnx.to_flat_state(state))
    # int8 Linears (layers.quantize): their kernel is read in `dtype` and quantized on its devices
    scale_vars = {path[:-1]: var for path, var in flat if path[-1] == "kernel_scale"}
    plan, missing, mismatched, used = [], [], [], set()
    for path, var in flat:
        name = _path_str(path)
        if isinstance(var, nnx.LoRAParam):
            raise ValueError(f"{name}: load the base model before applying LoRA")
        if not isinstance(var, nnx.Param):
            raise CheckpointMismatchError(f"{name}: non-parameter state {type(var).__name__} has no checkpoint rule")
        if path[-1] == "kernel_scale":
            continue
        quantized = path[-1] == "kernel" and path[:-1] in scale_vars
        shape = tuple(var.get_value().shape)
        # A stacked (scanned) parameter is one checkpoint tensor per layer; each is checked on its own.
        expected = shape[1:] if is_stacked(var) else shape
        keys, problems = [], 0
        for layer_name in layer_paths(name, var):
            candidates, fn = key_map.candidates(layer_name)
            key = next((k for k in candidates if k in ckpt), None)
            if key is None:
                missing.append(f"{candidates[0]} (for {layer_name})")
                problems += 1
                continue
            used.add(key)
            keys.append(key)
            got = tuple(fn(np.broadcast_to(np.zeros((), np.uint8), ckpt.shape(key))).shape)
            stored, wanted = ckpt.tensors[key].dtype, dtype if quantized else var.get_value().dtype
            if got != expected:
                mismatched.append(f"{key}: checkpoint shape {ckpt.shape(key)} -> {got}, model {layer_name} expects "
                                  f"{expected}")
                problems += 1
            elif _kind(stored) != _kind(wanted):  # bool/int values cast into float weights would be silently wrong
                mismatched.append(f"{key}: checkpoint dtype {stored} ({_kind(stored)}), model {layer_name} expects "
                                  f"{np.dtype(wanted)} ({_kind(wanted)})")
                problems += 1
        if not problems:
            plan.append((path, var, keys, fn, is_stacked(var), quantized))
    skipped: dict[str, int] = {}
    unexpected = []
    for k in ckpt.keys():
        if k in used:
            continue
        what = key_map.skipped(k)
        if what is not None:
            skipped[what] = skipped.get(what, 0) + 1
        elif not key_map.ignored(k):
            unexpected.append(k)
    unexpected.sort()
    raise_on_mismatch("checkpoint does not match the model", missing, unexpected, mismatched)

    specs = sharding_lib.param_partition_specs(state, mesh) if mesh is not None else None
    spec_of = dict(nnx.to_flat_state(specs)) if specs is not None else {}
    device = jax.local_devices()[0]
    filled = []
    total = sum(ckpt.nbytes(key) for _, _, keys, _, _, _ in plan for key in keys)
    progress = tqdm.tqdm(total=total, unit="B", unit_scale=True, leave=False, desc=f"loading {len(plan)} tensors",
                         disable=total < (1 << 30) or jax.process_index() > 0)  # shown for checkpoints over 1 GiB
    target_of = lambda p: NamedSharding(mesh, spec_of[p]) if mesh is not None else SingleDeviceSharding(device)
    for path, var, keys, fn, stacked, quantized in plan:
        shape = tuple(var.get_value().shape)
        target = target_of(path)

        def read_one(key, index, fn):
            if fn is identity:  # the shard's slice alone is read
                return ckpt.read(key, index).astype(dtype)
            if fn is transpose:
                return np.ascontiguousarray(ckpt.read(key, index[::-1]).T).astype(dtype)
            return np.ascontiguousarray(fn(ckpt.get(key))[index]).astype(dtype)  # small reshaped tensors

        def read(index, keys=keys, fn=fn, stacked=stacked):
            if not stacked:
                return read_one(keys[0], index, fn)
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            return np.stack([read_one(keys[i], index[1:], fn) for i in range(len(keys))[index[0]]])

        array = jax.make_array_from_callback(shape, target, read)
        if quantized:
            scale_path = path[:-1] + ("kernel_scale",)
            qvalue, scale = jax.jit(quantize_kernel, static_argnums=1,
                                    out_shardings=(target, target_of(scale_path)))(array, stacked)
            del array
            filled += [(path, var.replace(qvalue)), (scale_path, scale_vars[path[:-1]].replace(scale))]
        else:
            filled.append((path, var.replace(array)))
        progress.update(sum(ckpt.nbytes(key) for key in keys))
        progress.set_postfix_str(f"{len(filled)}/{len(plan)} tensors", refresh=False)
    progress.close()
    if report is not None:
        report.loaded, report.skipped = len(filled), skipped
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
