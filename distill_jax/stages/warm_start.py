"""Warm start (toy world only): the tiny audio and visual models trained from random init
(and, with config.warm_start.audio_visual, a tiny Qwen2.5-Omni on the clips' sounded video,
with true letters: the audio-visual reference).

Each model (Qwen2-Audio architecture on the clips' audio, Qwen2-VL architecture on their
frames) is trained, every parameter, on the `pretrain` split with the ground-truth letter as
the target, so that each is competent in its own modality, as the real checkpoints are, except
where the world's design scrambles a modality's pretraining labels within a group of classes
(`toy_world.PRETRAIN_SCRAMBLED`, `pretrain_letter`): that model hears the classes apart but
never learned their names, the learnable weakness distillation is meant to fix. The
result is written as a Hugging Face checkpoint (`convert.save_hf`, tokenizer included), so
every later stage loads it through `convert.load_hf`, as it loads Qwen2-Audio-7B / Qwen2-VL-7B
at paper scale, where this stage does not run.
"""
from __future__ import annotations

import json

import numpy as np
from etils import epath
from flax import nnx

from data_pipelines.questions import clip_rng
from distill_jax import multihost, prompts, sharding
from distill_jax.convert import save_hf
from distill_jax.layers.scan import with_scan_layers
from distill_jax.models.qwen2 import Qwen2Config
from distill_jax.models.qwen2_audio import (Qwen2AudioConfig, Qwen2AudioEncoderConfig,
                                            Qwen2AudioForConditionalGeneration)
from distill_jax.models.qwen2_vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLVisionConfig
from distill_jax.models.qwen2_5_omni import (OmniAudioEncoderConfig, OmniVisionConfig, Qwen2_5OmniConfig,
                                             Qwen2_5OmniThinker)
from distill_jax.stages.common import AUDIO_VISUAL, MODALITIES, audio_visual_name
from distill_jax.train import loop
from distill_jax.train.step import distill_objective

WARM_STARTED = (*MODALITIES, AUDIO_VISUAL)  # the audio-visual model only with config.warm_start.audio_visual


def _text_config(sizes, tokenizer, **extra) -> Qwen2Config:
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=sizes.hidden_size,
                       intermediate_size=sizes.intermediate_size, num_hidden_layers=sizes.num_layers,
                       num_attention_heads=sizes.num_heads, num_key_value_heads=sizes.num_kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=True,
                       eos_token_id=tokenizer.convert_tokens_to_ids(prompts.IM_END),
                       pad_token_id=tokenizer.pad_token_id, **extra)


def _mrope_section(sizes) -> tuple[int, int, int]:
    """The rotary half-dimension of a toy M-RoPE model split over (t, h, w), about 2 : 3 : 3."""
    half = sizes.hidden_size // sizes.num_heads // 2
    return half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8


def toy_omni_config(sizes, tokenizer) -> Qwen2_5OmniConfig:
    """A tiny Qwen2.5-Omni thinker for `tokenizer` (one with the Omni tokens): 2 s audio windows
    and 112-pixel vision windows as the real model's, full attention in the last vision block."""
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5OmniConfig(
        audio=OmniAudioEncoderConfig(num_mel_bins=128, encoder_layers=sizes.tower_layers,
                                     encoder_attention_heads=sizes.tower_heads, encoder_ffn_dim=2 * sizes.tower_dim,
                                     d_model=sizes.tower_dim, output_dim=sizes.hidden_size),
        vision=OmniVisionConfig(depth=sizes.tower_layers, hidden_size=sizes.tower_dim,
                                intermediate_size=2 * sizes.tower_dim, num_heads=sizes.tower_heads,
                                out_hidden_size=sizes.hidden_size, fullatt_block_indexes=(sizes.tower_layers - 1,)),
        text=_text_config(sizes, tokenizer, mrope_section=_mrope_section(sizes)),
        audio_token_id=ids(prompts.AUDIO_TOKEN),
        image_token_id=ids(prompts.OMNI_IMAGE), video_token_id=ids(prompts.OMNI_VIDEO),
        audio_start_token_id=ids(prompts.AUDIO_BOS), audio_end_token_id=ids(prompts.AUDIO_EOS),
        vision_start_token_id=ids(prompts.VISION_BOS), vision_end_token_id=ids(prompts.VISION_EOS))


def omni_tokenizer_dir(study, sizes):
    """The toy Omni's tokenizer (the toy tokenizer plus Omni's vision tokens, after the others), with
    its model's config.json beside it as in a checkpoint directory: the prompts' timing and token
    ids are read from there before the model exists."""
    from distill_jax.stages.prepare import TOY_TOKENIZER_VOCAB
    from distill_jax.toy_tokenizer import make_qwen2_tokenizer

    path = study.path("tokenizer_omni")
    if not (path / "config.json").exists():
        with multihost.atomic_dir(path, last="config.json") as out:
            make_qwen2_tokenizer(out, words=study.classes, vocab_size=TOY_TOKENIZER_VOCAB, omni=True)
            config = toy_omni_config(sizes, prompts.load_tokenizer(str(out)))
            (epath.Path(out) / "config.json").write_text(json.dumps(config.to_hf(), indent=2, sort_keys=True))
    return path


def toy_model(modality: str, sizes, tokenizer, *, max_seconds: float, seed: int, scan_layers: bool = True):
    """A randomly initialised tiny model of `modality`'s architecture for `tokenizer` (the same
    weights for a seed whether its layers are scanned or not)."""
    ids = tokenizer.convert_tokens_to_ids
    if modality == AUDIO_VISUAL:
        config = with_scan_layers(toy_omni_config(sizes, tokenizer), scan_layers)
        return Qwen2_5OmniThinker(config, rngs=nnx.Rngs(seed))
    if modality == "audio":
        config = Qwen2AudioConfig(
            audio=Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=sizes.tower_layers,
                                          encoder_attention_heads=sizes.tower_heads,
                                          encoder_ffn_dim=2 * sizes.tower_dim, d_model=sizes.tower_dim,
                                          max_source_positions=int(np.ceil(max_seconds * 100 / 2))),
            text=_text_config(sizes, tokenizer), audio_token_index=ids(prompts.AUDIO_TOKEN))
        return Qwen2AudioForConditionalGeneration(with_scan_layers(config, scan_layers), rngs=nnx.Rngs(seed))
    config = Qwen2VLConfig(
        vision=Qwen2VLVisionConfig(depth=sizes.tower_layers, embed_dim=sizes.tower_dim,
                                   hidden_size=sizes.hidden_size, mlp_ratio=2, num_heads=sizes.tower_heads),
        text=_text_config(sizes, tokenizer, mrope_section=_mrope_section(sizes)),
        image_token_id=ids(prompts.IMAGE_TOKEN), video_token_id=ids(prompts.VIDEO_TOKEN),
        vision_start_token_id=ids(prompts.VISION_START), vision_end_token_id=ids(prompts.VISION_END))
    return Qwen2VLForConditionalGeneration(with_scan_layers(config, scan_layers), rngs=nnx.Rngs(seed))


def scrambled_groups(study, modality: str) -> dict[int, tuple[int, ...]]:
    """class index -> the class indices it is scrambled with in `modality`'s pretraining (itself
    included), from the toy world's design.json ({} where none are)."""
    design = multihost.read_json(study.path("data", "design.json"))
    groups = design.get("pretrain_scrambled", {}).get(modality, [])
    if groups and study.config.data.question_strategy != "fixed":
        raise ValueError("scrambled pretraining labels need question_strategy 'fixed' (the letter is the class)")
    index = {name: i for i, name in enumerate(study.classes)}
    return {index[name]: tuple(index[c] for c in group) for group in groups for name in group}


def pretrain_letter(clip_id: str, label: int, answer: int, scrambled: dict[int, tuple[int, ...]], seed: int) -> int:
    """The warm start's target letter of a clip: the true one, except for a class of a scrambled
    group, whose clips each get a class of the group drawn at random once per clip (seeded by the
    clip id): labels that never tell the group's classes apart ("fixed" questions: letter = class)."""
    group = scrambled.get(int(label))
    if group:
        return int(group[clip_rng(f"pretrain/{clip_id}", seed).integers(len(group))])
    return int(answer)


class PretrainTargets:
    """Grain step: a clip's warm-start targets, which make the letter objective plain
    cross-entropy to its `pretrain_letter` (every switch closed, that letter as the teacher's)."""

    def __init__(self, scrambled: dict[int, tuple[int, ...]], seed: int, num_letters: int):
        self.scrambled, self.seed, self.num_letters = scrambled, seed, num_letters

    def __call__(self, example: dict) -> dict:
        letter = np.int32(pretrain_letter(example["clip_id"], example["label"], example["answer"], self.scrambled,
                                          self.seed))
        return {"switch_closed": np.bool_(True), "teacher_letter": letter, "student_letter": letter,
                "teacher_logits": np.zeros(self.num_letters, np.float32)}


def train_modality(study, modality: str):
    """Warm-start `modality`'s model ("audio", "visual", or "audio_visual": on sounded video) and save it."""
    config, cfg = study.config, study.config.warm_start
    out = study.model_dir(modality)
    run = cfg.models[modality]  # its sizes and its warm start: learning_rate, steps, batch_size, warmup_steps
    # The model directory does not exist yet: the tokenizer comes from the prepare stage's (Omni: its own).
    tokenizer_dir = omni_tokenizer_dir(study, run) if modality == AUDIO_VISUAL else study.path("tokenizer")
    tokenizer = prompts.load_tokenizer(multihost.local(tokenizer_dir))
    model = toy_model(modality, run, tokenizer, max_seconds=config.data.max_seconds,
                      seed=config.seed + WARM_STARTED.index(modality), scan_layers=config.models.scan_layers)
    sharding.shard_model(model, study.mesh)
    letters = prompts.letter_token_ids(tokenizer, prompts.LETTERS[:study.num_options()])
    name = audio_visual_name("audio_video") if modality == AUDIO_VISUAL else modality  # what it is shown
    transform = study.transform(name, tokenizer_dir)
    dataset = study.dataset(name, cfg.split, batch_size=run.batch_size, train=True, num_epochs=None,
                            seed=config.seed, tokenizer_dir=tokenizer_dir,
                            targets=PretrainTargets(scrambled_groups(study, modality), config.seed, len(letters)))
    model = loop.train(
        model, distill_objective(letters, mode="labels", model_inputs=transform.model_inputs), iter(dataset),
        optimizer=loop.OptimizerConfig(learning_rate=run.learning_rate, warmup_steps=run.warmup_steps,
                                       total_steps=run.steps, weight_decay=cfg.weight_decay, clip_norm=1.0),
        loop=loop.LoopConfig(steps=run.steps, log_every=cfg.log_every, max_nonfinite_steps=cfg.max_nonfinite_steps),
        mesh=study.mesh,
        name=f"warm start {modality}", trained=nnx.Param, static_inputs=transform.static_inputs,
        observe=study.observer(name, "train", cfg.split, tokenizer_dir=tokenizer_dir))
    study.input_log.save()
    save_hf(model, out, tokenizer_dir=tokenizer_dir)
    return out


def run(study) -> None:
    if not study.config.toy:
        print("warm_start: not a toy-world run; the models come from their checkpoints")
        return
    for modality in WARM_STARTED if study.config.warm_start.audio_visual else MODALITIES:
        if (study.model_dir(modality) / "config.json").exists():
            print(f"warm_start: {study.model_dir(modality)} exists, skipped")
            continue
        print(f"warm_start: {modality} model -> {train_modality(study, modality)}", flush=True)
