"""Qwen2-Audio (= HF Qwen2AudioForConditionalGeneration) in Flax NNX: Whisper-style audio tower,
projector, and the Qwen2 decoder, with the audio embeddings merged into the `<|AUDIO|>` positions.

Module names follow the hub checkpoint keys (`audio_tower.layers.0.self_attn.k_proj`,
`multi_modal_projector.linear`, `language_model.model.layers.0...`, `language_model.lm_head`).

Short-clip encoding: Hugging Face pads every clip to 30 s (3000 mel frames) and masks
the padding. The tower here encodes however many mel frames it is given (a multiple of
4); a window that keeps every real frame plus the two frames after it
(`short_clip_frames`) gives exactly the padded path's embeddings at the real positions,
since the convolutions then see the same inputs and attention already ignores padding.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.audio import FRAMES_PER_TOKEN, MAX_FRAMES, num_audio_tokens, short_window
from distill_jax.layers.attention import attention
from distill_jax.layers.linear import Conv1d, Embed, Linear
from distill_jax.layers.norms import LayerNorm
from distill_jax.layers.scan import scan_layers, stack_layers
from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from distill_jax.sharding import constrain

# Hugging Face's Qwen2AudioEncoderConfig defaults (a published audio_config may omit them).
_AUDIO_DEFAULTS = dict(num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                       d_model=1280, max_source_positions=1500, activation_function="gelu",
                       scale_embedding=False)


@dataclasses.dataclass(frozen=True)
class Qwen2AudioEncoderConfig:
    """The Whisper-style audio tower (= HF Qwen2AudioEncoderConfig)."""

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    max_source_positions: int = 1500
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None
    scan_layers: bool = True  # the layers stacked and run by one lax.scan (layers.scan)

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"d_model={self.d_model} not divisible by "
                             f"encoder_attention_heads={self.encoder_attention_heads}")

    @property
    def max_frames(self) -> int:
        """Mel frames of a full 30 s window (HF requires exactly this many)."""
        return 2 * self.max_source_positions

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, defaults: dict[str, Any] | None = None, **overrides):
        """From an HF audio config dict, HF's defaults filled in (`defaults`: a family's own, e.g.
        Qwen2.5-Omni's); every field of `cls` but the numerics is read."""
        d = {**(defaults or _AUDIO_DEFAULTS), **{k: v for k, v in hf.items() if v is not None}}
        if d["activation_function"] != "gelu":
            raise ValueError(f"audio tower activation_function must be 'gelu', got {d['activation_function']!r}")
        if d["scale_embedding"]:
            raise NotImplementedError("audio tower scale_embedding=true is not supported")
        keys = [f.name for f in dataclasses.fields(cls) if f.name not in ("dtype", "param_dtype", "attention_impl",
                                                                       "scan_layers")]
        return cls(**{**{k: d[k] for k in keys}, **overrides})

    def to_hf(self) -> dict[str, Any]:
        return dict(model_type="qwen2_audio_encoder", num_mel_bins=self.num_mel_bins,
                    encoder_layers=self.encoder_layers, encoder_attention_heads=self.encoder_attention_heads,
                    encoder_ffn_dim=self.encoder_ffn_dim, d_model=self.d_model,
                    max_source_positions=self.max_source_positions, activation_function="gelu",
                    scale_embedding=False)


@dataclasses.dataclass(frozen=True)
class Qwen2AudioConfig:
    """Audio tower + Qwen2 decoder + the `<|AUDIO|>` token id (= HF Qwen2AudioConfig)."""

    audio: Qwen2AudioEncoderConfig = Qwen2AudioEncoderConfig()
    text: Qwen2Config = Qwen2Config()
    audio_token_index: int = 151646

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, dtype: str = "float32", param_dtype: str = "float32"):
        numerics = dict(dtype=dtype, param_dtype=param_dtype)
        return cls(audio=Qwen2AudioEncoderConfig.from_hf(hf.get("audio_config") or {}, **numerics),
                   text=Qwen2Config.from_hf(hf.get("text_config") or {}, **numerics),
                   audio_token_index=int(hf.get("audio_token_index", hf.get("audio_token_id", 151646))))

    def to_hf(self) -> dict[str, Any]:
        return dict(model_type="qwen2_audio", audio_config=self.audio.to_hf(), text_config=self.text.to_hf(),
                    audio_token_index=self.audio_token_index)

    @classmethod
    def preset(cls, name: str, **numerics) -> "Qwen2AudioConfig":
        """`tiny` (CPU tests, toy world) or `7b` (= Qwen2-Audio-7B-Instruct's published config)."""
        if name == "tiny":
            return cls(audio=Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4,
                                                     encoder_ffn_dim=128, d_model=64, max_source_positions=1500,
                                                     **numerics),
                       text=Qwen2Config.preset("tiny", **numerics), audio_token_index=250)
        if name == "7b":
            return cls(audio=Qwen2AudioEncoderConfig(**numerics),
                       text=Qwen2Config(vocab_size=156032, hidden_size=4096, intermediate_size=11008,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=10000.0,
                                        bos_token_id=151643, eos_token_id=151645, **numerics),
                       audio_token_index=151646)
        raise ValueError(f"unknown Qwen2-Audio preset {name!r}; known: ['7b', 'tiny']")


def feature_lengths(feature_attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(real tower positions after conv2, real audio tokens after pooling) per clip (= HF's formula)."""
    frames = jnp.sum(feature_attention_mask.astype(jnp.int32), axis=-1)
    return (frames - 1) // 2 + 1, num_audio_tokens(frames)


def short_clip_frames(feature_attention_mask, *, multiple: int = 8, max_frames: int = MAX_FRAMES) -> int:
    """The batch's `audio.short_window`: the smallest window (a multiple of `multiple`) whose
    encoding equals the 30 s padded path's, for the longest clip of the mask."""
    longest = int(np.max(np.sum(np.asarray(feature_attention_mask), axis=-1)))
    return short_window(longest, multiple=multiple, max_frames=max_frames)


class Qwen2AudioAttention(nnx.Module):
    """= Qwen2AudioAttention (Whisper): bidirectional, k_proj without bias, q scaled before the product."""

    def __init__(self, config: Qwen2AudioEncoderConfig, *, rngs: nnx.Rngs):
        d = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.head_dim = d // self.num_heads
        self.attention_impl = config.attention_impl
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.q_proj = Linear(d, d, axes=("embed", "q_heads"), use_bias=True, **kw)
        self.k_proj = Linear(d, d, axes=("embed", "q_heads"), use_bias=False, **kw)
        self.v_proj = Linear(d, d, axes=("embed", "q_heads"), use_bias=True, **kw)
        self.out_proj = Linear(d, d, axes=("q_heads", "embed"), use_bias=True, **kw)

    def __call__(self, x, mask):
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = (self.q_proj(x) * self.head_dim ** -0.5).reshape(shape)
        k, v = self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)
        out = attention(q, k, v, mask, scale=1.0, implementation=self.attention_impl)
        return self.out_proj(out.reshape(b, t, -1))


class Qwen2AudioEncoderLayer(nnx.Module):
    """= Qwen2AudioEncoderLayer: pre-LN attention and GELU MLP with residuals."""

    def __init__(self, config: Qwen2AudioEncoderConfig, *, rngs: nnx.Rngs):
        d, pd = config.d_model, jnp.dtype(config.param_dtype)
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=pd, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(d, param_dtype=pd, rngs=rngs)
        self.self_attn = Qwen2AudioAttention(config, rngs=rngs)
        self.final_layer_norm = LayerNorm(d, param_dtype=pd, rngs=rngs)
        self.fc1 = Linear(d, config.encoder_ffn_dim, axes=("embed", "mlp"), use_bias=True, **kw)
        self.fc2 = Linear(config.encoder_ffn_dim, d, axes=("mlp", "embed"), use_bias=True, **kw)

    def __call__(self, x, mask):
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.fc2(jax.nn.gelu(self.fc1(self.final_layer_norm(x)), approximate=False))
        return constrain(x, ("batch", "length", "act_embed"))


def encoder_layers(config: Qwen2AudioEncoderConfig, rngs: nnx.Rngs):
    """The tower's `encoder_layers` layers: stacked for one scan, or a list."""
    layers = [Qwen2AudioEncoderLayer(config, rngs=rngs) for _ in range(config.encoder_layers)]
    return stack_layers(layers) if config.scan_layers else nnx.List(layers)


def run_encoder_layers(layers, x, mask, scanned: bool):
    """x through every encoder layer (one scan over the stacked layers, or a loop)."""
    if scanned:
        return scan_layers(layers, lambda layer, x, _: (layer(x, mask), None), x)[0]
    for layer in layers:
        x = layer(x, mask)
    return x


class Qwen2AudioEncoder(nnx.Module):
    """= Qwen2AudioEncoder: conv1 + GELU, conv2 (stride 2) + GELU, positions, layers, avg-pool 2, LayerNorm."""

    def __init__(self, config: Qwen2AudioEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, pd, dt = config.d_model, jnp.dtype(config.param_dtype), jnp.dtype(config.dtype)
        self.conv1 = Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1, axes=("conv_width", "conv_in", "embed"),
                            dtype=dt, param_dtype=pd, rngs=rngs)
        self.conv2 = Conv1d(d, d, kernel_size=3, stride=2, padding=1, axes=("conv_width", "conv_in", "embed"),
                            dtype=dt, param_dtype=pd, rngs=rngs)
        self.embed_positions = Embed(config.max_source_positions, d, dtype=dt, param_dtype=pd,
                                     axes=("positions", "embed"), rngs=rngs)
        self.layers = encoder_layers(config, rngs)
        self.layer_norm = LayerNorm(d, param_dtype=pd, rngs=rngs)

    def __call__(self, input_features: jax.Array, feature_attention_mask: jax.Array) -> jax.Array:
        """[B, mel, frames] log-mel (HF layout) -> [B, frames // 4, d_model]; frames a multiple of 4."""
        frames = input_features.shape[-1]
        if frames % FRAMES_PER_TOKEN or frames > self.config.max_frames:
            raise ValueError(f"audio tower needs a multiple of {FRAMES_PER_TOKEN} mel frames, at most "
                             f"{self.config.max_frames}; got {frames}")
        x = jnp.swapaxes(input_features, 1, 2)
        x = jax.nn.gelu(self.conv1(x), approximate=False)
        x = jax.nn.gelu(self.conv2(x), approximate=False)
        t = x.shape[1]
        x = x + self.embed_positions.embedding[:t].astype(x.dtype)
        after_conv, _ = feature_lengths(feature_attention_mask)
        key_valid = jnp.arange(t)[None, :] < after_conv[:, None]
        mask = key_valid[:, None, None, :]
        x = constrain(x, ("batch", "length", "act_embed"))
        x = run_encoder_layers(self.layers, x, mask, self.config.scan_layers)
        b, _, d = x.shape
        x = x.reshape(b, t // 2, 2, d).mean(axis=2)
        return self.layer_norm(x)


class Qwen2AudioMultiModalProjector(nnx.Module):
    """= Qwen2AudioMultiModalProjector: one Linear from the tower's width to the LM's."""

    def __init__(self, config: Qwen2AudioConfig, *, rngs: nnx.Rngs):
        self.linear = Linear(config.audio.d_model, config.text.hidden_size, axes=("audio_embed", "embed"),
                             use_bias=True, dtype=jnp.dtype(config.text.dtype),
                             param_dtype=jnp.dtype(config.text.param_dtype), rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


def is_concrete(*xs) -> bool:
    """No argument is a tracer: values can be checked on the host (outside jit)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_audio_tokens(input_ids, feature_attention_mask, audio_token_index: int) -> None:
    """Raise if the prompts' `<|AUDIO|>` count differs from the audio tokens the clips produce."""
    expected = int(np.sum(np.asarray(feature_lengths(jnp.asarray(feature_attention_mask))[1])))
    found = int(np.sum(np.asarray(input_ids) == audio_token_index))
    if expected != found:
        raise ValueError(f"the prompts hold {found} <|AUDIO|> tokens (id {audio_token_index}) but the clips' "
                         f"feature_attention_mask gives {expected} audio embeddings")


def merge_audio_embeddings(inputs_embeds, input_ids, audio_embeds, audio_lengths, audio_token_index: int):
    """Write each clip's first `audio_lengths[i]` embeddings into the `<|AUDIO|>` positions, in order.

    Same order as HF's masked_scatter: the k-th audio token of the batch (row-major) gets
    the k-th real audio embedding (clips in order). Fixed shapes; no host round trip.
    """
    is_audio = input_ids == audio_token_index
    rank = jnp.cumsum(is_audio.reshape(-1)).reshape(is_audio.shape) - 1  # k of each audio token
    ends = jnp.cumsum(audio_lengths)
    clip = jnp.clip(jnp.searchsorted(ends, rank, side="right"), 0, audio_embeds.shape[0] - 1)
    offset = jnp.clip(rank - (ends - audio_lengths)[clip], 0, audio_embeds.shape[1] - 1)
    gathered = audio_embeds[clip, offset].astype(inputs_embeds.dtype)
    return jnp.where(is_audio[..., None], gathered, inputs_embeds)


class Qwen2AudioForConditionalGeneration(nnx.Module):
    """`model(input_ids=, attention_mask=, input_features=, feature_attention_mask=) -> logits [B, T, V]`."""

    lora_scope = "language_model"  # LoRA adapts the LM only; the audio tower stays frozen

    def __init__(self, config: Qwen2AudioConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.audio_tower = Qwen2AudioEncoder(config.audio, rngs=rngs)
        self.multi_modal_projector = Qwen2AudioMultiModalProjector(config, rngs=rngs)
        self.language_model = Qwen2ForCausalLM(config.text, rngs=rngs)

    def embed_inputs(self, input_ids, input_features=None, feature_attention_mask=None):
        """Token embeddings with the projected audio embeddings in the `<|AUDIO|>` positions."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if input_features is None:
            return embeds
        if feature_attention_mask is None:
            raise ValueError("input_features need a feature_attention_mask (which frames are real)")
        if is_concrete(input_ids, feature_attention_mask):
            check_audio_tokens(input_ids, feature_attention_mask, self.config.audio_token_index)
        audio = self.multi_modal_projector(self.audio_tower(input_features, feature_attention_mask))
        _, lengths = feature_lengths(feature_attention_mask)
        return merge_audio_embeddings(embeds, input_ids, audio, lengths, self.config.audio_token_index)

    def hidden_states(self, input_ids, attention_mask=None, input_features=None, feature_attention_mask=None,
                      position_ids=None):
        embeds = self.embed_inputs(input_ids, input_features, feature_attention_mask)
        return self.language_model.hidden_states(attention_mask=attention_mask, position_ids=position_ids,
                                                 inputs_embeds=embeds)

    def __call__(self, input_ids, attention_mask=None, input_features=None, feature_attention_mask=None,
                 position_ids=None):
        return self.logits(self.hidden_states(input_ids, attention_mask, input_features, feature_attention_mask,
                                              position_ids))

    def logits(self, hidden, token_ids=None):
        return self.language_model.logits(hidden, token_ids)
