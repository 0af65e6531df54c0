"""The study, end to end: `python -m distill_jax.main --config=configs/<file>.py:<args> --workdir=DIR`.

With no flags it runs the toy world (configs/toy.py) into ./workdir and prints the results
table. Stages run in the order prepare, warm_start, evaluate, switch, label, distill, once per
seed of `config.seeds` (each seed repeats the whole study in DIR/seed_<s>/), then report, over
all seeds, into DIR (`--stages=evaluate,report` picks some); each skips what the workdir already
holds, so a rerun resumes. Config values that cannot work are refused before any stage starts.

Multi-host: every host runs the same command on the same workdir (a shared `gs://` bucket). On a
TPU VM `jax.distributed.initialize()` is called and finds the slice's hosts itself; on CPU/GPU
machines give `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`. Every host computes, process 0
alone writes shared files, and every stage ends at a barrier (distill_jax/multihost.py).
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import threading
import time

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from distill_jax import faults, multihost, prompts, sharding
from distill_jax.lock import WorkdirBusyError, WorkdirLock
from distill_jax.stages import common

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(_CONFIGS, "toy.py"), "Run config (configs/*.py[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Where every stage reads and writes.")
flags.DEFINE_list("stages", None, f"Stages to run (default: the config's), from {list(common.STAGES)}.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process run on CPU/GPU "
                    "machines (a multi-host TPU slice needs none of these three flags).")
flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (with --coordinator_address).")
flags.DEFINE_enum("jax_distributed", "auto", ["auto", "on", "off"], "jax.distributed.initialize(): auto = with the "
                  "three flags above, or on a TPU VM (JAX reads the slice's hosts from the TPU metadata).")


class ConfigError(ValueError):
    """A config value that cannot work, named."""


def _get(config, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _number(config, key, *, kind=float, low=None, high=None, low_open=False, high_open=False,
            none_ok=False) -> str | None:
    """An error naming `key` and its allowed range, or None when its value is allowed."""
    value = _get(config, key)
    if value is None and none_ok:
        return None
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    span = f" in {lo or '(-inf'}, {hi or 'inf)'}" if lo or hi else ""
    wanted = ("an integer" if kind is int else "a number") + span
    wanted += " or None" if none_ok else ""
    bad = isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int)
    if not bad:
        bad = (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
               or (high is not None and (value >= high if high_open else value > high)))
    return f"config.{key}={value!r}: expected {wanted}" if bad else None


def _choice(config, key, allowed, *, none_ok=False) -> str | None:
    value = _get(config, key)
    if (value is None and none_ok) or value in allowed:
        return None
    return f"config.{key}={value!r}: expected one of {tuple(allowed)}{' or None' if none_ok else ''}"


def _known_splits(config) -> tuple[str, ...] | None:
    """The split names a run can read: the toy world's, or the manifest's and "unseen" with an
    unseen manifest (None: not known yet)."""
    if config.toy:
        from data_pipelines import toy_world

        return (*toy_world.SEEN_SPLITS, common.UNSEEN)
    if config.data.manifest and multihost.path(config.data.manifest).exists():
        unseen = (common.UNSEEN,) if config.data.unseen.manifest else ()
        return (*multihost.read_json(config.data.manifest)["splits"], *unseen)
    return None


def check_video_buckets(config) -> list[str]:
    """The video buckets must hold the longest clip (max_seconds at video_fps, in temporal patches of
    2 frames) and the largest frame the processor can make (max_pixels in 14 px patches), so no
    batch overflows them; patch buckets come in whole 2x2 merge blocks."""
    data, errors = config.data, []
    frames, patches = tuple(data.video_frame_buckets), tuple(data.video_patch_buckets)
    if not (frames and patches and all(isinstance(b, int) for b in frames + patches)):
        return errors
    longest = max(1, round(data.max_seconds * data.video_fps / 2))
    if frames[-1] < longest:
        errors.append(f"config.data.video_frame_buckets={frames}: the largest must hold {longest} temporal patches "
                      f"(max_seconds={data.max_seconds} at video_fps={data.video_fps}, 2 frames each)")
    largest = max([data.max_pixels] + ([config.models.audio_visual.max_pixels] if common.has_audio_visual(config)
                                       else []))
    if isinstance(largest, int) and patches[-1] < largest // (14 * 14):
        errors.append(f"config.data.video_patch_buckets={patches}: the largest must hold {largest // 196} patches "
                      f"(max_pixels={largest} in 14x14 patches), the most a frame can have")
    if any(b % 4 for b in patches):
        errors.append(f"config.data.video_patch_buckets={patches}: expected multiples of 4 (2x2 merge blocks)")
    return errors


def check_config(config, stages) -> None:
    """Refuse, before any work, values that cannot work: every numeric and enumerated field is
    checked, and every error names its key and what is allowed (all errors at once)."""
    unknown = [s for s in stages if s not in common.STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(common.STAGES)}")
    from data_pipelines.questions import STRATEGIES
    from distill_jax.layers.attention import IMPLEMENTATIONS
    from distill_jax.layers.quantize import QUANTIZE
    from distill_jax.models.qwen2 import REMAT_POLICIES
    from distill_jax.stages.label import SWITCH_MODES
    from distill_jax.train import switch as switch_lib
    from distill_jax.train.losses import MODES
    from distill_jax.stages import switch as switch_stage

    errors = []
    seeds = tuple(config.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(x, int) and 0 <= x < 2**31 for x in seeds):
        errors.append(f"config.seeds={seeds}: expected distinct integers in [0, 2**31), at least one")
    errors += [_choice(config, "direction", sorted(common.ROLES)),
               _choice(config, "compute_dtype", ("float32", "bfloat16")),
               _choice(config, "models.attention_impl", IMPLEMENTATIONS, none_ok=True),
               _choice(config, "models.scan_layers", (True, False)),
               _choice(config, "models.quantize", [q for q in QUANTIZE if q], none_ok=True),
               _number(config, "models.vision_query_chunk", kind=int, low=8, none_ok=True),
               _choice(config, "teacher", (common.AUDIO_VISUAL,), none_ok=True)]
    av = config.models.audio_visual
    conditions = tuple(av.conditions)
    if not conditions or any(c not in prompts.CONDITIONS for c in conditions) or len(set(conditions)) < len(conditions):
        errors.append(f"config.models.audio_visual.conditions={conditions}: expected distinct names from "
                      f"{prompts.CONDITIONS}")
    errors += [_number(config, "models.audio_visual.min_pixels", kind=int, low=28 * 28),
               _number(config, "models.audio_visual.max_pixels", kind=int, low=28 * 28),
               _number(config, "models.audio_visual.batch_size", kind=int, low=1, none_ok=True)]
    if config.teacher == common.AUDIO_VISUAL and not (common.has_audio_visual(config) and "audio_video" in conditions):
        errors.append("config.teacher='audio_visual' needs an audio-visual model (config.models.audio_visual.path; "
                      "toy: warm_start.audio_visual=True) scored on 'audio_video' (models.audio_visual.conditions)")
    for axis in ("data", "fsdp", "tensor"):
        value = config.mesh[axis]
        if isinstance(value, bool) or not isinstance(value, int) or not (value >= 1 or value == -1):
            errors.append(f"config.mesh.{axis}={value!r}: expected an integer >= 1, or -1 (the remaining devices)")
    # data
    errors += [_number(config, "data.max_seconds", low=0, low_open=True),
               _number(config, "data.audio_chunk_seconds", low=0, low_open=True),
               _number(config, "data.video_fps", low=0, low_open=True),
               _number(config, "data.max_pixels", kind=int, low=28 * 28),
               _number(config, "data.min_pixels", kind=int, low=28 * 28, none_ok=True),
               _choice(config, "data.question_strategy", STRATEGIES),
               _choice(config, "data.exclude_related", (True, False), none_ok=True),
               _number(config, "data.question_seed", kind=int, low=0),
               _choice(config, "data.on_error", ("raise", "skip")),
               _number(config, "data.max_error_fraction", low=0, high=1),
               _number(config, "data.worker_count", kind=int, low=0),
               _number(config, "data.video_prompt_multiple", kind=int, low=1),
               _choice(config, "data.unseen.distractors", ("unseen", "all"))]
    if config.data.question_strategy != "fixed":
        errors.append(_number(config, "data.num_options", kind=int, low=2, high=26))
    for key in ("prompt_buckets", "video_frame_buckets", "video_patch_buckets"):
        buckets = tuple(config.data[key])
        if not buckets or list(buckets) != sorted(set(buckets)) or not all(isinstance(b, int) and b >= 1
                                                                            for b in buckets):
            errors.append(f"config.data.{key}={buckets}: expected increasing positive integers")
    errors += check_video_buckets(config)
    if config.toy:
        errors += [_number(config, "data.world.scale", low=0, low_open=True),
                   _number(config, "data.world.fps", low=0, low_open=True),
                   _number(config, "data.world.workers", kind=int, low=0)]
        for modality in common.MODALITIES + ((common.AUDIO_VISUAL,) if config.warm_start.audio_visual else ()):
            key = f"warm_start.models.{modality}"
            errors += [_number(config, f"{key}.learning_rate", low=0, low_open=True),
                       _number(config, f"{key}.steps", kind=int, low=1),
                       _number(config, f"{key}.batch_size", kind=int, low=1),
                       _number(config, f"{key}.warmup_steps", kind=int, low=0,
                               high=max(config.warm_start.models[modality].steps - 1, 0))]
        errors += [_number(config, "warm_start.weight_decay", low=0), _number(config, "warm_start.log_every", kind=int, low=1),
                   _number(config, "warm_start.max_nonfinite_steps", kind=int, low=1)]
    # evaluate, switch, label
    errors += [_number(config, "evaluate.batch_size", kind=int, low=1),
               _choice(config, "switch.finetune", switch_lib.FINETUNE_MODES),
               _choice(config, "switch.label_mode", switch_lib.LABEL_MODES),
               _choice(config, "switch.sample_rule", switch_lib.SAMPLE_RULES),
               _choice(config, "switch.inputs", switch_stage.INPUTS),
               _number(config, "switch.class_margin", low=-1, high=1),
               _number(config, "switch.threshold", low=0, high=1, low_open=True, high_open=True),
               _number(config, "switch.learning_rate", low=0, low_open=True),
               _number(config, "switch.batch_size", kind=int, low=1),
               _number(config, "switch.epochs", kind=int, low=1),
               _number(config, "switch.max_nonfinite_steps", kind=int, low=1),
               _number(config, "label.batch_size", kind=int, low=1),
               _number(config, "label.chunk_batches", kind=int, low=1)]
    variants = tuple(config.switch.variants)
    if any(v not in switch_stage.INPUTS for v in variants) or len(set(variants)) < len(variants):
        errors.append(f"config.switch.variants={variants}: expected distinct names from {switch_stage.INPUTS}")
    # distill
    cfg = config.distill
    bad = [m for m in cfg.modes if m not in SWITCH_MODES]
    if bad or not cfg.modes:
        errors.append(f"config.distill.modes={tuple(cfg.modes)}: each must be one of {SWITCH_MODES}")
    if "oracle" in cfg.modes and not config.toy:
        errors.append("config.distill.modes has 'oracle', which needs ground truth: toy world only")
    if cfg.lora.dropout:
        errors.append(f"config.distill.lora.dropout={cfg.lora.dropout}: LoRA dropout is not supported by the train "
                      "step (its RNG stream is not checkpointed, so a resumed run would differ); use 0")
    from distill_jax.models.lora import DEFAULT_TARGETS, _SHORT

    targets = tuple(cfg.lora.targets)
    if not targets or any(_SHORT.get(t, t) not in DEFAULT_TARGETS for t in targets):
        errors.append(f"config.distill.lora.targets={targets}: expected a non-empty subset of {DEFAULT_TARGETS}")
    errors += [_choice(config, "distill.loss", MODES), _choice(config, "distill.remat", sorted(REMAT_POLICIES)),
               _number(config, "distill.temperature", low=0, low_open=True),
               _number(config, "distill.lora.rank", kind=int, low=1),
               _number(config, "distill.lora.alpha", low=0, low_open=True),
               _number(config, "distill.batch_size", kind=int, low=1),
               _number(config, "distill.epochs", kind=int, low=1),
               _number(config, "distill.max_steps", kind=int, low=1, none_ok=True),
               _number(config, "distill.learning_rate", low=0, low_open=True),
               _number(config, "distill.warmup_steps", kind=int, low=0),
               _number(config, "distill.weight_decay", low=0),
               _number(config, "distill.clip_norm", low=0, none_ok=True),
               _number(config, "distill.accumulate_steps", kind=int, low=1),
               _number(config, "distill.checkpoint_every", kind=int, low=1),
               _number(config, "distill.log_every", kind=int, low=1),
               _number(config, "distill.max_nonfinite_steps", kind=int, low=1)]
    if isinstance(cfg.batch_size, int) and isinstance(cfg.accumulate_steps, int) and cfg.accumulate_steps >= 1 \
            and cfg.max_steps and cfg.max_steps // cfg.accumulate_steps < 2:
        errors.append(f"config.distill.max_steps={cfg.max_steps} with accumulate_steps={cfg.accumulate_steps}: "
                      "fewer than 2 optimizer updates (the warmup-cosine schedule needs 2)")
    # split names
    known = _known_splits(config)
    if known is not None:
        for key in ("warm_start.split", "switch.split", "switch.eval_split", "label.split"):
            if key.startswith("warm_start") and not config.toy:
                continue
            errors.append(_choice(config, key, known))
        for key in ("evaluate.splits", "distill.eval_splits"):
            names = tuple(_get(config, key))
            if not names or any(n not in known for n in names):
                errors.append(f"config.{key}={names}: expected split names from {known}")
    if not config.toy:
        from distill_jax.hub import is_hub_id

        for modality in common.MODALITIES + ((common.AUDIO_VISUAL,) if av.path else ()):
            path = config.models[modality].path
            if not path or not (is_hub_id(path) or (multihost.path(path) / "config.json").exists()):
                errors.append(f"config.models.{modality}.path={path!r} is not a checkpoint directory "
                              "(no config.json) nor a hub id (owner/name)")
        if config.data.get("humans") and not multihost.path(config.data.humans).exists():
            errors.append(f"config.data.humans={config.data.humans!r} does not exist")
        vgg = config.data.vggsound
        if vgg.csv:
            if not multihost.path(vgg.csv).is_file():
                errors.append(f"config.data.vggsound.csv={vgg.csv!r} does not exist")
            if not vgg.video_dir or not multihost.path(vgg.video_dir).is_dir():
                errors.append(f"config.data.vggsound.video_dir={vgg.video_dir!r} is not a directory (the clips of "
                              "config.data.vggsound.csv)")
            errors += [_number(config, "data.vggsound.analysis_size", kind=int, low=0),
                       _number(config, "data.vggsound.workers", kind=int, low=0)]
        elif not config.data.manifest or not multihost.path(config.data.manifest).exists():
            errors.append(f"config.data.manifest={config.data.manifest!r} does not exist (or give "
                          "config.data.vggsound.csv and video_dir: configs/paper.py:csv=...,video_dir=...)")
        if config.data.unseen.manifest and not multihost.path(config.data.unseen.manifest).exists():
            errors.append(f"config.data.unseen.manifest={config.data.unseen.manifest!r} does not exist (convert "
                          "AudioSet's evaluation segments first: python -m data_pipelines.audioset ...)")
        if not multihost.path(config.switch.backbone).is_file():
            errors.append(f"config.switch.backbone={config.switch.backbone!r} is not a file: the switch starts "
                          "from a pretrained PANN Cnn14 checkpoint (configs/paper.py: pann=...)")
    else:
        from distill_jax.models.cnn14 import Cnn14Config

        try:
            if not multihost.path(config.switch.backbone).is_file():
                Cnn14Config.preset(config.switch.backbone)
        except ValueError as e:
            errors.append(f"config.switch.backbone={config.switch.backbone!r}: not a file, and {e}")
    errors = [e for e in errors if e]
    if errors:
        raise ConfigError("; ".join(errors) if len(errors) == 1 else
                          f"{len(errors)} config values cannot work:\n  " + "\n  ".join(errors))


def check_batch_sizes(config, mesh) -> None:
    """Every global batch must split evenly over the mesh's batch axes (data x fsdp) and the hosts."""
    from distill_jax.train.loop import batch_axes

    shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    keys = ["evaluate.batch_size", "label.batch_size", "distill.batch_size", "switch.batch_size"]
    if config.toy:
        keys += [f"warm_start.models.{m}.batch_size" for m in common.MODALITIES]
        if config.warm_start.audio_visual:
            keys.append(f"warm_start.models.{common.AUDIO_VISUAL}.batch_size")
    if config.models.audio_visual.batch_size:
        keys.append("models.audio_visual.batch_size")
    errors = [f"config.{k}={_get(config, k)}: expected a multiple of {shards} (the mesh's data x fsdp devices) and "
              f"of the {jax.process_count()} processes" for k in keys
              if _get(config, k) % shards or _get(config, k) % jax.process_count()]
    if errors:
        raise ConfigError("; ".join(errors))


# Outputs that depend on which model teaches: a workdir holding them belongs to one direction.
_DIRECTED_OUTPUTS = ("switch", "labels", "distill")


def check_workdir(config, workdir) -> None:
    """Refuse a workdir whose direction-dependent outputs were made with the other direction;
    print the config values that differ from the workdir's last run (outputs are reused by name)."""
    previous_file = workdir / "config.json"
    if not previous_file.exists():
        return
    try:
        previous = multihost.read_json(previous_file)
    except json.JSONDecodeError as e:  # torn by a version that wrote it in place: rewritten below
        print(f"note: {previous_file} is not readable JSON ({e}); it is rewritten by this run", flush=True)
        previous = {}
    seeds = sorted(n.name for n in workdir.iterdir() if n.name.startswith("seed_"))
    directed = sorted({d for n in seeds for d in _DIRECTED_OUTPUTS if (workdir / n / d).exists()})
    if previous.get("direction") != config.direction and directed:
        raise ConfigError(f"workdir {workdir} holds {directed} made with direction={previous.get('direction')!r}; "
                          f"config.direction={config.direction!r} needs another workdir (or delete those)")
    if previous.get("teacher") != config.get("teacher") and directed:
        raise ConfigError(f"workdir {workdir} holds {directed} made with teacher={previous.get('teacher')!r}; "
                          f"config.teacher={config.get('teacher')!r} needs another workdir (or delete those)")
    current = json.loads(config.to_json_best_effort())
    changed = sorted(k for k in set(current) | set(previous) if current.get(k) != previous.get(k) and k != "stages")
    if changed and multihost.is_main():
        print(f"note: config values under {changed} differ from this workdir's last run; a stage whose outputs "
              "depend on a changed value refuses to reuse them (stage_configs.json in each seed's workdir)",
              flush=True)


def remove_leftovers(workdir) -> None:
    """Temporary files and directories of writes a killed run never finished (multihost.write_own,
    atomic_dir: ".<name>.<id>.tmp" / ".old"), removed by the run that holds the workdir's lock.
    Local workdirs only (listing a bucket would cost more than the few stray objects)."""
    if multihost.is_remote(workdir) or not workdir.exists():
        return
    stale = [epath.Path(root) / name for root, dirs, files in workdir.walk()
             for name in dirs + files if name.startswith(".") and name.endswith((".tmp", ".old"))]
    for path in stale:
        if path.is_dir():
            path.rmtree(missing_ok=True)
        elif path.exists():  # (not inside a directory removed just before)
            path.unlink()
    if stale:
        print(f"note: removed {len(stale)} temporary file(s) of a run that was interrupted", flush=True)


# The config values each stage's outputs depend on (besides the seed); a stage's outputs also
# depend on every value of the stages before it. Run-only values (batch sizes of scoring, log and
# checkpoint intervals, workers, error handling, which splits or modes to produce) are not here.
_PROMPT = ("data.max_seconds", "data.audio_chunk_seconds", "data.video_fps", "data.min_pixels", "data.max_pixels",
           "data.num_options",
           "data.question_strategy", "data.question_seed", "data.exclude_related", "data.question_template",
           "data.system_prompt", "data.prompt_buckets", "data.video_frame_buckets", "data.video_patch_buckets",
           "data.video_prompt_multiple", "compute_dtype")
STAGE_CONFIG = {
    "prepare": ("toy", "data.manifest", "data.vggsound.csv", "data.vggsound.video_dir",
                "data.vggsound.analysis_size", "data.world.scale", "data.world.fps"),
    "warm_start": ("warm_start.split", "warm_start.weight_decay", "warm_start.models", *_PROMPT),
    "evaluate": ("models.audio.path", "models.visual.path", "models.attention_impl", "models.quantize", *_PROMPT),
    "switch": ("direction", "teacher", "switch.split", "switch.eval_split", "switch.backbone", "switch.finetune",
               "switch.label_mode", "switch.sample_rule", "switch.class_margin", "switch.threshold",
               "switch.learning_rate", "switch.batch_size", "switch.epochs", "switch.inputs", "switch.variants"),
    "label": ("label.split",),
    "distill": ("distill.loss", "distill.temperature", "distill.lora", "distill.batch_size", "distill.epochs",
                "distill.max_steps", "distill.learning_rate", "distill.warmup_steps", "distill.weight_decay",
                "distill.clip_norm", "distill.accumulate_steps", "distill.remat"),
    # The audio-visual model (its warm start and its scoring), apart from the chain above: adding it to a
    # run leaves the two models' outputs valid. With config.teacher="audio_visual" the switch, label and
    # distill stages depend on it too (`stage_values`).
    "audio_visual": ("warm_start.audio_visual", "models.audio_visual.path", "models.audio_visual.system_prompt",
                     "models.audio_visual.min_pixels", "models.audio_visual.max_pixels"),
}
_AUDIO_VISUAL_BASE = ("prepare", "warm_start", "evaluate")  # the stages whose values it depends on
# What a stage writes in a seed's workdir: its recorded config is checked while any of it exists.
STAGE_OUTPUTS = {"prepare": ("data", "tokenizer"), "warm_start": ("models",),
                 "evaluate": ("eval/audio", "eval/visual", "eval/audio_visual_audio", "eval/audio_visual_video",
                              "eval/audio_visual_audio_video", "eval/summary.json"), "switch": ("switch",),
                 "label": ("labels",), "distill": ("distill",),
                 "audio_visual": ("models/audio_visual", "tokenizer_omni", "eval/audio_visual_audio",
                                  "eval/audio_visual_video", "eval/audio_visual_audio_video")}


def stage_values(config, stage: str) -> dict:
    """The config values `stage`'s outputs depend on: its own and every earlier stage's."""
    chain = [s for s in STAGE_CONFIG if s != "audio_visual"]
    if stage == "audio_visual":
        stages = [*_AUDIO_VISUAL_BASE, "audio_visual"]
    else:
        stages = chain[:chain.index(stage) + 1]
        if config.get("teacher") == common.AUDIO_VISUAL and stage in ("switch", "label", "distill"):
            stages.append("audio_visual")
    keys = [k for s in stages for k in STAGE_CONFIG[s]]
    values = {"seed": config.seed}
    for key in keys:
        value = _get(config, key)
        values[key] = json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))
    return values


def recorded_stages(config, stages) -> list[str]:
    """The STAGE_CONFIG entries a run of `stages` records, in order: its stages, and the audio-visual
    model's outputs when the run has that model and warm-starts or evaluates."""
    recorded = [s for s in STAGE_CONFIG if s in stages]
    if common.has_audio_visual(config) and {"warm_start", "evaluate"} & set(stages):
        recorded.append("audio_visual")
    return recorded


def stage_configs_file(seed_workdir) -> epath.Path:
    return multihost.path(seed_workdir) / "stage_configs.json"


def recorded_stage_configs(seed_workdir) -> dict:
    """{stage: the config values its outputs in `seed_workdir` were made with} ({} if none)."""
    record_file = stage_configs_file(seed_workdir)
    return multihost.read_json(record_file) if record_file.exists() else {}


def check_stage_configs(study, stages) -> None:
    """Refuse to reuse a stage's outputs made with other values of the config it depends on,
    naming the changed keys and what to delete; record the values of stages about to run."""
    record_file = stage_configs_file(study.workdir)
    recorded = recorded_stage_configs(study.workdir)
    unchanged = dict(recorded)
    for stage in recorded_stages(study.config, stages):
        current = stage_values(study.config, stage)
        before = recorded.get(stage)
        has_outputs = any(study.path(rel).exists() for rel in STAGE_OUTPUTS[stage])
        # a key newer than the recorded values counts as unchanged while it holds its default, None
        changed = sorted(k for k in set(before or {}) | set(current) if (before or {}).get(k) != current.get(k))
        if before is not None and has_outputs and changed:
            detail = ", ".join(f"{k}: {before.get(k)!r} -> {current.get(k)!r}" for k in changed)
            names = list(STAGE_CONFIG)  # redo from the first stage whose own values changed
            first = next((s for s in names if set(changed) & set(STAGE_CONFIG[s])), names[0])
            later = [rel for s in names[names.index(first):] for rel in STAGE_OUTPUTS[s]]
            raise ConfigError(f"{study.workdir}: the {stage} stage's outputs were made with other config values "
                              f"({detail}); they are not reused silently. Use another workdir, or delete "
                              f"{', '.join(later)} (and eval/student_*) under {study.workdir} to redo them")
        recorded[stage] = current
    if recorded != unchanged:  # a rerun with the same values writes nothing
        multihost.write_json(record_file, recorded, indent=1, sort_keys=True)


def make_mesh(config):
    try:
        return sharding.make_mesh(dict(config.mesh))
    except ValueError as e:
        raise ConfigError(f"config.mesh={dict(config.mesh)} does not fit the {jax.device_count()} devices: {e}") from e


def enable_compilation_cache(workdir, min_compile_time_s: float = 0.0) -> None:
    """Compiled programs are kept in <workdir>/jax_cache and reused by reruns and resumed runs.

    Every program is cached, not only those over JAX's default 1 s of compile time: the toy run's
    many small programs then compile once (benchmarks/compile_cache.py measures both).
    """
    jax.config.update("jax_compilation_cache_dir", str(multihost.path(workdir) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch's name for it


class CompileAnnouncer:
    """Prints what XLA is compiling when a compile runs past `after_s`, then how long it took.

    A 7B program compiles for minutes; without this the run looks hung. JAX reports each
    backend compile's start and duration to `jax.monitoring` listeners, with the program name.
    """

    def __init__(self, after_s: float = 10.0):
        self.after_s = after_s
        self._timers: dict[tuple[int, str], threading.Timer] = {}
        self.compiles = 0  # every backend compile this process ran (persistent-cache hits are not compiles)
        self.compile_seconds = 0.0

    def _started(self, event: str, value: float, **kwargs) -> None:
        if event != BACKEND_COMPILE_EVENT:
            return
        name = kwargs.get("fun_name", "?")
        timer = threading.Timer(self.after_s, lambda: print(
            f"compiling {name} (running for {self.after_s:g} s) ...", flush=True))
        timer.daemon = True
        self._timers[threading.get_ident(), name] = timer
        timer.start()

    def _finished(self, event: str, seconds: float, **kwargs) -> None:
        if event != BACKEND_COMPILE_EVENT:
            return
        name = kwargs.get("fun_name", "?")
        timer = self._timers.pop((threading.get_ident(), name), None)
        if timer is not None:
            timer.cancel()
        self.compiles += 1
        self.compile_seconds += seconds
        if seconds >= self.after_s:
            print(f"compiled {name} in {seconds:.1f} s", flush=True)

    def register(self) -> None:
        jax.monitoring.register_scalar_listener(self._started)
        jax.monitoring.register_event_duration_secs_listener(self._finished)

    def unregister(self) -> None:
        jax.monitoring.unregister_scalar_listener(self._started)
        jax.monitoring.unregister_event_duration_listener(self._finished)


_announcer: CompileAnnouncer | None = None


def announce_long_compiles(after_s: float = 10.0) -> None:
    """Once per process (process 0 only): long compiles print their name and time."""
    global _announcer
    if _announcer is None and multihost.is_main():
        _announcer = CompileAnnouncer(after_s)
        _announcer.register()


def seed_config(config, seed: int):
    """One seed's run config: `config` with `seed` set (the toy world, warm start, switch and
    distillation are all seeded by it)."""
    one = config.copy_and_resolve_references()
    with one.unlocked():
        one.seed = int(seed)
    one.lock()
    return one


def seed_dir(workdir, seed: int):
    """Where one seed's stage outputs live: every seed repeats the whole study."""
    return multihost.path(workdir) / f"seed_{int(seed)}"


def _record_time(timings_file, stage: str, seconds: float) -> None:
    timings = multihost.read_json(timings_file) if timings_file.exists() else {}
    multihost.write_json(timings_file, {**timings, stage: seconds}, indent=1)


def run(config, workdir: str, stages=None) -> list[common.Study]:
    """Run `stages` (default: the config's) of the study into `workdir`, once per seed of
    `config.seeds` (in `workdir/seed_<s>/`), then the report over all seeds (in `workdir`)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError("distill_jax.main.run was called while a worker process was starting: the worker "
                           "re-imported the script that calls it. Put that call under "
                           "`if __name__ == \"__main__\":`")
    stages = list(stages or config.stages)
    check_config(config, stages)
    mesh = make_mesh(config)
    check_batch_sizes(config, mesh)
    workdir = multihost.path(workdir)
    lock = WorkdirLock(workdir)
    try:
        lock.acquire()
        refused = None
    except WorkdirBusyError as e:
        refused = e
    if _any_host(refused is not None):
        raise refused or WorkdirBusyError(f"process 0 could not lock workdir {workdir} (see its log)")
    try:
        return _run_locked(config, workdir, stages, mesh)
    finally:
        lock.release()


def _any_host(flag: bool) -> bool:
    """Whether `flag` holds on process 0 (every host gets its answer)."""
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _run_locked(config, workdir, stages, mesh) -> list[common.Study]:
    from distill_jax.stages import distill, evaluate, label, prepare, report, switch, warm_start

    modules = {"prepare": prepare, "warm_start": warm_start, "evaluate": evaluate, "switch": switch,
               "label": label, "distill": distill}
    check_workdir(config, workdir)
    if multihost.is_main():
        remove_leftovers(workdir)
    studies = [common.Study(seed_config(config, seed), seed_dir(workdir, seed), mesh, run_dir=workdir)
               for seed in config.seeds]
    for study in studies:  # before any work: outputs made with other values are refused, not reused
        check_stage_configs(study, stages)
    multihost.sync("workdir checked")  # before process 0 rewrites config.json
    multihost.write_text(workdir / "config.json", config.to_json_best_effort(indent=1, sort_keys=True) + "\n")
    enable_compilation_cache(workdir)
    announce_long_compiles()
    with jax.set_mesh(mesh):
        for study in studies:
            study.workdir.mkdir(parents=True, exist_ok=True)
            tag = f"[seed {study.config.seed}] " if len(studies) > 1 else ""
            for stage in common.STAGES:
                if stage not in stages or stage == "report":
                    continue
                start = time.perf_counter()
                compiles = (_announcer.compiles, _announcer.compile_seconds) if _announcer else None
                faults.set_stage(stage)
                print(f"== {tag}{stage}", flush=True)
                modules[stage].run(study)
                multihost.sync(f"{stage} of seed {study.config.seed}")  # its outputs are complete on every host
                seconds = time.perf_counter() - start
                compiled = "" if compiles is None else (
                    f" ({_announcer.compiles - compiles[0]} XLA compiles, "
                    f"{_announcer.compile_seconds - compiles[1]:.1f} s of it compiling)")
                print(f"== {tag}{stage} done in {seconds:.1f} s{compiled}", flush=True)
                _record_time(study.path("timings.json"), stage, seconds)  # seconds of each stage's latest run
        if "report" in stages:
            faults.set_stage("report")
            print("== report", flush=True)
            report.run(studies, workdir)
    return studies


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.jax_distributed)
    if jax.process_index() > 0:
        logging.set_verbosity(logging.ERROR)
    run(FLAGS.config, FLAGS.workdir, FLAGS.stages)


if __name__ == "__main__":
    app.run(main)
