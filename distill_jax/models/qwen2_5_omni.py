"""Qwen2.5-Omni's thinker (= HF Qwen2_5OmniThinkerForConditionalGeneration) in Flax NNX.

The audio-visual reference model: audio, images and video (with or without its sound) in,
text out. Three parts, each built from the project's layers:
- `audio_tower`: the Whisper-style encoder of Qwen2-Audio (same layers), run per window of
  `2 * n_window` mel frames (each window its own conv padding, sinusoid positions from 0 and
  attention), then 2-frame average pooling, `ln_post` and `proj` to the LM width;
- `visual`: the Qwen2.5-VL vision tower: RMSNorm, SwiGLU MLP with bias, 2-D rotary positions,
  attention within windows of `window_size` pixels except in `fullatt_block_indexes`
  (within frames), and the patch merger;
- `language_model`: the Qwen2 decoder with M-RoPE sections, positioned by TMRoPE
  (`rope_index`): with `use_audio_in_video` the video and audio tokens of a clip are
  interleaved in chunks of `seconds_per_chunk` and share a time axis
  (`position_id_per_seconds` per second).

Windowed attention is computed on a padded [segments, longest segment] layout gathered on
the host from the grids (as Qwen2-VL's tower), so no mask over the whole sequence exists.
The audio windows are a reshape: features [B, mel, frames] become [B * windows, 2 * n_window, mel].
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.audio import num_audio_tokens
from distill_jax.prompts import interleave_by_chunk
from distill_jax.layers.attention import attention
from distill_jax.layers.linear import Conv1d, Embed, Linear
from distill_jax.layers.norms import LayerNorm, RMSNorm
from distill_jax.layers.rope import apply_rope, rope_cos_sin
from distill_jax.layers.scan import scan_layers, stack_layers
from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM, init_cache
from distill_jax.models.qwen2_audio import (Qwen2AudioEncoderConfig, check_audio_tokens, encoder_layers,
                                            feature_lengths, is_concrete, merge_audio_embeddings,
                                            run_encoder_layers)
from distill_jax.models.qwen2_vl import (PatchEmbed, PatchMerger, as_grids, check_padded_video, frame_segments,
                                         merge_vision_embeddings, padded_angles, padded_video_layout, patch_angles,
                                         segment_layout)
from distill_jax.sharding import constrain

Grid = tuple[int, int, int]

# Hugging Face's Qwen2_5Omni*Config defaults (a published config may omit keys that take them).
_AUDIO_DEFAULTS = dict(num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                       d_model=1280, max_source_positions=1500, n_window=100, output_dim=3584,
                       activation_function="gelu", scale_embedding=False)
_VISION_DEFAULTS = dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                        in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        out_hidden_size=3584, fullatt_block_indexes=(7, 15, 23, 31))
_TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                      max_position_embeddings=32768)


@dataclasses.dataclass(frozen=True)
class OmniAudioEncoderConfig(Qwen2AudioEncoderConfig):
    """Qwen2-Audio's encoder plus windows of `2 * n_window` frames and a projection to `output_dim`."""

    n_window: int = 100
    output_dim: int = 3584

    @property
    def window_frames(self) -> int:
        return 2 * self.n_window

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "OmniAudioEncoderConfig":
        return super().from_hf(hf, defaults=_AUDIO_DEFAULTS, **overrides)

    def to_hf(self) -> dict[str, Any]:
        return {**super().to_hf(), "model_type": "qwen2_5_omni_audio_encoder", "n_window": self.n_window,
                "output_dim": self.output_dim}


@dataclasses.dataclass(frozen=True)
class OmniVisionConfig:
    """The Qwen2.5-VL-style vision tower (= HF Qwen2_5OmniVisionEncoderConfig); `hidden_size` is its width."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None
    query_chunk: int | None = None  # attention scores this many queries at a time (layers.attention); None: all
    scan_layers: bool = True  # the blocks stacked and run by one lax.scan, full or window attention per block

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision hidden_size={self.hidden_size} / num_heads={self.num_heads} must be a "
                             "multiple of 4")
        if self.window_size % (self.spatial_merge_size * self.patch_size):
            raise ValueError(f"window_size={self.window_size} is not a multiple of spatial_merge_size * patch_size "
                             f"= {self.spatial_merge_size * self.patch_size}")

    @property
    def embed_dim(self) -> int:  # the name qwen2_vl.PatchEmbed reads
        return self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window_merge_units(self) -> int:
        """Side of an attention window in merged patches (4 for 112 px windows of 2x2 14 px patches)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "OmniVisionConfig":
        d = {**_VISION_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
        if d["hidden_act"] != "silu":
            raise ValueError(f"vision hidden_act must be 'silu', got {d['hidden_act']!r}")
        rope = d.get("rope_parameters") or {}
        keys = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size",
                "fullatt_block_indexes")
        return cls(**{k: d[k] for k in keys}, rope_theta=float(rope.get("rope_theta", 10000.0)), **overrides)

    def to_hf(self) -> dict[str, Any]:
        return dict(model_type="qwen2_5_omni_vision_encoder", depth=self.depth, hidden_size=self.hidden_size,
                    hidden_act="silu", intermediate_size=self.intermediate_size, num_heads=self.num_heads,
                    in_channels=self.in_channels, patch_size=self.patch_size,
                    spatial_merge_size=self.spatial_merge_size, temporal_patch_size=self.temporal_patch_size,
                    window_size=self.window_size, out_hidden_size=self.out_hidden_size,
                    fullatt_block_indexes=list(self.fullatt_block_indexes),
                    rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta})


@dataclasses.dataclass(frozen=True)
class Qwen2_5OmniConfig:
    """The thinker (= HF Qwen2_5OmniThinkerConfig): towers, M-RoPE decoder, token ids, TMRoPE timing."""

    audio: OmniAudioEncoderConfig = OmniAudioEncoderConfig()
    vision: OmniVisionConfig = OmniVisionConfig()
    text: Qwen2Config = Qwen2Config(**_TEXT_DEFAULTS, rope_theta=1000000.0, mrope_section=(16, 24, 24))
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    position_id_per_seconds: int = 25
    seconds_per_chunk: float = 2  # transformers' config field is an int

    def __post_init__(self):
        if self.text.mrope_section is None:
            raise ValueError("Qwen2.5-Omni's text config needs mrope_section (M-RoPE)")
        for tower, width in (("audio output_dim", self.audio.output_dim),
                             ("vision out_hidden_size", self.vision.out_hidden_size)):
            if width != self.text.hidden_size:
                raise ValueError(f"{tower} {width} != text hidden_size {self.text.hidden_size}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, dtype: str = "float32", param_dtype: str = "float32"):
        """From a thinker config dict, or a full Qwen2.5-Omni config (its `thinker_config` is read)."""
        if hf.get("model_type") == "qwen2_5_omni":
            hf = hf.get("thinker_config") or {}
        numerics = dict(dtype=dtype, param_dtype=param_dtype)
        text = dict(hf.get("text_config") or {})
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        text["rope_parameters"] = {"mrope_section": [16, 24, 24], **rope, "rope_type": "default",
                                   "rope_theta": rope.get("rope_theta", text.get("rope_theta", 1000000.0))}
        text.pop("rope_scaling", None)
        # The thinker's own flag decides (its text_config says true by default; the thinker's lm_head is its own).
        text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
        names = {"audio_token_id": "audio_token_index", "image_token_id": "image_token_index",
                 "video_token_id": "video_token_index"}
        ids = {}
        for key in (f.name for f in dataclasses.fields(cls) if f.name.endswith("token_id")):
            value = hf.get(key, hf.get(names.get(key, key)))
            if value is not None:
                ids[key] = int(value)
        timing = {k: hf[k] for k in ("position_id_per_seconds", "seconds_per_chunk") if hf.get(k) is not None}
        return cls(audio=OmniAudioEncoderConfig.from_hf(hf.get("audio_config") or {}, **numerics),
                   vision=OmniVisionConfig.from_hf(hf.get("vision_config") or {}, **numerics),
                   text=Qwen2Config.from_hf(text, defaults=_TEXT_DEFAULTS, **numerics), **ids, **timing)

    def to_hf(self) -> dict[str, Any]:
        text = {**self.text.to_hf(), "model_type": "qwen2_5_omni_text"}
        return dict(model_type="qwen2_5_omni_thinker", audio_config=self.audio.to_hf(),
                    vision_config=self.vision.to_hf(), text_config=text,
                    tie_word_embeddings=self.text.tie_word_embeddings, audio_token_index=self.audio_token_id,
                    image_token_index=self.image_token_id, video_token_index=self.video_token_id,
                    audio_start_token_id=self.audio_start_token_id, audio_end_token_id=self.audio_end_token_id,
                    vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id,
                    position_id_per_seconds=self.position_id_per_seconds,
                    seconds_per_chunk=int(self.seconds_per_chunk) if float(self.seconds_per_chunk).is_integer()
                    else self.seconds_per_chunk)

    @classmethod
    def preset(cls, name: str, **numerics) -> "Qwen2_5OmniConfig":
        """`tiny` (CPU tests, toy world) or `7b` (= Qwen2.5-Omni-7B's thinker)."""
        if name == "tiny":
            return cls(audio=OmniAudioEncoderConfig(encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                                                    d_model=64, n_window=8, output_dim=64, **numerics),
                       vision=OmniVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                                               window_size=56, out_hidden_size=64, fullatt_block_indexes=(1,),
                                               **numerics),
                       text=Qwen2Config.preset("tiny", mrope_section=(2, 3, 3), **numerics),
                       audio_token_id=245, image_token_id=246, video_token_id=247, audio_start_token_id=248,
                       audio_end_token_id=249, vision_start_token_id=253, vision_end_token_id=254)
        if name == "7b":
            return cls(audio=OmniAudioEncoderConfig(**numerics), vision=OmniVisionConfig(**numerics),
                       text=Qwen2Config(**_TEXT_DEFAULTS, rope_theta=1000000.0, mrope_section=(16, 24, 24),
                                        bos_token_id=151643, eos_token_id=151645, **numerics))
        raise ValueError(f"unknown Qwen2.5-Omni preset {name!r}; known: ['7b', 'tiny']")


# ----------------------------------------------------------------------------------------------
# TMRoPE positions (host side, NumPy)


def _vision_positions(start: int, grid: Grid, merge: int, t_index: np.ndarray) -> np.ndarray:
    t, h, w = grid
    gh, gw = h // merge, w // merge
    rows = np.stack([np.repeat(t_index, gh * gw), np.tile(np.repeat(np.arange(gh), gw), t),
                     np.tile(np.arange(gw), t * gh)])
    return rows + start


def rope_index(input_ids, attention_mask, config: Qwen2_5OmniConfig, *, image_grids: Sequence[Grid] = (),
               video_grids: Sequence[Grid] = (), audio_frames: Sequence[int] = (),
               video_second_per_grid: Sequence[float] = (), use_audio_in_video: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """TMRoPE positions [3, B, T] and each row's next-position offset [B] (= HF's get_rope_index).

    Text counts up on all three rows. An image or video run takes (t, h, w) grid positions, its
    time row stepping `second_per_grid * position_id_per_seconds` per temporal patch; an audio
    run counts up. With `use_audio_in_video` a clip's video and audio runs start at the same
    position and are laid out in chunks of `seconds_per_chunk` (video chunk, then audio chunk).
    Each piece after the first starts at the previous maximum + 1. Padding positions are 1,
    as HF's; the offset is what decoding adds to a token's text position.
    """
    input_ids = np.asarray(input_ids)
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    cfg, merge = config, config.vision.spatial_merge_size
    positions = np.ones((3,) + input_ids.shape, np.int64)
    deltas = np.zeros((input_ids.shape[0],), np.int64)
    if not image_grids and not video_grids:
        counts = np.cumsum(mask, axis=1) - 1
        positions[:] = np.where(mask, counts, 1)[None]
        deltas[:] = positions.max(axis=(0, 2)) + 1 - mask.sum(axis=1)
        return positions, deltas
    per_chunk = int(cfg.position_id_per_seconds * cfg.seconds_per_chunk)
    images, videos, audios = iter(image_grids), iter(zip(video_grids, video_second_per_grid)), iter(audio_frames)
    media = {cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id}
    for row in range(input_ids.shape[0]):
        tokens = input_ids[row][mask[row]]
        pieces: list[np.ndarray] = []
        next_start = lambda: int(pieces[-1].max()) + 1 if pieces else 0
        add_text = lambda n: n and pieces.append(np.broadcast_to(np.arange(n) + next_start(), (3, n)))
        add_pair = lambda: pieces.append(np.full((3, 2), next_start()))  # two tokens, one position
        i = 0
        while i < len(tokens):
            j = i
            while j < len(tokens) and tokens[j] not in media:
                j += 1
            sounded = use_audio_in_video and j < len(tokens) and tokens[j] == cfg.video_token_id
            add_text(j - i - (2 if sounded else 0))
            if j == len(tokens):
                break
            if sounded:  # <|vision_bos|><|audio_bos|> share a position, as <|audio_eos|><|vision_eos|> do
                add_pair()
            i, kind, start = j, int(tokens[j]), next_start()
            try:
                if kind == cfg.audio_token_id:
                    length = int(num_audio_tokens(next(audios)))
                    pieces.append(np.broadcast_to(np.arange(length) + start, (3, length)))
                elif kind == cfg.image_token_id:
                    grid = next(images)
                    pieces.append(_vision_positions(start, grid, merge, np.arange(grid[0]) *
                                                    cfg.position_id_per_seconds))
                    length = pieces[-1].shape[1]
                else:
                    grid, seconds = next(videos)
                    t_index = (np.arange(grid[0], dtype=np.float32) * np.float32(seconds) *
                               np.float32(cfg.position_id_per_seconds)).astype(np.int64)
                    video = _vision_positions(start, grid, merge, t_index)
                    length = video.shape[1]
                    if not sounded:
                        pieces.append(video)
                    else:
                        audio_length = int(num_audio_tokens(next(audios)))
                        audio = np.broadcast_to(np.arange(audio_length) + start, (3, audio_length))
                        for stream, a, b in interleave_by_chunk(video[0] - start, audio[0] - start, per_chunk):
                            pieces.append((video if stream == "video" else audio)[:, a:b])
                        length += audio_length
            except StopIteration:
                raise ValueError(f"row {row} has more media runs than grids / audio clips were given") from None
            run = tokens[i:i + length]
            if len(run) != length or not np.all(np.isin(run, list(media))):
                raise ValueError(f"row {row}: the media run at token {i} should hold {length} media tokens "
                                 f"(from its grid / audio length); the prompt's run differs")
            i += length
            if sounded:
                if i + 2 > len(tokens) or np.any(np.isin(tokens[i:i + 2], list(media))):
                    raise ValueError(f"row {row}: a sounded video must end with <|audio_eos|><|vision_eos|>")
                add_pair()
                i += 2
        row_positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, row, mask[row]] = row_positions
        deltas[row] = (int(row_positions.max()) + 1 if row_positions.size else 0) - len(tokens)
    return positions, deltas


# ----------------------------------------------------------------------------------------------
# Audio tower


def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """[length, channels] sin | cos table (= HF's SinusoidsPositionEmbedding), float32."""
    increment = np.float32(np.log(max_timescale) / (channels // 2 - 1))
    inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


class OmniAudioEncoder(nnx.Module):
    """= Qwen2_5OmniAudioEncoder: features [B, mel, frames] + mask -> [B, frames // 4, output_dim].

    Each window of `2 * n_window` frames is encoded on its own (zero conv padding at its edges,
    positions from 0, attention inside it); windows past a clip's end are empty. Real frames
    must come first in each row (the processor pads on the right). The result's first
    `num_audio_tokens(frames)` rows of each clip are its audio tokens.
    """

    def __init__(self, config: OmniAudioEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, pd, dt = config.d_model, jnp.dtype(config.param_dtype), jnp.dtype(config.dtype)
        conv = dict(axes=("conv_width", "conv_in", "embed"), dtype=dt, param_dtype=pd, rngs=rngs)
        self.conv1 = Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1, **conv)
        self.conv2 = Conv1d(d, d, kernel_size=3, stride=2, padding=1, **conv)
        self.audio_bos_eos_token = Embed(2, config.output_dim, dtype=dt, param_dtype=pd,
                                         axes=("vocab", "embed"), rngs=rngs)  # in checkpoints; the thinker never reads it
        self.layers = encoder_layers(config, rngs)
        self.ln_post = LayerNorm(d, param_dtype=pd, rngs=rngs)
        self.proj = Linear(d, config.output_dim, axes=("audio_embed", "embed"), use_bias=True, dtype=dt,
                           param_dtype=pd, rngs=rngs)

    def __call__(self, input_features: jax.Array, feature_attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        window = cfg.window_frames
        b, mel, frames = input_features.shape
        if frames % window:  # whole windows; the extra frames are past every clip's end
            input_features = jnp.pad(input_features, ((0, 0), (0, 0), (0, window - frames % window)))
            feature_attention_mask = jnp.pad(feature_attention_mask, ((0, 0), (0, window - frames % window)))
        windows = input_features.shape[-1] // window
        lengths = jnp.sum(feature_attention_mask.astype(jnp.int32), axis=-1)
        real = jnp.arange(windows * window)[None, :] < lengths[:, None]
        x = jnp.where(real[:, None, :], input_features, 0).astype(cfg.dtype)
        x = x.reshape(b, mel, windows, window).transpose(0, 2, 3, 1).reshape(b * windows, window, mel)
        window_lengths = jnp.clip(lengths[:, None] - jnp.arange(windows)[None, :] * window, 0, window).reshape(-1)
        x = jax.nn.gelu(self.conv1(x), approximate=False)
        x = x * (jnp.arange(window)[None, :] < window_lengths[:, None])[..., None].astype(x.dtype)
        x = jax.nn.gelu(self.conv2(x), approximate=False)  # [B * windows, n_window, d]
        x = x + jnp.asarray(sinusoid_positions(cfg.max_source_positions, cfg.d_model)[:cfg.n_window], x.dtype)
        after_conv = (window_lengths - 1) // 2 + 1
        mask = (jnp.arange(cfg.n_window)[None, :] < after_conv[:, None])[:, None, None, :]
        x = constrain(x, ("batch", "length", "act_embed"))
        x = run_encoder_layers(self.layers, x, mask, cfg.scan_layers)
        x = x.reshape(b, windows * cfg.n_window // 2, 2, -1).mean(axis=2)
        return self.proj(self.ln_post(x))


# ----------------------------------------------------------------------------------------------
# Vision tower


def window_segments(grids: Sequence[Grid], merge: int, window: int) -> np.ndarray:
    """Per patch (packed, merge-block-major order) the id of its attention window: windows of
    `window` x `window` merged patches within one temporal patch of one item (= HF's window index)."""
    ids, base = [], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        across = -(-gw // window)
        blocks = np.arange(gh * gw)
        per_frame = (blocks // gw // window) * across + (blocks % gw // window)
        per_frame = np.repeat(per_frame, merge * merge)
        windows = -(-gh // window) * across
        ids.append(np.concatenate([per_frame + base + f * windows for f in range(t)]))
        base += t * windows
    return np.concatenate(ids) if ids else np.zeros((0,), np.int64)


class SegmentLayout:
    """One attention pattern of the tower: index arrays and the rotary cos/sin in segment layout."""

    def __init__(self, segment_ids: np.ndarray, angles: np.ndarray):
        gather, valid, scatter = segment_layout(segment_ids)
        self.gather, self.scatter = jnp.asarray(gather), jnp.asarray(scatter)
        self.mask = jnp.asarray(valid)[:, None, None, :]
        self.cos, self.sin = rope_cos_sin(jnp.asarray(angles[gather], jnp.float32), jnp.float32)


class PaddedLayout:
    """The attention pattern of a padded video batch: x is already [B * F, L, D] (no gather); `mask` is
    [B * F, 1, 1, L] (whole frames) or [B * F, 1, L, L] (windows)."""

    gather = scatter = None

    def __init__(self, cos, sin, mask):
        self.cos, self.sin, self.mask = cos, sin, mask


def padded_window_mask(grid_thw, frames: int, patches: int, config: "OmniVisionConfig"):
    """[B * F, 1, L, L] bool: a patch slot attends to the valid slots of its own window (windows of
    `window_merge_units` x `window_merge_units` merged patches, = HF's window index) in a padded batch."""
    m, units = config.spatial_merge_size, config.window_merge_units
    row, col, valid = padded_video_layout(grid_thw, frames, patches, m)
    window = (row // m // units) * patches + col // m // units  # [B, L]: one id per window of a frame
    same = window[:, :, None] == window[:, None, :]  # [B, L, L]
    b = row.shape[0]
    mask = same[:, None] & valid[:, :, None, :]  # [B, F, L, L]
    return mask.reshape(b * frames, 1, patches, patches)


class OmniVisionAttention(nnx.Module):
    """= Qwen2_5OmniVisionAttention: q/k/v with bias, 2-D RoPE, bidirectional within a segment."""

    def __init__(self, config: OmniVisionConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads, self.head_dim, self.attention_impl = config.num_heads, config.head_dim, config.attention_impl
        self.query_chunk = config.query_chunk
        kw = dict(use_bias=True, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.q = Linear(d, d, axes=("embed", "q_heads"), **kw)
        self.k = Linear(d, d, axes=("embed", "q_heads"), **kw)
        self.v = Linear(d, d, axes=("embed", "q_heads"), **kw)
        self.proj = Linear(d, d, axes=("q_heads", "embed"), **kw)

    def __call__(self, x, layout: SegmentLayout | PaddedLayout):
        # Segments are spread over the batch axes, as Qwen2-VL's tower's are. Left to propagation, the
        # gathered layout's sharding made libtpu's dot cost model overflow its stack (v5e-8, 7B).
        if layout.gather is None:  # padded: x is [B * F, L, D] already
            heads = lambda y: constrain(y.reshape(*y.shape[:2], self.num_heads, self.head_dim),
                                        ("batch", "length", "act_heads", None))
        else:
            heads = lambda y: constrain(y[layout.gather].reshape(*layout.gather.shape, self.num_heads,
                                                                 self.head_dim), ("batch", "length", "act_heads", None))
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        q = apply_rope(q.astype(jnp.float32), layout.cos, layout.sin).astype(x.dtype)
        k = apply_rope(k.astype(jnp.float32), layout.cos, layout.sin).astype(x.dtype)
        out = attention(q, k, v, layout.mask, scale=self.head_dim ** -0.5, implementation=self.attention_impl,
                        query_chunk=self.query_chunk)
        if layout.gather is None:
            return self.proj(out.reshape(*x.shape[:2], self.num_heads * self.head_dim))
        return self.proj(out.reshape(-1, self.num_heads * self.head_dim)[layout.scatter])


class OmniVisionMLP(nnx.Module):
    """= Qwen2_5OmniMLP(bias=True): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: OmniVisionConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=True, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class OmniVisionBlock(nnx.Module):
    """= Qwen2_5OmniVisionBlock: pre-RMSNorm (eps 1e-6) attention and SwiGLU MLP with residuals."""

    def __init__(self, config: OmniVisionConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(config.param_dtype)
        self.norm1 = RMSNorm(config.hidden_size, eps=1e-6, param_dtype=pd, rngs=rngs)
        self.norm2 = RMSNorm(config.hidden_size, eps=1e-6, param_dtype=pd, rngs=rngs)
        self.attn = OmniVisionAttention(config, rngs=rngs)
        self.mlp = OmniVisionMLP(config, rngs=rngs)

    def __call__(self, x, layout: SegmentLayout):
        x = x + self.attn(self.norm1(x), layout)
        return x + self.mlp(self.norm2(x))

    def either(self, x, full: jax.Array, frames: SegmentLayout, windows: SegmentLayout):
        """The block with full attention (per frame) where `full`, else windowed: one body for a scan
        over blocks of both kinds (the attention alone is under `lax.cond`)."""
        h = self.norm1(x)
        x = x + jax.lax.cond(full, lambda: self.attn(h, frames), lambda: self.attn(h, windows))
        return x + self.mlp(self.norm2(x))


class OmniVisionEncoder(nnx.Module):
    """= Qwen2_5OmniVisionEncoder: packed patches [N, patch_dim] + grids -> merged [N / 4, out_hidden_size]."""

    def __init__(self, config: OmniVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.patch_embed = PatchEmbed(config, rngs=rngs)
        blocks = [OmniVisionBlock(config, rngs=rngs) for _ in range(config.depth)]
        self.blocks = stack_layers(blocks) if config.scan_layers else nnx.List(blocks)
        # = Qwen2_5OmniPatchMerger: Qwen2-VL's with RMSNorm, to out_hidden_size
        self.merger = PatchMerger(config, out_features=config.out_hidden_size, norm=RMSNorm, rngs=rngs)

    def padded(self, pixel_values, grid_thw):
        """Padded video [B, F, L, patch_dim] + grids [B, 3] -> merged tokens [B, F * L / 4, out_hidden_size]
        (as Qwen2-VL's tower's `padded`; window attention through a per-frame window mask)."""
        cfg = self.config
        check_padded_video(pixel_values, grid_thw, cfg)
        b, frames, patches, _ = pixel_values.shape
        cos, sin, key_mask = padded_angles(grid_thw, frames, patches, cfg)
        whole = PaddedLayout(cos, sin, key_mask)
        windows = PaddedLayout(cos, sin, padded_window_mask(grid_thw, frames, patches, cfg))
        x = self.patch_embed(pixel_values.reshape(b * frames, patches, -1))
        if cfg.scan_layers:
            full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])
            x, _ = scan_layers(self.blocks, lambda block, x, f: (block.either(x, f, whole, windows), None), x, full)
        else:
            for i, block in enumerate(self.blocks):
                x = block(x, whole if i in cfg.fullatt_block_indexes else windows)
        return self.merger(x).reshape(b, frames * patches // cfg.spatial_merge_size ** 2, -1)

    def __call__(self, pixel_values, grid_thw):
        grids = as_grids(grid_thw)
        cfg = self.config
        angles, _ = patch_angles(pixel_values, grids, cfg)
        frames = SegmentLayout(frame_segments(grids), angles)
        windows = SegmentLayout(window_segments(grids, cfg.spatial_merge_size, cfg.window_merge_units), angles)
        x = self.patch_embed(pixel_values)
        if cfg.scan_layers:
            full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])
            x, _ = scan_layers(self.blocks, lambda block, x, f: (block.either(x, f, frames, windows), None), x, full)
            return self.merger(x)
        for i, block in enumerate(self.blocks):
            x = block(x, frames if i in cfg.fullatt_block_indexes else windows)
        return self.merger(x)


# ----------------------------------------------------------------------------------------------
# The thinker


class Qwen2_5OmniThinker(nnx.Module):
    """`model(input_ids=, attention_mask=, input_features=, feature_attention_mask=, pixel_values_videos=,
    video_grid_thw=, video_second_per_grid=, use_audio_in_video=True) -> logits [B, T, V]`
    (also `pixel_values=`/`image_grid_thw=`); TMRoPE positions come from the ids, grids and audio lengths."""

    lora_scope = "language_model"  # LoRA adapts the LM only; the towers stay frozen

    def __init__(self, config: Qwen2_5OmniConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.audio_tower = OmniAudioEncoder(config.audio, rngs=rngs)
        self.visual = OmniVisionEncoder(config.vision, rngs=rngs)
        self.language_model = Qwen2ForCausalLM(config.text, rngs=rngs)

    def positions(self, input_ids, attention_mask=None, feature_attention_mask=None, image_grid_thw=None,
                  video_grid_thw=None, video_second_per_grid=None, use_audio_in_video=False):
        """Host-side TMRoPE positions [3, B, T] and next-position offsets [B] (see `rope_index`)."""
        frames = () if feature_attention_mask is None else np.asarray(feature_attention_mask).sum(axis=-1)
        videos = as_grids(video_grid_thw)
        seconds = (np.ones(len(videos)) if video_second_per_grid is None
                   else np.asarray(video_second_per_grid, np.float64).reshape(-1))
        return rope_index(input_ids, attention_mask, self.config, image_grids=as_grids(image_grid_thw),
                          video_grids=videos, audio_frames=tuple(int(f) for f in frames),
                          video_second_per_grid=tuple(float(s) for s in seconds),
                          use_audio_in_video=bool(use_audio_in_video))

    def prepare_inputs(self, batch: dict) -> tuple[dict, dict]:
        """Host-side: add TMRoPE `position_ids`, drop what only positions need, split off the static grids."""
        static = {k: as_grids(v) for k, v in batch.items() if k.endswith("grid_thw") and v is not None}
        arrays = {k: v for k, v in batch.items() if not k.endswith("grid_thw") and v is not None
                  and k not in ("video_second_per_grid", "use_audio_in_video")}
        if arrays.get("position_ids") is None:
            arrays["position_ids"] = self.positions(
                batch["input_ids"], batch.get("attention_mask"), batch.get("feature_attention_mask"),
                batch.get("image_grid_thw"), batch.get("video_grid_thw"), batch.get("video_second_per_grid"),
                batch.get("use_audio_in_video", False))[0]
        return arrays, static

    def embed_inputs(self, input_ids, input_features=None, feature_attention_mask=None, pixel_values=None,
                     image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
        """Token embeddings with the audio, image and video embeddings in their placeholder positions."""
        cfg = self.config
        embeds = self.language_model.model.embed_tokens(input_ids)
        if input_features is not None:
            if feature_attention_mask is None:
                raise ValueError("input_features need a feature_attention_mask (which frames are real)")
            if is_concrete(input_ids, feature_attention_mask):
                real = np.asarray(feature_attention_mask).astype(bool)
                if np.any(real[:, 1:] & ~real[:, :-1]):
                    raise ValueError("feature_attention_mask must mark each clip's real frames first "
                                     "(features padded on the right, as the processor pads them)")
                check_audio_tokens(input_ids, feature_attention_mask, cfg.audio_token_id)
            audio = self.audio_tower(input_features, feature_attention_mask)
            lengths = feature_lengths(feature_attention_mask)[1]
            embeds = merge_audio_embeddings(embeds, input_ids, audio, lengths, cfg.audio_token_id)
        return merge_vision_embeddings(embeds, input_ids, self.visual, cfg.vision.spatial_merge_size,
                                       ((pixel_values, image_grid_thw, cfg.image_token_id),
                                        (pixel_values_videos, video_grid_thw, cfg.video_token_id)))

    def hidden_states(self, input_ids, attention_mask=None, input_features=None, feature_attention_mask=None,
                      pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                      video_second_per_grid=None, use_audio_in_video=False, position_ids=None):
        embeds = self.embed_inputs(input_ids, input_features, feature_attention_mask, pixel_values, image_grid_thw,
                                   pixel_values_videos, video_grid_thw)  # checks the token counts first
        if position_ids is None and (image_grid_thw is not None or video_grid_thw is not None):
            if not is_concrete(input_ids, attention_mask, feature_attention_mask):
                raise ValueError("under jit, pass position_ids (see prepare_inputs)")
            position_ids = self.positions(input_ids, attention_mask, feature_attention_mask, image_grid_thw,
                                          video_grid_thw, video_second_per_grid, use_audio_in_video)[0]
        return self.language_model.hidden_states(attention_mask=attention_mask, position_ids=position_ids,
                                                 inputs_embeds=embeds)

    def __call__(self, input_ids, attention_mask=None, input_features=None, feature_attention_mask=None,
                 pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                 video_second_per_grid=None, use_audio_in_video=False, position_ids=None):
        return self.logits(self.hidden_states(input_ids, attention_mask, input_features, feature_attention_mask,
                                              pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                              video_second_per_grid, use_audio_in_video, position_ids))

    def logits(self, hidden, token_ids=None):
        return self.language_model.logits(hidden, token_ids)

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """The decoder's KV cache plus each row's TMRoPE offset (set by the prompt pass)."""
        return {**init_cache(self.config.text, batch_size, max_length),
                "rope_delta": jnp.zeros((batch_size,), jnp.int32)}

    def forward_cached(self, cache, input_ids, attention_mask=None, position_ids=None, *, input_features=None,
                       feature_attention_mask=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                       video_grid_thw=None):
        """Logits of new tokens after the cache's content, and the updated cache (`decoding.generate`).

        The prompt pass (media, 3-row `position_ids` from `prepare_inputs`) records each row's
        offset max(position) + 1 - real tokens; later tokens take their text position + offset
        (= HF's rope_deltas).
        """
        embeds = self.embed_inputs(input_ids, input_features, feature_attention_mask, pixel_values, image_grid_thw,
                                   pixel_values_videos, video_grid_thw)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
        if position_ids is not None and position_ids.ndim == 3:
            real = attention_mask.astype(bool)
            top = jnp.max(jnp.where(real[None], position_ids, -1), axis=(0, 2))
            cache = {**cache, "rope_delta": (top + 1 - jnp.sum(real, axis=1)).astype(jnp.int32)}
        hidden, cache = self.language_model.model(None, attention_mask, position_ids, inputs_embeds=embeds,
                                                  cache=cache)
        return self.logits(hidden), cache
