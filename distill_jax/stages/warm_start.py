"""Warm start (toy world only): the tiny audio and visual models trained from random init.

Each model (Qwen2-Audio architecture on the clips' audio, Qwen2-VL architecture on their
frames) is trained, every parameter, on the `pretrain` split with the ground-truth letter as
the target, so that each is competent in its own modality, as the real checkpoints are, except
where the world's design scrambles a modality's pretraining labels within a group of classes
(`toy_world.PRETRAIN_SCRAMBLED`, `pretrain_letters`): that model hears the classes apart but
never learned their names, the learnable weakness distillation is meant to fix. The
result is written as a Hugging Face checkpoint (`convert.save_hf`, tokenizer included), so
every later stage loads it through `convert.load_hf`, as it loads Qwen2-Audio-7B / Qwen2-VL-7B
at paper scale, where this stage does not run.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import optax
from flax import nnx

from data_pipelines.questions import clip_rng
from distill_jax import prompts
from distill_jax.convert import save_hf
from distill_jax.models.qwen2 import Qwen2Config
from distill_jax.models.qwen2_audio import (Qwen2AudioConfig, Qwen2AudioEncoderConfig,
                                            Qwen2AudioForConditionalGeneration)
from distill_jax.models.qwen2_vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLVisionConfig
from distill_jax.stages.common import MODALITIES, place_batch
from distill_jax.train.step import init_state, make_train_step, merge_model, split_inputs


def _text_config(sizes, tokenizer, **extra) -> Qwen2Config:
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=sizes.hidden_size,
                       intermediate_size=sizes.intermediate_size, num_hidden_layers=sizes.num_layers,
                       num_attention_heads=sizes.num_heads, num_key_value_heads=sizes.num_kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=True,
                       eos_token_id=tokenizer.convert_tokens_to_ids(prompts.IM_END),
                       pad_token_id=tokenizer.pad_token_id, **extra)


def toy_model(modality: str, sizes, tokenizer, *, max_seconds: float, seed: int):
    """A randomly initialised tiny model of `modality`'s architecture for `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids
    if modality == "audio":
        config = Qwen2AudioConfig(
            audio=Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=sizes.tower_layers,
                                          encoder_attention_heads=sizes.tower_heads,
                                          encoder_ffn_dim=2 * sizes.tower_dim, d_model=sizes.tower_dim,
                                          max_source_positions=int(np.ceil(max_seconds * 100 / 2))),
            text=_text_config(sizes, tokenizer), audio_token_index=ids(prompts.AUDIO_TOKEN))
        return Qwen2AudioForConditionalGeneration(config, rngs=nnx.Rngs(seed))
    quarter = sizes.hidden_size // sizes.num_heads // 2  # rotary half-dim, split over (t, h, w)
    section = (quarter - 2 * (quarter * 3 // 8), quarter * 3 // 8, quarter * 3 // 8)
    config = Qwen2VLConfig(
        vision=Qwen2VLVisionConfig(depth=sizes.tower_layers, embed_dim=sizes.tower_dim,
                                   hidden_size=sizes.hidden_size, mlp_ratio=2, num_heads=sizes.tower_heads),
        text=_text_config(sizes, tokenizer, mrope_section=section),
        image_token_id=ids(prompts.IMAGE_TOKEN), video_token_id=ids(prompts.VIDEO_TOKEN),
        vision_start_token_id=ids(prompts.VISION_START), vision_end_token_id=ids(prompts.VISION_END))
    return Qwen2VLForConditionalGeneration(config, rngs=nnx.Rngs(seed))


def scrambled_groups(study, modality: str) -> dict[int, tuple[int, ...]]:
    """class index -> the class indices it is scrambled with in `modality`'s pretraining (itself
    included), from the toy world's design.json ({} where none are)."""
    with open(study.path("data", "design.json")) as f:
        design = json.load(f)
    groups = design.get("pretrain_scrambled", {}).get(modality, [])
    if groups and study.config.data.question_strategy != "fixed":
        raise ValueError("scrambled pretraining labels need question_strategy 'fixed' (the letter is the class)")
    index = {name: i for i, name in enumerate(study.classes)}
    return {index[name]: tuple(index[c] for c in group) for group in groups for name in group}


def pretrain_letters(batch: dict, scrambled: dict[int, tuple[int, ...]], seed: int) -> np.ndarray:
    """The warm start's target letter per clip: the true one, except for a class of a scrambled
    group, whose clips each get a class of the group drawn at random once per clip (seeded by the
    clip id): labels that never tell the group's classes apart ("fixed" questions: letter = class)."""
    letters = np.asarray(batch["answer"], np.int32).copy()
    for row, (clip_id, label) in enumerate(zip(batch["clip_id"], batch["label"])):
        group = scrambled.get(int(label))
        if group:
            letters[row] = group[clip_rng(f"pretrain/{clip_id}", seed).integers(len(group))]
    return letters


def pretrain_targets(batch: dict, num_letters: int, letters: np.ndarray) -> dict:
    """Train-step targets that make the loss plain cross-entropy to `letters` (`pretrain_letters`)."""
    answer = np.asarray(letters, np.int32)
    return {"switch_closed": np.ones(len(answer), bool), "teacher_letter": answer,
            "teacher_logits": np.zeros((len(answer), num_letters), np.float32), "student_letter": answer,
            "weight": np.asarray(batch["valid"], np.float32)}


def train_modality(study, modality: str) -> str:
    config, cfg = study.config, study.config.warm_start
    out = study.model_dir(modality)
    tokenizer = prompts.load_tokenizer(study.path("tokenizer"))
    run = cfg.models[modality]  # its sizes and its warm start: learning_rate, steps, batch_size, warmup_steps
    model = toy_model(modality, run, tokenizer, max_seconds=config.data.max_seconds,
                      seed=config.seed + MODALITIES.index(modality))
    # The transform reads the tokenizer from the model directory, which does not exist yet.
    study_tokenizer_dir = study.path("tokenizer")
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, run.learning_rate, run.warmup_steps, run.steps),
        weight_decay=cfg.weight_decay))
    graphdef, state = init_state(model, tx, trained=nnx.Param)
    letters = prompts.letter_token_ids(tokenizer, prompts.LETTERS[:study.num_options()])
    train_step = make_train_step(graphdef, tx, letters, mode="labels")
    dataset = study.dataset(modality, cfg.split, batch_size=run.batch_size, train=True, num_epochs=None,
                            seed=config.seed, tokenizer_dir=study_tokenizer_dir)
    inputs_of = study.model_inputs(modality)
    scrambled = scrambled_groups(study, modality)
    start, losses = time.perf_counter(), []
    for step, batch in zip(range(1, run.steps + 1), dataset):
        arrays, static = split_inputs(model, inputs_of(batch))
        targets = pretrain_targets(batch, len(letters), pretrain_letters(batch, scrambled, config.seed))
        state, metrics = train_step(state, place_batch({"inputs": arrays, "targets": targets}, study.mesh), static)
        losses.append(float(metrics["loss"]))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"warm start of the {modality} model: loss {losses[-1]} at step {step}")
        if step % cfg.log_every == 0 or step == run.steps:
            rate = step / (time.perf_counter() - start)
            print(f"warm start {modality}: step {step}/{run.steps} loss {np.mean(losses[-cfg.log_every:]):.3f} "
                  f"{rate:.2f} steps/s ETA {(run.steps - step) / rate:.0f} s", flush=True)
    save_hf(merge_model(graphdef, state), out, tokenizer_dir=study_tokenizer_dir)
    return out


def run(study) -> None:
    if not study.config.toy:
        print("warm_start: not a toy-world run; the models come from their checkpoints")
        return
    for modality in MODALITIES:
        if os.path.exists(os.path.join(study.model_dir(modality), "config.json")):
            print(f"warm_start: {study.model_dir(modality)} exists, skipped")
            continue
        print(f"warm_start: {modality} model -> {train_modality(study, modality)}", flush=True)
