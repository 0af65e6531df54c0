"""Checkpoint conversion: Hugging Face (and PANN) checkpoints <-> Flax NNX models.

`load_hf(path)` reads `config.json`, picks the model family from `model_type`,
builds the model abstractly (no memory), and streams every tensor of the
safetensors checkpoint into its (sharded) place through the family's key map.
`save_hf(model, path)` writes the reverse (config.json + model.safetensors in the hub's
key names), so models trained here (the toy world's warm start) load through the same
`load_hf` path as real checkpoints, and in transformers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from distill_jax.convert.keymap import CheckpointMismatchError, KeyMap, LoadReport, load_state
from distill_jax.convert.safetensors_io import SafetensorsCheckpoint
from distill_jax.convert.pann import load_pann  # PANN Cnn14 .pth / safetensors -> models.cnn14.Cnn14
from distill_jax.layers.quantize import check_quantize, is_quantized, quantize_linears
from distill_jax.layers.scan import is_stacked, layer_paths, with_scan_layers
from distill_jax.models import qwen2, qwen2_5_omni, qwen2_audio, qwen2_vl
from distill_jax.sharding import abstract_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """How to build one model family from a HF config dict and where its keys live."""

    config_from_hf: Callable[[dict[str, Any], Any], Any]  # (hf dict, dtype) -> family config
    model_cls: type
    key_map: Callable[[Any], KeyMap]  # family config -> key map


def _qwen2_key_map(config: qwen2.Qwen2Config) -> KeyMap:
    ignore = [r"\.rotary_emb\.inv_freq$"]
    if config.tie_word_embeddings:
        ignore.append(r"^lm_head\.weight$")  # some tied checkpoints still carry the copy
    return KeyMap(prefixes=(("", ("",)),), ignore=tuple(ignore))


def _qwen2_audio_key_map(config: qwen2_audio.Qwen2AudioConfig) -> KeyMap:
    # Checkpoints use our names; the transformers-5 module tree nests the LM under `model.`.
    ignore = [r"\.rotary_emb\.inv_freq$"]
    if config.text.tie_word_embeddings:
        ignore.append(r"^language_model\.lm_head\.weight$")  # the copy save_hf writes (equal: load_hf checks)
    return KeyMap(
        prefixes=(("", ("",)),), ignore=tuple(ignore),
        peft_prefixes=(("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
                       ("audio_tower.", "model.audio_tower."),
                       ("multi_modal_projector.", "model.multi_modal_projector.")))


def _conv3d_as_matmul(x):
    """Conv3d weight [out, C, T, P, P] -> matmul kernel [C*T*P*P, out] (patches are flattened C, T, P, P)."""
    return x.reshape(x.shape[0], -1).T


def _matmul_as_conv3d(vision: qwen2_vl.Qwen2VLVisionConfig):
    shape = (vision.embed_dim, vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
    return lambda x: x.T.reshape(shape)


def _qwen2_vl_key_map(config: qwen2_vl.Qwen2VLConfig) -> KeyMap:
    ignore = [r"\.rotary_emb\.inv_freq$"]
    if config.text.tie_word_embeddings:
        ignore.append(r"^lm_head\.weight$")
    return KeyMap(
        # hub checkpoints: visual.*, model.*, lm_head.*; transformers 5: model.visual.*, model.language_model.*
        prefixes=(("visual.", ("visual.", "model.visual.")),
                  ("language_model.model.", ("model.", "model.language_model.")),
                  ("language_model.lm_head", ("lm_head",))),
        ignore=tuple(ignore),
        transforms={r"visual\.patch_embed\.proj\.kernel": _conv3d_as_matmul},
        inverse_transforms={r"visual\.patch_embed\.proj\.kernel": _matmul_as_conv3d(config.vision)},
        peft_prefixes=(("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
                       ("visual.", "model.visual.")))


def _qwen2_5_omni_key_map(config: qwen2_5_omni.Qwen2_5OmniConfig, prefix: str = "") -> KeyMap:
    """Thinker keys as `save_pretrained` writes them (`audio_tower.`, `visual.`, `model.`, `lm_head`);
    the full Qwen2.5-Omni checkpoint puts them under `thinker.` beside the speech decoder, skipped."""
    ignore = [r"\.rotary_emb\.inv_freq$"]
    if config.text.tie_word_embeddings:
        ignore.append(rf"^{prefix}lm_head\.weight$")
    skip = ((r"^talker\.", "the talker (speech-token decoder)"),
            (r"^token2wav\.", "token2wav (speech synthesis)")) if prefix else ()
    return KeyMap(
        prefixes=(("audio_tower.", (f"{prefix}audio_tower.",)), ("visual.", (f"{prefix}visual.",)),
                  ("language_model.model.", (f"{prefix}model.",)), ("language_model.lm_head", (f"{prefix}lm_head",))),
        ignore=tuple(ignore), skip=skip,
        transforms={r"visual\.patch_embed\.proj\.kernel": _conv3d_as_matmul},
        inverse_transforms={r"visual\.patch_embed\.proj\.kernel": _matmul_as_conv3d(config.vision)},
        peft_prefixes=(("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
                       ("audio_tower.", "model.audio_tower."), ("visual.", "model.visual.")))


def _omni_config(d, dtype) -> qwen2_5_omni.Qwen2_5OmniConfig:
    return qwen2_5_omni.Qwen2_5OmniConfig.from_hf(d, dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)


FAMILIES: dict[str, Family] = {
    "qwen2": Family(
        config_from_hf=lambda d, dtype: qwen2.Qwen2Config.from_hf(
            d, dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name),
        model_cls=qwen2.Qwen2ForCausalLM,
        key_map=_qwen2_key_map,
    ),
    "qwen2_audio": Family(
        config_from_hf=lambda d, dtype: qwen2_audio.Qwen2AudioConfig.from_hf(
            d, dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name),
        model_cls=qwen2_audio.Qwen2AudioForConditionalGeneration,
        key_map=_qwen2_audio_key_map,
    ),
    "qwen2_vl": Family(
        config_from_hf=lambda d, dtype: qwen2_vl.Qwen2VLConfig.from_hf(
            d, dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name),
        model_cls=qwen2_vl.Qwen2VLForConditionalGeneration,
        key_map=_qwen2_vl_key_map,
    ),
    "qwen2_5_omni_thinker": Family(
        config_from_hf=_omni_config,
        model_cls=qwen2_5_omni.Qwen2_5OmniThinker,
        key_map=_qwen2_5_omni_key_map,
    ),
    # The full Qwen/Qwen2.5-Omni-7B checkpoint: its thinker is loaded, the speech decoder skipped.
    "qwen2_5_omni": Family(
        config_from_hf=_omni_config,  # reads the thinker_config
        model_cls=qwen2_5_omni.Qwen2_5OmniThinker,
        key_map=lambda config: _qwen2_5_omni_key_map(config, prefix="thinker."),
    ),
}


_AUDIO_LM_HEAD, _AUDIO_EMBED = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"


def read_hf_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    with open(file) as f:
        return json.load(f)


def family_of(hf_config: dict[str, Any]) -> Family:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; known: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def key_map_for(model: nnx.Module) -> KeyMap:
    """The key map of a model built by this module (used by the PEFT export)."""
    for family in FAMILIES.values():
        if isinstance(model, family.model_cls):
            return family.key_map(model.config)
    raise ValueError(f"no key map for {type(model).__name__}")


def with_language_model_options(config, **options):
    """`config` with its language model's run options replaced (`remat`, `attention_impl`)."""
    if hasattr(config, "text"):
        return dataclasses.replace(config, text=dataclasses.replace(config.text, **options))
    return dataclasses.replace(config, **options)


def load_hf(path: str, *, dtype=jnp.float32, mesh: Mesh | None = None, remat: str = "none",
            attention_impl: str | None = None, scan_layers: bool = True, quantize: str | None = None,
            vision_query_chunk: int | None = None) -> nnx.Module:
    """Load a Hugging Face checkpoint directory as our model, parameters in `dtype`, sharded on `mesh`.

    `remat` and `attention_impl` set how its language model runs (models.qwen2.REMAT_POLICIES,
    layers.attention.IMPLEMENTATIONS); the audio and vision towers always run "xla". `scan_layers`:
    every part's layers stacked and run by one scan (layers.scan), or unrolled. `quantize="int8"`:
    every Linear's kernel int8 with per-channel scales (layers.quantize), each tensor quantized on
    its devices as it is read (embedding tables stay in `dtype`). `vision_query_chunk`: the vision
    tower's attention scores that many queries at a time (layers.attention; the same values, less
    memory for long frames). `path` may
    be a hub id ("Qwen/Qwen2-Audio-7B-Instruct"), fetched into the Hugging Face cache (hub.py).
    Checkpoint parts the model does not use (the full Qwen2.5-Omni's talker and token2wav) are
    skipped and logged with their tensor counts (a `LoadReport`).
    """
    from distill_jax.hub import checkpoint_dir

    path = checkpoint_dir(path)
    hf_config = read_hf_config(path)
    family = family_of(hf_config)
    config = with_language_model_options(family.config_from_hf(hf_config, dtype), remat=remat,
                                         attention_impl=attention_impl)
    config = with_scan_layers(config, scan_layers)
    if vision_query_chunk is not None and hasattr(config, "vision"):
        config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, query_chunk=vision_query_chunk))
    ckpt = SafetensorsCheckpoint(path)
    if family is FAMILIES["qwen2_audio"] and config.text.tie_word_embeddings and _AUDIO_LM_HEAD in ckpt \
            and not np.array_equal(ckpt.get(_AUDIO_LM_HEAD), ckpt.get(_AUDIO_EMBED)):
        # transformers' Qwen2-Audio never ties: its lm_head is the checkpoint's, whatever the config says
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, tie_word_embeddings=False))
    check_quantize(quantize)
    abstract = abstract_model(lambda: family.model_cls(config, rngs=nnx.Rngs(0)))
    if quantize == "int8":
        quantize_linears(abstract)
    report = LoadReport()
    model = load_state(abstract, ckpt, family.key_map(config), dtype=dtype, mesh=mesh, report=report)
    if report.skipped:
        log.warning("%s: %s", path, report)  # parts of the checkpoint this model does not use
    return model


def save_hf(model: nnx.Module, path: str, *, tokenizer_dir: str | None = None) -> str:
    """Write `model`'s base parameters as a Hugging Face checkpoint directory (float32).

    LoRA adapters are not written (export them with `models.lora.export_peft`); tied
    embeddings are written once, except for Qwen2-Audio, which transformers never ties (its
    lm_head is written as a copy, so the checkpoint loads there with the same logits).
    `tokenizer_dir`'s files are copied alongside, so the directory is self-contained like a hub checkpoint. Every host calls it (sharded parameters
    are gathered); process 0 writes the directory whole (multihost.atomic_dir: a local directory
    is renamed into place; on gs:// config.json goes last), so a directory with config.json is
    complete. `path` may be gs://.
    """
    from safetensors.numpy import save

    from distill_jax import multihost

    if is_quantized(model):
        raise ValueError("save_hf writes float checkpoints; this model's Linears are int8 (load it without quantize)")
    key_map = key_map_for(model)
    tensors = {}
    for key_path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(var, nnx.LoRAParam):
            continue
        value = np.asarray(multihost.to_host(var.get_value()), np.float32)
        # a stacked parameter of scanned layers is written as one tensor per layer, as checkpoints hold it
        names = layer_paths(".".join(str(p) for p in key_path), var)
        for name, layer_value in zip(names, value if is_stacked(var) else [value]):
            key, fn = key_map.checkpoint_key(name)
            tensors[key] = np.ascontiguousarray(fn(layer_value))
    if isinstance(model, qwen2_audio.Qwen2AudioForConditionalGeneration) and model.config.text.tie_word_embeddings:
        tensors[_AUDIO_LM_HEAD] = tensors[_AUDIO_EMBED]  # transformers' Qwen2-Audio never ties: it needs the copy
    out = multihost.path(path)
    with multihost.atomic_dir(out, last="config.json") as staging:
        staging = pathlib.Path(staging)
        (staging / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
        if tokenizer_dir is not None:
            for source in multihost.path(tokenizer_dir).iterdir():
                if source.is_file():
                    (staging / source.name).write_bytes(source.read_bytes())
        (staging / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2, sort_keys=True))
    multihost.sync(f"save_hf {out}")
    return str(out)


__all__ = ["save_hf", "CheckpointMismatchError", "KeyMap", "LoadReport", "load_hf", "read_hf_config", "key_map_for", "FAMILIES",
           "load_pann"]
