"""Warm start (toy world only): the tiny audio and visual models trained from random init.

Each model (Qwen2-Audio architecture on the clips' audio, Qwen2-VL architecture on their
frames) is trained, every parameter, on the `pretrain` split with the ground-truth letter as
the target, so that each is competent in its own modality, as the real checkpoints are. The
result is written as a Hugging Face checkpoint (`convert.save_hf`, tokenizer included), so
every later stage loads it through `convert.load_hf`, as it loads Qwen2-Audio-7B / Qwen2-VL-7B
at paper scale, where this stage does not run.
"""
from __future__ import annotations

import os
import time

import numpy as np
import optax
from flax import nnx

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


def ground_truth_targets(batch: dict, num_letters: int) -> dict:
    """Train-step targets that make the loss plain cross-entropy to the true letter."""
    answer = np.asarray(batch["answer"], np.int32)
    return {"switch_closed": np.ones(len(answer), bool), "teacher_letter": answer,
            "teacher_logits": np.zeros((len(answer), num_letters), np.float32), "student_letter": answer,
            "weight": np.asarray(batch["valid"], np.float32)}


def train_modality(study, modality: str) -> str:
    config, cfg = study.config, study.config.warm_start
    out = study.model_dir(modality)
    tokenizer = prompts.load_tokenizer(study.path("tokenizer"))
    model = toy_model(modality, cfg.models[modality], tokenizer, max_seconds=config.data.max_seconds,
                      seed=config.seed + MODALITIES.index(modality))
    # The transform reads the tokenizer from the model directory, which does not exist yet.
    study_tokenizer_dir = study.path("tokenizer")
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, cfg.models[modality].learning_rate, cfg.warmup_steps, cfg.steps),
        weight_decay=cfg.weight_decay))
    graphdef, state = init_state(model, tx, trained=nnx.Param)
    letters = prompts.letter_token_ids(tokenizer, prompts.LETTERS[:study.num_options()])
    train_step = make_train_step(graphdef, tx, letters, mode="labels")
    dataset = study.dataset(modality, cfg.split, batch_size=cfg.batch_size, train=True, num_epochs=None,
                            seed=config.seed, tokenizer_dir=study_tokenizer_dir)
    inputs_of = study.model_inputs(modality)
    start, losses = time.perf_counter(), []
    for step, batch in zip(range(1, cfg.steps + 1), dataset):
        arrays, static = split_inputs(model, inputs_of(batch))
        state, metrics = train_step(state, place_batch({"inputs": arrays, "targets": ground_truth_targets(
            batch, len(letters))}, study.mesh), static)
        losses.append(float(metrics["loss"]))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"warm start of the {modality} model: loss {losses[-1]} at step {step}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = step / (time.perf_counter() - start)
            print(f"warm start {modality}: step {step}/{cfg.steps} loss {np.mean(losses[-cfg.log_every:]):.3f} "
                  f"{rate:.2f} steps/s ETA {(cfg.steps - step) / rate:.0f} s", flush=True)
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
