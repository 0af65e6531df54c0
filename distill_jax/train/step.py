"""The letter objective the LLM trainings share: `distill_objective(...) -> loss_fn` for the
trainer (`train.loop`).

A batch is complete (data_pipelines): the model's inputs plus, per clip, `switch_closed`,
`teacher_letter`, `teacher_logits`, `student_letter` and `valid` (0: a padding row, no loss).
The loss is `losses.distill_loss` at the answer (last) position; the toy warm start uses it
with every switch closed and the teacher's letter set to the pretraining letter, which makes
it plain cross-entropy.
"""
from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from distill_jax.train.losses import distill_loss

TARGET_KEYS = ("switch_closed", "teacher_letter", "teacher_logits", "student_letter")
BOOKKEEPING_KEYS = ("valid", "index", "label", "answer", "weight")


def plain_inputs(batch: dict, static: tuple) -> dict:
    """The model's call arguments of a batch whose other fields are the model's inputs as they are
    (Qwen2, Qwen2-Audio); transforms with their own packing give `model_inputs` instead."""
    inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS + BOOKKEEPING_KEYS}
    return {**inputs, **dict(static)}


def targets_of(batch: dict) -> dict:
    weight = batch["weight"] if "weight" in batch else batch["valid"]
    return {**{k: batch[k] for k in TARGET_KEYS}, "weight": weight.astype(jnp.float32)}


def distill_objective(letter_token_ids, *, mode: str = "labels", temperature: float = 1.0,
                      model_inputs: Callable[[dict, tuple], dict] = plain_inputs):
    """`loss_fn(model, batch, static) -> (loss, {"closed_fraction"})` for `train.loop`.

    Dropout is not supported: its RNG stream would live in the frozen state, which the step
    does not advance or checkpoint (use LoRA dropout 0; main refuses other values).
    """
    letters = jnp.asarray(letter_token_ids, jnp.int32)

    def loss_fn(model, batch, static):
        hidden = model.hidden_states(**model_inputs(batch, static))[:, -1]
        loss, parts = distill_loss(model.logits(hidden), letters, targets_of(batch), mode=mode,
                                   temperature=temperature)
        return loss, {"closed_fraction": parts["closed_fraction"]}

    return loss_fn
