"""TPU without a TPU: the paper-scale programs compiled for real TPU topologies.

libtpu (`pip install "jax[tpu]"`) compiles for a TPU slice described by
`jax.experimental.topologies` on any machine; the compiled program reports XLA's per-chip
memory (arguments, temporaries, outputs) and FLOPs. We compile the real programs: the
Qwen2-Audio-7B LoRA distill step (the trainer's `train.loop.make_step`), the Qwen2-VL-7B letter
scoring step (what `decoding.score_choices` runs) and the Qwen2.5-Omni-7B scoring step on
sounded video, on abstract bf16 weights sharded by the
rules table, to prove a mesh/batch/remat preset fits a slice before renting it.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax import sharding
from distill_jax.layers.quantize import quantize_linears
from distill_jax.layers.scan import CONTAINERS, with_scan_layers
from distill_jax.models import lora
from distill_jax.models.qwen2_audio import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration
from distill_jax.models.qwen2_vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from distill_jax.train.loop import OptimizerConfig, make_optimizer, make_step
from distill_jax.train.step import distill_objective

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: how libtpu names it, and each chip's HBM and peak bf16 FLOP/s (Google's specs)."""

    name: str
    topology: str
    hbm_gib: float
    peak_tflops: float
    options: tuple = ()  # extra get_topology_desc keywords

    def devices(self):
        from jax.experimental import topologies
        return topologies.get_topology_desc(platform="tpu", topology_name=self.topology,
                                            **dict(self.options)).devices


# v4 runs "megacore" (one device per chip, its two TensorCores fused), as a v4-8 VM does.
TOPOLOGIES = {
    "v5e-8": Topology("v5e-8", "v5e:2x4", hbm_gib=16.0, peak_tflops=197.0),
    "v4-8": Topology("v4-8", "v4:2x2x1", hbm_gib=32.0, peak_tflops=275.0,
                     options=(("chip_config_name", "megacore"),)),
    "v5p-8": Topology("v5p-8", "v5p:2x2x1", hbm_gib=95.0, peak_tflops=459.0),
    # one chip (Colab's TPU v5e-1): a host of 2x2 chips is libtpu's default for v5e, so say it is 1x1
    "v5e-1": Topology("v5e-1", "v5e:1x1", hbm_gib=16.0, peak_tflops=197.0,
                      options=(("chips_per_host_bounds", (1, 1, 1)),)),
}


def libtpu_available() -> bool:
    try:
        TOPOLOGIES["v5e-8"].devices()
    except Exception:  # no libtpu, or one too old for this jax: the caller says what to install
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Workload:
    """One program's shapes and knobs (a `configs/paper.py` topology preset fills these)."""

    mesh: tuple[int, int, int] = (1, -1, 1)  # data x fsdp x tensor
    batch_size: int = 32  # global
    prompt_length: int = 512  # the prompt bucket (10 s clip: 250 audio tokens + ~100-token question)
    remat: str = "full"
    attention_impl: str | None = None
    lora_rank: int = 16
    audio_frames: int = 1008  # the 10 s clip's short window (data_pipelines.audio.window_frames(10))
    # The video batch as the pipeline pads it ([B, frames, patches, 1176], grids traced): by default the
    # largest bucket pair of configs/paper.py (10 temporal patches, 3072 patches each), which every clip
    # fills: 10 s at 2 fps of a frame at max_pixels (768 28x28 blocks) -> grid (10, 48, 64).
    video_frames: int = 10
    video_patches: int = 3072
    vision_query_chunk: int | None = None  # config.models.vision_query_chunk
    num_letters: int = 10
    model: str = "7b"  # the model presets ("tiny": a seconds-long check of this module)
    scan_layers: bool = True  # every part's layers stacked and run by one scan (config.models.scan_layers)
    quantize: str | None = None  # "int8": every Linear's frozen kernel int8 (config.models.quantize)

    @property
    def video_grid(self) -> tuple[int, int, int]:
        """A clip's grid (t, h, w) that fills the padded layout: h x w patches the nearest to square with
        both sides multiples of 8 (whole 2x2 merge blocks and, for Qwen2.5-Omni, whole 8x8 windows)."""
        sides = [(h, self.video_patches // h) for h in range(8, self.video_patches + 1, 8)
                 if self.video_patches % h == 0 and (self.video_patches // h) % 8 == 0]
        if not sides:
            raise ValueError(f"video_patches={self.video_patches}: no h x w with both sides multiples of 8")
        h, w = min(sides, key=lambda hw: (abs(hw[0] - hw[1]), hw[0]))
        return self.video_frames, h, w

    @property
    def video_tokens(self) -> int:
        return self.video_frames * self.video_patches // 4  # 2x2 merge


@dataclasses.dataclass
class Compiled:
    program: str
    topology: Topology
    workload: Workload
    compile_s: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops: float  # XLA's count for one chip's program (remat's recomputation included)
    model_flops: float  # per chip: what the step must compute (`model_flops`), for MFU

    @property
    def peak_bytes(self) -> int:
        """Per chip: arguments + temporaries + outputs, less outputs that reuse donated arguments."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.topology.hbm_gib * GIB

    def mfu(self, step_seconds: float) -> float:
        return self.model_flops / (step_seconds * self.topology.peak_tflops * 1e12)


def _matmul_params(state) -> int:
    """Parameters that multiply every token: all but embedding and position tables (and norms and
    biases, which stay vectors per layer when the layers are stacked for a scan)."""
    def per_layer_ndim(path, x):
        names = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
        stacked = any(n in CONTAINERS and not isinstance(after, int) for n, after in zip(names, names[1:]))
        return x.ndim - stacked

    return sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(state)
               if per_layer_ndim(path, x) >= 2 and not any("embed" in str(p) for p in path))


def transformer_flops(params: int, positions: int, *, layers: int, context: int, width: int, train: bool) -> float:
    """Model FLOPs of a transformer over `positions` positions attending over `context` each.

    Forward: 2 per matmul parameter per position, plus 4 * context * width per layer and
    position for the attention scores and their weighted sum. A LoRA step adds the backward's
    input gradients: 2 more per parameter (frozen weights get no weight gradient: 4N in all)
    and twice the attention's forward (remat's recomputation is not counted: it is not needed).
    """
    matmul, attention = 2 * params * positions, 4 * layers * context * width * positions
    return 2 * matmul + 3 * attention if train else matmul + attention


def _abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (a tree with one sharding per leaf)."""
    leaves, treedef = jax.tree.flatten(tree)
    flat = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(flat) != len(leaves):
        raise ValueError(f"{len(flat)} shardings for {len(leaves)} arrays")
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, flat)])


def variable_shardings(tree, mesh):
    """A sharding per leaf: nnx Variables by their logical axes (the rules table), the rest replicated."""
    def one(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("out_sharding")
            shape = np.shape(x.get_value())
            spec = sharding.fit_spec(sharding.logical_to_mesh(axes), shape, mesh) if axes else PartitionSpec()
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _batch_shardings(batch, mesh):
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
    ways = math.prod(mesh.shape[a] for a in axes or ())

    def one(x):
        spec = PartitionSpec(axes) if x.ndim and x.shape[0] % ways == 0 else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, batch)


def _finish(program, topology, workload, lowered, start, flops_needed) -> Compiled:
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return Compiled(program, topology, workload, seconds, memory.argument_size_in_bytes,
                    memory.output_size_in_bytes, memory.temp_size_in_bytes, memory.alias_size_in_bytes,
                    float(cost.get("flops", 0.0)), flops_needed / len(topology.devices()))


def audio_distill_step(topology: Topology, workload: Workload) -> Compiled:
    """The Qwen2-Audio-7B LoRA distill step (forward, backward, AdamW), bf16 weights, fp32 LoRA."""
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, workload.mesh)), devices=topology.devices())
    text_options = dict(remat=workload.remat, attention_impl=workload.attention_impl)
    config = Qwen2AudioConfig.preset(workload.model, dtype="bfloat16", param_dtype="bfloat16")
    config = with_scan_layers(dataclasses.replace(config, text=dataclasses.replace(config.text, **text_options)),
                              workload.scan_layers)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=100, total_steps=5000))
    graphdefs = []

    def state():
        model = Qwen2AudioForConditionalGeneration(config, rngs=nnx.Rngs(0))
        if workload.quantize == "int8":
            quantize_linears(model)
        lora.apply_lora(model, lora.LoraConfig(rank=workload.lora_rank, alpha=2.0 * workload.lora_rank),
                        rngs=nnx.Rngs(1))
        graphdef, params, changing, frozen = nnx.split(model, nnx.LoRAParam, nnx.Nothing, ...)
        graphdefs.append(graphdef)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params), "mutable": changing,
                "nonfinite_run": jnp.zeros((), jnp.int32), "nonfinite_total": jnp.zeros((), jnp.int32)}, frozen

    start = time.perf_counter()
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        abstract_state, abstract_frozen = jax.eval_shape(state)
    b, t, f = workload.batch_size, workload.prompt_length, workload.audio_frames
    batch = {"input_ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "input_features": jax.ShapeDtypeStruct((b, config.audio.num_mel_bins, f), jnp.float32),
             "feature_attention_mask": jax.ShapeDtypeStruct((b, f), jnp.int32),
             "switch_closed": jax.ShapeDtypeStruct((b,), jnp.bool_),
             "teacher_letter": jax.ShapeDtypeStruct((b,), jnp.int32),
             "teacher_logits": jax.ShapeDtypeStruct((b, workload.num_letters), jnp.float32),
             "student_letter": jax.ShapeDtypeStruct((b,), jnp.int32),
             "valid": jax.ShapeDtypeStruct((b,), jnp.int32)}
    step = make_step(graphdefs[0], tx, distill_objective(list(range(32, 32 + workload.num_letters))))
    with jax.set_mesh(mesh):
        lowered = step.lower(_abstract(abstract_state, variable_shardings(abstract_state, mesh)),
                             _abstract(abstract_frozen, variable_shardings(abstract_frozen, mesh)),
                             _abstract(batch, _batch_shardings(batch, mesh)))
    lm = _matmul_params(abstract_frozen["language_model"]) - _matmul_params(
        abstract_frozen["language_model"]["lm_head"])  # only 10 letter columns are used
    text, audio = config.text, config.audio
    needed = (transformer_flops(lm, b * t, layers=text.num_hidden_layers, context=t,
                                width=text.num_attention_heads * text.head_dim, train=True)
              + transformer_flops(_matmul_params(abstract_frozen["audio_tower"]), b * f // 2,
                                  layers=audio.encoder_layers, context=f // 2, width=audio.d_model, train=False))
    return _finish("Qwen2-Audio-7B LoRA distill step", topology, workload, lowered, start, needed)


def _letter_score(model_cls, config, topology: Topology, workload: Workload, media: dict):
    """Lower the letter-scoring program (one forward pass, letters at the last position) of
    `model_cls(config)` for prompts of `workload` with `media` inputs (ShapeDtypeStructs: the padded
    video and its traced grids, as the pipeline batches them); (lowered, abstract params, start time)."""
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, workload.mesh)), devices=topology.devices())
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, attention_impl=workload.attention_impl),
                                 vision=dataclasses.replace(config.vision, query_chunk=workload.vision_query_chunk))
    config = with_scan_layers(config, workload.scan_layers)
    start = time.perf_counter()
    abstract = sharding.abstract_model(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    if workload.quantize == "int8":
        quantize_linears(abstract)
    graphdef, params = nnx.split(abstract)
    b, t = workload.batch_size, workload.prompt_length
    letters = jnp.arange(32, 32 + workload.num_letters, dtype=jnp.int32)

    @jax.jit
    def score(params, batch):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(**batch)
        return model.logits(hidden[:, -1], letters)

    batch = {"input_ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "position_ids": jax.ShapeDtypeStruct((3, b, t), jnp.int32), **media}
    with jax.set_mesh(mesh):
        lowered = score.lower(_abstract(params, variable_shardings(params, mesh)),
                              _abstract(batch, _batch_shardings(batch, mesh)))
    return lowered, params, start


def _language_model_flops(params, config, workload: Workload) -> float:
    """Model FLOPs of the scoring step's language model (the LM head's 10 letter columns left out)."""
    lm = _matmul_params(params["language_model"]) - _matmul_params(params["language_model"]["lm_head"])
    text, b, t = config.text, workload.batch_size, workload.prompt_length
    return transformer_flops(lm, b * t, layers=text.num_hidden_layers, context=t,
                             width=text.num_attention_heads * text.head_dim, train=False)


def _padded_video(config, workload: Workload) -> dict:
    b = workload.batch_size
    return {"pixel_values_videos": jax.ShapeDtypeStruct(
                (b, workload.video_frames, workload.video_patches, config.vision.patch_dim), jnp.float32),
            "video_grid_thw": jax.ShapeDtypeStruct((b, 3), jnp.int32)}


def visual_score_step(topology: Topology, workload: Workload) -> Compiled:
    """The Qwen2-VL-7B teacher's letter scoring (one forward pass) on video padded per clip, bf16."""
    config = Qwen2VLConfig.preset(workload.model, dtype="bfloat16", param_dtype="bfloat16")
    grid, b = workload.video_grid, workload.batch_size
    patches = b * math.prod(grid)
    if workload.video_tokens >= workload.prompt_length:
        raise ValueError(f"prompt_length {workload.prompt_length} cannot hold the clip's {workload.video_tokens} "
                         "video tokens")
    media = _padded_video(config, workload)
    lowered, params, start = _letter_score(Qwen2VLForConditionalGeneration, config, topology, workload, media)
    segment = grid[1] * grid[2]  # vision attention runs within each temporal patch
    needed = (_language_model_flops(params, config, workload)
              + transformer_flops(_matmul_params(params["visual"]), patches, layers=config.vision.depth,
                                  context=segment, width=config.vision.embed_dim, train=False))
    return _finish("Qwen2-VL-7B teacher scoring step", topology, workload, lowered, start, needed)


def audio_visual_score_step(topology: Topology, workload: Workload) -> Compiled:
    """The Qwen2.5-Omni-7B thinker's letter scoring on sounded video (padded video, 10 s of
    audio, interleaved; TMRoPE positions come with the batch, as the transform makes them), bf16."""
    from distill_jax.models.qwen2_5_omni import Qwen2_5OmniConfig, Qwen2_5OmniThinker

    config = Qwen2_5OmniConfig.preset(workload.model, dtype="bfloat16", param_dtype="bfloat16")
    grid, b, f = workload.video_grid, workload.batch_size, workload.audio_frames
    patches = b * math.prod(grid)
    media_tokens = workload.video_tokens + f // 4
    if media_tokens >= workload.prompt_length:
        raise ValueError(f"prompt_length {workload.prompt_length} cannot hold the clip's {media_tokens} video and "
                         "audio tokens")
    media = {"input_features": jax.ShapeDtypeStruct((b, config.audio.num_mel_bins, f), jnp.float32),
             "feature_attention_mask": jax.ShapeDtypeStruct((b, f), jnp.int32), **_padded_video(config, workload)}
    lowered, params, start = _letter_score(Qwen2_5OmniThinker, config, topology, workload, media)
    vision, audio = config.vision, config.audio
    window = (vision.window_merge_units * vision.spatial_merge_size) ** 2
    full = len(vision.fullatt_block_indexes)
    needed = (_language_model_flops(params, config, workload)
              # vision: its matmuls, and attention within frames in the full-attention blocks, within windows elsewhere
              + 2 * _matmul_params(params["visual"]) * patches
              + 4 * vision.hidden_size * patches * (full * grid[1] * grid[2] + (vision.depth - full) * window)
              + transformer_flops(_matmul_params(params["audio_tower"]), b * f // 2, layers=audio.encoder_layers,
                                  context=audio.n_window, width=audio.d_model, train=False))
    return _finish("Qwen2.5-Omni-7B sounded-video scoring step", topology, workload, lowered, start, needed)


PROGRAMS = {"distill": audio_distill_step, "score": visual_score_step, "audio_visual_score": audio_visual_score_step}


# A prompt's tokens besides its media: the 10 longest of VGGSound's 309 class names as options with the
# system prompt and chat template, plus the pipeline's margin. Qwen2-VL: 154, measured
# (Qwen2VLTransform.text_tokens with the real Qwen2 tokenizer of data_pipelines/standin.py's checkpoint);
# Qwen2.5-Omni's longer system prompt: about 40 more, estimated (its prompt is rounded to 128 anyway).
QUESTION_TOKENS = 154
OMNI_QUESTION_TOKENS = 200


def workloads(config) -> dict[str, Workload]:
    """The distill and teacher-scoring workloads a run config describes (mesh, batches, remat,
    attention): audio prompts in the prompt bucket that holds a 10 s clip's; video at the largest
    bucket pair of config.data.video_frame_buckets x video_patch_buckets, the prompt at the length the
    pipeline derives for it (its text budget plus the pair's vision tokens, rounded up to
    config.data.video_prompt_multiple)."""
    mesh = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    buckets = sorted(config.data.prompt_buckets)
    question_tokens = QUESTION_TOKENS
    audio_tokens = 250  # 10 s
    video = dict(video_frames=max(config.data.video_frame_buckets), video_patches=max(config.data.video_patch_buckets),
                 vision_query_chunk=config.models.get("vision_query_chunk"))
    video_tokens = Workload(**video).video_tokens
    multiple = config.data.video_prompt_multiple
    follow = lambda n: -(-n // multiple) * multiple  # noqa: E731
    bucket = lambda n: next(b for b in buckets if b >= n)  # noqa: E731
    common = dict(mesh=mesh, attention_impl=config.models.attention_impl, lora_rank=config.distill.lora.rank,
                  num_letters=config.data.num_options, scan_layers=config.models.scan_layers,
                  quantize=config.models.quantize)
    return {"distill": Workload(batch_size=config.distill.batch_size,
                                prompt_length=bucket(audio_tokens + question_tokens), remat=config.distill.remat,
                                **common),
            "score": Workload(batch_size=config.label.batch_size,
                              prompt_length=follow(video_tokens + question_tokens),
                              remat="none", **video, **common),
            # 1000 mel frames: the Omni tower's five 2 s windows of a 10 s clip -> 250 audio tokens
            "audio_visual_score": Workload(batch_size=config.models.audio_visual.batch_size or config.label.batch_size,
                                           prompt_length=follow(video_tokens + audio_tokens + OMNI_QUESTION_TOKENS),
                                           remat="none", audio_frames=1000, **video, **common)}
