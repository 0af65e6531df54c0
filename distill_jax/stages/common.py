"""What the stages share: the workdir's layout, the two models' roles, their pipelines and checkpoints.

`Study(config, workdir, mesh)` is built by `main` for each seed of the run config (its
`config.seed` set, its workdir `<workdir>/seed_<s>`); each stage but the report is a function
`run(study)` that reads and writes only under `study.workdir` (and the model checkpoints the
config names), and skips work whose output already exists. The report reads every seed's study
and writes results.md, results.json and plots into the run's workdir. Paths are etils.epath
paths (the workdir may be gs://). A stage declares what it trains or scores; the batches come
complete from `Study.dataset` (model inputs, positions, targets joined by clip id, each batch
padded to a bucket, the same lengths on every host), and the trainer (train/loop.py) and scorer (scoring.py) run them.

Layout of one seed's workdir:
    data/                 the toy world (prepare): its manifest, and its unseen classes' AudioSet-format
                          files and manifest; real runs name their manifests in the config
    tokenizer/            the toy world's tokenizer (real checkpoints carry their own)
    models/{audio,visual} the toy world's warm-started checkpoints (HF format); models/audio_visual and
                          tokenizer_omni/ with config.warm_start.audio_visual (a tiny Qwen2.5-Omni)
    eval/{name}/{split}.jsonl   per-clip letter scores (name: audio, visual, student_<mode>,
                          audio_visual_<condition>: the audio-visual model on audio, video, audio_video)
    switch/               the trained switch, its probabilities on its splits, its metrics;
                          variants/<inputs>/ the same for each config.switch.variants switch, and
                          visual_embedding/<split>.jsonl (the audio_visual switch's pooled vision embeddings)
    labels/               train-split scores of both models, switch probabilities, labels per mode
                          (learned_<inputs>: a switch variant's)
    distill/<mode>/       orbax checkpoints, metrics.jsonl + TensorBoard events, PEFT adapter
    results.json          this seed's tables (the run's report pools the seeds one level up)
The run's workdir (above the seeds) also holds data_errors.jsonl: every record skipped with
config.data.on_error="skip" (distill_jax/data_errors.py).
    timings.json          seconds of each stage's latest run
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from etils import epath

from data_pipelines import pipeline as pipeline_lib
from data_pipelines import tfrecord, transforms, vision
from data_pipelines.converter import load_manifest
from data_pipelines.questions import QuestionMaker
from distill_jax import multihost, prompts

MODALITIES = ("audio", "visual")
# direction -> (teacher, student)
ROLES = {"vl_to_audio": ("visual", "audio"), "audio_to_vl": ("audio", "visual")}
# The audio-visual reference model (Qwen2.5-Omni, config.models.audio_visual): scored on each
# condition of prompts.CONDITIONS under the records name `audio_visual_name(condition)`; with
# config.teacher="audio_visual" its sounded-video answers teach the direction's student.
AUDIO_VISUAL = "audio_visual"
# The split of classes the study never distils on: config.data.unseen's manifest (AudioSet's
# evaluation segments, data_pipelines/audioset.py; the toy world's unseen classes go the same way).
UNSEEN = "unseen"


def audio_visual_name(condition: str) -> str:
    """Records / transform name of the audio-visual model shown clips in `condition`."""
    if condition not in prompts.CONDITIONS:
        raise ValueError(f"condition {condition!r} is not one of {prompts.CONDITIONS}")
    return f"{AUDIO_VISUAL}_{condition}"


def has_audio_visual(config) -> bool:
    """Whether a run has an audio-visual model: a checkpoint, or the toy world's warm start of one."""
    cfg = config.models.get(AUDIO_VISUAL)
    return bool(cfg and (cfg.path or (config.toy and config.warm_start.get(AUDIO_VISUAL))))


def checkpoint_of(name: str) -> str:
    """The model (config.models key) behind a records name: "audio", "visual" or "audio_visual"."""
    return AUDIO_VISUAL if name.startswith(AUDIO_VISUAL) else name


def condition_of(name: str) -> str | None:
    """The condition of an audio-visual records name (None for the single-modality models)."""
    return name[len(AUDIO_VISUAL) + 1:] if name.startswith(AUDIO_VISUAL + "_") else None


def classes_with_clips(manifest: dict, split: str) -> list[str]:
    """The classes with clips in `split` (its `class_counts`; a manifest written before they were
    recorded: its whole class list)."""
    counts = manifest["splits"].get(split, {}).get("class_counts")
    return [c for c in manifest["classes"] if counts is None or counts.get(c)]


def check_unseen(unseen: dict, unseen_path, unseen_split: str, seen: dict, seen_path,
                 seen_splits: tuple[str, ...]) -> None:
    """Raises naming both manifests where the unseen split is missing, or where a class with clips in
    it also has clips in a split the study distils on (`seen_splits` of the run's manifest)."""
    if unseen_split not in unseen["splits"]:
        raise ValueError(f"{unseen_path}: no split {unseen_split!r} (config.data.unseen.split; the manifest has "
                         f"{sorted(unseen['splits'])})")
    distilled = {c for split in seen_splits if split in seen["splits"] for c in classes_with_clips(seen, split)}
    overlap = [c for c in classes_with_clips(unseen, unseen_split) if c in distilled]
    if overlap:
        raise ValueError(f"{unseen_path}: the unseen split {unseen_split!r} holds clips of {len(overlap)} classes "
                         f"that the study distils on ({seen_path}, splits {list(seen_splits)}): {overlap[:10]}; "
                         "an unseen class must be new to the distillation (leave it out of the converter's --keep)")


def vggsound_manifest_path(run_dir) -> epath.Path:
    """Where the prepare stage converts config.data.vggsound.csv: <run workdir>/data/vggsound/."""
    return multihost.path(run_dir) / "data" / "vggsound" / "vggsound.manifest.json"


STAGES = ("prepare", "warm_start", "evaluate", "switch", "label", "distill", "report")


@dataclasses.dataclass
class Study:
    """The run config, workdir and mesh, and everything derived from them that stages share."""

    config: object  # ml_collections.ConfigDict (locked)
    workdir: epath.Path
    mesh: object
    run_dir: epath.Path | None = None  # the run's workdir (seeds' parent): data_errors.jsonl; None: workdir
    _manifest: dict | None = None
    _unseen_manifest: dict | None = None
    _data_errors: object = None
    _transforms: dict = dataclasses.field(default_factory=dict)
    _paddings: dict = dataclasses.field(default_factory=dict)
    _input_log: object = None

    def __post_init__(self):
        self.workdir = multihost.path(self.workdir)
        self.run_dir = multihost.path(self.run_dir or self.workdir)

    # ---- roles and paths ----------------------------------------------------------------------
    @property
    def teacher(self) -> str:
        """The teacher's records name: the direction's other modality, or with config.teacher
        "audio_visual" the audio-visual model on sounded video."""
        if self.config.get("teacher") == AUDIO_VISUAL:
            return audio_visual_name("audio_video")
        return ROLES[self.config.direction][0]

    @property
    def audio_visual(self) -> bool:
        return has_audio_visual(self.config)

    @property
    def student(self) -> str:
        return ROLES[self.config.direction][1]

    def path(self, *parts: str) -> epath.Path:
        return self.workdir.joinpath(*parts)

    def manifest_path(self) -> epath.Path:
        """config.data.manifest; the prepare stage's conversion of config.data.vggsound.csv (in the run's
        workdir, shared by its seeds); or the toy world's."""
        if self.config.data.vggsound.csv:
            return vggsound_manifest_path(self.run_dir)
        return multihost.path(self.config.data.manifest or self.path("data", "tfrecords", "toy_world.manifest.json"))

    def unseen_manifest_path(self) -> epath.Path | None:
        """config.data.unseen.manifest, the toy world's unseen manifest, or None (no unseen split)."""
        cfg = self.config.data.unseen
        if cfg.manifest:
            return multihost.path(cfg.manifest)
        return self.path("data", "tfrecords", "toy_world_unseen.manifest.json") if self.config.toy else None

    def model_dir(self, modality: str) -> epath.Path:
        """`modality`'s checkpoint directory: config.models.<m>.path (a directory, gs://, or a hub
        id fetched into the Hugging Face cache), or the toy world's warm-started model."""
        from distill_jax.hub import checkpoint_dir

        modality = checkpoint_of(modality)
        path = self.config.models[modality].path
        return multihost.path(checkpoint_dir(path) if path else self.path("models", modality))

    def records_path(self, name: str, split: str) -> epath.Path:
        return self.path("eval", name, f"{split}.jsonl")

    # ---- data ---------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = load_manifest(self.manifest_path())
        return self._manifest

    @property
    def classes(self) -> list[str]:
        """The run manifest's class list (records' `label` of every split but "unseen" indexes it)."""
        return list(self.manifest["classes"])

    @property
    def unseen_manifest(self) -> dict:
        """The unseen split's manifest, checked against the run's: none of the classes with clips
        in it may have clips in the splits the study distils on (`check_unseen`)."""
        if self._unseen_manifest is None:
            path = self.unseen_manifest_path()
            if path is None:
                raise ValueError(f"split {UNSEEN!r} needs config.data.unseen.manifest: an AudioSet manifest "
                                 "(python -m data_pipelines.audioset ...)")
            manifest = load_manifest(path)
            check_unseen(manifest, path, self.config.data.unseen.split, self.manifest, self.manifest_path(),
                         seen_splits=(self.config.label.split, self.config.switch.split))
            self._unseen_manifest = manifest
        return self._unseen_manifest

    def _source(self, split: str) -> tuple[dict, str, epath.Path]:
        """(manifest, its name for the split, its path) of the study's `split`."""
        if split == UNSEEN:
            return self.unseen_manifest, self.config.data.unseen.split, self.unseen_manifest_path()
        return self.manifest, split, self.manifest_path()

    def classes_of(self, split: str) -> list[str]:
        """The class list the records of `split` index (their `label`): the manifest's that holds it."""
        return list(self._source(split)[0]["classes"])

    def split_paths(self, split: str) -> list[str]:
        manifest, key, path = self._source(split)
        if key not in manifest["splits"]:
            raise ValueError(f"split {key!r} is not in the manifest {path} (has {sorted(manifest['splits'])})")
        return manifest["splits"][key]["paths"]

    def num_examples(self, split: str) -> int:
        self.split_paths(split)  # names a missing split
        manifest, key, _ = self._source(split)
        return int(manifest["splits"][key]["num_examples"])

    @property
    def data_errors(self):
        """This run's log of skipped records (distill_jax/data_errors.py)."""
        if self._data_errors is None:
            from distill_jax.data_errors import DataErrorLog

            self._data_errors = DataErrorLog(self.run_dir, seed=self.config.seed,
                                             max_fraction=self.config.data.max_error_fraction,
                                             split_size=self.num_examples)
        return self._data_errors

    def num_options(self) -> int:
        data = self.config.data
        return len(self.classes) if data.question_strategy == "fixed" else data.num_options

    def question_classes(self, split: str | None = None) -> list[str]:
        """The classes a question about a clip of `split` draws its options from: the run's classes;
        for "unseen", with config.data.unseen.distractors "unseen" the unseen manifest's classes,
        with "all" the run's classes followed by the unseen ones it lacks."""
        if split != UNSEEN:
            return self.classes
        unseen = self.classes_of(UNSEEN)
        return unseen if self.config.data.unseen.distractors == "unseen" else \
            self.classes + [c for c in unseen if c not in self.classes]

    def related(self, split: str | None = None) -> tuple[dict, dict]:
        """(class -> related classes, clip id -> other labels) a question about a clip of `split` leaves
        out of its distractors (config.data.exclude_related): as the split's manifest records them
        (`related_classes`, `other_labels`), or for a manifest without the table the shipped one
        (data_pipelines/related_classes.py); ({}, {}) when off."""
        if not self.config.data.get("exclude_related"):
            return {}, {}
        from data_pipelines import related_classes

        manifest = self._source(split)[0] if split is not None else self.manifest
        table = (manifest.get("related_classes") or {}).get("table")
        if table is None:
            table = related_classes.restrict(related_classes.load(), self.question_classes(split))
        return table, manifest.get("other_labels") or {}

    def question_maker(self, split: str | None = None) -> QuestionMaker:
        data = self.config.data
        related, other_labels = self.related(split)
        try:
            return QuestionMaker(self.question_classes(split), num_options=self.num_options(),
                                 strategy=data.question_strategy, seed=data.question_seed, related=related,
                                 other_labels=other_labels)
        except ValueError as e:
            path = self.unseen_manifest_path() if split == UNSEEN else self.manifest_path()
            raise ValueError(f"questions about split {split!r} ({path}, config.data.unseen.distractors="
                             f"{data.unseen.distractors!r}): {e}") from None

    def transform(self, modality: str, tokenizer_dir=None):
        """`modality`'s model transform ("waveform": the switch's fixed-length audio); the
        tokenizer comes from its checkpoint unless given. One object per (modality, tokenizer)."""
        key = (modality, str(tokenizer_dir))
        if key not in self._transforms:
            data = self.config.data
            if modality == "waveform":
                made = transforms.WaveformTransform(data.max_seconds)
            else:
                prompt = dict(question_template=data.question_template, system=data.system_prompt or None)
                tokenizer_dir = multihost.local(tokenizer_dir or self.model_dir(modality))
                if condition_of(modality):
                    av = self.config.models[AUDIO_VISUAL]
                    made = transforms.Qwen2_5OmniTransform(
                        tokenizer_dir, condition_of(modality), max_seconds=data.max_seconds,
                        chunk_seconds=data.audio_chunk_seconds, question_template=data.question_template,
                        system=av.system_prompt or None, config=vision.VisionPreprocessConfig(
                            fps=data.video_fps, min_pixels=av.min_pixels, max_pixels=av.max_pixels))
                elif modality == "audio":
                    made = transforms.Qwen2AudioTransform(tokenizer_dir, max_seconds=data.max_seconds,
                                                          chunk_seconds=data.audio_chunk_seconds, **prompt)
                else:
                    bounds = dict(max_pixels=data.max_pixels, **({"min_pixels": data.min_pixels}
                                                                 if data.get("min_pixels") else {}))
                    made = transforms.Qwen2VLTransform(tokenizer_dir, config=vision.VisionPreprocessConfig(
                        fps=data.video_fps, **bounds), **prompt)
            self._transforms[key] = made
        return self._transforms[key]

    def _pipeline_config(self, modality, *, batch_size, train, num_epochs, seed):
        data = self.config.data
        return pipeline_lib.PipelineConfig(
            batch_size=batch_size, shuffle=train, seed=seed, num_epochs=num_epochs, drop_remainder=train,
            decode_audio=modality != "visual" and condition_of(modality) != "video",
            decode_frames=modality == "visual" or condition_of(modality) in ("video", "audio_video"),
            num_options=self.num_options(), question_strategy=data.question_strategy,
            question_seed=data.question_seed, on_error=data.on_error, worker_count=data.worker_count)

    def video_buckets(self, modality: str, split: str, tokenizer_dir=None):
        """How `modality`'s batches of `split` pad their video (None for a model without video):
        config.data.video_frame_buckets x video_patch_buckets, and the prompt's text budget for the
        split's question classes (`PromptTransform.text_tokens`)."""
        transform = self.transform(modality, tokenizer_dir)
        if modality == "waveform" or getattr(transform, "video_token", None) is None:
            return None
        key = (modality, split, str(tokenizer_dir))
        if key not in self._paddings:
            data = self.config.data
            self._paddings[key] = transforms.VideoBuckets(
                frames=tuple(data.video_frame_buckets), patches=tuple(data.video_patch_buckets),
                text_tokens=transform.text_tokens(self.question_classes(split), self.num_options()),
                multiple=data.video_prompt_multiple)
        return self._paddings[key]

    @property
    def input_log(self):
        """This seed's record of the programs' input shapes and padding (distill_jax/input_stats.py)."""
        if self._input_log is None:
            from distill_jax.input_stats import InputLog

            self._input_log = InputLog(self.path("input_shapes.json"))
        return self._input_log

    def observer(self, name: str, program: str, split: str, modality: str | None = None, tokenizer_dir=None):
        """`input_log.observer` for `name`'s `program` on `split`, bounded by its padding's bucket count:
        video bucket pairs, prompt buckets, or 1 for the switch's fixed-length audio."""
        modality = modality or name
        if modality == "waveform":
            bound = 1
        else:
            video = self.video_buckets(modality, split, tokenizer_dir)
            bound = video.programs if video is not None else len(self.config.data.prompt_buckets)
        return self.input_log.observer(name, program, split, bound)

    def padding(self, modality: str, split: str, tokenizer_dir=None) -> dict | None:
        """How `modality`'s batches of `split` are padded: each batch on its own, to the smallest of
        config.data.prompt_buckets that holds its longest prompt, or (video) to the smallest
        (frames, patches) bucket pair that holds its videos, the prompt to what that pair implies.
        The hosts agree on each step's lengths (pipeline.AgreeOnShapes)."""
        if modality == "waveform":
            return None
        transform = self.transform(modality, tokenizer_dir)
        video = self.video_buckets(modality, split, tokenizer_dir)
        buckets = tuple(self.config.data.prompt_buckets)
        return transform.padding(buckets, video) if video is not None else transform.padding(buckets)

    def dataset(self, modality: str, split: str, *, batch_size: int, train: bool = False,
                num_epochs: int | None = 1, seed: int = 0, tokenizer_dir=None,
                targets: Callable[[dict], dict] | None = None, all_hosts: bool = False):
        """This host's Grain batches of `split` for `modality`'s model ("waveform": the switch's
        audio): complete, with `targets(example)` joined to each clip's row when given.
        `all_hosts`: every host reads the whole split (small splits held in memory)."""
        return pipeline_lib.make_dataset(
            self.split_paths(split), self.classes_of(split),
            config=self._pipeline_config(modality, batch_size=batch_size, train=train, num_epochs=num_epochs,
                                         seed=seed),
            transform=self.transform(modality, tokenizer_dir), padding=self.padding(modality, split, tokenizer_dir),
            targets=targets, question_maker=self.question_maker(split), on_data_error=self.data_errors.reporter(split),
            **(dict(process_index=0, process_count=1) if all_hosts else {}))

    # ---- models -------------------------------------------------------------------------------
    def tokenizer(self, modality: str):
        return prompts.load_tokenizer(multihost.local(self.model_dir(modality)))

    def letter_ids(self, modality: str) -> list[int]:
        return prompts.letter_token_ids(self.tokenizer(modality), prompts.LETTERS[:self.num_options()])

    def scoring_batch_size(self, name: str, default: int) -> int:
        """The batch `name`'s model is scored in: the audio-visual model's own when set
        (config.models.audio_visual.batch_size: longer prompts), else `default`."""
        if checkpoint_of(name) == AUDIO_VISUAL and self.config.models[AUDIO_VISUAL].batch_size:
            return self.config.models[AUDIO_VISUAL].batch_size
        return default

    def load_model(self, modality: str, *, remat: str = "none"):
        """`modality`'s model; `remat` for a model that will be trained (config.distill.remat)."""
        from distill_jax.convert import load_hf

        return load_hf(multihost.local(self.model_dir(modality)), dtype=self.config.compute_dtype, mesh=self.mesh,
                       remat=remat, attention_impl=self.config.models.attention_impl,
                       scan_layers=self.config.models.scan_layers, quantize=self.config.models.quantize,
                       vision_query_chunk=self.config.models.get("vision_query_chunk"))
