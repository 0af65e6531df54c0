"""The paper's study at 7B scale: Qwen2-VL-7B <-> Qwen2-Audio-7B on VGGSound with a PANN switch.

    python -m data_pipelines.vggsound --csv vggsound.csv --video-dir clips/ --out data/vggsound
    python -m distill_jax.main --workdir=gs://.../run1 --config=configs/paper.py:direction=vl_to_audio,\\
        audio=ckpt/Qwen2-Audio-7B-Instruct,visual=ckpt/Qwen2-VL-7B-Instruct,\\
        manifest=data/vggsound/vggsound.manifest.json,pann=ckpt/Cnn14_16k_mAP=0.438.pth,mesh=1x8x1

Rehearsal on a VGGSound-shaped stand-in (random tiny checkpoints with the real tokenizer, clips of
every shape, README "Rehearse the paper run"):

    python -m data_pipelines.standin --out /tmp/standin
    python -m distill_jax.main --config=configs/paper.py:standin=/tmp/standin --workdir=/tmp/rehearsal

Arguments (comma-separated key=value after the colon): direction=vl_to_audio|audio_to_vl,
audio= / visual= (Hugging Face checkpoint directories, converted on load by convert.load_hf),
manifest= (the converted VGGSound manifest), or csv= + video_dir= (the prepare stage converts them into
the workdir; analysis_size=, default 3090), standin=DIR (the stand-in's CSV, clips and checkpoints, with
few steps: `rehearsal`), rehearsal=1 (those few steps on data and checkpoints given by the other
arguments, e.g. your own small CSV and tiny checkpoints), pann= (a PANN Cnn14 .pth or its safetensors copy),
audio_visual= (optional: a Qwen2.5-Omni checkpoint or hub id, e.g. Qwen/Qwen2.5-Omni-7B, scored on
audio, silent video and sounded video as the audio-visual reference), teacher=audio_visual (its
sounded-video answers teach the student instead of the other modality's model), humans= (a CSV
of people's answers in the three conditions, data_pipelines/humans.py, for the report's analysis),
unseen_manifest= (AudioSet classes unseen in VGGSound: `python -m data_pipelines.audioset`'s manifest,
scored as the "unseen" split by every model and distilled student),
mesh=DATAxFSDPxTENSOR (default 1x-1x1: FSDP over every device), topology=v5e-8|v4-8|v5p-8|v5e-1 (a
preset below: mesh, batch sizes and remat whose compiled programs fit that slice's HBM,
`benchmarks/tpu_aot.py`; it replaces mesh=; v5e-1, one 16 GB chip, also makes the weights int8).

The paper's settings are the defaults: 10 shuffled options per question, LoRA rank 16 on the
LLM's attention and MLP projections (q, k, v, o, gate, up, down), one epoch over the training
split, cosine schedule with warmup, the teacher's letter as target where the switch is closed
and the student's own answer elsewhere. `sweep(add)` lists the ablations.
"""
import json
import os

import ml_collections

from configs import toy
from distill_jax import prompts

# Per TPU slice: what fits, from `JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py` (libtpu's compiler,
# per-chip peak memory of the compiled Qwen2-Audio-7B distill step and Qwen2-VL-7B scoring step, layers
# scanned; figures in benchmarks/README.md). distill_batch / label_batch are global batch sizes.
# Peak per chip, distill / scoring (video at the largest bucket pair, 10 x 3072 patches, vision queries
# chunked by 512): v5e-8 13.91 / 6.30 GiB of 16; v4-8 26.66 / 11.37 of 32; v5p-8 26.65 / 11.38 of 95. Scanned, remat "dots" needs what unrolled "none" did; "none" would not fit
# v5e-8 (17.2 GiB of temporaries), "full" needs 4.73 GiB there.
# audio_visual_batch: the Qwen2.5-Omni-7B sounded-video scoring batch (its evaluate and, as a teacher,
# label batch): v5e-8 6.12 GiB of 16 per chip at 16. v5e-1: distill 15.13, scoring 13.00, Omni 14.83
# GiB of 16, int8 weights (bf16 ones alone are 16.8 GB).
TOPOLOGY_PRESETS = {
    "v5e-8": dict(mesh="1x8x1", distill_batch=32, remat="dots", label_batch=16, audio_visual_batch=16),
    "v4-8": dict(mesh="1x4x1", distill_batch=32, remat="dots", label_batch=16, audio_visual_batch=16),
    "v5p-8": dict(mesh="1x4x1", distill_batch=32, remat="dots", label_batch=16, audio_visual_batch=16),
    # One v5e chip (Colab's TPU v5e-1): the 7B models only fit with their Linear kernels int8.
    "v5e-1": dict(mesh="1x1x1", distill_batch=16, remat="full", label_batch=3, audio_visual_batch=3,
                  quantize="int8"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = toy.parse_arg(arg, direction="vl_to_audio", audio="", visual="", manifest="", pann="", mesh="1x-1x1",
                         topology="", audio_visual="", teacher="", humans="", unseen_manifest="", csv="",
                         video_dir="", analysis_size="3090", standin="", rehearsal="")
    standin = standin_values(args["standin"]) if args["standin"] else {}
    for key, value in standin.items():
        if args[key] and args[key] != value and key not in ("analysis_size",):
            raise ValueError(f"config arguments standin= and {key}=: the stand-in sets {key}; give one of them")
        args[key] = value
    preset = {}
    if args["topology"]:
        if args["topology"] not in TOPOLOGY_PRESETS:
            raise ValueError(f"config argument topology={args['topology']!r}; presets: {sorted(TOPOLOGY_PRESETS)}")
        if args["mesh"] != "1x-1x1":
            raise ValueError(f"config arguments topology={args['topology']} and mesh={args['mesh']}: the "
                             "topology's preset sets the mesh; give one of them")
        preset = TOPOLOGY_PRESETS[args["topology"]]
        args["mesh"] = preset["mesh"]
    c = toy.get_config(f"direction={args['direction']}")
    c.toy = False
    c.stages = ("prepare", "evaluate", "switch", "label", "distill", "report")
    try:
        data, fsdp, tensor = (int(x) for x in args["mesh"].split("x"))
    except ValueError:
        raise ValueError(f"config argument mesh={args['mesh']!r}: expected DATAxFSDPxTENSOR, e.g. 1x8x1") from None
    c.mesh = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
    c.compute_dtype = "bfloat16"
    c.models.quantize = preset.get("quantize")
    # A frame at max_pixels is 3072 patches: the vision towers score 512 queries at a time, so a
    # layer's attention holds 1/6 of its [3072, 3072] scores (benchmarks/README.md: what v5e-1 needs).
    c.models.vision_query_chunk = 512

    if args["csv"] and args["manifest"]:
        raise ValueError("config arguments csv= and manifest=: the prepare stage converts the CSV into the "
                         "workdir's manifest; give one of them")
    c.data.manifest = args["manifest"] or None
    # csv= + video_dir=: the prepare stage converts the clips (data_pipelines.vggsound) into the run's
    # workdir (data/vggsound/, shared by its seeds); manifest=: clips converted beforehand.
    c.data.vggsound = ml_collections.ConfigDict(dict(csv=args["csv"] or None, video_dir=args["video_dir"] or None,
                                                     analysis_size=int(args["analysis_size"]), workers=0))
    c.data.humans = args["humans"] or None  # a CSV of human answers (data_pipelines/humans.py); None: no humans
    c.data.max_seconds = 10.0
    c.data.audio_chunk_seconds = 30.0  # the processor's chunk; we compute a 10.08 s window of it
    c.data.video_fps = 2.0
    # The pinned transformers' Qwen2VLVideoProcessor bounds a frame's area (its smart_resize): 128 to 768
    # 28x28 blocks (a checkpoint's own video_preprocessor_config.json may set others: give them here).
    c.data.min_pixels = 128 * 28 * 28
    c.data.max_pixels = 768 * 28 * 28
    c.data.question_strategy = "uniform"
    c.data.exclude_related = True  # never a second right answer among the distractors (related_classes.py)
    c.data.num_options = 10
    c.data.prompt_buckets = (256, 384, 512, 1024, 2048)  # audio prompts (10 s: 250 audio tokens + the question)
    # VGGSound's clips come in every shape and length: each keeps the processor's smart_resize of its
    # own frames (short side <= 448 from the converter) and its own length, and a batch is padded to
    # the smallest pair of these buckets that holds it: temporal patches (10 s at 2 fps: 10) and
    # patches per temporal patch (16:9 at 448: 1792; 4:3: 1344; 360p 16:9: 1196; 240p, raised to
    # min_pixels: 512-560; the largest, 3072, is max_pixels' bound). At most 2 x 5 programs per video
    # model and batch size.
    c.data.video_frame_buckets = (5, 10)
    c.data.video_patch_buckets = (640, 1024, 1344, 1792, 3072)
    # The prompt's length rounded to the TPU flash kernel's block (layers/attention.FLASH_BLOCK): at other
    # lengths the decoder's attention falls back to XLA, whose [T, T] scores at ~7,800 tokens do not fit.
    c.data.video_prompt_multiple = 128
    # At 150K clips a corrupt record is logged (data_errors.jsonl), counted in the report and left out,
    # not fatal; more than max_error_fraction (1 %) of a split bad still stops the run.
    c.data.on_error = "skip"
    c.data.worker_count = 4

    c.models.audio.path = args["audio"] or None
    c.models.visual.path = args["visual"] or None
    c.models.audio_visual.path = args["audio_visual"] or None
    c.models.audio_visual.system_prompt = prompts.OMNI_SYSTEM  # its chat template's default system turn
    c.models.audio_visual.min_pixels = 128 * 28 * 28  # Qwen2_5OmniProcessor's video bounds
    c.models.audio_visual.max_pixels = 768 * 28 * 28
    c.models.audio_visual.batch_size = preset.get("audio_visual_batch", 8)
    c.teacher = args["teacher"] or None
    c.warm_start.audio_visual = False

    # AudioSet classes unseen in VGGSound (the paper: 60.0 -> 72.3 %): the AudioSet converter's manifest,
    # scored as the "unseen" split by the evaluate stage and every distilled student; 10 options drawn
    # from the unseen classes (so the keep list needs at least 10 classes).
    c.data.unseen.manifest = args["unseen_manifest"] or None
    c.data.unseen.distractors = "unseen"
    unseen = ("unseen",) if c.data.unseen.manifest else ()
    c.evaluate.splits = ("analysis", "test", *unseen)
    c.evaluate.batch_size = 16

    c.switch.backbone = args["pann"] or "cnn14_16k"
    c.switch.variants = ()  # one switch per run at 7B scale; the other inputs are sweep() entries
    # Class-level labels: the paper transfers "in sound classes predicted as more challenging to the
    # student" (its abstract); per-clip labels are the ablation in sweep().
    c.switch.label_mode = "class"
    c.switch.class_margin = 0.0
    c.switch.finetune = "full"
    c.switch.learning_rate = 1e-4
    c.switch.batch_size = 32
    c.switch.epochs = 10

    c.label.batch_size = preset.get("label_batch", 16)
    c.label.chunk_batches = 64

    c.distill.modes = ("learned",)
    c.distill.lora.rank = 16
    c.distill.lora.alpha = 32.0
    c.distill.lora.dropout = 0.0  # the train step does not support dropout (see train/step.py)
    c.distill.batch_size = preset.get("distill_batch", 32)
    c.distill.remat = preset.get("remat", "full")  # without a preset: the safe choice
    c.distill.epochs = 1
    c.distill.learning_rate = 1e-4
    c.distill.warmup_steps = 100
    c.distill.checkpoint_every = 500
    c.distill.log_every = 10
    c.distill.eval_splits = ("test", "analysis", *unseen)  # analysis: the paper's headline split
    if args["rehearsal"] not in ("", "0", "1"):
        raise ValueError(f"config argument rehearsal={args['rehearsal']!r}: 1 (few steps) or 0")
    if standin or args["rehearsal"] == "1":
        rehearsal(c, preset)
    return c


def standin_values(directory: str) -> dict:
    """The config arguments a stand-in directory (`python -m data_pipelines.standin --out DIR`) fills."""
    made_file = os.path.join(directory, "standin.json")
    if not os.path.exists(made_file):
        raise ValueError(f"config argument standin={directory}: no {made_file}; build the stand-in first "
                         f"(python -m data_pipelines.standin --out {directory})")
    with open(made_file, encoding="utf-8") as f:
        made = json.load(f)
    values = dict(csv=made["csv"], video_dir=made["clips_dir"], audio=made["checkpoints"]["qwen2_audio"],
                  visual=made["checkpoints"]["qwen2_vl"], pann=made["pann"], analysis_size=str(made["analysis_size"]))
    if "qwen2_5_omni" in made["checkpoints"]:
        values["audio_visual"] = made["checkpoints"]["qwen2_5_omni"]
    return values


def rehearsal(c, preset: dict) -> None:
    """The paper run on the stand-in: every setting as above, on a few dozen clips, with a few steps. Batch
    sizes are the topology preset's, or 8 (whole batches on 1, 2, 4 or 8 devices)."""
    batch = lambda key, default=8: preset.get(key, default)
    c.evaluate.batch_size = batch("label_batch")
    c.label.batch_size = batch("label_batch")
    c.label.chunk_batches = 2
    c.models.audio_visual.batch_size = batch("audio_visual_batch")
    c.switch.batch_size = 8
    c.switch.epochs = 2
    c.distill.batch_size = batch("distill_batch")
    c.distill.max_steps = 4
    c.distill.warmup_steps = 1
    c.distill.checkpoint_every = 2
    c.distill.log_every = 1
    c.data.worker_count = 2
    c.data.max_error_fraction = 0.1  # the stand-in's two faulty files are 8 % of its test split


def sweep(add):
    """The ablations: switch modes, the logits loss, sample-level switch labels, the switch's inputs."""
    for mode in ("learned", "always", "never"):
        add(**{"distill.modes": (mode,)})
    add(**{"distill.loss": "logits", "distill.temperature": 2.0})
    add(**{"switch.label_mode": "sample"})
    # The audio-visual switch (the paper's open question) and the confidence switch.
    add(**{"switch.inputs": "audio_visual"})
    add(**{"switch.inputs": "confidence"})
