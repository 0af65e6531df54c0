"""Model transforms for `data_pipelines.pipeline`: picklable `example dict -> model input dict`.

A transform receives the decoded example (see `pipeline`'s docstring: audio, frames, question,
options, answer, ...) and returns NumPy arrays named as the model's call takes them. Fields of
varying length are padded by the pipeline's batcher as `padding()` says.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from data_pipelines import audio
from data_pipelines.pipeline import Pad
from distill_jax import prompts

# Grain decodes in several threads; the first loads of a tokenizer (and of transformers' lazy
# modules) must not race.
_LOAD_LOCK = threading.Lock()


class Qwen2AudioTransform:
    """Log-mel features + the Qwen2-Audio multiple-choice prompt of one clip.

    Output: input_features float32 [128, T], feature_attention_mask int32 [T] (T = max_seconds
    * 100, 3000 for the 30 s window every Qwen2-Audio clip is padded to) and input_ids int32
    [prompt length] with one <|AUDIO|> per audio-encoder output frame. `padding()` left-pads
    input_ids in the batch (answer letters are scored at the last position) and adds
    attention_mask. The tokenizer is loaded from `tokenizer_dir` in each process on first use.
    """

    def __init__(self, tokenizer_dir: str, *, max_seconds: float = audio.MAX_SECONDS,
                 question_template: str = prompts.DEFAULT_QUESTION, system: str | None = prompts.DEFAULT_SYSTEM):
        self.tokenizer_dir, self.max_seconds = str(tokenizer_dir), max_seconds
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

    def __call__(self, example: dict) -> dict:
        try:
            features, mask = audio.log_mel_features(example["audio"], sample_rate=example["sample_rate"],
                                                    max_seconds=self.max_seconds)
        except ValueError as e:
            raise ValueError(f"clip {example['clip_id']}: {e}") from e
        num_tokens = audio.num_audio_tokens(int(mask.sum()))
        question = prompts.format_question(example["options"], self.question_template)
        ids = prompts.encode_qwen2_audio(self.tokenizer, question, num_tokens, system=self.system)
        return {"input_features": features, "feature_attention_mask": mask,
                "input_ids": np.asarray(ids, np.int32)}
