"""The toy world end to end on a CPU: the default config of `python -m distill_jax.main`.

    python -m distill_jax.main --workdir=workdir                      # = --config=configs/toy.py
    python -m distill_jax.main --config=configs/toy.py:seeds=3 --workdir=workdir3   # 3 seeds, pooled
    python -m distill_jax.main --config=configs/toy.py:direction=audio_to_vl --workdir=workdir_a2v
    python -m distill_jax.main --config=configs/toy.py --config.distill.loss=logits --workdir=workdir_kl

Arguments (after the colon, comma-separated key=value): direction=vl_to_audio|audio_to_vl,
seeds=<n> (repeat the whole study with seeds 0..n-1, each in workdir/seed_<s>/; the report pools
the findings over them), scale=<float> (clips per class, x the toy world's default counts),
tiny=1 (a seconds-long run for tests: few clips and steps), audio_visual=1 (also warm-start a tiny
Qwen2.5-Omni, the audio-visual reference, and score it on audio, silent video and sounded
video; opt-in: it adds its own warm start and three scorings to the run, README),
teacher=audio_visual (its sounded-video answers teach the student; implies audio_visual=1). The default, one seed, runs in
about 6.5 minutes on 2 CPU cores (README); each further seed adds as much.

Questions list all 20 toy classes in a fixed order (question_strategy "fixed"): tiny models
trained from scratch on a CPU do not learn to look a class up among shuffled options in
minutes (measured; see data_pipelines/questions.py), while the study itself, the switch and
the letter-level losses, is the same as with the paper's 10 shuffled options.
"""
import ml_collections
from ml_collections import config_dict

from distill_jax import prompts


def parse_arg(arg: str | None, **defaults) -> dict:
    """"a=1,b=x" -> {"a": "1", "b": "x"} over `defaults` (unknown keys are an error)."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(defaults)}")
        values[key] = value
    return values


def tower(learning_rate, steps, batch_size, warmup_steps, hidden_size=128, intermediate_size=256, num_layers=2,
          num_heads=4, num_kv_heads=2, tower_dim=64, tower_layers=2, tower_heads=4):
    """A toy model's sizes and its warm start: peak learning rate, steps, batch size, warmup steps."""
    return ml_collections.ConfigDict(dict(
        learning_rate=learning_rate, steps=steps, batch_size=batch_size, warmup_steps=warmup_steps,
        hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, tower_dim=tower_dim,
        tower_layers=tower_layers, tower_heads=tower_heads))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, direction="vl_to_audio", scale="1.0", tiny="0", seeds="1", audio_visual="0", teacher="")
    tiny = args["tiny"] not in ("0", "", "false", "False")
    audio_visual = args["audio_visual"] not in ("0", "", "false", "False") or args["teacher"] == "audio_visual"
    c = ml_collections.ConfigDict()
    c.toy = True
    # Each seed repeats the whole study (world, warm start, switch, distillation) in workdir/seed_<s>/;
    # the report pools the findings over them and gives mean +- sd.
    c.seeds = tuple(range(int(args["seeds"])))
    c.direction = args["direction"]
    # None: the direction's other modality teaches; "audio_visual": the audio-visual model on sounded video.
    c.teacher = args["teacher"] or config_dict.placeholder(str)
    c.stages = ("prepare", "warm_start", "evaluate", "switch", "label", "distill", "report")
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1: the remaining devices
    c.compute_dtype = "float32"  # CPU; bfloat16 on TPU/GPU

    c.data = ml_collections.ConfigDict()
    c.data.manifest = config_dict.placeholder(str)  # None: the toy world's, in the workdir
    # Real data converted by the prepare stage (configs/paper.py: csv=, video_dir=): a VGGSound CSV and
    # its clips -> <workdir>/data/vggsound/ (workers 0: one decoding process per CPU).
    c.data.vggsound = ml_collections.ConfigDict(dict(csv=config_dict.placeholder(str),
                                                     video_dir=config_dict.placeholder(str),
                                                     analysis_size=config_dict.placeholder(int), workers=0))
    c.data.world = ml_collections.ConfigDict(dict(scale=0.25 if tiny else float(args["scale"]), fps=4.0,
                                                  workers=0))
    c.data.max_seconds = 2.0  # the toy clips' length (VGGSound: 10)
    # Qwen2-Audio pads each clip to a chunk (the HF processor: 30 s) and we compute only the short
    # window of it. The toy's models are trained from scratch on 2 s chunks; real checkpoints: 30.
    c.data.audio_chunk_seconds = 2.0
    c.data.video_fps = 4.0
    c.data.max_pixels = 28 * 28 * 1280
    c.data.min_pixels = config_dict.placeholder(int)  # None: 56 * 56 (the image processor's)
    c.data.num_options = 10
    c.data.question_strategy = "fixed"
    c.data.question_seed = 0
    # Leave out of a clip's distractors the classes related to its class (synonyms, classes usually on
    # the same clips: data_pipelines/related_classes.py, as the manifest records them) and its other
    # labels (the manifest's other_labels). The toy's classes are distinct and its questions list them all.
    c.data.exclude_related = config_dict.placeholder(bool)  # None: off
    c.data.question_template = prompts.DEFAULT_QUESTION
    c.data.system_prompt = prompts.DEFAULT_SYSTEM
    # The toy prompts list all 20 classes: 165 tokens (visual) and 205 (audio); tight buckets save a
    # third of the visual model's compute.
    c.data.prompt_buckets = (128, 176, 208, 256, 512, 1024)
    # Video batches are padded per batch to the smallest pair of these that holds them: temporal
    # patches (2 frames each) and patches per temporal patch (14 px squares); a video prompt's
    # length follows from the pair, so a video model compiles one program per pair it meets.
    # The toy's clips are uniform (2 s at 4 fps, 64x64: 4 x 16); real clips are not (configs/paper.py).
    c.data.video_frame_buckets = (4,)
    c.data.video_patch_buckets = (16, 64, 256, 1024, 5120)
    c.data.video_prompt_multiple = 8  # a video prompt's length rounded up to a multiple of this
    # "raise": a bad record stops the run naming file and offset; "skip": it is logged with file, offset,
    # clip id and reason, counted per split in <workdir>/data_errors.jsonl and the report, and left out,
    # while more than max_error_fraction of a split's records bad stops the run.
    # Human answers to the same questions (data_pipelines/humans.py: clip_id, condition, participant,
    # answer, options); None: the toy world's simulated participants (labelled simulated in the report).
    c.data.humans = config_dict.placeholder(str)
    # The "unseen" split: clips of classes the study never distils on, from their own manifest (AudioSet's
    # evaluation segments through data_pipelines/audioset.py, split "eval"; None: the toy world's unseen
    # classes, converted the same way, or no unseen split at paper scale). Its classes must have no clip in
    # label.split or switch.split. Questions about its clips draw their options from `distractors`:
    # "unseen" (the unseen manifest's classes only) or "all" (the run's classes, then the unseen ones; the
    # toy: its fixed 20-class question, which the warm-started models learned with every class in it).
    c.data.unseen = ml_collections.ConfigDict(dict(manifest=config_dict.placeholder(str), split="eval",
                                                   distractors="all"))
    c.data.on_error = "raise"
    c.data.max_error_fraction = 0.01
    c.data.worker_count = 0

    c.models = ml_collections.ConfigDict()
    c.models.audio = ml_collections.ConfigDict(dict(path=config_dict.placeholder(str)))  # None: warm start's
    c.models.visual = ml_collections.ConfigDict(dict(path=config_dict.placeholder(str)))
    # The audio-visual reference (Qwen2.5-Omni's thinker): a checkpoint, or (toy) warm_start.audio_visual's.
    # Scored in the evaluate stage on each condition: "audio", "video" (silent), "audio_video" (sounded).
    # Its prompts use `system_prompt` (Omni's own template default at paper scale) and frames resized
    # within [min_pixels, max_pixels]; batch_size: its scoring batch (None: evaluate.batch_size).
    c.models.audio_visual = ml_collections.ConfigDict(dict(
        path=config_dict.placeholder(str), conditions=prompts.CONDITIONS, system_prompt=prompts.DEFAULT_SYSTEM,
        min_pixels=56 * 56, max_pixels=28 * 28 * 1280, batch_size=config_dict.placeholder(int)))
    # The language models' attention: "xla" | "cudnn" | "flash" (Pallas, TPU; passes with a KV cache
    # run "xla"); None: by the platform ("flash" on TPU where shapes allow, else "xla").
    c.models.attention_impl = config_dict.placeholder(str)
    # Every model's repeated layers (decoder, audio and vision towers) stacked and run by one
    # lax.scan: one layer to compile instead of L, the same results (tests/test_scan.py). False:
    # unrolled, as before (needed for LoRA on some layers only, or LoRA dropout).
    c.models.scan_layers = True
    # None | "int8": every model's Linear kernels weight-only int8 (qwix, per output channel),
    # quantized as they load; LoRA weights and optimizer state keep their dtype. For one 16 GB
    # chip at 7B (configs/paper.py:topology=v5e-1); quality: benchmarks/README.md, int8_quality.py.
    c.models.quantize = config_dict.placeholder(str)
    # The vision towers' attention scores at most this many queries of a frame at a time (the same
    # values; memory for the scores of long frames, which the causal flash kernel cannot take); None: all.
    c.models.vision_query_chunk = config_dict.placeholder(int)

    c.warm_start = ml_collections.ConfigDict()
    c.warm_start.split = "pretrain"
    c.warm_start.weight_decay = 0.0
    c.warm_start.log_every = 2 if tiny else 50
    c.warm_start.max_nonfinite_steps = 3  # consecutive skipped (non-finite) steps before a training stops
    # Measured on the default world. Audio: 400 steps of 16 at 3e-3 left errors outside the scrambled
    # groups (chainsaw heard as cello: a sensory confusion the design does not intend; 73 % of the
    # scrambled classes' answers stayed in their group); 300 steps of 32 keep 98 % in the group, 73 %
    # overall. Visual: it learns slowly and unstably: 300 steps of 16 at 1e-3 left it at 0.62-0.80 on
    # test (at 2e-3: 0.31), 600 of 16 at 1e-3: 0.83; batches of 32 at 1.5e-3 with a longer warmup
    # train it steadily (loss 0.41 after 300 steps).
    c.warm_start.models = ml_collections.ConfigDict(dict(
        audio=tower(3e-3, steps=4 if tiny else 300, batch_size=8 if tiny else 32, warmup_steps=1 if tiny else 60),
        visual=tower(1.5e-3, steps=4 if tiny else 400, batch_size=8 if tiny else 32, warmup_steps=1 if tiny else 60,
                     tower_dim=32),
        audio_visual=tower(1.5e-3, steps=4 if tiny else 300, batch_size=8 if tiny else 32,
                           warmup_steps=1 if tiny else 60, tower_dim=32)))
    c.warm_start.audio_visual = audio_visual  # warm-start the tiny audio-visual model (models.audio_visual)

    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.splits = ("analysis", "test", "unseen")
    c.evaluate.batch_size = 8 if tiny else 32

    c.switch = ml_collections.ConfigDict()
    c.switch.split = "analysis"  # trained on this split's answers of both models
    c.switch.eval_split = "test"
    c.switch.backbone = "tiny"  # a Cnn14Config preset (random init) or a PANN checkpoint path
    # What the switch sees beside the audio (stages/switch.py): "audio" (the Cnn14 alone, the paper's),
    # "audio_visual" (+ the visual model's pooled vision-tower embedding of the clip, frozen) or
    # "confidence" (+ both models' letter-distribution features: max probability, margin, entropy,
    # agreement). `variants`: the ablations, trained, labelled and distilled ("learned_<inputs>") in the
    # same run beside `inputs`, compared in results.json's analysis.switch_variants (tiny: none, for CI
    # time; tests/test_cloud_paths.py runs the tiny study with both).
    c.switch.inputs = "audio"
    c.switch.variants = () if tiny else ("audio_visual", "confidence")
    c.switch.finetune = "full"
    # Class-level labels (the paper's "classes predicted as more challenging to the student").
    # Measured on seed 0 of the default world, on test: class-level 0.992 (always-majority 0.562),
    # 0.989 when trained on only 8 analysis clips a class; per-clip "teacher right, student wrong"
    # labels 0.797 (majority 0.742). In the previous world the switch was below its majority
    # baseline (0.617 vs 0.688) because its class labels were noise: gaps of 1-2 clips in 8 made
    # the analysis split's labels disagree with the test split's on 3 of 16 classes, and the
    # balanced BCE then over-predicted the teacher (recall 0.95, precision 0.45).
    c.switch.label_mode = "class"
    c.switch.sample_rule = "right_wrong"
    c.switch.class_margin = 0.1
    c.switch.threshold = 0.5
    c.switch.learning_rate = 1e-3
    c.switch.batch_size = 8 if tiny else 16
    c.switch.epochs = 1 if tiny else 20
    c.switch.max_nonfinite_steps = 3

    c.label = ml_collections.ConfigDict()
    c.label.split = "train"
    c.label.batch_size = 8 if tiny else 32
    c.label.chunk_batches = 2 if tiny else 8  # batches per resumable records file

    c.distill = ml_collections.ConfigDict()
    # The learned switch and its controls: `always` (no switch), `never` (own answers only: as many
    # steps without the teacher) and `oracle` (the teacher exactly where it is right and the student wrong).
    c.distill.modes = ("learned", "always", "never", "oracle")
    c.distill.loss = "labels"  # "labels": CE to the teacher's letter; "logits": KL at `temperature`
    c.distill.temperature = 1.0
    c.distill.lora = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, dropout=0.0,
                                                    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj")))
    c.distill.batch_size = 8 if tiny else 16
    c.distill.epochs = 3  # 512 clips: one epoch (32 steps) barely moved the student
    c.distill.max_steps = config_dict.placeholder(int)  # None: epochs x clips / batch
    if tiny:
        c.distill.max_steps = 6
    # At 2e-3 the student did not learn the unlearned classes from the teacher's letters in 96
    # steps where the other clips' targets are its own answers (oracle switch: race car 0 -> 0 %
    # on test); at 5e-3 it did (0 -> 95 %). Measured on the default world.
    c.distill.learning_rate = 5e-3
    c.distill.warmup_steps = 1 if tiny else 4
    c.distill.weight_decay = 0.0
    c.distill.clip_norm = 1.0
    c.distill.accumulate_steps = 1
    c.distill.remat = "none"  # the student's decoder layers in training: none | dots | full (models.qwen2)
    c.distill.checkpoint_every = 2 if tiny else 10
    c.distill.log_every = 1 if tiny else 5
    c.distill.max_nonfinite_steps = 3
    # analysis: the paper's headline split (left out of the tiny test run: the same code, and CI time)
    c.distill.eval_splits = ("test", "unseen") if tiny else ("test", "unseen", "analysis")
    return c


def sweep(add):
    """The ablations at toy scale (`python -m distill_jax.sweep --config=configs/toy.py --workdir=ROOT`):
    the letter-distribution loss, and per-clip switch labels instead of class-level ones."""
    add(**{"distill.loss": "logits", "distill.temperature": 2.0})
    add(**{"switch.label_mode": "sample"})
