"""Ask a model the multiple-choice question about a few clip files, outside the study.

The engine of `colab/qwen_models.ipynb`: `letter_probabilities(model, "audio" | "visual",
clips, options)` gives each clip's distribution over the answer letters, the same prompt,
preprocessing and letter scoring as the study's evaluate stage (`data_pipelines.transforms`,
`scoring.letter_scorer`), for clips decoded straight from mp4 files (`read_clip`).
`example_clips` renders a few synthetic toy-world clips (labelled as such) when no clips are
uploaded; `random_checkpoint` writes a tiny random model of either architecture, for CPU demos
and tests without the hub.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import audio, media, vision
from data_pipelines.pipeline import PadBatch
from data_pipelines.questions import QuestionMaker
from distill_jax import prompts, scoring, sharding
from distill_jax.train.loop import batch_axes, local_rows, place

MAX_SECONDS = 10.0  # VGGSound's clip length, the paper config's
VIDEO_FPS = 2.0
PROMPT_BUCKETS = (128, 256, 512, 1024, 2048, 4096)


def read_clip(path, *, max_seconds: float = MAX_SECONDS, fps: float = VIDEO_FPS, max_short_side: int = 448) -> dict:
    """The first `max_seconds` of an mp4 (or any FFmpeg-readable file with sound and picture) as the
    pipeline's example fields: 16 kHz mono audio in [-1, 1) and RGB frames at `fps`."""
    pcm, jpegs = media.decode_clip(path, max_seconds=max_seconds, fps=fps, max_short_side=max_short_side)
    return {"clip_id": os.path.splitext(os.path.basename(os.fspath(path)))[0],
            "audio": pcm.astype(np.float32) / np.float32(32768.0), "sample_rate": media.SAMPLE_RATE,
            "frames": np.stack([media.decode_jpeg(j) for j in jpegs]), "fps": fps}


def question_options(true_class: str, classes: Sequence[str], *, num_options: int = 10, seed: int = 0,
                     clip_id: str = "") -> tuple[tuple[str, ...], int]:
    """(options, index of the true class) of the study's question: the true class and
    `num_options - 1` distractors drawn uniformly from `classes`, in a seeded order."""
    question = QuestionMaker(list(classes), num_options=num_options, strategy="uniform", seed=seed)(
        clip_id or true_class, true_class)
    return tuple(question.options), int(question.answer)


def _transform(modality: str, model_dir: str, max_seconds: float, fps: float):
    from data_pipelines import transforms

    if modality == "audio":
        return transforms.Qwen2AudioTransform(model_dir, max_seconds=max_seconds, chunk_seconds=audio.MAX_SECONDS)
    if modality == "visual":
        return transforms.Qwen2VLTransform(model_dir, config=vision.VisionPreprocessConfig(fps=fps))
    raise ValueError(f"modality must be 'audio' or 'visual', got {modality!r}")


def letter_probabilities(model, modality: str, clips: Sequence[dict], options: Sequence[Sequence[str]], *,
                         model_dir: str | None = None, mesh=None, max_seconds: float = MAX_SECONDS,
                         fps: float = VIDEO_FPS) -> np.ndarray:
    """[clips, options] softmax over the answer letters of `model` (a path, hub id or loaded
    model; a loaded one needs `model_dir` for its tokenizer), one clip (`read_clip`) and its
    options per row. The audio model hears the audio only; the visual model sees the frames only.
    Each clip is one batch (clips differ in length and frame size), repeated over the mesh's batch
    axes, so this is for a handful of clips: the study's evaluate stage scores splits."""
    from distill_jax import hub
    from distill_jax.convert import load_hf

    mesh = mesh or sharding.make_mesh({"fsdp": -1})
    if isinstance(model, (str, os.PathLike)):
        model_dir = hub.checkpoint_dir(model)
        model = load_hf(model_dir, dtype=jnp.bfloat16 if jax.default_backend() == "tpu" else jnp.float32, mesh=mesh)
    if model_dir is None:
        raise ValueError("a loaded model needs model_dir= (its tokenizer's directory)")
    transform = _transform(modality, hub.checkpoint_dir(model_dir), max_seconds, fps)
    batcher = PadBatch(transform.padding(PROMPT_BUCKETS))
    copies = int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))
    scorers = {}  # per number of options: its letters' scorer
    out = []
    with jax.set_mesh(mesh):
        for clip, clip_options in zip(clips, options, strict=True):
            if len(clip_options) not in scorers:
                letters = prompts.letter_token_ids(transform.tokenizer, prompts.LETTERS[:len(clip_options)])
                scorers[len(clip_options)] = scoring.letter_scorer(model, letters, transform.model_inputs, mesh)
            compute = scorers[len(clip_options)]
            example = transform({**clip, "options": tuple(clip_options)})
            batch = batcher([example] * copies)
            logits = local_rows(compute(place(batch, mesh), transform.static_inputs(batch)))[0]
            out.append(np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32))))
    return np.stack(out)


def example_clips(out_dir, classes: Sequence[str] = ("dog barking", "church bell ringing", "playing violin, fiddle",
                                                     "police car (siren)"), *, seed: int = 0) -> list[tuple[str, str]]:
    """[(mp4 path, class)]: one **synthetic** toy-world clip per class (a procedural sound and a
    drawn shape, 2 s; see data_pipelines/toy_world.py), for trying the pipeline without uploads.
    Real models are not expected to recognise them."""
    from data_pipelines import toy_world

    names = [c.name for c in toy_world.CLASSES]
    config = toy_world.WorldConfig(seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for number, name in enumerate(classes):
        path = os.path.join(os.fspath(out_dir), f"synthetic_{number}.mp4")
        toy_world._write_clip((path, names.index(name), "test", number, config))
        out.append((path, name))
    return out


def random_checkpoint(modality: str, out_dir, *, words: Sequence[str] = (), seed: int = 0) -> str:
    """A tiny randomly initialised Qwen2-Audio ("audio") or Qwen2-VL ("visual") with a tiny
    Qwen2-style tokenizer (`words` added to its corpus), as a Hugging Face directory: the
    architecture and file layout of the real checkpoint at toy size, for CPU runs without the hub."""
    import ml_collections

    from distill_jax.convert import save_hf
    from distill_jax.stages.warm_start import toy_model
    from distill_jax.toy_tokenizer import make_qwen2_tokenizer

    out_dir = os.fspath(out_dir)
    tokenizer_dir = make_qwen2_tokenizer(os.path.join(out_dir, "tokenizer"), words=words)
    sizes = ml_collections.ConfigDict(dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                           num_kv_heads=2, tower_layers=1, tower_dim=32, tower_heads=2))
    model = toy_model(modality, sizes, prompts.load_tokenizer(tokenizer_dir), max_seconds=audio.MAX_SECONDS, seed=seed)
    return save_hf(model, os.path.join(out_dir, modality), tokenizer_dir=tokenizer_dir)
