"""The pure LoRA distillation step: `train_step(state, batch) -> (state, metrics)`.

The model is split once into its graph definition, the LoRA parameters (trained) and
everything else (frozen); the state carries both so the step is a pure function of
(state, batch), jitted with the state donated. Only LoRA parameters get gradients and
optimizer state (AdamW, cosine schedule with warmup, global-norm clipping, optional
gradient accumulation through optax.MultiSteps).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from distill_jax.train.losses import distill_loss


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    total_steps: int = 100
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    accumulate_steps: int = 1  # micro-batches per optimizer update


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    if config.total_steps < 1 or not 0 <= config.warmup_steps < config.total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {config.warmup_steps}, {config.total_steps}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1),
                                                  config.total_steps)
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm),
                     optax.adamw(schedule, weight_decay=config.weight_decay))
    if config.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accumulate_steps)
    return tx


def init_state(model: nnx.Module, tx: optax.GradientTransformation, *, trained=nnx.LoRAParam):
    """(graphdef, state): state = {step, lora, opt, frozen}; "lora" holds the trained parameters:
    every nnx.LoRAParam by default, or e.g. every nnx.Param (the toy world's warm start)."""
    graphdef, lora, frozen = nnx.split(model, trained, ...)
    if not jax.tree.leaves(lora):
        raise ValueError("the model has no LoRA parameters: apply_lora before building the train state")
    return graphdef, {"step": jnp.zeros((), jnp.int32), "lora": lora, "opt": tx.init(lora), "frozen": frozen}


def merge_model(graphdef, state) -> nnx.Module:
    return nnx.merge(graphdef, state["lora"], state["frozen"])


def split_inputs(model: nnx.Module, inputs: dict) -> tuple[dict, tuple]:
    """A batch's model inputs -> (arrays, static items) for the step: models with
    `prepare_inputs` (Qwen2-VL) derive host-side arrays (M-RoPE positions) and static grids."""
    prepare = getattr(model, "prepare_inputs", None)
    arrays, static = prepare(inputs) if prepare is not None else (inputs, {})
    return arrays, tuple(sorted(static.items()))


def make_train_step(graphdef, tx: optax.GradientTransformation, letter_token_ids, *, mode: str = "labels",
                    temperature: float = 1.0):
    """A jitted `train_step(state, batch, static=()) -> (state, metrics)`.

    batch: {"inputs": the model's inputs (left-padded, answer at the last position),
            "targets": switch_closed, teacher_letter, teacher_logits, student_letter, weight}.
    static: hashable extra inputs (`split_inputs`); one program is compiled per value.
    Dropout is not supported: its RNG stream would live in the frozen state, which the step
    does not advance or checkpoint (use LoRA dropout 0; `distill` refuses other values).
    """
    letters = jnp.asarray(letter_token_ids, jnp.int32)

    def loss_fn(lora, frozen, batch, static):
        model = nnx.merge(graphdef, lora, frozen)
        hidden = model.hidden_states(**batch["inputs"], **dict(static))[:, -1]
        return distill_loss(model.logits(hidden), letters, batch["targets"], mode=mode, temperature=temperature)

    @partial(jax.jit, donate_argnums=0, static_argnums=2)
    def train_step(state, batch, static=()):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["lora"], state["frozen"], batch,
                                                                         static)
        updates, opt = tx.update(grads, state["opt"], state["lora"])
        lora = optax.apply_updates(state["lora"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "closed_fraction": parts["closed_fraction"]}
        return {"step": state["step"] + 1, "lora": lora, "opt": opt, "frozen": state["frozen"]}, metrics

    return train_step
