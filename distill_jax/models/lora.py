"""LoRA adapters on `Linear` layers, merge/unmerge, and export to PEFT format.

`apply_lora(model, LoraConfig(...), rngs=)` attaches an adapter to every
`Linear` whose attribute name is a target (default: the attention and MLP
projections). Adapter weights are `nnx.LoRAParam`, so the optimizer is built
`wrt=nnx.LoRAParam` and everything else stays frozen. y = W x + (alpha/r) B A x,
A kaiming-uniform and B zero at init (= PEFT's defaults).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.layers.linear import Linear
from distill_jax.layers.scan import CONTAINERS, LAYER_AXIS, is_stacked, layer_paths

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SHORT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
          "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scaling alpha/r), dropout on the adapter input, which Linears get one.

    target_modules: attribute names (short forms q,k,v,o,gate,up,down accepted).
    under: only modules whose path starts with this prefix; "" = the model's `lora_scope`
      (Qwen2-Audio's is "language_model", so its audio tower stays frozen).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    under: str = ""
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "target_modules", tuple(_SHORT.get(t, t) for t in self.target_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _kaiming_uniform_a_sqrt5(key, shape, dtype):
    """torch.nn.init.kaiming_uniform_(a=sqrt(5)) on a [r, in] weight: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / np.sqrt(shape[0])  # our A is [in, r]
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRA(nnx.Module):
    """The low-rank update of one Linear: (alpha/r) * dropout(x) @ lora_a @ lora_b.

    `keys`: one (A, B) key pair, or one per layer for a Linear of stacked (scanned) layers,
    whose adapters are stacked on the same leading "layers" axis.
    """

    def __init__(self, linear: Linear, config: LoraConfig, *, keys: list[tuple[jax.Array, jax.Array]],
                 rngs: nnx.Rngs):
        dtype = jnp.dtype(config.param_dtype)
        in_axis, out_axis = linear.axes
        a_shape, b_shape = (linear.in_features, config.rank), (config.rank, linear.out_features)
        a = [_kaiming_uniform_a_sqrt5(key_a, a_shape, dtype) for key_a, _ in keys]
        b = [nnx.initializers.zeros(key_b, b_shape, dtype) for _, key_b in keys]
        layer_axis = ()
        if is_stacked(linear.kernel):
            a, b, layer_axis = jnp.stack(a), jnp.stack(b), (LAYER_AXIS,)
        else:
            (a,), (b,) = a, b
        self.lora_a = nnx.LoRAParam(a, out_sharding=layer_axis + (in_axis, "lora_rank"), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(b, out_sharding=layer_axis + ("lora_rank", out_axis), eager_sharding=False)
        self.scaling = config.scaling
        if config.dropout > 0 and layer_axis:
            raise NotImplementedError("LoRA dropout on scanned layers (set models.scan_layers=False, or dropout=0)")
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None
        self.merged = False

    def delta(self) -> jax.Array:
        """The dense update (alpha/r) A B, [in, out] (per layer, [L, in, out], when stacked)."""
        return (self.lora_a[...] @ self.lora_b[...]) * self.scaling

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout is not None:
            x = self.dropout(x)
        return ((x @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)) * self.scaling


def lora_layers(model: nnx.Module):
    """(path, Linear) for every Linear that carries an adapter (a stacked Linear once)."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear) and module.lora is not None:
            yield ".".join(str(p) for p in path), module


def _unrolled_order(path: tuple, index: int | None) -> tuple:
    """`path` as the unrolled model's traversal visits it: block `index`'s number after `layers`/`blocks`."""
    if index is None:
        return path
    at = next(i for i, p in enumerate(path) if p in CONTAINERS)
    return path[:at + 1] + (index,) + path[at + 1:]


def apply_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Attach adapters in place to the target Linears of `model`; returns `model`.

    Keys are drawn in the order an unrolled model visits its Linears (layer 0's projections,
    then layer 1's, ...), so one seed gives the same adapters whether the layers are scanned or not.
    """
    under = lora_scope(model, config)
    targets = []
    for path, module in list(nnx.iter_modules(model)):
        name = ".".join(str(p) for p in path)
        if not (isinstance(module, Linear) and path and path[-1] in config.target_modules):
            continue
        chosen = [n.startswith(under) for n in layer_paths(name, module.kernel)]
        if any(chosen) and not all(chosen):
            raise ValueError(f"under={under!r} selects some layers of the scanned (stacked) {name}: adapters "
                             "go on all of its layers or none (load the model with scan_layers=False)")
        if all(chosen):
            if module.lora is not None:
                raise ValueError(f"{name} already has a LoRA adapter")
            targets.append((path, module))
    if not targets:
        raise ValueError(f"no Linear named one of {config.target_modules} under {under!r} in "
                         f"{type(model).__name__}")
    slots = []
    for t, (path, module) in enumerate(targets):
        layers = module.kernel[...].shape[0] if is_stacked(module.kernel) else None
        slots += [(_unrolled_order(path, i), t) for i in (range(layers) if layers else [None])]
    keys = {t: [] for t in range(len(targets))}
    for _, t in sorted(slots, key=lambda slot: slot[0]):
        keys[t].append((rngs.params(), rngs.params()))
    for t, (_, module) in enumerate(targets):
        module.lora = LoRA(module, config, keys=keys[t], rngs=rngs)
    model.lora_config = config
    return model


def lora_scope(model: nnx.Module, config: LoraConfig) -> str:
    """The module prefix adapters go under: the config's, else the model's own (`lora_scope`)."""
    return config.under or getattr(model, "lora_scope", "")


def merge_lora(model: nnx.Module) -> None:
    """Fold every adapter into its base kernel (W += (alpha/r) A B); adapters then stay idle."""
    for path, linear in lora_layers(model):
        if linear.kernel_scale is not None:
            raise ValueError(f"{path}: an adapter cannot be merged into an int8 kernel (models.quantize)")
        if not linear.lora.merged:
            linear.kernel[...] = (linear.kernel[...] + linear.lora.delta()).astype(linear.kernel.dtype)
            linear.lora.merged = True


def unmerge_lora(model: nnx.Module) -> None:
    """Undo `merge_lora` (W -= (alpha/r) A B); adapters are applied on the fly again."""
    for _, linear in lora_layers(model):
        if linear.lora.merged:
            linear.kernel[...] = (linear.kernel[...] - linear.lora.delta()).astype(linear.kernel.dtype)
            linear.lora.merged = False


def _peft_target_regex(model: nnx.Module, key_map, adapted: list[str]) -> str:
    """A regex PEFT full-matches against module names that selects exactly the `adapted` ones.

    Layer indices are generalised (`layers\\.\\d+\\.`) when that still selects exactly them;
    otherwise the names are listed one by one.
    """
    candidates = [key_map.peft_module(name) for path, module in nnx.iter_modules(model)
                  if isinstance(module, Linear) and path
                  for name in layer_paths(".".join(str(p) for p in path), module.kernel)]
    patterns = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in adapted})
    compact = "^(?:" + "|".join(patterns) + ")$"
    if sorted(n for n in candidates if re.fullmatch(compact, n)) == sorted(adapted):
        return compact
    return "^(?:" + "|".join(re.escape(n) for n in sorted(adapted)) + ")$"


def export_peft(model: nnx.Module, out_dir: str, *, base_model_name_or_path: str | None = None) -> str:
    """Write `adapter_config.json` + `adapter_model.safetensors` for `peft.PeftModel.from_pretrained`.

    PEFT stores A as [r, in] and B as [out, r] under
    `base_model.model.<HF module name>.lora_{A,B}.weight`.
    """
    from safetensors.numpy import save

    from distill_jax import multihost
    from distill_jax.convert import key_map_for

    config: LoraConfig = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("model has no LoRA adapters (apply_lora first)")
    key_map = key_map_for(model)
    tensors, module_names = {}, []
    for path, linear in lora_layers(model):
        if linear.lora.merged:
            raise ValueError(f"{path}: unmerge LoRA before exporting the adapter")
        lora_a = np.asarray(multihost.to_host(linear.lora.lora_a[...]), np.float32)
        lora_b = np.asarray(multihost.to_host(linear.lora.lora_b[...]), np.float32)
        names = layer_paths(path, linear.kernel)  # the module's per-layer names: its kernel's
        if not is_stacked(linear.kernel):
            lora_a, lora_b = lora_a[None], lora_b[None]
        for name, a, b in zip(names, lora_a, lora_b):  # one adapter per layer of a stacked Linear
            hf_module = key_map.peft_module(name)
            module_names.append(hf_module)
            prefix = f"base_model.model.{hf_module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.T)
    if lora_scope(model, config):
        target_modules = _peft_target_regex(model, key_map, module_names)
    else:
        target_modules = sorted({name.rpartition(".")[2] for name in module_names})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": target_modules, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    out = multihost.path(out_dir)  # every host gathers the adapters; process 0 writes the directory whole
    with multihost.atomic_dir(out, last="adapter_model.safetensors") as staging:
        pathlib.Path(staging, "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        pathlib.Path(staging, "adapter_model.safetensors").write_bytes(save(tensors))
    multihost.sync(f"export_peft {out}")
    return str(out_dir)
