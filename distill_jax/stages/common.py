"""What the stages share: the workdir's layout, the two models' roles, their pipelines and checkpoints.

`Study(config, workdir, mesh)` is built by `main` for each seed of the run config (its
`config.seed` set, its workdir `<workdir>/seed_<s>`); each stage but the report is a function
`run(study)` that reads and writes only under `study.workdir` (and the model checkpoints the
config names), and skips work whose output already exists. The report reads every seed's study
and writes results.md, results.json and plots into the run's workdir.

Layout of one seed's workdir:
    data/                 the toy world (prepare); real runs name their manifest in the config
    tokenizer/            the toy world's tokenizer (real checkpoints carry their own)
    models/{audio,visual} the toy world's warm-started checkpoints (HF format)
    eval/{name}/{split}.jsonl   per-clip letter scores (name: audio, visual, student_<mode>)
    switch/               the trained switch and its metrics
    labels/               train-split scores of both models, switch probabilities, labels per mode
    distill/<mode>/       orbax checkpoints, metrics.jsonl + TensorBoard events, PEFT adapter
    results.json          this seed's tables (the run's report pools the seeds one level up)
    timings.json          seconds of each stage's latest run
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import pipeline as pipeline_lib
from data_pipelines import transforms, vision
from data_pipelines.converter import load_manifest
from data_pipelines.questions import QuestionMaker
from distill_jax import prompts

MODALITIES = ("audio", "visual")
# direction -> (teacher, student)
ROLES = {"vl_to_audio": ("visual", "audio"), "audio_to_vl": ("audio", "visual")}
STAGES = ("prepare", "warm_start", "evaluate", "switch", "label", "distill", "report")


def batch_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)


def place_batch(tree, mesh):
    """Host arrays -> jax.Arrays: split over the mesh's batch axes where axis 0 divides evenly
    (the per-clip arrays), replicated otherwise (e.g. M-RoPE positions [3, B, T])."""
    axes = batch_axes(mesh)
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

    def place(x):
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            return x
        spec = PartitionSpec(axes) if x.ndim and x.shape[0] % ways == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, tree)


@dataclasses.dataclass
class Study:
    """The run config, workdir and mesh, and everything derived from them that stages share."""

    config: object  # ml_collections.ConfigDict (locked)
    workdir: str
    mesh: object
    _manifest: dict | None = None

    # ---- roles and paths ----------------------------------------------------------------------
    @property
    def teacher(self) -> str:
        return ROLES[self.config.direction][0]

    @property
    def student(self) -> str:
        return ROLES[self.config.direction][1]

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def manifest_path(self) -> str:
        return self.config.data.manifest or self.path("data", "tfrecords", "toy_world.manifest.json")

    def model_dir(self, modality: str) -> str:
        return self.config.models[modality].path or self.path("models", modality)

    def records_path(self, name: str, split: str) -> str:
        return self.path("eval", name, f"{split}.jsonl")

    # ---- data ---------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = load_manifest(self.manifest_path())
        return self._manifest

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def split_paths(self, split: str) -> list[str]:
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"split {split!r} is not in the manifest {self.manifest_path()} (has {sorted(splits)})")
        return splits[split]["paths"]

    def num_examples(self, split: str) -> int:
        self.split_paths(split)  # names a missing split
        return int(self.manifest["splits"][split]["num_examples"])

    def num_options(self) -> int:
        data = self.config.data
        return len(self.classes) if data.question_strategy == "fixed" else data.num_options

    def question_maker(self) -> QuestionMaker:
        data = self.config.data
        return QuestionMaker(self.classes, num_options=self.num_options(), strategy=data.question_strategy,
                             seed=data.question_seed)

    def transform(self, modality: str, tokenizer_dir: str | None = None):
        """`modality`'s model transform ("waveform": the switch's fixed-length audio); the
        tokenizer comes from its checkpoint unless given."""
        data = self.config.data
        if modality == "waveform":
            return transforms.WaveformTransform(data.max_seconds)
        prompt = dict(question_template=data.question_template, system=data.system_prompt or None)
        tokenizer_dir = tokenizer_dir or self.model_dir(modality)
        if modality == "audio":
            return transforms.Qwen2AudioTransform(tokenizer_dir, max_seconds=data.max_seconds,
                                                  chunk_seconds=data.audio_chunk_seconds, **prompt)
        return transforms.Qwen2VLTransform(tokenizer_dir, config=vision.VisionPreprocessConfig(
            fps=data.video_fps, max_pixels=data.max_pixels), **prompt)

    def dataset(self, modality: str | None, split: str, *, batch_size: int, train: bool = False,
                num_epochs: int | None = 1, seed: int = 0, tokenizer_dir: str | None = None):
        """Grain batches of `split` for `modality`'s model ("waveform": the switch's audio)."""
        transform = self.transform(modality, tokenizer_dir)
        padding = transform.padding(self.config.data.prompt_buckets) if modality != "waveform" else None
        config = pipeline_lib.PipelineConfig(
            batch_size=batch_size, shuffle=train, seed=seed, num_epochs=num_epochs, drop_remainder=train,
            decode_audio=modality != "visual", decode_frames=modality == "visual",
            num_options=self.num_options(), question_strategy=self.config.data.question_strategy,
            question_seed=self.config.data.question_seed, on_error=self.config.data.on_error,
            worker_count=self.config.data.worker_count)
        return pipeline_lib.make_dataset(self.split_paths(split), self.classes, config=config,
                                         transform=transform, padding=padding,
                                         question_maker=self.question_maker())

    @staticmethod
    def model_inputs(modality: str) -> Callable[[dict], dict]:
        if modality == "audio":
            return lambda b: {k: b[k] for k in ("input_ids", "attention_mask", "input_features",
                                                "feature_attention_mask")}
        return transforms.qwen2_vl_model_inputs

    # ---- models -------------------------------------------------------------------------------
    def tokenizer(self, modality: str):
        return prompts.load_tokenizer(self.model_dir(modality))

    def letter_ids(self, modality: str) -> list[int]:
        return prompts.letter_token_ids(self.tokenizer(modality), prompts.LETTERS[:self.num_options()])

    def load_model(self, modality: str, *, remat: str = "none"):
        """`modality`'s model; `remat` for a model that will be trained (config.distill.remat)."""
        from distill_jax.convert import load_hf

        return load_hf(self.model_dir(modality), dtype=self.config.compute_dtype, mesh=self.mesh, remat=remat,
                       attention_impl=self.config.models.attention_impl)
