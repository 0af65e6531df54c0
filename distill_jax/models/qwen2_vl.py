"""Qwen2-VL (= HF Qwen2VLForConditionalGeneration) in Flax NNX: vision tower, M-RoPE positions,
and the Qwen2 decoder with image/video embeddings in the `<|image_pad|>`/`<|video_pad|>` positions.

Our module tree is `visual` (= Qwen2VisionTransformerPretrainedModel) and `language_model`
(our Qwen2ForCausalLM: `model` + `lm_head`); checkpoints name the LM `model.*` (hub) or
`model.language_model.*` (transformers 5), both load.

Vision attention runs per segment (one frame pair of one item, as HF's cu_seqlens). Video
comes in one of two layouts:
- **packed** (HF's): pixel_values_videos [sum of t*h*w, 1176] with static grids (a tuple); the
  patches are gathered into a [segments, longest segment, D] layout with a key mask computed
  on the host. Every distinct list of grids is its own compiled program.
- **padded per clip** (the input pipeline's): pixel_values_videos [B, F, L, 1176], clip b's
  temporal patch f in row [b, f] (its h*w patches, then zeros), video_grid_thw an int array
  [B, 3] that may be traced. Positions, masks and the placement of the merged tokens in the
  prompt are computed on the device from the grids, so clips of any size and length run
  through one program per (B, F, L) (`padded_video_layout`, `scatter_padded_video`).
No dense mask over the whole batch ever exists in either.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.layers.attention import attention
from distill_jax.layers.linear import Linear
from distill_jax.layers.norms import LayerNorm
from distill_jax.layers.rope import apply_rope, inv_frequencies, rope_cos_sin
from distill_jax.layers.scan import scan_layers, stack_layers
from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from distill_jax.sharding import constrain

# Hugging Face's Qwen2VLVisionConfig / Qwen2VLTextConfig defaults (hub configs omit some).
_VISION_DEFAULTS = dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4,
                        num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
_TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, bos_token_id=151643,
                      eos_token_id=151645, max_position_embeddings=32768)
Grid = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """The ViT of Qwen2-VL (= HF Qwen2VLVisionConfig); `hidden_size` is the LM width the merger outputs."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584
    mlp_ratio: int = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None
    query_chunk: int | None = None  # attention scores this many queries at a time (layers.attention); None: all
    scan_layers: bool = True  # the blocks stacked and run by one lax.scan (layers.scan)

    def __post_init__(self):
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim={self.embed_dim} / num_heads={self.num_heads} must be a multiple of 4")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "Qwen2VLVisionConfig":
        d = {**_VISION_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
        if "in_chans" in hf:  # older hub configs
            d["in_channels"] = hf["in_chans"]
        if d["hidden_act"] != "quick_gelu":
            raise ValueError(f"vision hidden_act must be 'quick_gelu', got {d['hidden_act']!r}")
        rope = d.get("rope_parameters") or {}
        keys = ("depth", "embed_dim", "hidden_size", "mlp_ratio", "num_heads", "in_channels", "patch_size",
                "spatial_merge_size", "temporal_patch_size")
        return cls(**{k: d[k] for k in keys}, rope_theta=float(rope.get("rope_theta", 10000.0)), **overrides)

    def to_hf(self) -> dict[str, Any]:
        return dict(model_type="qwen2_vl_vision", depth=self.depth, embed_dim=self.embed_dim,
                    hidden_size=self.hidden_size, hidden_act="quick_gelu", mlp_ratio=self.mlp_ratio,
                    num_heads=self.num_heads, in_channels=self.in_channels, patch_size=self.patch_size,
                    spatial_merge_size=self.spatial_merge_size, temporal_patch_size=self.temporal_patch_size,
                    rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta})


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """Vision tower + Qwen2 decoder with M-RoPE + the vision token ids (= HF Qwen2VLConfig)."""

    vision: Qwen2VLVisionConfig = Qwen2VLVisionConfig()
    text: Qwen2Config = Qwen2Config(mrope_section=(16, 24, 24))
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        if self.text.mrope_section is None:
            raise ValueError("Qwen2-VL's text config needs mrope_section (M-RoPE)")
        if self.vision.hidden_size != self.text.hidden_size:
            raise ValueError(f"vision hidden_size {self.vision.hidden_size} != text hidden_size "
                             f"{self.text.hidden_size}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, dtype: str = "float32", param_dtype: str = "float32"):
        """From a config.json: text keys nested in `text_config` (transformers 5) or flat (hub)."""
        numerics = dict(dtype=dtype, param_dtype=param_dtype)
        text = dict(hf.get("text_config") or {k: v for k, v in hf.items() if k != "vision_config"})
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            rope = {**rope, "mrope_section": [16, 24, 24]}
        text["rope_parameters"] = {**rope, "rope_type": "default", "rope_theta": rope.get(
            "rope_theta", text.get("rope_theta", 1000000.0))}
        text.pop("rope_scaling", None)
        text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
        ids = {k: int(hf[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                       "vision_end_token_id") if k in hf}
        return cls(vision=Qwen2VLVisionConfig.from_hf(hf.get("vision_config") or {}, **numerics),
                   text=Qwen2Config.from_hf(text, defaults=_TEXT_DEFAULTS, **numerics), **ids)

    def to_hf(self) -> dict[str, Any]:
        text = {**self.text.to_hf(), "model_type": "qwen2_vl_text"}
        return dict(model_type="qwen2_vl", vision_config=self.vision.to_hf(), text_config=text,
                    tie_word_embeddings=self.text.tie_word_embeddings, image_token_id=self.image_token_id,
                    video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
                    vision_end_token_id=self.vision_end_token_id)

    @classmethod
    def preset(cls, name: str, **numerics) -> "Qwen2VLConfig":
        """`tiny` (CPU tests, toy world) or `7b` (= Qwen2-VL-7B-Instruct's published config)."""
        if name == "tiny":
            return cls(vision=Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4,
                                                  **numerics),
                       text=Qwen2Config.preset("tiny", mrope_section=(2, 3, 3), **numerics),
                       image_token_id=251, video_token_id=252, vision_start_token_id=253, vision_end_token_id=254)
        if name == "7b":
            return cls(vision=Qwen2VLVisionConfig(**numerics),
                       text=Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                        mrope_section=(16, 24, 24), bos_token_id=151643, eos_token_id=151645,
                                        **numerics))
        raise ValueError(f"unknown Qwen2-VL preset {name!r}; known: ['7b', 'tiny']")


def as_grids(grid_thw) -> tuple[Grid, ...]:
    """Grids as a hashable tuple of (t, h, w) ints (static under jit); None -> ()."""
    if grid_thw is None:
        return ()
    if isinstance(grid_thw, jax.core.Tracer):
        raise ValueError("image/video grid_thw must be concrete (static under jit): pass them as numpy "
                         "arrays or tuples, or through decoding.score_choices, which keeps them static")
    return tuple(tuple(int(v) for v in row) for row in np.asarray(grid_thw).reshape(-1, 3))


def segment_layout(segment_ids: np.ndarray):
    """Gather the tokens of each segment (in token order) into a padded [S, L] layout.

    Returns (gather [S, L], valid [S, L], scatter [N]): `x[gather]` is the padded layout,
    `padded.reshape(S * L, ...)[scatter]` takes it back to token order.
    """
    order = np.argsort(segment_ids, kind="stable")
    ids, starts, counts = np.unique(segment_ids[order], return_index=True, return_counts=True)
    longest = int(counts.max()) if len(counts) else 0
    offsets = np.arange(longest)[None, :]
    valid = offsets < counts[:, None]
    gather = np.where(valid, order[np.minimum(starts[:, None] + offsets, len(order) - 1)], 0)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order)) - np.repeat(starts, counts)
    segment = np.searchsorted(ids, segment_ids)
    return gather, valid, segment * longest + rank


def frame_segments(grids: Sequence[Grid]) -> np.ndarray:
    """Per patch the index of its temporal patch over all items (the per-frame attention segments)."""
    sizes = [h * w for t, h, w in grids for _ in range(t)]
    return np.repeat(np.arange(len(sizes)), sizes)


def vision_layout(grids: Sequence[Grid], merge: int):
    """Host-side layout of a packed patch sequence: per-patch (row, col) positions, segment gathers.

    Returns (positions [N, 2], gather [S, L], valid [S, L], scatter [N]): `gather` takes the
    patches of each segment (one temporal patch of one item) into a padded [S, L] layout,
    `scatter` takes them back (`segment_layout`). Patch order within a frame is merge-block-major (= HF's).
    """
    positions = []
    for t, h, w in grids:
        if h % merge or w % merge:
            raise ValueError(f"grid {(t, h, w)} is not a multiple of spatial_merge_size={merge}")
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        order = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        positions.append(np.tile(np.stack([order(rows), order(cols)], axis=-1), (t, 1)))
    positions = np.concatenate(positions) if positions else np.zeros((0, 2), np.int64)
    return (positions, *segment_layout(frame_segments(grids)))


def mrope_positions(input_ids, attention_mask, image_grids: Sequence[Grid], video_grids: Sequence[Grid],
                    config: Qwen2VLConfig) -> np.ndarray:
    """3-row M-RoPE positions [3, B, T] (= HF's get_rope_index; padding positions are 0).

    Text runs count up by one on all three rows; an image/video run takes (t, h, w) grid
    positions offset by the text before it; the next text starts after max(h, w).
    """
    return rope_index(input_ids, attention_mask, image_grids, video_grids, image_token_id=config.image_token_id,
                      video_token_id=config.video_token_id, spatial_merge_size=config.vision.spatial_merge_size)


def rope_index(input_ids, attention_mask, image_grids: Sequence[Grid], video_grids: Sequence[Grid], *,
               image_token_id: int, video_token_id: int, spatial_merge_size: int) -> np.ndarray:
    """`mrope_positions` from the token ids and merge size alone (what the input pipeline knows)."""
    input_ids = np.asarray(input_ids)
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    merge = spatial_merge_size
    token_type = np.where(input_ids == image_token_id, 1, np.where(input_ids == video_token_id, 2, 0))
    grids = {1: iter(image_grids), 2: iter(video_grids)}
    positions = np.zeros((3,) + input_ids.shape, np.int64)
    for row in range(input_ids.shape[0]):
        types = token_type[row][mask[row]]
        pieces, current = [], 0
        for kind, run in itertools.groupby(types):
            length = len(list(run))
            if kind == 0:
                pieces.append(np.broadcast_to(np.arange(length) + current, (3, length)))
                current += length
                continue
            try:
                t, h, w = next(grids[kind])
            except StopIteration:
                raise ValueError(f"row {row} has more {'image' if kind == 1 else 'video'} runs than grids") from None
            gt, gh, gw = np.meshgrid(np.arange(t), np.arange(h // merge), np.arange(w // merge), indexing="ij")
            block = np.stack([gt, gh, gw]).reshape(3, -1) + current
            if block.shape[1] != length:
                raise ValueError(f"row {row}: a run of {length} vision tokens but its grid {(t, h, w)} gives "
                                 f"{block.shape[1]}")
            pieces.append(block)
            current += max(h, w) // merge
        if pieces:
            positions[:, row, mask[row]] = np.concatenate(pieces, axis=1)
    return positions


def padded_video_layout(grid_thw, frames: int, patches: int, merge: int):
    """Per clip of a padded video batch ([B, F=`frames`, L=`patches`, D], `grid_thw` [B, 3], may be
    traced): each patch slot's (row, col) [B, L] in its frame (HF's merge-block-major order, the
    same in every frame) and which slots hold a patch, valid [B, F, L]."""
    grid = jnp.asarray(grid_thw, jnp.int32)
    t, h, w = grid[:, 0:1], grid[:, 1:2], grid[:, 2:3]  # [B, 1]
    slot = jnp.arange(patches, dtype=jnp.int32)[None, :]  # [1, L]
    block, within = slot // (merge * merge), slot % (merge * merge)
    across = jnp.maximum(w // merge, 1)  # merge blocks per row
    row = (block // across) * merge + within // merge
    col = (block % across) * merge + within % merge
    valid = (jnp.arange(frames)[None, :, None] < t[:, :, None]) & (slot[:, None, :] < (h * w)[:, :, None])
    return row, col, valid


def padded_token_mask(grid_thw, frames: int, patches: int, merge: int):
    """[B, F * L / merge^2] bool: which merged-token slots of a padded video batch hold a clip's token."""
    _, _, valid = padded_video_layout(grid_thw, frames, patches, merge)
    return valid.reshape(valid.shape[0], frames, patches // merge ** 2, merge ** 2)[..., 0].reshape(
        valid.shape[0], -1)


def check_padded_video(pixel_values, grid_thw, config) -> None:
    """Shape checks of a padded video batch; concrete grids are checked to fit its frames and patches."""
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != config.patch_dim:
        raise ValueError(f"padded pixel_values must be [B, frames, patches, {config.patch_dim}], got "
                         f"{pixel_values.shape}")
    b, frames, patches, _ = pixel_values.shape
    m2 = config.spatial_merge_size ** 2
    if patches % m2:
        raise ValueError(f"padded pixel_values hold {patches} patches per frame, not a multiple of {m2}")
    if np.shape(grid_thw) != (b, 3):
        raise ValueError(f"padded pixel_values of {b} clips need video_grid_thw [{b}, 3], got {np.shape(grid_thw)}")
    if not isinstance(grid_thw, jax.core.Tracer):
        grid = np.asarray(grid_thw)
        too_big = [i for i, (t, h, w) in enumerate(grid) if t > frames or h * w > patches]
        if too_big:
            raise ValueError(f"clips {too_big} have grids {grid[too_big].tolist()} larger than the padded layout "
                             f"({frames} temporal patches of {patches} patches)")


def padded_angles(grid_thw, frames: int, patches: int, config):
    """(cos, sin) [B * F, L, head_dim] of the 2-D rotary embedding and the key mask [B * F, 1, 1, L] of
    a padded video batch (rows by their patch's row, columns by its column, as `patch_angles`)."""
    row, col, valid = padded_video_layout(grid_thw, frames, patches, config.spatial_merge_size)
    inv_freq = jnp.asarray(inv_frequencies(config.head_dim // 2, config.rope_theta))
    angles = jnp.concatenate([row[..., None] * inv_freq, col[..., None] * inv_freq], axis=-1)  # [B, L, hd/2]
    cos, sin = rope_cos_sin(angles.astype(jnp.float32), jnp.float32)
    b = angles.shape[0]
    spread = lambda x: jnp.broadcast_to(x[:, None], (b, frames, *x.shape[1:])).reshape(b * frames, *x.shape[1:])
    return spread(cos), spread(sin), valid.reshape(b * frames, 1, 1, patches)


def patch_angles(pixel_values, grids: Sequence[Grid], config):
    """Check packed patches against their grids; (2-D rotary angles per patch [N, head_dim / 2],
    the per-frame segment layout (gather, valid, scatter) of `vision_layout`).

    The first half of the frequencies rotate by the patch's row, the second by its column.
    """
    expected = sum(t * h * w for t, h, w in grids)
    if pixel_values.shape != (expected, config.patch_dim):
        raise ValueError(f"pixel_values has shape {pixel_values.shape}, but grids {tuple(grids)} need "
                         f"({expected}, {config.patch_dim})")
    positions, *layout = vision_layout(grids, config.spatial_merge_size)
    inv_freq = inv_frequencies(config.head_dim // 2, config.rope_theta)
    return np.concatenate([positions[:, :1] * inv_freq, positions[:, 1:] * inv_freq], axis=-1), tuple(layout)


class PatchEmbed(nnx.Module):
    """= PatchEmbed: the Conv3d with stride == kernel over (C, 2, 14, 14) patches is one matmul."""

    def __init__(self, config: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.proj = Linear(config.patch_dim, config.embed_dim, axes=("conv_in", "embed"), use_bias=False,
                           dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)

    def __call__(self, pixel_values):
        return self.proj(pixel_values)


class VisionAttention(nnx.Module):
    """= VisionAttention: fused qkv with bias, 2-D RoPE on rows/columns, bidirectional within a segment."""

    def __init__(self, config: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        d = config.embed_dim
        self.num_heads, self.head_dim, self.attention_impl = config.num_heads, config.head_dim, config.attention_impl
        self.query_chunk = config.query_chunk
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.qkv = Linear(d, 3 * d, axes=("embed", "q_heads"), use_bias=True, **kw)
        self.proj = Linear(d, d, axes=("q_heads", "embed"), use_bias=True, **kw)

    def __call__(self, x, cos, sin, mask):
        s, length, _ = x.shape
        qkv = self.qkv(x).reshape(s, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        out = attention(q, k, v, mask, scale=self.head_dim ** -0.5, implementation=self.attention_impl,
                        query_chunk=self.query_chunk)
        return self.proj(out.reshape(s, length, -1))


class Qwen2VLVisionBlock(nnx.Module):
    """= Qwen2VLVisionBlock: pre-LN (eps 1e-6) attention and QuickGELU MLP with residuals."""

    def __init__(self, config: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        d, pd = config.embed_dim, jnp.dtype(config.param_dtype)
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=pd, rngs=rngs)
        self.norm1 = LayerNorm(d, eps=1e-6, param_dtype=pd, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=1e-6, param_dtype=pd, rngs=rngs)
        self.attn = VisionAttention(config, rngs=rngs)
        self.mlp = VisionMlp(config, **kw)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, ("batch", "length", "act_embed"))


class VisionMlp(nnx.Module):
    """= VisionMlp: fc1, QuickGELU (x * sigmoid(1.702 x)), fc2."""

    def __init__(self, config: Qwen2VLVisionConfig, **kw):
        hidden = config.embed_dim * config.mlp_ratio
        self.fc1 = Linear(config.embed_dim, hidden, axes=("embed", "mlp"), use_bias=True, **kw)
        self.fc2 = Linear(hidden, config.embed_dim, axes=("mlp", "embed"), use_bias=True, **kw)

    def __call__(self, x):
        h = self.fc1(x)
        return self.fc2(h * jax.nn.sigmoid(1.702 * h))


class GELU(nnx.Module):
    """= torch.nn.GELU() (exact); a module so `merger.mlp` indexes like HF's nn.Sequential."""

    def __call__(self, x):
        return jax.nn.gelu(x, approximate=False)


class PatchMerger(nnx.Module):
    """= PatchMerger: LayerNorm, then each 2x2 block of patches (consecutive rows) -> Linear, GELU, Linear.

    `out_features` (default: the LM width, `config.hidden_size`) and `norm` (Qwen2.5-VL: RMSNorm)
    serve the Qwen2.5-style towers too.
    """

    def __init__(self, config, *, out_features: int | None = None, norm=LayerNorm, rngs: nnx.Rngs):
        merged = config.embed_dim * config.spatial_merge_size ** 2
        pd = jnp.dtype(config.param_dtype)
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=pd, rngs=rngs)
        self.ln_q = norm(config.embed_dim, eps=1e-6, param_dtype=pd, rngs=rngs)
        self.mlp = nnx.List([Linear(merged, merged, axes=("vision_merge", "mlp"), use_bias=True, **kw), GELU(),
                             Linear(merged, out_features or config.hidden_size, axes=("mlp", "embed"), use_bias=True,
                                    **kw)])
        self.merged = merged

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, self.merged)
        for layer in self.mlp:
            x = layer(x)
        return x


class Qwen2VisionTransformer(nnx.Module):
    """= Qwen2VisionTransformerPretrainedModel: packed patches [N, 1176] + grids -> merged [N / 4, hidden]."""

    def __init__(self, config: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.patch_embed = PatchEmbed(config, rngs=rngs)
        blocks = [Qwen2VLVisionBlock(config, rngs=rngs) for _ in range(config.depth)]
        self.blocks = stack_layers(blocks) if config.scan_layers else nnx.List(blocks)
        self.merger = PatchMerger(config, rngs=rngs)

    def padded(self, pixel_values, grid_thw):
        """Padded video [B, F, L, 1176] + grids [B, 3] -> merged tokens [B, F * L / 4, hidden] (a clip's
        tokens first in each frame's L / 4 slots; the rest is padding, `padded_token_mask`)."""
        cfg = self.config
        check_padded_video(pixel_values, grid_thw, cfg)
        b, frames, patches, _ = pixel_values.shape
        cos, sin, mask = padded_angles(grid_thw, frames, patches, cfg)
        x = self.patch_embed(pixel_values.reshape(b * frames, patches, -1))  # [B * F, L, D]
        if cfg.scan_layers:
            x, _ = scan_layers(self.blocks, lambda block, x, _: (block(x, cos, sin, mask), None), x)
        else:
            for block in self.blocks:
                x = block(x, cos, sin, mask)
        return self.merger(x).reshape(b, frames * patches // cfg.spatial_merge_size ** 2, -1)

    def __call__(self, pixel_values, grid_thw):
        grids = as_grids(grid_thw)
        cfg = self.config
        angles, (gather, valid, scatter) = patch_angles(pixel_values, grids, cfg)
        cos, sin = rope_cos_sin(jnp.asarray(angles[gather], jnp.float32), jnp.float32)
        mask = jnp.asarray(valid)[:, None, None, :]
        x = self.patch_embed(pixel_values)[jnp.asarray(gather)]  # [S, L, D]
        if cfg.scan_layers:
            x, _ = scan_layers(self.blocks, lambda block, x, _: (block(x, cos, sin, mask), None), x)
        else:
            for block in self.blocks:
                x = block(x, cos, sin, mask)
        x = x.reshape(-1, x.shape[-1])[jnp.asarray(scatter)]
        return self.merger(x)


def merge_vision_embeddings(embeds, input_ids, visual, merge: int, items):
    """`embeds` with each (pixels, grids, placeholder token id) of `items` encoded by `visual` into its
    placeholder positions (None pixels: skipped). Concrete ids are checked against the grids.
    Pixels of 4 dimensions are a padded video batch (module docstring): `visual.padded` encodes them."""
    for pixels, grid, token in items:
        if pixels is None:
            continue
        placeholder = input_ids == token
        if pixels.ndim == 4:
            if not isinstance(input_ids, jax.core.Tracer) and not isinstance(grid, jax.core.Tracer):
                found = np.sum(np.asarray(placeholder), axis=1)
                expected = np.prod(np.asarray(grid), axis=1) // merge ** 2
                if (found != expected).any():
                    rows = np.flatnonzero(found != expected).tolist()
                    raise ValueError(f"rows {rows} hold {found[rows].tolist()} vision tokens (id {token}) but their "
                                     f"grids give {expected[rows].tolist()}")
            embeds = scatter_padded_video(embeds, placeholder, visual.padded(pixels, grid), grid,
                                          pixels.shape[2] // merge ** 2, merge)
            continue
        grids = as_grids(grid)
        if not isinstance(input_ids, jax.core.Tracer):
            found, expected = int(np.sum(np.asarray(placeholder))), sum(t * h * w for t, h, w in grids) // merge ** 2
            if found != expected:
                raise ValueError(f"the prompts hold {found} vision tokens (id {token}) but the grids {grids} "
                                 f"give {expected} embeddings")
        embeds = scatter_into_placeholders(embeds, placeholder, visual(pixels, grids))
    return embeds


def scatter_padded_video(embeds, placeholder, tokens, grid_thw, slots_per_frame: int, merge: int):
    """embeds [B, T, D] with row b's placeholders replaced, in order, by clip b's merged tokens from a
    padded layout `tokens` [B, F * slots_per_frame, D] (frame f's h*w / merge^2 tokens first in its slots)."""
    grid = jnp.asarray(grid_thw, jnp.int32)
    per_frame = jnp.maximum(grid[:, 1:2] * grid[:, 2:3] // merge ** 2, 1)  # [B, 1]
    rank = jnp.cumsum(placeholder.astype(jnp.int32), axis=1) - 1  # [B, T]: the k-th vision token of the row
    index = (rank // per_frame) * slots_per_frame + rank % per_frame
    index = jnp.clip(index, 0, tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(tokens, index[..., None], axis=1).astype(embeds.dtype)
    return jnp.where(placeholder[..., None], gathered, embeds)


def scatter_into_placeholders(embeds, placeholder, values):
    """embeds with the rows where `placeholder` is True replaced, in row-major order, by `values` [M, D]."""
    rank = jnp.cumsum(placeholder.reshape(-1)).reshape(placeholder.shape) - 1
    gathered = values[jnp.clip(rank, 0, values.shape[0] - 1)].astype(embeds.dtype)
    return jnp.where(placeholder[..., None], gathered, embeds)


class Qwen2VLForConditionalGeneration(nnx.Module):
    """`model(input_ids=, attention_mask=, pixel_values=, image_grid_thw=, pixel_values_videos=,
    video_grid_thw=) -> logits [B, T, V]`; M-RoPE positions are derived from the ids and grids."""

    lora_scope = "language_model"  # LoRA adapts the LM only; the vision tower stays frozen

    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.visual = Qwen2VisionTransformer(config.vision, rngs=rngs)
        self.language_model = Qwen2ForCausalLM(config.text, rngs=rngs)

    def prepare_inputs(self, batch: dict) -> tuple[dict, dict]:
        """Host-side: add M-RoPE `position_ids` and split off the grids as static values (for jit)."""
        arrays = {k: v for k, v in batch.items() if not k.endswith("grid_thw")}
        static = {k: as_grids(v) for k, v in batch.items() if k.endswith("grid_thw") and v is not None}
        if arrays.get("position_ids") is None and static:
            arrays["position_ids"] = mrope_positions(
                batch["input_ids"], batch.get("attention_mask"), static.get("image_grid_thw", ()),
                static.get("video_grid_thw", ()), self.config)
        return arrays, static

    def embed_inputs(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                     video_grid_thw=None):
        """Token embeddings with the merged vision embeddings in the image/video placeholder positions."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        return merge_vision_embeddings(embeds, input_ids, self.visual, self.config.vision.spatial_merge_size,
                                       ((pixel_values, image_grid_thw, self.config.image_token_id),
                                        (pixel_values_videos, video_grid_thw, self.config.video_token_id)))

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                      pixel_values_videos=None, video_grid_thw=None, position_ids=None):
        if position_ids is None and (image_grid_thw is not None or video_grid_thw is not None):
            if isinstance(input_ids, jax.core.Tracer):
                raise ValueError("under jit, pass position_ids (see prepare_inputs / mrope_positions)")
            position_ids = mrope_positions(input_ids, attention_mask, as_grids(image_grid_thw),
                                           as_grids(video_grid_thw), self.config)
        embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        return self.language_model.hidden_states(attention_mask=attention_mask, position_ids=position_ids,
                                                 inputs_embeds=embeds)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, position_ids=None):
        return self.logits(self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw,
                                              pixel_values_videos, video_grid_thw, position_ids))

    def logits(self, hidden, token_ids=None):
        return self.language_model.logits(hidden, token_ids)
