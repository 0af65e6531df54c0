"""Qwen2-VL image/video preprocessing in NumPy (+ PIL for the bicubic resize).

Equals transformers' `Qwen2VLImageProcessor` (its PIL backend): `smart_resize` to
multiples of 28 within [min_pixels, max_pixels], PIL bicubic resize of uint8 RGB,
rescale by 1/255 (float64, then float32), normalise with the OpenAI CLIP mean/std,
and patchify into rows of 3*2*14*14 values in HF's order: merge-block-major rows,
(channel, time, y, x) columns. A video is the same code path on its frames taken
in pairs (temporal patch 2); an image is one frame repeated twice. torchvision
(HF's video path) is unusable on our machines, hence this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """Qwen2-VL processor settings (HF defaults); min/max pixels bound the resized frame area."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    fps: float = 2.0  # video frames sampled per second

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) divisible by `factor`, area within [min_pixels, max_pixels], aspect kept (= HF's)."""
    if min(height, width) < 1:
        raise ValueError(f"image of size {height}x{width} is empty")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"frames must be [T, H, W, 3] uint8, got shape {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("no frames (T = 0)")
    if frames.shape[-1] != 3:
        raise ValueError(f"frames must have 3 (RGB) channels, got {frames.shape[-1]} (shape {frames.shape})")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
    return frames


def resize_and_normalize(frames: np.ndarray, config: VisionPreprocessConfig = VisionPreprocessConfig()
                         ) -> np.ndarray:
    """[T, H, W, 3] uint8 -> [T, 3, H', W'] float32 (resized by smart_resize, rescaled, normalised).

    Frames with a side under `config.factor` (28) pixels are an error: Qwen2-VL's own
    utilities refuse them (transformers 5 would silently upscale a sliver into patches).
    """
    frames = _check_frames(frames)
    height, width = frames.shape[1:3]
    if min(height, width) < config.factor:
        raise ValueError(f"frame of {height}x{width} pixels is smaller than the {config.factor}-pixel minimum "
                         "side of Qwen2-VL's patches")
    new_h, new_w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)
    std = np.asarray(OPENAI_CLIP_STD, np.float32)
    out = np.empty((len(frames), 3, new_h, new_w), np.float32)
    for i, frame in enumerate(frames):
        resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
        scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        out[i] = ((scaled - mean) / std).transpose(2, 0, 1)
    return out


def patchify(frames: np.ndarray, config: VisionPreprocessConfig = VisionPreprocessConfig()
             ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[T, 3, H, W] normalised frames (T a multiple of 2) -> (rows [t*h*w, 3*2*14*14], grid (t, h, w))."""
    n, channels, height, width = frames.shape
    p, tp, m = config.patch_size, config.temporal_patch_size, config.merge_size
    if n % tp:
        raise ValueError(f"frame count {n} is not a multiple of temporal_patch_size={tp}")
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frame size {height}x{width} is not a multiple of {p * m}")
    grid_t, grid_h, grid_w = n // tp, height // p, width // p
    patches = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return (np.ascontiguousarray(patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)),
            (grid_t, grid_h, grid_w))


def preprocess_image(image: np.ndarray, config: VisionPreprocessConfig = VisionPreprocessConfig()):
    """[H, W, 3] uint8 -> (pixel_values [h*w, 1176], grid (1, h, w)) (= Qwen2VLImageProcessor)."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W, 3] uint8, got shape {image.shape}")
    frames = resize_and_normalize(image[None], config)
    return patchify(np.repeat(frames, config.temporal_patch_size, axis=0), config)


def sample_frame_indices(num_frames: int, source_fps: float, config: VisionPreprocessConfig = VisionPreprocessConfig()
                         ) -> np.ndarray:
    """Indices of frames to keep: `config.fps` per second, evenly spread, count a multiple of 2 (>= 2)."""
    if num_frames < 1:
        raise ValueError("no frames to sample from (0 decoded frames)")
    if source_fps <= 0:
        raise ValueError(f"source fps must be positive, got {source_fps}")
    tp = config.temporal_patch_size
    wanted = num_frames / source_fps * config.fps
    count = max(tp, int(round(wanted / tp)) * tp)
    return np.round(np.linspace(0, num_frames - 1, count)).astype(np.int64)


def preprocess_video(frames: np.ndarray, source_fps: float | None = None,
                     config: VisionPreprocessConfig = VisionPreprocessConfig()):
    """[T, H, W, 3] uint8 decoded frames -> (pixel_values [t*h*w, 1176], grid (t, h, w)).

    With `source_fps`, frames are first sampled at `config.fps`; without, all given
    frames are used (their count must be a multiple of 2).
    """
    frames = _check_frames(frames)
    if source_fps is not None:
        frames = frames[sample_frame_indices(len(frames), source_fps, config)]
    return patchify(resize_and_normalize(frames, config), config)


def num_vision_tokens(grid_thw, merge_size: int = 2) -> int:
    """LLM tokens (`<|image_pad|>`/`<|video_pad|>`) of one item: t*h*w / merge_size^2."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)
