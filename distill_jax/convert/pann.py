"""PANN checkpoints (`Cnn14_mAP=0.431.pth`, `Cnn14_16k_mAP=0.438.pth`) -> our Cnn14.

`load_pann(path)` reads a PyTorch `.pth` (`{"model": state_dict, ...}` or a bare state
dict) without running pickled code (`convert.torch_pickle.read_pth`), writes a
safetensors copy next to it (PANN key names, the Cnn14Config in its metadata) so that
later runs need no torch, and fills a Cnn14 one tensor per parameter / running
statistic. `load_pann(copy.safetensors)` reads that copy.

The front end's constants in the state dict (`spectrogram_extractor.stft.conv_real/
conv_imag.weight`, `logmel_extractor.melW`) are not loaded but checked against the ones
our config computes, so a checkpoint for another sample rate or mel range is an error,
not silently wrong features. The config comes from `config=`, else the copy's metadata,
else the state dict's shapes plus the preset with that window size (the hop size is not
in the state dict: 1024 -> cnn14_32k's 320, 512 -> cnn14_16k's 160).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from distill_jax import sharding as sharding_lib
from distill_jax.convert.keymap import CheckpointMismatchError, KeyMap, identity, raise_on_mismatch
from distill_jax.convert.safetensors_io import SafetensorsCheckpoint
from distill_jax.convert.torch_pickle import read_pth
from distill_jax.models.cnn14 import NUM_BLOCKS, Cnn14, Cnn14Config, default_rngs, mel_filters, stft_basis

METADATA_KEY = "cnn14_config"
STFT_REAL = "spectrogram_extractor.stft.conv_real.weight"
STFT_IMAG = "spectrogram_extractor.stft.conv_imag.weight"
MEL = "logmel_extractor.melW"
FRONT_END_TOLERANCE = 1e-5  # float32 roundings of the same float64 constants; a wrong config differs by >1e-2


def torch_to_ours(x: np.ndarray) -> np.ndarray:
    """Linear weight [out, in] -> [in, out]; Conv2d weight [out, in, kh, kw] -> [kh, kw, in, out]."""
    if x.ndim == 2:
        return x.T
    if x.ndim == 4:
        return x.transpose(2, 3, 1, 0)
    raise ValueError(f"a kernel must be 2-D or 4-D, got shape {x.shape}")


KEY_MAP = KeyMap(
    leaves={"kernel": ("weight", torch_to_ours), "scale": ("weight", identity), "bias": ("bias", identity),
            "mean": ("running_mean", identity), "var": ("running_var", identity)},
    ignore=(r"\.num_batches_tracked$",),
)


def state_dict_of(obj: Any, path: str) -> dict[str, np.ndarray]:
    """The state dict inside a loaded `.pth` object, every value checked to be an array."""
    if isinstance(obj, dict) and "model" in obj:
        obj, where = obj["model"], "['model']"
    else:
        where = ""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}{where}: expected a state dict (str -> tensor), got {type(obj).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{path}{where}: state dict entries that are not tensors: {', '.join(bad)}")
    return dict(obj)


def infer_config(state: dict[str, Any], path: str) -> Cnn14Config:
    """Widths from the tensors' shapes, the front end from the preset with the same window size."""
    if STFT_REAL not in state:
        raise CheckpointMismatchError(f"{path}: missing key {STFT_REAL}, so the window size is unknown; pass config=")
    window = int(state[STFT_REAL].shape[-1])
    presets = {1024: "cnn14_32k", 512: "cnn14_16k"}
    if window not in presets:
        raise ValueError(f"{path}: window size {window} ({STFT_REAL}) matches no preset (1024: cnn14_32k, "
                         "512: cnn14_16k); pass config=")
    fields: dict[str, Any] = {}
    shape = lambda key, dim: int(state[key].shape[dim]) if key in state else None  # noqa: E731
    channels = [shape(f"conv_block{i + 1}.conv1.weight", 0) for i in range(NUM_BLOCKS)]
    if None not in channels:
        fields["channels"] = tuple(channels)
    for name, key, dim in (("mel_bins", MEL, 1), ("embedding_dim", "fc1.weight", 0),
                           ("classes_num", "fc_audioset.weight", 0)):
        if shape(key, dim) is not None:
            fields[name] = shape(key, dim)
    return Cnn14Config.preset(presets[window], **fields)


def check_front_end(state: dict[str, np.ndarray], config: Cnn14Config, path: str) -> None:
    """The checkpoint's STFT and mel constants must be the ones `config` computes."""
    bins = config.window_size // 2 + 1
    basis = stft_basis(config.window_size)
    expected = {STFT_REAL: basis[:, :bins].T[:, None, :], STFT_IMAG: basis[:, bins:].T[:, None, :],
                MEL: mel_filters(config.sample_rate, config.window_size, config.mel_bins, config.fmin, config.fmax)}
    front = (f"sample_rate={config.sample_rate}, window_size={config.window_size}, mel_bins={config.mel_bins}, "
             f"fmin={config.fmin}, fmax={config.fmax}")
    for key, want in expected.items():
        got = np.asarray(state[key], np.float32)
        if got.shape != want.shape:
            raise CheckpointMismatchError(
                f"{path}: {key} has shape {got.shape}; the config ({front}) gives {want.shape}")
        diff = float(np.max(np.abs(got - want)))
        if diff > FRONT_END_TOLERANCE:
            raise CheckpointMismatchError(f"{path}: {key} differs from the config's ({front}) by up to {diff:.3g}: "
                                          "the checkpoint was made for another front end; pass its config=")


def write_safetensors(state: dict[str, np.ndarray], config: Cnn14Config, file: str) -> str:
    """Save a PANN state dict (PANN key names, float32 as stored) with the config in the metadata."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in state.items() if not KEY_MAP.ignored(k)}
    tmp = file + ".tmp"
    save_file(tensors, tmp, metadata={METADATA_KEY: config.to_json(), "format": "pann_cnn14"})
    os.replace(tmp, file)  # a crash mid-write never leaves a truncated copy under the real name
    return file


def _plan(abstract: Cnn14, keys, shape_of, path: str):
    """[(var path, checkpoint key, transform)] for every parameter and running statistic, or an error."""
    _, state, _ = nnx.split(abstract, (nnx.Param, nnx.BatchStat), ...)
    plan, missing, mismatched, used = [], [], [], set()
    for var_path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in var_path)
        candidates, fn = KEY_MAP.candidates(name)
        key = candidates[0]
        if key not in keys:
            missing.append(f"{key} (for {name})")
            continue
        used.add(key)
        want = tuple(var.get_value().shape)
        got = tuple(fn(np.broadcast_to(np.zeros((), np.uint8), shape_of(key))).shape)
        if got != want:
            mismatched.append(f"{key}: checkpoint shape {tuple(shape_of(key))} -> {got}, model {name} expects {want}")
            continue
        plan.append((var_path, key, fn))
    front = {STFT_REAL, STFT_IMAG, MEL}
    missing += [f"{k} (front-end constant)" for k in sorted(front) if k not in keys]
    unexpected = sorted(k for k in keys if k not in used and k not in front and not KEY_MAP.ignored(k))
    raise_on_mismatch(f"{path}: checkpoint does not match Cnn14", missing, unexpected, mismatched)
    return plan


def load_pann(path: str, config: Cnn14Config | str | None = None, *, write_copy: bool = True,
              copy_path: str | None = None, dtype=jnp.float32, mesh: Mesh | None = None, seed: int = 0) -> Cnn14:
    """Our Cnn14 with the weights and running statistics of a PANN checkpoint, in eval mode.

    Args:
        path: a `.pth` (PyTorch; read without executing code) or our `.safetensors` copy.
        config: a Cnn14Config or preset name; default: the copy's metadata, else inferred.
        write_copy / copy_path: for a `.pth`, write its safetensors copy (default
            `<path without extension>.safetensors`) so later loads need no torch.
        dtype: parameter dtype (running statistics stay float32).
        mesh: place every variable by `distill_jax.sharding`'s rules (default: one device).
        seed: seeds the dropout / SpecAugment streams used in train mode.

    Raises:
        CheckpointMismatchError: missing, unexpected or mis-shaped keys (all named), or
            front-end constants that differ from the config's.
        UnsafeCheckpointError / ValueError: the .pth pickles a non-tensor object, holds a
            non-tensor state-dict entry, or is not a checkpoint.
    """
    if isinstance(config, str):
        config = Cnn14Config.preset(config)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such PANN checkpoint")
    if path.endswith(".safetensors"):
        ckpt = SafetensorsCheckpoint(path)
        keys, shape_of, get = set(ckpt.keys()), ckpt.shape, ckpt.get
        written_with = ckpt.metadata().get(METADATA_KEY)
        if config is None and written_with is not None:
            config = Cnn14Config.from_dict(json.loads(written_with))
        front = {k: ckpt.get(k) for k in (STFT_REAL, STFT_IMAG, MEL) if k in ckpt}
        shapes = {k: np.broadcast_to(np.zeros((), np.uint8), ckpt.shape(k)) for k in keys}
        config = config or infer_config({**shapes, **front}, path)
    else:
        state = state_dict_of(read_pth(path), path)
        keys, shape_of, get = set(state), (lambda k: state[k].shape), state.__getitem__
        front = {k: state[k] for k in (STFT_REAL, STFT_IMAG, MEL) if k in state}
        config = config or infer_config(state, path)
    abstract = sharding_lib.abstract_model(lambda: Cnn14(config, rngs=default_rngs(seed)))
    plan = _plan(abstract, keys, shape_of, path)
    check_front_end(front, config, path)
    if not path.endswith(".safetensors") and write_copy:
        target = copy_path or os.path.splitext(path)[0] + ".safetensors"
        try:
            write_safetensors(state, config, target)
        except OSError as e:
            raise OSError(f"{path}: could not write its safetensors copy to {target} ({e}); "
                          "pass copy_path= or write_copy=False") from e

    graphdef, weights, _ = nnx.split(abstract, (nnx.Param, nnx.BatchStat), ...)
    specs = dict(nnx.to_flat_state(sharding_lib.param_partition_specs(weights, mesh))) if mesh is not None else {}
    device = SingleDeviceSharding(jax.local_devices()[0])
    flat_vars = dict(nnx.to_flat_state(weights))
    filled = []
    for var_path, key, fn in plan:
        var = flat_vars[var_path]
        target_dtype = jnp.float32 if isinstance(var, nnx.BatchStat) else dtype
        value = np.asarray(fn(np.asarray(get(key))), dtype=target_dtype)
        sharding = NamedSharding(mesh, specs[var_path]) if mesh is not None else device
        filled.append((var_path, var.replace(jax.device_put(value, sharding))))
    # The RNG streams (train-mode dropout / SpecAugment) are made concretely; jit drops the unused init.
    rngs = jax.jit(lambda: nnx.state(Cnn14(config, rngs=default_rngs(seed)), nnx.RngState))()
    if mesh is not None:
        rngs = jax.device_put(rngs, NamedSharding(mesh, PartitionSpec()))
    model = nnx.merge(graphdef, nnx.from_flat_state(filled), rngs)
    model.eval()
    return model
