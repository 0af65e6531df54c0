"""Model transforms for `data_pipelines.pipeline`: picklable `example dict -> model input dict`.

A transform receives the decoded example (see `pipeline`'s docstring: audio, frames, question,
options, answer, ...) and returns NumPy arrays named as the model's call takes them. Fields of
varying length are padded by the pipeline's batcher as `padding()` says.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from data_pipelines import audio, vision
from data_pipelines.pipeline import Pad
from distill_jax import prompts

# Grain decodes in several threads; the first loads of a tokenizer (and of transformers' lazy
# modules) must not race.
_LOAD_LOCK = threading.Lock()


class PromptTransform:
    """What every model transform shares: a tokenizer loaded lazily in each process (Grain
    pickles transforms into its workers without it), the question wording, and the
    left-padding of input_ids (answer letters are scored at the last position)."""

    def __init__(self, tokenizer_dir: str, *, question_template: str = prompts.DEFAULT_QUESTION,
                 system: str | None = prompts.DEFAULT_SYSTEM):
        self.tokenizer_dir = str(tokenizer_dir)
        self.question_template, self.system = question_template, system
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            with _LOAD_LOCK:
                if self._tokenizer is None:
                    self._tokenizer = prompts.load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def padding(self, buckets: Sequence[int] = (128, 256, 512, 1024)) -> dict[str, Pad]:
        return {"input_ids": Pad(tuple(buckets), value=self.tokenizer.pad_token_id, side="left",
                                 mask_key="attention_mask")}


class Qwen2AudioTransform(PromptTransform):
    """Log-mel features + the Qwen2-Audio multiple-choice prompt of one clip.

    Output: input_features float32 [128, T], feature_attention_mask int32 [T] and input_ids int32
    [prompt length] with one <|AUDIO|> per audio-encoder output frame; `padding()` left-pads
    input_ids and adds attention_mask. Every Qwen2-Audio clip is padded to a `chunk_seconds`
    chunk (30 s, the processor's); T is the short window of clips of at most `max_seconds`
    (`audio.window_frames`: 1008 frames for 10 s), over which the features and the tower's
    embeddings equal the padded chunk's, without computing 20 s of padding.
    """

    def __init__(self, tokenizer_dir: str, *, max_seconds: float = audio.MAX_SECONDS,
                 chunk_seconds: float = audio.MAX_SECONDS, **prompt_kw):
        super().__init__(tokenizer_dir, **prompt_kw)
        self.max_seconds = max_seconds
        self.chunk_seconds = chunk_seconds
        self.num_frames = audio.window_frames(max_seconds, chunk_seconds=chunk_seconds)

    def __call__(self, example: dict) -> dict:
        try:
            features, mask = audio.log_mel_features(example["audio"], sample_rate=example["sample_rate"],
                                                    max_seconds=self.chunk_seconds, num_frames=self.num_frames)
        except ValueError as e:
            raise ValueError(f"clip {example['clip_id']}: {e}") from e
        num_tokens = audio.num_audio_tokens(int(mask.sum()))
        question = prompts.format_question(example["options"], self.question_template)
        ids = prompts.encode_qwen2_audio(self.tokenizer, question, num_tokens, system=self.system)
        return {"input_features": features, "feature_attention_mask": mask,
                "input_ids": np.asarray(ids, np.int32)}


class Qwen2VLTransform(PromptTransform):
    """Frames sampled at `config.fps`, Qwen2-VL preprocessing, and the multiple-choice video prompt.

    Output: pixel_values_videos float32 [t*h*w, 1176], video_grid_thw int64 [3] and input_ids
    int32 with t*h*w / 4 <|video_pad|> tokens. Clips of one split share frame size and length
    (the converter makes them so), so a batch stacks them; `qwen2_vl_model_inputs` packs a
    batch into the model's call. `padding()` left-pads input_ids as for audio.
    """

    def __init__(self, tokenizer_dir: str, *, config: vision.VisionPreprocessConfig = vision.VisionPreprocessConfig(),
                 **prompt_kw):
        super().__init__(tokenizer_dir, **prompt_kw)
        self.config = config

    def __call__(self, example: dict) -> dict:
        try:
            pixels, grid = vision.preprocess_video(example["frames"], source_fps=example["fps"], config=self.config)
        except ValueError as e:
            raise ValueError(f"clip {example['clip_id']}: {e}") from e
        question = prompts.format_question(example["options"], self.question_template)
        ids = prompts.encode_qwen2_vl(self.tokenizer, question, vision.num_vision_tokens(grid, self.config.merge_size),
                                      kind="video", system=self.system)
        return {"pixel_values_videos": pixels, "video_grid_thw": np.asarray(grid, np.int64),
                "input_ids": np.asarray(ids, np.int32)}


def qwen2_vl_model_inputs(batch: dict) -> dict:
    """A batch of `Qwen2VLTransform` outputs -> the Qwen2-VL call's inputs (packed patches, one grid per clip)."""
    grids = np.asarray(batch["video_grid_thw"])
    if (grids != grids[0]).any():
        raise ValueError(f"clips of one batch have different video grids {sorted({tuple(g) for g in grids})}: "
                         "convert the split with one frame size and clip length")
    pixels = np.asarray(batch["pixel_values_videos"])
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "pixel_values_videos": pixels.reshape(-1, pixels.shape[-1]), "video_grid_thw": grids}


class WaveformTransform:
    """The clip's mono waveform cut or zero-padded to `seconds` (the switch's input): waveform
    float32 [seconds * sample_rate], num_samples int32 (real samples before padding)."""

    def __init__(self, seconds: float, sample_rate: int = audio.SAMPLE_RATE):
        self.length, self.sample_rate = int(round(seconds * sample_rate)), sample_rate

    def __call__(self, example: dict) -> dict:
        if example["sample_rate"] != self.sample_rate:
            raise ValueError(f"clip {example['clip_id']}: audio at {example['sample_rate']} Hz, "
                             f"expected {self.sample_rate}")
        samples = np.asarray(example["audio"], np.float32)[:self.length]
        waveform = np.zeros(self.length, np.float32)
        waveform[:len(samples)] = samples
        return {"waveform": waveform, "num_samples": np.int32(len(samples))}
