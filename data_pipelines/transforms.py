"""Model transforms for `data_pipelines.pipeline`: picklable `example dict -> model input dict`.

A transform receives the decoded example (see `pipeline`'s docstring: audio, frames, question,
options, answer, ...) and returns NumPy arrays named as the model's call takes them. Fields of
varying length are padded by the pipeline's batcher as `padding()` says.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import numpy as np

from data_pipelines import audio, vision
from data_pipelines.pipeline import Pad
from distill_jax import prompts
from distill_jax.models.qwen2_vl import rope_index

# Grain decodes in several threads; the first loads of a tokenizer (and of transformers' lazy
# modules) must not race.
_LOAD_LOCK = threading.Lock()
# Tokens added to a prompt's measured text budget: option names tokenized beside other lines may
# take a token more than alone.
TEXT_MARGIN = 8


@dataclasses.dataclass(frozen=True)
class VideoBuckets:
    """How a batch of videos is padded: temporal patches to one of `frames`, patches per temporal
    patch to one of `patches` (config.data.video_frame_buckets / video_patch_buckets), and the
    prompt to `text_tokens` (the split's longest text and audio part, `PromptTransform.text_tokens`)
    plus the layout's vision tokens. A model then compiles one program per (frames, patches) pair."""
    frames: tuple[int, ...]
    patches: tuple[int, ...]
    text_tokens: int
    multiple: int = 8  # the prompt's length rounded up to this (128: a length the TPU flash kernel takes)

    @property
    def programs(self) -> int:
        """The most distinct input shapes a batch size can give: one per bucket pair."""
        return len(self.frames) * len(self.patches)


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
        """Prompts left-padded to the smallest of `buckets` that holds the batch's longest."""
        return {"input_ids": Pad(tuple(buckets), value=self.tokenizer.pad_token_id, side="left",
                                 mask_key="attention_mask")}

    def text_tokens(self, class_names: Sequence[str], num_options: int) -> int:
        """An upper bound of a prompt's tokens other than video tokens, for questions over
        `class_names`: the prompt asked with the `num_options` longest option lines (and, with
        audio, the longest clip: `worst_case`), its video tokens not counted, plus TEXT_MARGIN."""
        tok = self.tokenizer
        by_length = sorted(class_names, key=lambda n: (-len(tok.encode(f"A. {n}\n", add_special_tokens=False)), n))
        out = self(self.worst_case({**self.probe_example(), "options": tuple(by_length[:num_options])}))
        video = tok.convert_tokens_to_ids(self.video_token) if self.video_token else None
        ids = np.asarray(out["input_ids"])
        return int(len(ids) - (0 if video is None else np.sum(ids == video))) + TEXT_MARGIN

    video_token: str | None = None  # the prompt's video placeholder, when the model sees video

    def probe_example(self) -> dict:
        """A minimal clip (two black 56x56 frames, 1 s of silence) to measure prompts with."""
        return {"clip_id": "probe", "frames": np.zeros((2, 56, 56, 3), np.uint8), "fps": 2.0,
                "audio": np.zeros(audio.SAMPLE_RATE, np.float32), "sample_rate": audio.SAMPLE_RATE}

    def worst_case(self, example: dict) -> dict:
        return example

    def static_inputs(self, batch: dict) -> tuple:
        """Hashable inputs of a (host) batch that the jitted model call takes as static."""
        return ()

    def model_inputs(self, arrays: dict, static: tuple) -> dict:
        """A placed batch -> the model's call arguments (runs under jit)."""
        raise NotImplementedError


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

    def worst_case(self, example: dict) -> dict:
        return {**example, "audio": np.zeros(int(self.max_seconds * example["sample_rate"]), np.float32)}

    def model_inputs(self, arrays: dict, static: tuple) -> dict:
        return {k: arrays[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}


class Qwen2VLTransform(PromptTransform):
    """Frames sampled at `config.fps`, Qwen2-VL preprocessing, and the multiple-choice video prompt.

    Output: pixel_values_videos float32 [t, h*w, 1176] (the processor's patches of each temporal
    patch), video_grid_thw int32 [3], input_ids int32 with t*h*w / 4 <|video_pad|> tokens, and
    their M-RoPE positions (= HF get_rope_index) int32 [T, 3]. Clips keep their own frame size
    and length (each gets the processor's smart_resize of its own frames); `padding()` pads a
    batch's videos to a (temporal patches, patches) bucket pair and its prompts, left, to the
    length that layout implies, and `model_inputs` hands the padded layout to the model, which
    computes positions and masks from the grids on the device (models/qwen2_vl.py).
    """

    video_token = prompts.VIDEO_TOKEN

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
        ids = np.asarray(ids, np.int32)
        positions = rope_index(ids[None], None, (), (tuple(int(v) for v in grid),),
                               image_token_id=self.tokenizer.convert_tokens_to_ids(prompts.IMAGE_TOKEN),
                               video_token_id=self.tokenizer.convert_tokens_to_ids(prompts.VIDEO_TOKEN),
                               spatial_merge_size=self.config.merge_size)
        t, h, w = (int(v) for v in grid)
        return {"pixel_values_videos": pixels.reshape(t, h * w, pixels.shape[-1]),
                "video_grid_thw": np.asarray(grid, np.int32), "input_ids": ids,
                "position_ids": np.ascontiguousarray(positions[:, 0].T, np.int32)}

    def padding(self, buckets: Sequence[int] = (128, 256, 512, 1024), video: VideoBuckets | None = None
                ) -> dict[str, Pad]:
        return video_padding(self.tokenizer.pad_token_id, buckets, video, self.config.merge_size)

    def model_inputs(self, arrays: dict, static: tuple) -> dict:
        return qwen2_vl_model_inputs(arrays)


def video_padding(pad_id: int, buckets: Sequence[int], video: VideoBuckets | None, merge: int) -> dict[str, Pad]:
    """A video model's batch padding: the patches [temporal patches, patches] to `video`'s bucket pair
    and the prompt (ids and their M-RoPE positions [T, 3], left, positions with 0 as HF's) to the length
    that pair implies. `video` None: the batch's own longest video, prompts to one of `buckets` (a
    handful of clips, e.g. `distill_jax.ask`)."""
    if video is None:
        return {"pixel_values_videos": Pad(None, inner=True),
                "input_ids": Pad(tuple(buckets), value=pad_id, side="left", mask_key="attention_mask"),
                "position_ids": Pad(tuple(buckets), value=0, side="left")}
    follow = dict(follows="pixel_values_videos", base=video.text_tokens, per=merge * merge, multiple=video.multiple)
    return {"pixel_values_videos": Pad(tuple(video.frames), inner=True, inner_buckets=tuple(video.patches)),
            "input_ids": Pad(value=pad_id, side="left", mask_key="attention_mask", **follow),
            "position_ids": Pad(value=0, side="left", **follow)}


def qwen2_vl_model_inputs(batch: dict) -> dict:
    """A batch of `Qwen2VLTransform` outputs -> the Qwen2-VL call's inputs: the padded video
    [B, frames, patches, 1176] with its grids [B, 3] (arrays: traced under jit) and the M-RoPE
    positions [3, B, T]. NumPy batches or placed arrays under jit alike."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "pixel_values_videos": batch["pixel_values_videos"], "video_grid_thw": batch["video_grid_thw"],
            "position_ids": batch["position_ids"].transpose(2, 0, 1)}


class Qwen2_5OmniTransform(PromptTransform):
    """One clip as Qwen2.5-Omni is shown it in `condition` ("audio", "video" (silent) or
    "audio_video" (sounded, `use_audio_in_video`)), and the multiple-choice prompt.

    Output: input_ids int32 and their TMRoPE positions int32 [T, 3] (= HF get_rope_index), and
    as the condition needs: input_features float32 [128, F] + feature_attention_mask int32 [F]
    (the Whisper front end as for Qwen2-Audio; F: whole windows of `2 * n_window` frames that
    hold the longest clip: the tower zeroes what follows a clip, so these are exactly the
    processor's 30 s features' embeddings), pixel_values_videos float32 [t*h*w, 1176] +
    video_grid_thw int32 [3] (Qwen2-VL's video preprocessing with the Omni processor's pixel
    bounds; one temporal patch = `temporal_patch_size / fps` seconds). The token ids and timing
    come from the checkpoint's config.json in `model_dir` (which also holds the tokenizer).
    """

    def __init__(self, model_dir: str, condition: str, *,
                 config: vision.VisionPreprocessConfig = vision.VisionPreprocessConfig(
                     min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28),
                 max_seconds: float = audio.MAX_SECONDS, chunk_seconds: float = audio.MAX_SECONDS,
                 system: str | None = prompts.OMNI_SYSTEM, **prompt_kw):
        if condition not in prompts.CONDITIONS:
            raise ValueError(f"condition {condition!r} is not one of {prompts.CONDITIONS}")
        super().__init__(model_dir, system=system, **prompt_kw)
        self.condition, self.config = condition, config
        self.max_seconds, self.chunk_seconds = max_seconds, chunk_seconds
        self._model_config = None

    @property
    def uses_audio(self) -> bool:
        return self.condition != "video"

    @property
    def uses_video(self) -> bool:
        return self.condition != "audio"

    @property
    def model_config(self):
        if self._model_config is None:
            from distill_jax.convert import read_hf_config
            from distill_jax.models.qwen2_5_omni import Qwen2_5OmniConfig

            self._model_config = Qwen2_5OmniConfig.from_hf(read_hf_config(self.tokenizer_dir))
        return self._model_config

    def __getstate__(self):
        return {**super().__getstate__(), "_model_config": None}

    def num_frames(self) -> int:
        """Mel frames per clip: whole tower windows holding a `max_seconds` clip."""
        window = self.model_config.audio.window_frames
        real = audio.num_audio_frames(int(round(self.max_seconds * audio.SAMPLE_RATE)),
                                      max_seconds=self.chunk_seconds)
        return -(-real // window) * window

    def __call__(self, example: dict) -> dict:
        cfg = self.model_config
        out, kw, grids, frames, seconds = {}, {}, (), (), ()
        try:
            if self.uses_audio:
                keep = self.num_frames()
                features, mask = audio.log_mel_features(
                    example["audio"], sample_rate=example["sample_rate"], max_seconds=self.chunk_seconds,
                    num_frames=audio.window_frames(self.max_seconds, chunk_seconds=self.chunk_seconds))
                out.update(input_features=np.ascontiguousarray(features[:, :keep]),
                           feature_attention_mask=mask[:keep])
                frames = (int(mask.sum()),)
                kw["num_audio_tokens"] = audio.num_audio_tokens(frames[0])
            if self.uses_video:
                pixels, grid = vision.preprocess_video(example["frames"], source_fps=example["fps"],
                                                       config=self.config)
                out.update(pixel_values_videos=pixels.reshape(int(grid[0]), -1, pixels.shape[-1]),
                           video_grid_thw=np.asarray(grid, np.int32))
                grids, seconds = (tuple(int(v) for v in grid),), (self.config.temporal_patch_size / self.config.fps,)
                kw.update(grid_thw=grid, second_per_grid=seconds[0], merge_size=self.config.merge_size,
                          position_id_per_seconds=cfg.position_id_per_seconds,
                          seconds_per_chunk=cfg.seconds_per_chunk)
        except ValueError as e:
            raise ValueError(f"clip {example['clip_id']}: {e}") from e
        question = prompts.format_question(example["options"], self.question_template)
        ids = np.asarray(prompts.encode_qwen2_5_omni(self.tokenizer, question, self.condition, system=self.system,
                                                     **kw), np.int32)
        from distill_jax.models.qwen2_5_omni import rope_index

        positions, _ = rope_index(ids[None], None, cfg, video_grids=grids, audio_frames=frames,
                                  video_second_per_grid=seconds, use_audio_in_video=self.condition == "audio_video")
        return {**out, "input_ids": ids, "position_ids": np.ascontiguousarray(positions[:, 0].T, np.int32)}

    def worst_case(self, example: dict) -> dict:
        if not self.uses_audio:
            return example
        return {**example, "audio": np.zeros(int(self.max_seconds * example["sample_rate"]), np.float32)}

    @property
    def video_token(self) -> str | None:
        return prompts.OMNI_VIDEO if self.uses_video else None

    def padding(self, buckets: Sequence[int] = (128, 256, 512, 1024), video: VideoBuckets | None = None
                ) -> dict[str, Pad]:
        if self.uses_video:
            return video_padding(self.tokenizer.pad_token_id, buckets, video, self.config.merge_size)
        return {**super().padding(buckets), "position_ids": Pad(tuple(buckets), value=0, side="left")}

    def model_inputs(self, arrays: dict, static: tuple) -> dict:
        if self.uses_video:  # the video part is padded per clip, as for Qwen2-VL
            out = qwen2_vl_model_inputs(arrays)
        else:
            out = {"input_ids": arrays["input_ids"], "attention_mask": arrays["attention_mask"],
                   "position_ids": arrays["position_ids"].transpose(2, 0, 1)}
        if self.uses_audio:
            out.update(input_features=arrays["input_features"], feature_attention_mask=arrays["feature_attention_mask"])
        return out


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
